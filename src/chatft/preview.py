"""`chatft preview`: what training would see, without training.

In: a compiled training config. Out (stdout): N rows with the supervised tokens marked, per-row
supervised/total token counts, the dataset's token-length quantiles, how many rows exceed
`dataset.seq_length` and what the truncation policy does with them, how the first epoch fills micro-batches
(the padding a padded layout would compute, how full the packs of `packed_sequence_size` are), the rows
whose chat template leaves out their tool calls, tools or reasoning (counted per field, where training refuses
them), how conversations became rows (`dataset.multi_turn`: rows and tokens before and after a per-turn
expansion), the validation rows' counts when `validation_dataset` is set, and the memory estimate (sized, as
training sizes it, for the longest training and validation rows).
`--json` prints `{rows: [{source_row, message, input_ids, labels_mask, text}], stats: {...}}` (`message`: the
assistant message a per-turn row trains).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from chatft.config.schema import TrainingConfig
from chatft.data.types import PreparedData, TokenizedRow
from chatft.data.pipeline import expansion_summary, prepare_training_data
from chatft.train import batching
from chatft.train.memory import estimate_memory, row_lengths
from chatft.train.model import load_tokenizer

POLICY_WORDS = {
    "drop": "dropped (counted)",
    "truncate": "cut to seq_length",
    "error": "refused: training stops with error[sequence_too_long]",
}


def supervised_segments(tokenizer: Any, row: TokenizedRow) -> list[tuple[str, bool]]:
    """The row's text in runs of (text, supervised)."""
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    flag = None
    for token, supervised in zip(row.input_ids, row.loss_mask):
        if flag is not None and supervised != flag:
            segments.append((tokenizer.decode(run), flag))
            run = []
        run.append(token)
        flag = supervised
    if run:
        segments.append((tokenizer.decode(run), bool(flag)))
    return segments


def _row_counts(report: Any) -> dict[str, Any]:
    """What a dataset's rows came to: the counts preview reports for training and validation data alike."""
    return {"rows_in": report.rows_in, "rows_used": report.rows_used, "dropped_by_reason": report.dropped_by_reason,
            "over_seq_length": report.over_length, "truncated": report.truncated,
            "supervised_tokens": report.supervised_tokens, "total_tokens": report.total_tokens,
            "fields_dropped_by_template": report.fields_dropped_by_template,
            "template_drop_examples": report.template_drop_examples,
            "multi_turn": report.multi_turn, "expansion": report.expansion,
            "multi_turn_summary": expansion_summary(report), "drop_details": report.drop_details}


def _stats(data: PreparedData, val_data: PreparedData | None, cfg: TrainingConfig,
           memory: dict[str, Any]) -> dict[str, Any]:
    report = data.report
    return {
        **_row_counts(report),
        "first_rows_by_reason": report.examples_by_reason,
        "token_length_quantiles": report.token_length_quantiles,
        "seq_length": cfg.dataset.seq_length,
        "truncation": cfg.dataset.truncation,
        "template_source": report.template_source,
        "mask_method": report.mask_method,
        "batching": _batching(data, cfg),
        "validation": _row_counts(val_data.report) if val_data else None,
        "memory_estimate": memory,
    }


def _batching(data: PreparedData, cfg: TrainingConfig) -> dict[str, Any]:
    """Micro-batch fill over the first epoch, in the order training visits the rows."""
    sched, packing = cfg.step_scheduler, cfg.packed_sequence
    lengths = [len(row) for row in data.rows]
    order = batching.epoch_order(lengths, 0, seed=cfg.seed, shuffle=cfg.dataloader.shuffle,
                                 group_by_length=cfg.dataloader.group_by_length,
                                 global_batch_size=sched.global_batch_size)
    stats = batching.layout_stats(lengths, order, sched.global_batch_size, sched.local_batch_size,
                                  packing.packed_sequence_size)
    layout = "packed" if packing.packed_sequence_size > 0 else "padding_free" if packing.padding_free else "padded"
    return {"layout": layout, "local_batch_size": sched.local_batch_size, **stats}


def _memory_estimate(cfg: TrainingConfig, data: PreparedData, val_data: PreparedData | None) -> dict[str, Any]:
    """The training engine's estimate for this config and these rows (validation micro-batches included, as
    training sizes it) on the device training would use."""
    estimate = estimate_memory(cfg, lengths=row_lengths(data, val_data))
    return {"training_mb": round(estimate.training / 2**20), "total_mb": round(estimate.total / 2**20),
            "device": estimate.device, "lora": estimate.lora, "summary": " ".join(estimate.lines())}


def reporting_section(section: Any) -> Any:
    """Preview reports over-length rows instead of stopping at the first, as truncation=error would."""
    return section.model_copy(update={"truncation": "drop"}) if section.truncation == "error" else section


def preview(cfg: TrainingConfig, *, rows: int, as_json: bool) -> None:
    tokenizer = load_tokenizer(cfg.model)
    # Rows whose template leaves out fields are counted, not refused as training refuses them.
    data = prepare_training_data(reporting_section(cfg.dataset), tokenizer, refuse_template_drops=False)
    val_data = None
    if cfg.validation_dataset is not None:
        val_data = prepare_training_data(reporting_section(cfg.validation_dataset), tokenizer, key="validation_dataset",
                                         refuse_template_drops=False)
    stats = _stats(data, val_data, cfg, _memory_estimate(cfg, data, val_data))
    shown = data.rows[:rows]
    if as_json:
        payload = {
            "rows": [{"source_row": r.source_row, "message": r.message, "input_ids": r.input_ids,
                      "labels_mask": [int(m) for m in r.loss_mask], "text": tokenizer.decode(r.input_ids)}
                     for r in shown],
            "stats": stats,
        }
        print(json.dumps(payload))
        return
    _print_human(tokenizer, shown, stats)


def _batching_line(batching: dict[str, Any]) -> str:
    padded = (f"padded micro-batches of {batching['local_batch_size']} would be "
              f"{batching['padding_fraction']:.1%} padding")
    if batching["layout"] == "packed":
        return (f"batching: {batching['packs']} packs, {batching['pack_fill']:.1%} full on average, no padding "
                f"computed ({padded})")
    if batching["layout"] == "padding_free":
        return f"batching: padding-free rows, no padding computed ({padded})"
    return f"batching: {padded} (packed_sequence.padding_free=true computes none)"


def _rows_line(label: str, counts: dict[str, Any]) -> str:
    return (f"{label}: {counts['rows_in']} in, {counts['rows_used']} used"
            + "".join(f", {n} {reason}" for reason, n in counts["dropped_by_reason"].items()))


def _template_drops_lines(label: str, counts: dict[str, Any]) -> list[str]:
    """Per field, how many rows the chat template renders without it, and the first of them."""
    return [f"{label}template drops {field}: {n} rows, refused by training with error[template_drops_field] "
            f"(first: {counts['template_drop_examples'][field]})"
            for field, n in counts["fields_dropped_by_template"].items()]


def _drop_detail_lines(label: str, counts: dict[str, Any]) -> list[str]:
    """The first row's account of drops that training refuses (a turn its template cannot render as generated)."""
    return [f"{label}{reason}: {counts['dropped_by_reason'][reason]} rows, refused by training with "
            f"error[template_not_prefix_stable] (first: {detail})"
            for reason, detail in counts["drop_details"].items() if reason == "generation_prompt_mismatch"]


def _print_human(tokenizer: Any, shown: list[TokenizedRow], stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)  # the terminal wraps; inserted breaks would look like text
    colour = console.is_terminal
    for row in shown:
        label = f"row {row.source_row}" + (f", assistant message {row.message}" if row.message else "")
        counts = f"{row.num_supervised} supervised / {len(row)} tokens"
        console.print(f"[bold]{label}[/bold]: {counts}" if colour else f"{label}: {counts}")
        text = Text()
        for segment, supervised in supervised_segments(tokenizer, row):
            if colour:
                text.append(segment, style="bold green" if supervised else "dim")
            else:
                text.append(f"[[{segment}]]" if supervised else segment)
        console.print(text)
    legend = "green = trained" if colour else "[[...]] = trained"
    quantiles = stats["token_length_quantiles"]
    lines = [
        f"supervised tokens: {legend}; masks by {stats['mask_method']}, template from {stats['template_source']}",
        _rows_line("rows", stats),
        "token lengths: " + ", ".join(f"{k} {v}" for k, v in quantiles.items()),
        f"over seq_length={stats['seq_length']}: {stats['over_seq_length']} rows, "
        f"{POLICY_WORDS[stats['truncation']]} (dataset.truncation={stats['truncation']})",
        f"tokens: {stats['supervised_tokens']} supervised of {stats['total_tokens']}",
        stats["multi_turn_summary"],
        *_drop_detail_lines("", stats),
        _batching_line(stats["batching"]),
        *_template_drops_lines("", stats),
    ]
    if stats["validation"] is not None:
        val = stats["validation"]
        lines.append(_rows_line("validation rows", val) + f"; {val['over_seq_length']} over seq_length")
        lines.extend(_template_drops_lines("validation: ", val))
        lines.append("validation " + val["multi_turn_summary"])
        lines.extend(_drop_detail_lines("validation: ", val))
    lines.append(stats["memory_estimate"]["summary"])
    for line in lines:
        print(line, file=sys.stdout)
