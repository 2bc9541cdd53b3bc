"""Several training runs in one page (`chatft report RUN_DIR RUN_DIR ...`): their curves overlaid, one colour per
run with a legend, and their settings side by side, those that differ highlighted.

In: `RunRecord`s (load.py) and any eval records given with them. Out: the text of one self-contained HTML document.
Settings are every key of each run's resolved config, flattened to dotted names, plus what the manifests say of the
base model, tokenizer and data (fingerprints and sha256), so two runs on different data with the same path differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from chatft.report.evals import eval_section
from chatft.report.load import RunRecord
from chatft.report.markup import code, document, esc, note, num, section, table
from chatft.report.page import status_badge, step_points
from chatft.report.svg import Series, line_chart

COLOURS = 8  # the stylesheet's series classes s0..s7; more runs than that reuse them in turn
ABSENT = object()  # a key one run's config does not have


def run_labels(runs: list[RunRecord]) -> list[str]:
    """Each run's dir name, or where names repeat (runs/a/run, runs/b/run) its path below the runs' common folder."""
    names = [run.run_dir.resolve().name for run in runs]
    if len(set(names)) == len(names):
        return names
    paths = [run.run_dir.resolve() for run in runs]
    common = Path(os.path.commonpath(paths))
    return [str(path.relative_to(common)) or path.name for path in paths]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.key: leaf}; lists are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return flat


def _recorded(run: RunRecord) -> dict[str, Any]:
    """What the manifest records of the run's inputs, under names that do not clash with config keys."""
    manifest = run.manifest or {}
    data = manifest.get("data") or {}
    return {
        "manifest: base model fingerprint": (manifest.get("base_model") or {}).get("fingerprint", ABSENT),
        "manifest: tokenizer fingerprint": (manifest.get("tokenizer") or {}).get("fingerprint", ABSENT),
        "manifest: chat template sha256": (manifest.get("tokenizer") or {}).get("chat_template_sha256", ABSENT),
        "manifest: train data sha256": (data.get("train") or {}).get("sha256", ABSENT),
        "manifest: validation data sha256": (data.get("validation") or {}).get("sha256", ABSENT),
    }


def _cell(value: Any) -> str:
    if value is ABSENT:
        return '<span class="sub">absent</span>'
    return code(value if isinstance(value, str) else json.dumps(value))


def settings_tables(runs: list[RunRecord], labels: list[str]) -> str:
    """The settings that differ, then all of them (folded), the differing rows highlighted in both."""
    flats = [{**_recorded(run), **flatten(run.config)} for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    rows, differing = [], []
    for key in keys:
        values = [flat.get(key, ABSENT) for flat in flats]
        if all(value is ABSENT for value in values):
            continue
        differs = len({json.dumps(v, sort_keys=True, default=str) if v is not ABSENT else "\0" for v in values}) > 1
        row = f'<tr{" class=differs" if differs else ""}><th>{esc(key)}</th>' \
              + "".join(f"<td>{_cell(v)}</td>" for v in values) + "</tr>"
        rows.append(row)
        if differs:
            differing.append(row)
    head = "<thead><tr><th>setting</th>" + "".join(f"<th>{esc(label)}</th>" for label in labels) + "</tr></thead>"
    if differing:
        first = f'<table class="diff">{head}<tbody>{"".join(differing)}</tbody></table>'
    else:
        first = note("no setting differs: the runs share their resolved config and recorded inputs")
    return (f"<h3>{len(differing)} setting(s) differ</h3>{first}"
            f"<details><summary>all {len(rows)} settings</summary>"
            f'<table class="diff">{head}<tbody>{"".join(rows)}</tbody></table></details>')


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool)]
    return values[-1] if values else None


def results_table(runs: list[RunRecord], labels: list[str]) -> str:
    """How each run went, in columns: status, final and best losses, tokens, time, memory, rows used."""
    def best_validation(run: RunRecord) -> str:
        losses = [(row["loss"], row["step"]) for row in run.validation if isinstance(row.get("loss"), (int, float))]
        if not losses:
            return "-"
        loss, step = min(losses)
        return f"{num(loss)} (step {num(step)})"

    def rows_used(run: RunRecord) -> str:
        train = ((run.manifest or {}).get("data") or {}).get("train") or {}
        return f"{num(train.get('rows_used'))} of {num(train.get('rows_in'))}" if train else "-"

    lines = [
        ("status", [status_badge(run) for run in runs]),
        ("run dir", [code(run.run_dir.resolve()) for run in runs]),
        ("final train loss", [num(run.run_metrics.get("train_loss", _last(run.metrics, "loss"))) for run in runs]),
        ("final validation loss", [num(run.run_metrics.get("val_loss", _last(run.validation, "loss")))
                                   for run in runs]),
        ("best validation loss", [best_validation(run) for run in runs]),
        ("tokens", [num(run.run_metrics.get("tokens")) for run in runs]),
        ("time (s)", [num(run.run_metrics.get("elapsed_s"), 1) for run in runs]),
        ("peak memory (MB)", [num(run.run_metrics.get("peak_mem_mb", _last(run.metrics, "peak_mem_mb")), 1)
                              for run in runs]),
        ("memory estimate (MB)", [num(run.run_metrics.get("memory_estimate_mb"), 1) for run in runs]),
        ("train rows used", [rows_used(run) for run in runs]),
    ]
    return table(["", *labels], [[esc(name), *cells] for name, cells in lines], numeric=range(1, len(runs) + 1))


def overlaid_curves(runs: list[RunRecord], labels: list[str]) -> str:
    """One chart per measure, one line per run in the run's colour."""
    def chart(title: str, y_label: str, key: str, validation: bool = False) -> str:
        series = [Series(label, step_points(run.validation if validation else run.metrics, key), f"s{i % COLOURS}",
                         markers_only=validation) for i, (run, label) in enumerate(zip(runs, labels))]
        return line_chart(title, series, y_label=y_label)

    charts = [chart("train loss", "loss per supervised token", "loss"),
              chart("validation loss", "loss per supervised token", "loss", validation=True),
              chart("learning rate", "lr", "lr"),
              chart("gradient norm", "norm before clipping", "grad_norm"),
              chart("throughput", "tokens/s", "tokens_per_s"),
              chart("peak memory", "MB", "peak_mem_mb"),
              chart("validation token accuracy", "share of tokens", "token_accuracy", validation=True)]
    charts = [c for c in charts if c]
    if not charts:
        return note("no run has logged a step yet")
    return (f'<div class="charts">{"".join(charts)}</div>'
            + note("hover a chart for every run's value at a step, drag across it to zoom, double-click to zoom out"))


def render_comparison(runs: list[RunRecord], evals: list[Any]) -> str:
    labels = run_labels(runs)
    keys = "".join(f'<span class="key s{i % COLOURS}">{esc(label)}</span>' for i, label in enumerate(labels))
    sections = [("results", "Results"), ("settings", "Settings"), ("curves", "Curves")]
    evals_html = "".join(eval_section(record) for record in evals)
    if evals_html:
        sections.append(("evals", "Evaluation"))
    links = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in sections)
    header = (f"<header><h1>chatft comparison: {esc(' vs '.join(labels))}</h1>"
              f'<p class="sub">{len(runs)} training runs {keys}</p><nav>{links}</nav></header>')
    body = (header + section("results", "Results", results_table(runs, labels))
            + section("settings", "Settings", settings_tables(runs, labels))
            + section("curves", "Curves", overlaid_curves(runs, labels))
            + (section("evals", "Evaluation", evals_html) if evals_html else "")
            + note(f"each run's own report.html ({code('chatft report RUN_DIR')}) has its data, mask preview and "
                   "memory"))
    return document(f"chatft comparison: {' vs '.join(labels)}", body)
