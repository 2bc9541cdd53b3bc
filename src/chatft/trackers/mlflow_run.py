"""MLflow: one run per `chatft run`, from AutoModel's `mlflow:` section, through `MlflowClient` (no global active
run that other code could end or reuse).

Keys: tracking_uri (else MLFLOW_TRACKING_URI), experiment_name (created when missing, with artifact_location;
unset: MLflow's Default experiment), run_name (unset or empty: the run dir's name), tags (secret-named ones
masked), description (the run's note). The resolved config goes in twice: flattened into params
(`optimizer.lr`, ...) to filter and compare runs by, and whole as the artifact `config.yaml`. Metrics are named
`train/<key>` and `validation/<key>` at each optimizer step; the final artifact's path is the tag
`final_artifact`.

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

NOTE_TAG = "mlflow.note.content"  # MLflow's UI shows this tag as the run's description


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"optimizer": {"lr": 1e-4}}` -> `{"optimizer.lr": "0.0001"}`; lists and nulls as JSON."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return params


def in_batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class MlflowRun:
    name = "mlflow"

    def __init__(self, section: MlflowSection, tracking_uri: str, run_dir: Path) -> None:
        self.section, self.tracking_uri, self.run_dir = section, tracking_uri, run_dir
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        from chatft.run import to_yaml

        section = self.section
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        name = section.experiment_name or "Default"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name, artifact_location=section.artifact_location))
        tags = {**redact(section.tags or {}), **({NOTE_TAG: section.description} if section.description else {})}
        run = self.client.create_run(experiment_id, run_name=section.run_name or self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        # MLflow caps a param's value; the whole config is the artifact config.yaml
        params = [Param(key, value[:MAX_PARAM_VAL_LENGTH]) for key, value in flat_params(config).items()]
        for batch in in_batches(params, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)
        self.client.log_text(self.run_id, to_yaml(config), "config.yaml")

    def where(self) -> str:
        return f"run {self.run_id} at {self.tracking_uri}"

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
