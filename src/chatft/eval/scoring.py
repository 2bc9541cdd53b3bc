"""Scoring every target with identical settings; nothing is written here (that is `results`).

In: an `EvalConfig` and its checked `Target`s. Out: `Scores`: the rows scored, the settings, each target's
metrics, fingerprints and notes, the answers to the generation prompts, and whether adapter and merged agree.

- loss, perplexity and token accuracy over the supervised (assistant) tokens (`train.losses`, the training
  loop's own validation), on rows tokenized and masked once by training's pipeline;
- greedy answers to the same prompts, stopped where the saved models stop (`artifacts.generation_stop_ids`),
  `local_batch_size` prompts together, optionally scored against the reference answer (`generation.scoring`);
- targets are loaded one at a time and freed before the next;
- adapter (base + adapter, unmerged) and merged must agree on the loss within a dtype-dependent tolerance; for a
  QLoRA adapter, its point on the full-precision base is the one the merged model must agree with.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from chatft import artifacts, console
from chatft.config.schema import EvalConfig
from chatft.data.pipeline import prepare_training_data
from chatft.data.types import PreparedData
from chatft.errors import ChatftError
from chatft.eval import log
from chatft.config.secrets import redact
from chatft.eval.loading import TemplateUse, choose_eval_template, load_target_model
from chatft.eval.prompts import Prompt, generation_prompts
from chatft.eval.targets import ADAPTER_ON_FULL_PRECISION, Target, qlora_base_unused
from chatft.train import batching, losses, padding_free
from chatft.train.model import pick_device, probe_vocab_size, resolve_dtype

# Relative loss difference allowed between adapter (base + adapter, unmerged) and merged. float32 differs only
# by summation order; in half precision the merged weights W + BA are rounded once more, and the LoRA weights
# stay float32 in the unmerged model.
AGREEMENT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


@dataclass
class Scores:
    """What scoring found, in the shape eval_results.json records it."""

    dataset: dict[str, Any]  # the rows scored: location, sha256, counts
    settings: dict[str, Any]  # identical for every target
    targets: dict[str, dict[str, Any]]  # per target: path, base, kind, fingerprints, metrics, notes
    agreement: dict[str, Any] | None  # adapter vs merged, when both were scored
    generations: list[dict[str, Any]]  # per prompt: the prompt, the reference and every target's answer


# --------------------------------------------------------------------------- answers


def normalise_answer(text: str) -> str:
    return " ".join(text.split()).casefold()


def score_answer(answer: str, reference: str, scoring: str) -> bool | None:
    """exact_match: equal; contains: the answer contains the reference. Both compare case-folded text with
    whitespace runs collapsed. None when scoring is `none`."""
    if scoring == "none":
        return None
    answer, reference = normalise_answer(answer), normalise_answer(reference)
    return answer == reference if scoring == "exact_match" else reference in answer


def answer_tokens(new: list[int], stop: list[int]) -> tuple[list[int], bool]:
    """The tokens of one answer up to and including its first stop token, and whether it stopped. In a batch,
    `generate` pads a row that has stopped until the longest row ends: what follows the stop is padding."""
    for index, token in enumerate(new):
        if token in stop:
            return new[:index + 1], True
    return new, False


def prompt_batches(prompts: list[Prompt], size: int) -> list[list[int]]:
    """Indices of `prompts` in groups of at most `size`, similar lengths together (less left padding)."""
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    return [by_length[i:i + size] for i in range(0, len(by_length), size)]


def stop_ids(model: Any, tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Where an answer ends: the model's own EOS ids, then the chat template's end-of-turn token (rendered with the
    prompts' `dataset.chat_template_kwargs`), then the tokenizer's EOS (`artifacts.generation_stop_ids`), the ids
    training and merge write into the generation_config.json of the models they save, so eval stops where those
    models stop when served."""
    generation = getattr(model, "generation_config", None)
    return artifacts.generation_stop_ids(tokenizer, getattr(generation, "eos_token_id", None),
                                         template_kwargs=template_kwargs)


def generate_answers(model: Any, prompts: list[Prompt], tokenizer: Any, cfg: EvalConfig,
                     device: Any, task: str = "eval") -> list[dict[str, Any]]:
    """Greedy answers, stopped at `stop_ids`, `local_batch_size` prompts at a time.

    Decoding one token reads every weight of the model, whatever the number of rows, so on a CPU (memory-bound)
    a batch of prompts costs about what one prompt costs (on 2 cores, 4 prompts of SmolLM2-135M decode a token in
    the time of 2 alone). The prompts of a batch are left-padded and masked out by the attention mask
    (`generate` derives the position ids from it), so each answer is the one its prompt gets alone: identical in
    float32 (tested); in half precision the batch's other matmul shapes may tip a near-tie. `local_batch_size=1`
    answers one prompt at a time. Progress (`task`: the target's name) on stderr."""
    stop = stop_ids(model, tokenizer, dict(cfg.dataset.chat_template_kwargs or {}))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    # Every setting spelled out, so no target's own generation_config.json changes how it decodes.
    config = GenerationConfig(max_new_tokens=cfg.generation.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stop, pad_token_id=pad, use_cache=True, temperature=None, top_p=None,
                              top_k=None)
    answers: list[dict[str, Any]] = [{} for _ in prompts]
    with console.Progress(f"generating ({task})", len(prompts), "prompts", stream=sys.stderr) as progress:
        for batch in prompt_batches(prompts, cfg.local_batch_size):
            _answer(model, prompts, batch, tokenizer, cfg, config, stop, pad, device, answers)
            progress.advance(len(batch))
    return answers


def _answer(model: Any, prompts: list[Prompt], batch: list[int], tokenizer: Any, cfg: EvalConfig,
            config: GenerationConfig, stop: list[int], pad: int, device: Any, answers: list[dict[str, Any]]) -> None:
    """Generate the answers of one batch of prompts (indices into `prompts`) into `answers`."""
    width = max(len(prompts[i].input_ids) for i in batch)
    input_ids = torch.tensor([[pad] * (width - len(prompts[i].input_ids)) + prompts[i].input_ids for i in batch],
                             device=device)
    attention_mask = torch.tensor([[0] * (width - len(prompts[i].input_ids)) + [1] * len(prompts[i].input_ids)
                                   for i in batch], device=device)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    for i, row in zip(batch, output[:, width:].tolist()):
        new, stopped = answer_tokens(row, stop)
        text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        answers[i] = {"text": text, "tokens": len(new), "stopped": stopped,
                      "match": score_answer(text, prompts[i].reference, cfg.generation.scoring)}


# --------------------------------------------------------------------------- one target


def score_target(cfg: EvalConfig, target: Target, data: PreparedData, prompts: list[Prompt], tokenizer: Any,
                 device: Any, dtype: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load, score, free. Returns the metrics and the answers to `prompts`."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = load_target_model(cfg, target, device, dtype)
    try:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = sorted(data.rows, key=len, reverse=True)  # less padding; the sums do not depend on the order
        vocab = probe_vocab_size(tokenizer, model)
        attn = target.model_section(cfg).attn_implementation
        # Scored like training scores validation rows: padding-free where the model keeps them apart.
        packed, _ = padding_free.switch_to_padding_free(model, attn, vocab, device, dtype)
        if not packed:
            target.notes.append("scored on padded batches: this model does not keep padding-free rows apart")
        head = losses.head_for(model, vocab, device)
        batches = batching.micro_batches(rows, cfg.local_batch_size, pad, padding_free=packed)
        with console.Progress(f"scoring ({target.name})", len(batches), "batches", stream=sys.stderr) as progress:
            score = losses.score_batches(model, progress.each(batches), device, head)
        model.set_attn_implementation(attn)  # generation runs on the attention the model was loaded with
        answers = generate_answers(model, prompts, tokenizer, cfg, device, target.name)
    except (torch.OutOfMemoryError, MemoryError):
        raise ChatftError(
            "oom",
            f"out of memory scoring the {target.name} target ({target.describe()}) on {device.type}",
            "lower local_batch_size (e.g. local_batch_size=1), then dataset.seq_length or "
            "generation.max_new_tokens; on a GPU, torch_dtype=bfloat16 halves the weights",
        ) from None
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    metrics: dict[str, Any] = {
        "loss": score.loss, "perplexity": score.perplexity, "token_accuracy": score.token_accuracy,
        "supervised_tokens": score.tokens, "rows": len(data.rows),
    }
    if cfg.generation.scoring != "none" and answers:
        metrics[cfg.generation.scoring] = sum(bool(a["match"]) for a in answers) / len(answers)
        metrics["scored_prompts"] = len(answers)
    metrics["elapsed_s"] = round(time.perf_counter() - started, 3)
    return metrics, answers


def model_fingerprints(target: Target) -> dict[str, Any]:
    if target.adapter_base is not None:
        return {"model_fingerprint": artifacts.weights_fingerprint(target.adapter_dir),
                "base_fingerprint": target.adapter_base.fingerprint}
    return {"model_fingerprint": artifacts.weights_fingerprint(target.model, target.revision)}


def base_precision(target: Target, dtype_name: str) -> dict[str, Any]:
    """An adapter point's base: `4-bit nf4` (or fp4) with the quantization record, or the dtype it was loaded in."""
    if target.adapter_dir is None:
        return {}
    record = target.quantization
    return {"base_precision": f"4-bit {record['type']}" if record else dtype_name, "base_quantization": record}


def target_record(target: Target, metrics: dict[str, Any], dataset: dict[str, Any],
                  settings: dict[str, Any]) -> dict[str, Any]:
    """A target's entry in eval_results.json (`results` adds where its validation was recorded)."""
    manifest = target.artifact_dir and artifacts.read_manifest(target.artifact_dir)
    base = target.adapter_base
    return {
        "target": target.name,
        "path": str(target.adapter_dir or target.model),
        **({"base": target.model, "base_source": base.source} if base is not None else {}),
        **base_precision(target, settings["torch_dtype"]),
        "kind": manifest.get("kind") if manifest else None,
        **model_fingerprints(target),
        "dataset_sha256": dataset["sha256"],
        "metrics": metrics,
        "settings": settings,
        "notes": target.notes,
    }


# --------------------------------------------------------------------------- every target


def agreement(results: dict[str, dict[str, Any]], dtype_name: str) -> dict[str, Any] | None:
    """adapter vs merged: relative loss difference against the tolerance of the dtype scored in.

    The adapter point compared is the one on the full-precision base where there is one (a QLoRA adapter with
    `qlora_base: full_precision | both`): the merged model holds that base. A QLoRA adapter scored on its 4-bit
    base only differs from the merged model by what quantizing changes in the base (10% relative on the demo
    model, 6 QLoRA steps): no tolerance tells a wrong merge from that, and the merged model's record of the
    adapter it holds decides instead."""
    point = ADAPTER_ON_FULL_PRECISION if ADAPTER_ON_FULL_PRECISION in results else "adapter"
    if point not in results or "merged" not in results:
        return None
    quantized_base = results[point].get("base_quantization") is not None
    adapter, merged = results[point]["metrics"]["loss"], results["merged"]["metrics"]["loss"]
    relative = abs(adapter - merged) / max(abs(adapter), abs(merged), 1e-12)
    # A merge by chatft records the adapter it folded in; None when the merged model does not say.
    merged_dir = Path(results["merged"]["path"])
    recorded = ((artifacts.read_manifest(merged_dir) or {}).get("adapter") or {}).get("fingerprint") \
        if merged_dir.is_dir() else None
    same_adapter = None if recorded is None else recorded == results[point]["model_fingerprint"]
    tolerance = None if quantized_base else AGREEMENT_TOLERANCE[dtype_name]
    passed = same_adapter is not False if tolerance is None else relative <= tolerance
    return {"adapter_target": point, "adapter_loss": adapter, "merged_loss": merged, "relative_difference": relative,
            "tolerance": tolerance, "dtype": dtype_name, "adapter_on_4bit_base": quantized_base, "passed": passed,
            "merged_records_this_adapter": same_adapter}


def _dataset_record(cfg: EvalConfig, data: PreparedData) -> dict[str, Any]:
    report = data.report
    local_data = Path(cfg.dataset.path_or_dataset_id).expanduser()
    location = str(local_data.resolve()) if local_data.exists() else cfg.dataset.path_or_dataset_id
    return {"path": location, "split": cfg.dataset.split, "sha256": report.sha256,
            "rows_in": report.rows_in, "rows_used": report.rows_used,
            "dropped_by_reason": report.dropped_by_reason, "truncated": report.truncated,
            "supervised_tokens": report.supervised_tokens, "expansion": report.expansion}


def _settings(cfg: EvalConfig, use: TemplateUse, prompts: list[Prompt], dtype_name: str,
              device: Any) -> dict[str, Any]:
    return {
        "chat_template": {"origin": use.origin, "source": use.choice.source, "sha256": use.choice.sha256,
                          "mask_method": use.choice.method},
        "seq_length": cfg.dataset.seq_length, "truncation": cfg.dataset.truncation,
        "train_on": cfg.dataset.train_on, "mask_generation_prompt": cfg.dataset.mask_generation_prompt,
        # how conversations became rows and what every render was given: both change the prompts and the loss
        "multi_turn": cfg.dataset.multi_turn, "chat_template_kwargs": redact(cfg.dataset.chat_template_kwargs),
        "num_samples_limit": cfg.dataset.num_samples_limit, "torch_dtype": dtype_name, "device": device.type,
        "local_batch_size": cfg.local_batch_size, "seed": cfg.seed,
        "generation": {"decoding": "greedy", "num_prompts": len(prompts),
                       "max_new_tokens": cfg.generation.max_new_tokens, "scoring": cfg.generation.scoring,
                       "prompt_rows": [p.row for p in prompts]},
    }


def score_targets(cfg: EvalConfig, targets: list[Target]) -> Scores:
    """One template, one tokenization and one set of prompts for all; then every target, one at a time."""
    use = choose_eval_template(cfg, targets)
    data = prepare_training_data(cfg.dataset, use.tokenizer, key="dataset", log=log)
    prompts = generation_prompts(cfg, data, use)
    device = pick_device()
    dtype = resolve_dtype(cfg.torch_dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    for name in use.differs:
        log(f"warning: the {name} target's tokenizer carries another chat template than the one used "
            f"({use.origin}); set dataset.chat_template to the template it was trained with to score it that way")
    unused = qlora_base_unused(cfg, targets)
    if unused:
        log(f"warning: {unused}")
    dataset = _dataset_record(cfg, data)
    settings = _settings(cfg, use, prompts, dtype_name, device)
    log(f"eval: {len(targets)} target(s) on {data.report.rows_used} rows ({data.report.supervised_tokens:,} "
        f"supervised tokens) of {cfg.dataset.path_or_dataset_id}, template from {use.origin}, {dtype_name} on "
        f"{device.type}")

    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        log(f"eval: {target.name}: loading {target.describe()}")
        metrics, answers[target.name] = score_target(cfg, target, data, prompts, use.tokenizer, device, dtype)
        results[target.name] = target_record(target, metrics, dataset, settings)
        log(f"eval: {target.name}: loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3g}, token "
            f"accuracy {metrics['token_accuracy']:.3f} ({metrics['elapsed_s']:.1f}s)")
    generations = [{"row": p.row, "prompt": p.messages, "reference": p.reference,
                    "answers": {name: answers[name][i] for name in results}} for i, p in enumerate(prompts)]
    return Scores(dataset, settings, results, agreement(results, dtype_name), generations)
