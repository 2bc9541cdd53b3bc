"""The run report's page: the job, the data, the mask preview, the curves, memory, recorded validations and eval
results.

In: a `RunRecord` (load.py). Out: the text of one self-contained HTML document: inline CSS, SVG and script, no
URL. A run under way or stopped (no final/ yet) gets what its job.yaml and metrics.jsonl hold.
"""

from __future__ import annotations

import datetime as dt
import shlex
from typing import Any

from chatft import __version__
from chatft.report.evals import eval_section
from chatft.report.load import RunRecord
from chatft.report.mask_preview import mask_preview, mask_section
from chatft.report.markup import code, document, esc, kv_table, note, num, section, table
from chatft.report.svg import Series, bars, line_chart


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def status_badge(run: RunRecord) -> str:
    max_steps = _get(run.config, "step_scheduler.max_steps")
    last = run.metrics[-1]["step"] if run.metrics else 0
    if run.finished:
        return f'<span class="badge">finished: {num(run.run_metrics.get("steps", last))} steps</span>'
    of = f" of {num(max_steps)}" if max_steps else ""
    return f'<span class="badge warn">no final/ yet (under way or stopped): {num(last)}{of} steps logged</span>'


def _header(run: RunRecord, sections: list[tuple[str, str]]) -> str:
    job, manifest = run.job, run.manifest or {}
    argv = job.get("argv")
    command = code(shlex.join(["chatft", *map(str, argv)])) if isinstance(argv, list) else None
    links = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in sections)
    return (f"<header><h1>chatft run report: {esc(run.run_dir.name or run.run_dir)}</h1>"
            f'<p class="sub">{esc(job.get("step") or manifest.get("kind") or "training run")} · '
            f"{code(run.run_dir.resolve())} · {status_badge(run)}</p>"
            + (f'<p class="sub">command: {command}</p>' if command else "") + f"<nav>{links}</nav></header>")


def _precision(run: RunRecord) -> str | None:
    precision = run.run_metrics.get("precision")
    if isinstance(precision, dict):
        return ", ".join(f"{esc(k.replace('_', ' '))} {code(v)}" for k, v in precision.items())
    dtype = _get(run.config, "model.torch_dtype")
    return code(dtype) if dtype else None


def _lora(run: RunRecord) -> str | None:
    lora = (run.manifest or {}).get("lora")
    peft = _get(run.config, "peft") if str(run.job.get("step") or "").startswith("peft/") else None
    if isinstance(lora, dict):
        r, alpha, dropout, targets = lora.get("r"), lora.get("alpha"), lora.get("dropout"), lora.get("target_modules")
    elif isinstance(peft, dict):
        r, alpha, dropout = peft.get("dim"), peft.get("alpha"), peft.get("dropout")
        targets = peft.get("target_modules") or ("all linear layers" if peft.get("match_all_linear") else None)
    else:
        return None
    names = ", ".join(map(str, targets)) if isinstance(targets, list) else targets
    experts = lora.get("target_parameters") if isinstance(lora, dict) else None  # stacked expert weights (MoE)
    if experts:
        names = f"{names or '-'}; expert weights {', '.join(map(str, experts))}"
    return f"rank {num(r)}, alpha {num(alpha, 2)}, dropout {num(dropout, 2)}; targets {esc(names or '-')}"


def _batch(run: RunRecord, world: int) -> str | None:
    sched = _get(run.config, "step_scheduler") or {}
    glob, local = sched.get("global_batch_size"), sched.get("local_batch_size")
    if glob is None:
        return None
    text = f"{num(glob)} rows per step"
    if local:
        accumulation = max(glob // (local * world), 1)
        text += f" = {num(local)} per micro-batch × {num(world)} process(es) × {num(accumulation)} accumulation"
    limits = [f"max_steps {num(sched['max_steps'])}" if sched.get("max_steps") else None,
              f"num_epochs {num(sched['num_epochs'])}" if sched.get("num_epochs") else None]
    return text + "; " + ", ".join(x for x in limits if x) if any(limits) else text


def job_section(run: RunRecord) -> str:
    cfg, metrics, manifest = run.config, run.run_metrics, run.manifest or {}
    base = manifest.get("base_model") or {}
    tokenizer = manifest.get("tokenizer") or {}
    world = metrics.get("world_size") or 1
    spread = f"{num(world)}"
    if metrics.get("world_size"):
        spread += f" ({num(metrics.get('nodes'))} node(s), {esc(metrics.get('strategy'))}, " \
                  f"{esc(metrics.get('launcher'))})"
    opt, sched = _get(cfg, "optimizer") or {}, _get(cfg, "lr_scheduler") or {}
    optimizer = None
    if opt:
        optimizer = (f"lr {num(opt.get('lr'), 6)}, {esc(sched.get('lr_decay_style', '-'))} decay, warmup "
                     f"{num(sched.get('lr_warmup_steps'))} steps, weight decay {num(opt.get('weight_decay'))}, "
                     f"clip {num(_get(cfg, 'clip_grad_norm.max_norm'), 2)}")
    seq = _get(cfg, "dataset.seq_length")
    layout = []
    if metrics.get("padding_free") is not None:
        layout.append("padding-free" if metrics["padding_free"] else "padded")
    if _get(cfg, "packed_sequence.packed_sequence_size"):
        layout.append(f"packed to {num(_get(cfg, 'packed_sequence.packed_sequence_size'))}")
    result = None
    if run.finished:
        result = (f"train loss {num(metrics.get('train_loss'))}, validation loss {num(metrics.get('val_loss'))}, "
                  f"{num(metrics.get('tokens'))} tokens in {num(metrics.get('elapsed_s'), 1)} s")
    rows = [
        ("step", code(run.job.get("step") or manifest.get("kind", "-"))),
        ("created", esc(run.job.get("created") or manifest.get("created") or "-")),
        ("base model", code(base.get("name_or_path") or _get(cfg, "model.pretrained_model_name_or_path") or "-")
         + (f" revision {code(base['revision'])}" if base.get("revision") else "")),
        ("base fingerprint", code(base["fingerprint"]) if base.get("fingerprint") else None),
        ("tokenizer", f"fingerprint {code(tokenizer.get('fingerprint'))}, chat template sha256 "
                      f"{code(tokenizer.get('chat_template_sha256'))}" if tokenizer else None),
        ("batch", _batch(run, world)),
        ("seq length", f"{num(seq)}" + (f" ({', '.join(layout)})" if layout else "") if seq else None),
        ("precision", _precision(run)),
        ("LoRA", _lora(run)),
        ("optimizer", optimizer),
        ("world size", spread),
        ("device", esc(", ".join(f"{k} {metrics[k]}" for k in ("device", "attention", "loss_head",
                                                                "activation_checkpointing") if metrics.get(k)))
         or None),
        ("loss scaling", f"on, {num(metrics.get('skipped_steps'))} skipped step(s)" if metrics.get("loss_scaling")
         else None),
        ("resumed", esc("; ".join(f"at step {r.get('step')} from {r.get('from')}" for r in metrics["resumes"]))
         if metrics.get("resumes") else None),
        ("result", result),
    ]
    return section("job", "Job", kv_table(rows))


def data_section(run: RunRecord) -> str:
    data = (run.manifest or {}).get("data") or {}
    rows = []
    for split, key in (("train", "dataset"), ("validation", "validation_dataset")):
        record = data.get(split)
        if not isinstance(record, dict):
            path = _get(run.config, f"{key}.path_or_dataset_id")
            if path:
                rows.append([esc(split), code(path), "-", "-", "-", "-", "-", "-", "-"])
            continue
        dropped = record.get("dropped_by_reason") or {}
        dropped_html = ", ".join(f"{esc(reason)} {num(n)}" for reason, n in dropped.items()) or "none"
        lengths = record.get("token_length_quantiles") or {}
        length_html = " / ".join(f"{num(lengths.get(q))}" for q in ("p50", "p90", "max")) if lengths else "-"
        rows.append([esc(split), code(record.get("path")), code(record.get("sha256") or "unknown"),
                     num(record.get("rows_in")), num(record.get("rows_used")), dropped_html,
                     num(record.get("truncated")),
                     f"{num(record.get('supervised_tokens'))} / {num(record.get('total_tokens'))}", length_html])
    if not rows:
        return section("data", "Data", note("no data recorded yet"))
    body = table(["split", "path", "sha256", "rows in", "rows used", "dropped by reason", "truncated",
                  "supervised / total tokens", "tokens p50 / p90 / max"], rows, numeric=(3, 4, 6, 7, 8))
    if not data:
        body += note("row counts come with final/chatft_manifest.json, when the run finishes")
    return section("data", "Data", body)


def step_points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) for the rows that have a number under `key`."""
    return [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))
            and not isinstance(row.get(key), bool)]


def curves_section(run: RunRecord) -> str:
    train, val = run.metrics, run.validation
    estimate = run.run_metrics.get("memory_estimate_mb")
    charts = [
        line_chart("loss", [Series("train loss", step_points(train, "loss"), "s0"),
                            Series("validation loss", step_points(val, "loss"), "s1", markers_only=True)],
                   y_label="loss per supervised token"),
        line_chart("learning rate", [Series("lr", step_points(train, "lr"), "s2")], y_label="lr"),
        line_chart("gradient norm", [Series("grad_norm", step_points(train, "grad_norm"), "s3")],
                   y_label="norm before clipping"),
        line_chart("throughput", [Series("tokens/s", step_points(train, "tokens_per_s"), "s0")], y_label="tokens/s"),
        line_chart("peak memory", [Series("peak MB", step_points(train, "peak_mem_mb"), "s1")], y_label="MB",
                   hlines=[(estimate, "estimate")] if isinstance(estimate, (int, float)) else []),
        line_chart("validation token accuracy", [Series("token accuracy", step_points(val, "token_accuracy"), "s1",
                                                        markers_only=True)], y_label="share of tokens"),
    ]
    charts = [chart for chart in charts if chart]
    if not charts:
        return section("curves", "Curves", note("no step logged yet (metrics.jsonl is empty)"))
    return section("curves", "Curves", f'<div class="charts">{"".join(charts)}</div>'
                   + note(f"{len(train)} step(s) from metrics.jsonl, {len(val)} validation(s) from "
                          "validation.jsonl; hover a chart for its values, drag across it to zoom, double-click to "
                          "zoom out"))


def memory_section(run: RunRecord) -> str:
    metrics = run.run_metrics
    estimate = metrics.get("memory_estimate_mb")
    peak = metrics.get("peak_mem_mb")
    if peak is None and run.metrics:
        peaks = [row["peak_mem_mb"] for row in run.metrics if isinstance(row.get("peak_mem_mb"), (int, float))]
        peak = max(peaks) if peaks else None
    if estimate is None and peak is None:
        return section("memory", "Memory", note("no memory recorded yet"))
    chart = bars([("estimate", estimate, "s0"), ("measured peak", peak, "s1")], "MB")
    verdict = ""
    if estimate and peak:
        ratio = peak / estimate
        css = "" if ratio <= 1.0 else ("warn" if ratio <= 1.25 else "bad")
        verdict = (f'<p><span class="badge {css}">peak is {ratio:.0%} of the estimate</span> on '
                   f"{esc(metrics.get('device', 'the device'))}</p>")
    return section("memory", "Memory", chart + verdict)


def validations_section(run: RunRecord) -> str:
    records = [r for r in (run.manifest or {}).get("validations") or [] if isinstance(r, dict)]
    if not records:
        return ""
    rows = [[esc(r.get("time", "-")), esc(r.get("target", "-")), code(r.get("dataset", "-")),
             code(str(r.get("dataset_sha256") or "")[:12]), num(r.get("rows")),
             num((r.get("metrics") or {}).get("loss")), num((r.get("metrics") or {}).get("perplexity"), 2),
             num((r.get("metrics") or {}).get("token_accuracy")), code(r.get("eval_results", "-"))]
            for r in records]
    return section("validations", "Validations recorded in the manifest",
                   table(["time", "target", "dataset", "sha256", "rows", "loss", "perplexity", "token accuracy",
                          "eval results"], rows, numeric=(4, 5, 6, 7))
                   + note("pass an eval's output dir to `chatft report RUN_DIR EVAL_DIR` for its table and "
                          "generations"))


def _footer(run: RunRecord) -> str:
    versions = (run.manifest or {}).get("versions") or run.job.get("versions") or {}
    listed = ", ".join(f"{esc(k)} {esc(v)}" for k, v in versions.items()) if isinstance(versions, dict) else ""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return (f"<footer>written by chatft {esc(__version__)} at {esc(now)}"
            + (f"; the run used {listed}" if listed else "") + "</footer>")


def render(run: RunRecord) -> str:
    """The whole document."""
    sections = [("job", "Job"), ("data", "Data"), ("masks", "Masks"), ("curves", "Curves"), ("memory", "Memory")]
    validations = validations_section(run)
    if validations:
        sections.append(("validations", "Validations"))
    evals = "".join(eval_section(record) for record in run.evals)
    if evals:
        sections.append(("evals", "Evaluation"))
    body = (_header(run, sections) + job_section(run) + data_section(run) + mask_section(mask_preview(run))
            + curves_section(run) + memory_section(run) + validations
            + (section("evals", "Evaluation", evals) if evals else "") + _footer(run))
    return document(f"chatft report: {run.run_dir.name}", body)
