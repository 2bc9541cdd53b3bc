"""Reading what run dirs and eval output dirs hold, for the report, and telling them apart by their content;
nothing here loads a model or torch.

In: training run dirs (`checkpoint.checkpoint_dir`: job.yaml, metrics.jsonl, validation.jsonl, final/ with
chatft_manifest.json; any of them may be missing while a run is under way or after it was stopped) and eval
output dirs (eval_results.json, or that file itself), in any order. A dir is a run when it has job.yaml of a
training step, metrics.jsonl or final/chatft_manifest.json; else an eval dir when it has eval_results.json.
Out: `RunRecord`s / `EvalRecord`s, or `ChatftError(config_invalid)` naming what a path is instead.
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


USAGE = ("pass training run dirs (checkpoint.checkpoint_dir: job.yaml of a training step, metrics.jsonl or "
         "final/chatft_manifest.json) and eval/model_eval output dirs (eval_results.json), in any order, e.g. "
         "`chatft report runs/tiny-peft runs/eval`; several run dirs make a comparison")


def is_training_run(path: Path) -> bool:
    """What tells a run dir apart: job.yaml of a training step, metrics.jsonl, or final/chatft_manifest.json."""
    return path.is_dir() and (_read_job(path / JOB_FILE).get("step") in TRAINING_STEPS
                              or (path / METRICS_FILE).is_file()
                              or artifacts.read_manifest(final_dir(path)) is not None)


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a training run dir; anything else is refused with what it is and what to pass instead."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ChatftError("config_invalid", f"{run_dir} is not a directory", USAGE)
    if not is_training_run(run_dir):
        raise ChatftError("config_invalid", f"{run_dir} is not a training run dir: {_what_it_is(run_dir)}", USAGE)
    return RunRecord(run_dir, _read_job(run_dir / JOB_FILE), artifacts.read_manifest(final_dir(run_dir)),
                     by_step(read_jsonl(run_dir / METRICS_FILE)), by_step(read_jsonl(run_dir / VALIDATION_FILE)))


def _what_it_is(path: Path) -> str:
    step = _read_job(path / JOB_FILE).get("step")
    if _eval_file(path) is not None:
        return f"an eval output dir ({EVAL_RESULTS}), not a training run"
    if step:
        return f"the output of {step}, neither a training run nor an eval's output"
    return f"no job.yaml of a training step, no metrics.jsonl, no final/chatft_manifest.json and no {EVAL_RESULTS}"


def load_eval(path: str | Path) -> EvalRecord:
    """Read an eval output dir (or its eval_results.json)."""
    path = Path(path)
    found = _eval_file(path)
    if found is None:
        raise ChatftError("config_invalid", f"{path} has no {EVAL_RESULTS}", USAGE)
    hint = "pass the output_dir of `chatft run eval/model_eval` (it holds eval_results.json)"
    try:
        results = json.loads(found.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChatftError("config_invalid", f"{found} is not valid JSON ({exc})", hint) from None
    if not isinstance(results, dict) or not isinstance(results.get("targets"), dict):
        raise ChatftError("config_invalid", f"{found} has no `targets`: not written by eval/model_eval", hint)
    return EvalRecord(found, results)


def load_dirs(paths: list[str | Path]) -> tuple[list[RunRecord], list[EvalRecord]]:
    """Sort the given dirs by their content into training runs and eval outputs (a dir that is both a run and
    holds eval_results.json counts as a run); refuses a dir that is neither, one given twice, or no run at all."""
    runs: list[RunRecord] = []
    evals: list[EvalRecord] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ChatftError("config_invalid", f"{path} does not exist", USAGE)
        key = path.resolve()
        if key in seen:
            raise ChatftError("config_invalid", f"{path} is given twice", "name each run or eval dir once")
        seen.add(key)
        if is_training_run(path):
            runs.append(load_run(path))
        elif _eval_file(path) is not None:
            evals.append(load_eval(path))
        else:
            raise ChatftError("config_invalid", f"{path} is not a training run dir nor an eval output dir: "
                              f"{_what_it_is(path)}", USAGE)
    if not runs:
        raise ChatftError("config_invalid", f"no training run dir among {', '.join(map(str, paths))}", USAGE)
    return runs, evals
