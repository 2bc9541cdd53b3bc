"""Reading what a run dir (and an eval output dir) holds, for the report; nothing here loads a model or torch.

In: a training run dir (`checkpoint.checkpoint_dir`: job.yaml, metrics.jsonl, validation.jsonl, final/ with
chatft_manifest.json; any of them may be missing while a run is under way or after it was stopped) and eval
output dirs (eval_results.json, or that file itself). Out: a `RunRecord` / `EvalRecord`, or
`ChatftError(config_invalid)` naming what the path is instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft import artifacts
from chatft.errors import ChatftError
from chatft.run_layout import JOB_FILE, METRICS_FILE, VALIDATION_FILE, final_dir

EVAL_RESULTS = "eval_results.json"  # chatft.eval.results.RESULTS_JSON, spelt here so the report imports no eval
TRAINING_STEPS = ("sft/automodel", "peft/automodel")


@dataclass
class EvalRecord:
    path: Path  # the eval_results.json read
    results: dict[str, Any]


@dataclass
class RunRecord:
    run_dir: Path
    job: dict[str, Any]  # job.yaml ({} when absent or unreadable)
    manifest: dict[str, Any] | None  # final/chatft_manifest.json, once the run has finished
    metrics: list[dict[str, Any]]  # metrics.jsonl, one row per step (a resumed step's last row wins)
    validation: list[dict[str, Any]]
    evals: list[EvalRecord] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config: the manifest's, else job.yaml's."""
        if self.manifest and isinstance(self.manifest.get("config"), dict):
            return self.manifest["config"]
        resolved = self.job.get("resolved")
        return resolved if isinstance(resolved, dict) else {}

    @property
    def run_metrics(self) -> dict[str, Any]:
        """The manifest's `metrics` (how the run ran), {} before the run finished."""
        return (self.manifest or {}).get("metrics") or {}

    @property
    def finished(self) -> bool:
        return self.manifest is not None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a line that does not parse (a row still being written) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step, in step order; a step written twice (a resumed run repeats it) keeps its last row."""
    kept: dict[float, dict[str, Any]] = {}
    for row in rows:
        step = row.get("step")
        if isinstance(step, (int, float)) and math.isfinite(step):
            kept[step] = row
    return [kept[step] for step in sorted(kept)]


def _read_job(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        job = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return job if isinstance(job, dict) else {}


def _eval_file(path: Path) -> Path | None:
    if path.is_file() and path.name == EVAL_RESULTS:
        return path
    if path.is_dir() and (path / EVAL_RESULTS).is_file():
        return path / EVAL_RESULTS
    return None


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a training run dir; anything else is refused with what it is and what to pass instead."""
    run_dir = Path(run_dir)
    usage = "pass the run's checkpoint.checkpoint_dir (the dir with job.yaml and metrics.jsonl), e.g. " \
            "`chatft report runs/tiny-peft`; eval output dirs come after it: `chatft report RUN_DIR EVAL_DIR`"
    if not run_dir.is_dir():
        raise ChatftError("config_invalid", f"{run_dir} is not a directory", usage)
    job = _read_job(run_dir / JOB_FILE)
    manifest = artifacts.read_manifest(final_dir(run_dir))
    metrics_path = run_dir / METRICS_FILE
    if job.get("step") not in TRAINING_STEPS and not metrics_path.is_file() and manifest is None:
        what = "no job.yaml of a training step, no metrics.jsonl and no final/chatft_manifest.json"
        if _eval_file(run_dir) is not None:
            what = f"an eval output dir ({EVAL_RESULTS}), not a training run"
        elif job.get("step"):
            what = f"the output of {job['step']}, not a training run"
        raise ChatftError("config_invalid", f"{run_dir} is not a training run dir: {what}", usage)
    return RunRecord(run_dir, job, manifest, by_step(read_jsonl(metrics_path)),
                     by_step(read_jsonl(run_dir / VALIDATION_FILE)))


def load_eval(path: str | Path) -> EvalRecord:
    """Read an eval output dir (or its eval_results.json)."""
    path = Path(path)
    found = _eval_file(path)
    hint = "pass the output_dir of `chatft run eval/model_eval` (it holds eval_results.json) after the run dir"
    if found is None:
        if path.is_dir() and (path / METRICS_FILE).is_file():
            raise ChatftError("not_available_yet", f"{path} is a training run dir: comparing several runs in one "
                              "report is not available yet", "report each run on its own: `chatft report RUN_DIR`")
        raise ChatftError("config_invalid", f"{path} has no {EVAL_RESULTS}", hint)
    try:
        results = json.loads(found.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChatftError("config_invalid", f"{found} is not valid JSON ({exc})", hint) from None
    if not isinstance(results, dict) or not isinstance(results.get("targets"), dict):
        raise ChatftError("config_invalid", f"{found} has no `targets`: not written by eval/model_eval", hint)
    return EvalRecord(found, results)
