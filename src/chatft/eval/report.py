"""The markdown side of eval/model_eval: the targets side by side, then every target's answer per prompt.

In: the results document `results.write_results` writes as eval_results.json. Out: the text of eval_results.md,
which is also printed. Nothing here loads a model.
"""

from __future__ import annotations

import math
from typing import Any


def _cell(text: Any) -> str:
    """One table cell: pipes escaped, line breaks shown as <br>."""
    return str(text).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3e}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A markdown table; the columns numbered in `right` are right-aligned (numbers)."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def agreement_line(check: dict[str, Any] | None) -> str | None:
    if check is None:
        return None
    point = check.get("adapter_target", "adapter")  # results written before QLoRA points have no name here
    verdict = "PASS" if check["passed"] else "FAIL: the merged model is not this adapter merged into this base"
    if check.get("merged_records_this_adapter") is False:
        verdict += " (its manifest records another adapter)"
    if check.get("adapter_on_4bit_base"):  # losses differ by the quantization of the base: not compared
        recorded = {True: "records this adapter", None: "does not say which adapter it holds"}.get(
            check.get("merged_records_this_adapter"), "records another adapter")
        return (f"{point} vs merged: loss {check['adapter_loss']:.6f} (adapter on its 4-bit base) vs "
                f"{check['merged_loss']:.6f} (merged into the full-precision base), not compared; the merged "
                f"model {recorded}: {'PASS' if check['passed'] else 'FAIL'}")
    sign = "<=" if check["passed"] else ">"
    return (f"{point} vs merged: loss {check['adapter_loss']:.6f} vs {check['merged_loss']:.6f}, relative difference "
            f"{check['relative_difference']:.1e} {sign} {check['tolerance']:.0e} ({check['dtype']}): {verdict}")


def rows_setting(settings: dict[str, Any]) -> str:
    """How conversations became rows and the template variables, as far as results record them."""
    parts = [f"multi_turn {settings['multi_turn']}"] if settings.get("multi_turn") else []
    if settings.get("chat_template_kwargs"):
        variables = settings["chat_template_kwargs"]
        parts.append("chat_template_kwargs " + ", ".join(f"{key}={value}" for key, value in variables.items()))
    return "".join(f", {part}" for part in parts)


def render_markdown(results: dict[str, Any]) -> str:
    targets: dict[str, dict[str, Any]] = results["targets"]
    names = list(targets)
    dataset, settings = results["dataset"], results["settings"]
    template, generation = settings["chat_template"], settings["generation"]
    dropped = ", ".join(f"{reason} {n}" for reason, n in dataset["dropped_by_reason"].items()) or "none"
    sha = (dataset["sha256"] or "unknown")[:12]
    split = f" ({dataset['split']})" if dataset.get("split") else ""
    lines = [
        f"# eval: {' vs '.join(names)}",
        "",
        f"- dataset: {dataset['path']}{split}, "
        f"sha256 {sha}; {dataset['rows_used']} of {dataset['rows_in']} rows scored (dropped: {dropped}), "
        f"{dataset['supervised_tokens']:,} supervised tokens",
        f"- chat template: {template['origin']} ({template['source']}, sha256 {template['sha256'][:12]}), masks by "
        f"{template['mask_method']}, train_on {settings['train_on']}{rows_setting(settings)}; identical token ids "
        "and masks for every target",
        f"- {settings['torch_dtype']} on {settings['device']}, seq_length {settings['seq_length']}; generation: greedy, "
        f"{generation['num_prompts']} prompts, max_new_tokens {generation['max_new_tokens']}, "
        f"scoring {generation['scoring']}",
        "",
    ]
    metric_rows = [
        ["loss"] + [_number(targets[n]["metrics"]["loss"]) for n in names],
        ["perplexity"] + [_number(targets[n]["metrics"]["perplexity"], 2) for n in names],
        ["token accuracy"] + [_number(targets[n]["metrics"]["token_accuracy"], 4) for n in names],
    ]
    scoring = generation["scoring"]
    if scoring != "none" and generation["num_prompts"]:
        counts = [(targets[n]["metrics"][scoring], targets[n]["metrics"]["scored_prompts"]) for n in names]
        metric_rows.append([scoring.replace("_", " ")] + [f"{round(share * n)}/{n}" for share, n in counts])
    if any(targets[n].get("base_precision") for n in names):  # a QLoRA adapter: which base each point used
        metric_rows.append(["adapter's base"] + [targets[n].get("base_precision") or "-" for n in names])
    metric_rows.append(["model fingerprint"] + [(targets[n]["model_fingerprint"] or "unknown")[:12] for n in names])
    metric_rows.append(["validation recorded"] + [
        "yes" if targets[n].get("validation_recorded") else "no manifest" for n in names])
    lines += _table(["metric", *names], metric_rows, right=set(range(1, len(names) + 1)))
    lines.append("")
    for name in names:
        path = targets[name]["path"] + (f" on base {targets[name]['base']}" if targets[name].get("base") else "")
        notes = "; ".join(targets[name].get("notes") or [])
        lines.append(f"- {name}: {path}" + (f" ({notes})" if notes else ""))
    check_line = agreement_line(results.get("adapter_vs_merged"))
    if check_line:
        lines += ["", f"**{check_line}**"]
    if results["generations"]:
        lines += ["", "## Generations", ""]
    for item in results["generations"]:
        user = next((m.get("content") for m in reversed(item["prompt"]) if m.get("role") == "user"), "")
        lines += [f"### row {item['row']}", "", f"prompt (last user turn): {_cell(user)}", ""]
        header = ["target", "answer", "tokens"] + (["match"] if scoring != "none" else [])
        rows = [["reference", _cell(item["reference"]), "", ""][:len(header)]]
        for name in names:
            answer = item["answers"][name]
            row = [name, _cell(answer["text"]), f"{answer['tokens']}{'' if answer['stopped'] else ' (cut)'}"]
            if scoring != "none":
                row.append("yes" if answer["match"] else "no")
            rows.append(row)
        lines += _table(header, rows, right={2})
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
