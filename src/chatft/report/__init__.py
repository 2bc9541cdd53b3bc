"""The run report: one self-contained `report.html` per training run (`chatft report`, and the end of training).

In: a training run dir (job.yaml, metrics.jsonl, validation.jsonl, final/chatft_manifest.json) and optionally
eval output dirs (eval_results.json). Out: `RUN_DIR/report.html` (or the path `-o` names): the job, the data's
rows in/used/dropped, loss/lr/grad-norm/throughput/memory curves, the memory estimate against the measured peak,
the validations the manifest records and, for each eval dir given, its base/adapter/merged table and generations
side by side. The file has inline CSS and inline SVG only: no script, no stylesheet, font or image from anywhere,
so it opens offline and can be mailed. Torch-free, so `chatft report` is quick.

Modules:
  load.py    reading the run dir and eval dirs; what is not a run dir is refused (config_invalid)
  page.py    the document: job, data, curves, memory, validations
  evals.py   an eval's table and generations
  svg.py     the line charts and bars, drawn as SVG text
  markup.py  escaping, tables, the stylesheet
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from chatft.report.load import load_eval, load_run
from chatft.run_layout import REPORT_FILE

__all__ = ["write_report", "write_report_after_training"]


def write_report(run_dir: str | Path, eval_dirs: list[str | Path] = (), out: str | Path | None = None) -> Path:
    """Build the report and write it (atomically); returns its path. Refuses a path that is not a run dir."""
    from chatft.report.page import render

    run = load_run(run_dir)
    run.evals = [load_eval(path) for path in eval_dirs]
    target = Path(out) if out is not None else run.run_dir / REPORT_FILE
    if target.is_dir():
        target = target / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(render(run), encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_report_after_training(run_dir: str | Path) -> Path | None:
    """For the end of training (rank 0): write report.html; any failure is one `warning:` line, never an error,
    because a report must not fail a run that trained."""
    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 (the run's outcome does not depend on its report)
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        print(f"warning: report.html not written ({reason}); retry with `chatft report {run_dir}`",
              file=sys.stderr, flush=True)
        return None
    print(f"report: {path}", flush=True)
    return path
