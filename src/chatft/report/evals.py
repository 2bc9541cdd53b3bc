"""The report's eval part: what `chatft run eval/model_eval` found, targets side by side.

In: an `EvalRecord` (eval_results.json as eval/results.py writes it). Out: HTML: the dataset and settings, the
metric table (one column per target: base, adapter, merged), the adapter-vs-merged check, and each generation
prompt with the reference and every target's answer in columns.
"""

from __future__ import annotations

from typing import Any

from chatft.eval.report import agreement_line
from chatft.report.load import EvalRecord
from chatft.report.markup import code, esc, note, num, table


def _metric_table(targets: dict[str, dict[str, Any]], scoring: str, prompts: int) -> str:
    names = list(targets)

    def metric(name: str, key: str) -> Any:
        return (targets[name].get("metrics") or {}).get(key)

    rows = [["loss"] + [num(metric(n, "loss")) for n in names],
            ["perplexity"] + [num(metric(n, "perplexity"), 2) for n in names],
            ["token accuracy"] + [num(metric(n, "token_accuracy")) for n in names]]
    if scoring != "none" and prompts:
        rows.append([esc(scoring.replace("_", " "))] + [
            f"{round((metric(n, scoring) or 0) * (metric(n, 'scored_prompts') or 0))}/"
            f"{num(metric(n, 'scored_prompts'))}" for n in names])
    rows.append(["model fingerprint"] + [code(str(targets[n].get("model_fingerprint") or "unknown")[:12])
                                         for n in names])
    rows.append(["path"] + [code(targets[n].get("path", "-")) + (f" on base {code(targets[n]['base'])}"
                                                                 if targets[n].get("base") else "") for n in names])
    notes = ["; ".join(map(str, targets[n].get("notes") or [])) for n in names]
    if any(notes):
        rows.append(["notes"] + [esc(text) for text in notes])
    return table(["metric", *names], rows, numeric=range(1, len(names) + 1))


def _answer(title: str, text: Any, detail: str = "", css: str = "") -> str:
    return f'<div class="gen {css}"><h4>{esc(title)}{detail}</h4><pre>{esc(text)}</pre></div>'


def _generations(items: list[dict[str, Any]], names: list[str], scoring: str) -> str:
    parts = []
    for item in items:
        prompt = item.get("prompt") or []
        turns = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
        cells = [_answer("reference", item.get("reference", ""), css="ref")]
        answers = item.get("answers") or {}
        for name in names:
            answer = answers.get(name)
            if not isinstance(answer, dict):
                continue
            detail = f" · {num(answer.get('tokens'))} tokens" + ("" if answer.get("stopped") else " (cut)")
            if scoring != "none" and answer.get("match") is not None:
                detail += " · match" if answer["match"] else " · no match"
            cells.append(_answer(name, answer.get("text", ""), esc(detail)))
        parts.append(f"<h3>row {esc(item.get('row', '?'))}</h3><pre>{esc(turns)}</pre>"
                     f'<div class="gens" style="grid-template-columns:repeat({len(cells)},minmax(0,1fr))">'
                     + "".join(cells) + "</div>")
    return "".join(parts)


def eval_section(record: EvalRecord) -> str:
    results = record.results
    targets: dict[str, dict[str, Any]] = results["targets"]
    dataset = results.get("dataset") or {}
    settings = results.get("settings") or {}
    generation = settings.get("generation") or {}
    scoring = generation.get("scoring") or "none"
    dropped = ", ".join(f"{esc(k)} {num(v)}" for k, v in (dataset.get("dropped_by_reason") or {}).items()) or "none"
    head = (f"<h3>{esc(' vs '.join(targets))}</h3>"
            f"<p>from {code(record.path.resolve())}, {esc(results.get('created', ''))}</p>"
            f"<p>dataset {code(dataset.get('path', '-'))} sha256 {code(dataset.get('sha256') or 'unknown')}: "
            f"{num(dataset.get('rows_used'))} of {num(dataset.get('rows_in'))} rows scored (dropped: {dropped}), "
            f"{num(dataset.get('supervised_tokens'))} supervised tokens; {esc(settings.get('torch_dtype', '-'))} "
            f"on {esc(settings.get('device', '-'))}, seq_length {num(settings.get('seq_length'))}</p>")
    check = None
    if isinstance(results.get("adapter_vs_merged"), dict):
        try:
            check = agreement_line(results["adapter_vs_merged"])
        except (KeyError, TypeError, ValueError):
            check = None
    body = head + _metric_table(targets, scoring, generation.get("num_prompts") or 0)
    if check:
        passed = results["adapter_vs_merged"].get("passed")
        body += f'<p><span class="badge {"" if passed else "bad"}">{esc(check)}</span></p>'
    items = [item for item in results.get("generations") or [] if isinstance(item, dict)]
    if items:
        body += (f"<h3>Generations ({esc(generation.get('decoding', 'greedy'))}, max_new_tokens "
                 f"{num(generation.get('max_new_tokens'))})</h3>" + _generations(items, list(targets), scoring))
    else:
        body += note("no generations in these results")
    return f'<div class="eval">{body}</div>'
