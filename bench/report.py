"""From the workers' raw step records to OUT/<workload>.json and OUT/<workload>.md.

Per repeat: the steps after the warm-up are timed (end of step `warmup` to end of the last step); tokens,
supervised tokens and model FLOPs of those steps are divided by that time. Per system: the median of each
number over the repeats. Ratios are chatft's number divided by the other system's.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.flops import ModelCounts
from bench.systems import compute_dtype

MEDIAN_KEYS = ("tokens_per_s", "supervised_tokens_per_s", "flops_per_s", "mfu", "peak_mem_mb", "final_loss")


def summarise_repeat(raw: dict[str, Any], warmup: int, counts: ModelCounts, lora: bool, peak: float) -> dict[str, Any]:
    steps = raw["steps"]
    timed = [s for s in steps if s["step"] > warmup]
    if not timed:
        raise SystemExit(f"{raw['system']}: no step after the warm-up ({len(steps)} steps ran)")
    start = next(s["end_s"] for s in steps if s["step"] == warmup) if warmup > 0 else 0.0
    seconds = timed[-1]["end_s"] - start
    tokens = sum(s["tokens"] for s in timed)
    supervised = sum(s["supervised"] for s in timed)
    flops = sum(counts.step_flops(lora, s["tokens"], s["squared_lengths"]) for s in timed)
    return {
        "seconds": seconds, "timed_steps": len(timed), "tokens": tokens, "supervised_tokens": supervised,
        "tokens_per_s": tokens / seconds, "supervised_tokens_per_s": supervised / seconds,
        "flops_per_s": flops / seconds, "mfu": flops / seconds / peak,
        "peak_mem_mb": raw["peak_mem_mb"], "final_loss": raw["final_loss"],
        "losses": [s["loss"] for s in steps],
        "step_tokens": [s["tokens"] for s in steps],
        "step_supervised": [s["supervised"] for s in steps],
        "step_conversations": [s["conversations"] for s in steps],
    }


def summarise_system(raws: list[dict[str, Any]], warmup: int, counts: ModelCounts, lora: bool,
                     peak: dict[str, Any]) -> dict[str, Any]:
    repeats = [summarise_repeat(raw, warmup, counts, lora, peak["flops"]) for raw in raws]
    first = raws[0]
    out: dict[str, Any] = {key: statistics.median(r[key] for r in repeats) for key in MEDIAN_KEYS}
    steps = first["steps"]
    out.update({
        "conversations_per_step": statistics.mean(s["conversations"] for s in steps),
        "tokens_per_step": statistics.mean(s["tokens"] for s in steps),
        "supervised_tokens_per_step": statistics.mean(s["supervised"] for s in steps),
        "layout": first["layout"], "dtype": first["dtype"], "peak_flops": peak["flops"],
        "trainable_params": first["trainable_params"], "tokens_sha256": first["tokens_sha256"],
        "logged_tokens_match": first["logged_tokens_match"], "threads": first["threads"], "checks": first["checks"],
        "repeats": repeats,
    })
    return out


def ratios(systems: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """`ratio`: chatft tokens/s over TRL-with-defaults tokens/s; `ratios`: chatft over every other system."""
    chatft = systems["chatft"]

    def over(key: str, other: dict[str, Any]) -> float | None:
        return chatft[key] / other[key] if other[key] else None

    table = {name: {"tokens_per_s": over("tokens_per_s", other),
                    "supervised_tokens_per_s": over("supervised_tokens_per_s", other),
                    "peak_mem": over("peak_mem_mb", other)}
             for name, other in systems.items() if name != "chatft"}
    ratio = table["trl"]["tokens_per_s"] if "trl" in table else None
    return ratio, table


def build(workload: Any, settings: Any, raws: dict[str, list[dict[str, Any]]], failures: dict[str, str],
          counts: ModelCounts, peaks: dict[str, Any], data_info: dict[str, Any], *, device: str,
          versions: dict[str, str], command: str, partial: bool) -> dict[str, Any] | None:
    """The report of the systems that finished at least one run (None until chatft has: every ratio and note is
    relative to it). `partial`: more runs are still to come; `failures`: system -> why its worker failed."""
    done = {name: runs for name, runs in raws.items() if runs}
    if "chatft" not in done:
        return None
    summary = {name: summarise_system(runs, settings.warmup, counts, settings.lora,
                                      peaks[compute_dtype(name, settings)]) for name, runs in done.items()}
    ratio, ratio_table = ratios(summary)
    report_notes = notes(workload, settings, summary, done, data_info, counts, peaks)
    report_notes += [f"FAILED: {why.splitlines()[0]} (the end of its log is in the JSON's `failures`)"
                     for why in failures.values()]
    if partial:
        runs_done = sum(map(len, raws.values()))
        report_notes.insert(0, f"PARTIAL: written after each finished worker, so that a run stopped early keeps what "
                               f"it measured; {runs_done} of {settings.repeats * len(raws)} runs done, device peak "
                               "measured before the runs only.")
    return {
        "workload": workload.name,
        "device": device,
        "versions": versions,
        "command": command,
        "settings": {**settings.to_json(), "global_batch": settings.global_batch, "description": workload.summary,
                     "lr_schedule": "constant, no warm-up", "data": data_info},
        "model_counts": counts.__dict__,
        "flop_formula": counts.formula(settings.lora),
        "peak_flops": peaks,
        "systems": summary,
        "ratio": ratio,
        "ratios": ratio_table,
        "notes": report_notes,
        "partial": partial,
        "failures": failures,
    }


def _number(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def table_lines(report: dict[str, Any]) -> list[str]:
    systems = report["systems"]
    gpu = report["settings"]["device"] == "cuda"
    scale, unit = (1e12, "TFLOP/s") if gpu else (1e9, "GFLOP/s")
    lines = [
        (f"| system | layout | conversations/step | tokens/step | tokens/s | supervised tokens/s | {unit} | MFU "
         "| peak MB | final loss | chatft ÷ system (tokens/s) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in systems.items():
        ratio = 1.0 if name == "chatft" else report["ratios"][name]["tokens_per_s"]
        lines.append(
            f"| {name} | {s['layout']} | {_number(s['conversations_per_step'], 1)} "
            f"| {_number(s['tokens_per_step'], 0)} "
            f"| {_number(s['tokens_per_s'], 1)} | {_number(s['supervised_tokens_per_s'], 1)} "
            f"| {_number(s['flops_per_s'] / scale, 2)} | {_number(s['mfu'], 3)} | {_number(s['peak_mem_mb'], 0)} "
            f"| {_number(s['final_loss'], 4)} | {_number(ratio, 3)} |")
    return lines


def header_line(report: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    settings = report["settings"]
    return (f"Device: {report['device']}. Versions: {versions}. Command: `{report['command']}` "
            f"(medians of {settings['repeats']} repeats, {settings['steps'] - settings['warmup']} timed steps each)")


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = report["workload"]
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md = [header_line(report), "", *table_lines(report), "", "## Notes", "",
          *[f"- {note}" for note in report["notes"]], ""]
    md_path.write_text("\n".join(md))
    return json_path, md_path


def identical_token_groups(systems: dict[str, Any]) -> list[list[str]]:
    """Systems grouped by the digest of the token ids they trained, in training order."""
    groups: dict[str, list[str]] = {}
    for name, s in systems.items():
        groups.setdefault(s["tokens_sha256"], []).append(name)
    return list(groups.values())


def notes(workload: Any, settings: Any, systems: dict[str, Any], raws: dict[str, list[dict[str, Any]]],
          data_info: dict[str, Any], counts: ModelCounts, peaks: dict[str, Any]) -> list[str]:
    """What was measured and how, and everything that differs between the systems."""
    s = settings
    out: list[str] = []
    if s.quick:
        out.append("QUICK RUN: toy size and a handful of steps; it checks that everything runs end to end, the "
                   "numbers are not measurements.")
    out.append(f"model FLOPs: {counts.formula(s.lora)}")
    out.append("MFU = model FLOPs/s / device peak. Model FLOPs are the same for the same rows whatever a system "
               "skips or repeats (chatft runs its output head only where a supervised token follows; activation "
               "recomputation and padding are not counted), so for identical rows MFU ranks systems as tokens/s does.")
    for dtype, peak in peaks.items():
        measured = ", ".join(f"{p / 1e9:,.1f}" for p in peak["measured_each_time"])
        out.append(f"device peak for {dtype}: {peak['flops'] / 1e9:,.1f} GFLOP/s, {peak['source']} (square "
                   f"{dtype} matmuls measured before and after the runs reached {measured} GFLOP/s; where the peak "
                   "is measured, the higher of the two is used). Each system's MFU uses the peak of its compute dtype.")
    out.append(f"timing: wall clock from the end of step {s.warmup} to the end of step {s.steps} "
               f"({s.steps - s.warmup} timed steps) inside one fresh process per system and repeat; the order of "
               "the systems reverses every repeat; medians over repeats. chatft: `elapsed_s` of its metrics.jsonl; "
               "TRL: a TrainerCallback.on_step_end timestamp (after a CUDA sync on GPU). Loading, tokenization and "
               "saving are not timed.")
    out.append("peak_mem_mb: " + ("torch.cuda.max_memory_allocated of the worker process." if s.device == "cuda" else
                                  "peak RSS (ru_maxrss) of the worker process, model load and data preparation "
                                  "included."))
    if s.lora or s.dtype == "float32":
        weights = f"{s.dtype} weights and compute for every system" + (
            " except chatft-bf16 (a bfloat16 base)" if "chatft-bf16" in systems else "")
    else:  # bfloat16 full SFT
        weights = ("float32 master weights with bfloat16 compute under autocast for every system (chatft "
                   "optimizer.master_weights=auto; TRL loads the model in float32 with bf16=True)")
    out.append(f"precision: {weights}; LoRA adapters are float32 in both chatft and TRL/PEFT. TRL gets bf16="
               + str(s.dtype == "bfloat16") + "; attention " + s.attn_implementation + " for every system.")
    recomputation = {name: sys_["checks"].get("activation_checkpointing") for name, sys_ in systems.items()}
    out.append(f"activation checkpointing (non-reentrant) per system: {recomputation}. The workload sets "
               f"{s.activation_checkpointing}; where it sets False, chatft keeps its own default (auto: 'selective' "
               "for full SFT on CPU, recomputing only pointwise ops, norms and casts in the backward, with the same "
               "losses; TRL has no counterpart), and chatft-keep-all recomputes nothing.")
    if workload.model is not None:
        shape = s.model_shape or {}
        sizes = {k: shape.get(k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "tied")}
        out.append(f"model: random weights (seed {s.seed}) built from a {shape.get('architecture')} config {sizes}, "
                   f"saved once with the tokenizer and chat template of {shape.get('tokenizer_from')}; vocabulary "
                   "ids above the tokenizer's size are simply never used. Random weights train at the same speed "
                   "as real ones of that shape; the losses mean nothing.")
    out.append(f"rows: {json.dumps(data_info)}")
    out.append(f"row order: every system reads the rows in file order (chatft dataloader.shuffle=false; TRL "
               f"train_sampling_strategy='sequential'), {s.global_batch} conversations per optimizer step "
               f"({s.local_batch} per micro-batch x {s.accumulation}).")
    if data_info.get("every_row_has_one_assistant_turn"):
        out.append("loss: completion loss of the last assistant turn (chatft dataset.train_on=last_assistant; TRL "
                   "prompt/completion rows, prompt = every message before the last, completion_only_loss=True). "
                   "Every row has exactly one assistant turn, so this is also chatft's default all_assistant loss. "
                   "Both divide the summed token cross-entropy by the supervised tokens of the whole optimizer step.")
    for group in identical_token_groups(systems):
        if len(group) > 1:
            out.append(f"identical tokens: {', '.join(group)} trained exactly the same token ids in the same order "
                       "(same sha256 over every trained conversation).")
    base = systems["chatft"]
    for name, other in systems.items():
        if name == "chatft" or other["tokens_sha256"] == base["tokens_sha256"]:
            continue
        if name == "trl-packed":
            pool_rows = data_info.get("trl_packed_pool", {}).get("rows")
            out.append(f"trl-packed trains other conversations per step: TRL packs rows into {s.max_length}-token "
                       f"packs with its default strategy ({other['checks'].get('packing_strategy')}: longest first, "
                       f"each into the fullest pack it fits) and a step takes {s.global_batch} packs, "
                       f"{other['conversations_per_step']:.1f} conversations and {other['tokens_per_step']:.0f} tokens "
                       f"per step against chatft's {base['conversations_per_step']:.1f} and "
                       f"{base['tokens_per_step']:.0f}. Its rows are the first {pool_rows} of the same order; "
                       "the ratio is per non-padding token, so this is comparable, but the tokens are not the same. "
                       "Its counts come from the packs it trained (seq_lengths and labels).")
        else:
            out.append(f"{name} trained different tokens than chatft (token digests differ): compare its per-step "
                       "counts in the JSON.")
    trl_like = [n for n in systems if n.startswith("trl")]
    for name in trl_like:
        mine, theirs = base["repeats"][0]["step_supervised"], systems[name]["repeats"][0]["step_supervised"]
        if name != "trl-packed" and mine != theirs:
            out.append(f"supervised tokens per step differ, chatft {mine} vs {name} {theirs}: TRL's completion is "
                       "everything after the rendered prompt, so it also supervises what the template writes after "
                       "the end-of-turn token (a newline for ChatML templates); chatft stops at the end-of-turn token. "
                       "Supervised tokens/s are counted with each system's own mask; losses are not directly "
                       "comparable.")
        if systems[name]["logged_tokens_match"]:
            out.append(f"{name}: TRL's own logged num_tokens per step equals the counted non-padding tokens.")
        else:
            logged = raws[name][0].get("logged_tokens")
            out.append(f"{name}: TRL's logged num_tokens per step {logged} differ from the counted non-padding tokens "
                       f"{systems[name]['repeats'][0]['step_tokens']} (TRL counts attention-mask tokens when padded "
                       "and the flattened row width when padding-free); the counted ones are used.")
    if not base["logged_tokens_match"]:
        out.append(f"chatft's metrics.jsonl tokens {raws['chatft'][0].get('logged_tokens')} differ from the counted "
                   "non-padding tokens; the counted ones are used.")
    layouts = {name: sys_["layout"] for name, sys_ in systems.items()}
    out.append(f"batch layout per system: {layouts}. chatft's default is padding-free micro-batches and TRL's default "
               "pads, so chatft vs trl compares the defaults; chatft vs trl-padding-free and chatft-padded vs trl "
               "compare equal layouts.")
    if "trl-padding-free" in systems:
        out.append("trl-padding-free: TRL refuses padding_free=True without packing unless max_length=None (it "
                   "would not enforce it), so it gets max_length=None; every row was already checked to fit.")
    trainable = {name: sys_["trainable_params"] for name, sys_ in systems.items()}
    if len(set(trainable.values())) == 1:
        out.append(f"trainable parameters: {next(iter(trainable.values())):,} in every system.")
    else:
        out.append(f"trainable parameters differ: {trainable}.")
    for name in trl_like:
        out.append(f"{name} settings as seen inside its trainer: {systems[name]['checks']}")
    for name in (n for n in systems if n.startswith("chatft")):
        out.append(f"{name} settings as seen inside its trainer: {systems[name]['checks']}")
        estimate = systems[name]["checks"].get("memory_estimate_mb")
        if estimate:
            peak_mb = systems[name]["peak_mem_mb"]
            out.append(f"{name} memory estimate (made before loading, as `chatft preview` and the oom check make it): "
                       f"{estimate:,.0f} MB against the measured peak of {peak_mb:,.0f} MB, "
                       f"{estimate / peak_mb - 1:+.0%}.")
    probe = raws["trl"][0].get("assistant_only_loss_probe") if "trl" in raws else None
    if probe:
        out.append(f"TRL assistant_only_loss=True on the messages rows with this tokenizer's template: {probe}")
    if trl_like:
        out.append("not matched (each system's default path): TRL 1.16 computes the loss through the model's fused "
                   "LM head (fused_lm_head=True, which also yields the entropy and accuracy it logs) and reads metrics "
                   "with .item() every micro-batch; chatft computes logits only at positions followed by a supervised "
                   "token and takes the cross-entropy. Both are inside the timings.")
        if s.lora:
            out.append("not matched: LoRA adapters are initialised from different RNG states (chatft seeds just before "
                       "get_peft_model; TRL wraps inside SFTTrainer), so the A matrices differ and later losses agree "
                       "only approximately; B=0 at init, so the step-1 model is the same in every system.")
        out.append("not matched: weight-decay grouping (chatft: no decay on norms, biases and 1-d tensors; HF: norms "
                   "and biases); weight_decay is 0 here, so it has no effect.")
    return out
