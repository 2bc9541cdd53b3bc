"""MLflow: one run per `chatft run`, from AutoModel's `mlflow:` section, through `MlflowClient` (no global active
run that other code could end or reuse).

Keys: tracking_uri (else MLFLOW_TRACKING_URI), experiment_name (created when missing, with artifact_location;
unset: MLflow's Default experiment), run_name (unset or empty: the run dir's name), tags (secret-named ones
masked), description (the run's note), flatten_depth (how deep the config is split into params), resume
(training only). The resolved config goes in twice: flattened into params (`optimizer.lr`, ...) to filter and
compare runs by, and whole as the artifact `config.yaml`. Metrics are named `train/<key>` and `validation/<key>`
at each optimizer step (an eval's: `eval/<target>/<key>`); the final artifact's path is the tag `final_artifact`.

A training run resumed from its own checkpoint continues its MLflow run when `resume` is true (AutoModel's
default; `continuation` keeps the run id): the run is set RUNNING again, its params stay those of the first
attempt (MLflow never changes a param) and the resumed attempt's config is the artifact
`config.resumed-step_N.yaml`. MLflow keeps every value logged, so a step the interrupted attempt logged after
the checkpoint has two values in the metric's history; the charts show both.

`chatft[mlflow]` installs mlflow-skinny, the tracking client without the server: enough for a tracking server
(`http(s)://`, `databricks`) and for a local `file:` store, which MLflow 3 opens only with
MLFLOW_ALLOW_FILE_STORE=true. A `sqlite:` store needs the full `mlflow` package.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from chatft.config.schema import MlflowSection
from chatft.config.secrets import redact
from chatft.trackers.base import scalars
from chatft.config.loader import to_yaml

NOTE_TAG = "mlflow.note.content"  # MLflow's UI shows this tag as the run's description


def flat_params(config: dict[str, Any], max_depth: int | None = None, prefix: str = "") -> dict[str, str]:
    """`{"optimizer": {"lr": 1e-4}}` -> `{"optimizer.lr": "0.0001"}`; lists and nulls as JSON. Sections deeper
    than `max_depth` levels (None: no limit) stay one param holding their JSON, as AutoModel's flatten_depth."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and (max_depth is None or max_depth > 0):
            params.update(flat_params(value, None if max_depth is None else max_depth - 1, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return params


def in_batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class MlflowRun:
    name = "mlflow"

    def __init__(self, section: MlflowSection, tracking_uri: str, run_dir: Path, reopen: str | None = None,
                 resumed_at: int | None = None) -> None:
        self.section, self.tracking_uri, self.run_dir = section, tracking_uri, run_dir
        self.reopen, self.resumed_at = reopen, resumed_at  # the run to continue, and the step training resumed at
        self.client: Any = None
        self.run_id: str | None = None
        self.continued = False
        self.lost: str | None = None  # the run to continue, when the store no longer has it

    def start(self, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        section = self.section
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.reopen is not None:
            try:
                self.client.get_run(self.reopen)
            except MlflowException:  # deleted, or another store: a new run, and `where` says so
                self.lost, self.reopen = self.reopen, None
            else:
                self.run_id, self.continued = self.reopen, True
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.log_text(self.run_id, to_yaml(config), f"config.resumed-step_{self.resumed_at}.yaml")
                return
        name = section.experiment_name or "Default"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name, artifact_location=section.artifact_location))
        tags = {**redact(section.tags or {}), **({NOTE_TAG: section.description} if section.description else {})}
        run = self.client.create_run(experiment_id, run_name=section.run_name or self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        # MLflow caps a param's value; the whole config is the artifact config.yaml
        params = [Param(key, value[:MAX_PARAM_VAL_LENGTH])
                  for key, value in flat_params(config, section.flatten_depth).items()]
        for batch in in_batches(params, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)
        self.client.log_text(self.run_id, to_yaml(config), "config.yaml")

    def where(self) -> str:
        continued = f", continued after step {self.resumed_at}" if self.continued else ""
        lost = f", a new run: the store no longer has run {self.lost}" if self.lost else ""
        return f"run {self.run_id} at {self.tracking_uri}{continued}{lost}"

    def log(self, prefix: str, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}/{key}", value, now, row["step"]) for key, value in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def artifact(self, path: Path) -> None:
        self.client.set_tag(self.run_id, "final_artifact", str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def identity(self) -> dict[str, Any] | None:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri} if self.run_id is not None else None
