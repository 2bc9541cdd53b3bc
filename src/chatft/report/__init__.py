"""The run report: one self-contained `report.html` per training run (`chatft report`, and the end of training),
and a comparison page for several runs.

In: training run dirs (job.yaml, metrics.jsonl, validation.jsonl, final/chatft_manifest.json) and optionally eval
output dirs (eval_results.json), told apart by their content. Out, for one run: `RUN_DIR/report.html` (or the path
`-o` names): the job, the data's rows in/used/dropped, a mask preview of its first rows, loss/lr/grad-norm/
throughput/memory curves, the memory estimate against the measured peak, the validations the manifest records
and, for each eval dir given, its base/adapter/merged table and generations side by side. For several runs:
`compare.html` in the current directory (or `-o`): their curves overlaid and their settings side by side, those
that differ highlighted. Either file has inline CSS, SVG and script only: nothing is fetched from anywhere, so it
opens offline and can be mailed. Only the mask preview loads a tokenizer (and with it torch).

Modules:
  load.py          reading run dirs and eval dirs, telling them apart; anything else is refused (config_invalid)
  page.py          one run's document: job, data, curves, memory, validations
  mask_preview.py  the first training rows with their supervised tokens, made by chatft's own pipeline
  compare.py       several runs: overlaid curves, settings side by side
  evals.py         an eval's table and generations
  svg.py           the line charts and bars, drawn as SVG text, with their points as JSON for charts.js
  charts.js        hover values and drag-to-zoom, inlined into the page
  markup.py        escaping, tables, the stylesheet, the document around a body
"""

from __future__ import annotations

import os
from pathlib import Path

from chatft import console
from chatft.report.compare import render_comparison
from chatft.report.load import RunRecord, load_dirs, load_eval, load_run
from chatft.report.page import render
from chatft.run_layout import REPORT_FILE

__all__ = ["COMPARE_FILE", "report_dirs", "write_report", "write_report_after_training"]

COMPARE_FILE = "compare.html"  # several runs compared, written in the current directory unless -o says where


def _write(target: Path, default_name: str, text: str) -> Path:
    """Write atomically; a target that is a folder gets `default_name` inside it."""
    if target.is_dir():
        target = target / default_name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def _write_run(run: RunRecord, out: str | Path | None) -> Path:
    return _write(Path(out) if out is not None else run.run_dir / REPORT_FILE, REPORT_FILE, render(run))


def write_report(run_dir: str | Path, eval_dirs: list[str | Path] = (), out: str | Path | None = None) -> Path:
    """Build one run's report and write it; returns its path. Refuses a path that is not a run dir."""
    run = load_run(run_dir)
    run.evals = [load_eval(path) for path in eval_dirs]
    return _write_run(run, out)


def report_dirs(paths: list[str | Path], out: str | Path | None = None) -> Path:
    """`chatft report DIR...`: run dirs and eval dirs in any order. One run: its report.html; several: a comparison."""
    runs, evals = load_dirs(paths)
    if len(runs) == 1:
        runs[0].evals = evals
        return _write_run(runs[0], out)
    return _write(Path(out) if out is not None else Path.cwd() / COMPARE_FILE, COMPARE_FILE,
                  render_comparison(runs, evals))


def write_report_after_training(run_dir: str | Path) -> Path | None:
    """For the end of training (rank 0): write report.html; any failure is one `warning:` line, never an error,
    because a report must not fail a run that trained."""
    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 (the run's outcome does not depend on its report)
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        console.warning(f"report.html not written ({reason}); retry with `chatft report {run_dir}`")
        return None
    console.result(f"report: {path}")
    return path
