"""`chatft run eval/model_eval`: score base, adapter and merged model on the same chat rows.

In: an `EvalConfig` (targets, their paths, the eval rows, generation settings) and the output dir (`job.yaml`
is already there). Out: `eval_results.json` and `eval_results.md` in the output dir (the table is printed too),
and one record appended to the `validations` of each target's `chatft_manifest.json` where it has one.

Each target is a separate validation point scored with identical settings:
- one chat template for all (`dataset.chat_template`, else the first target's tokenizer that has one), and
  the rows tokenized and masked once, by training's pipeline, so every target sees the same token ids and
  the same supervised tokens;
- loss, perplexity and token accuracy over the supervised (assistant) tokens (`train.losses`, the training
  loop's own validation);
- greedy answers to the same `generation.num_prompts` prompts: the conversation up to its last assistant turn,
  rendered with the generation prompt, stopped at the end-of-turn token, optionally scored against the
  reference answer (`generation.scoring`); `local_batch_size` prompts are answered together.
Targets are loaded one at a time and freed before the next. When both adapter (base + adapter, not merged)
and merged are scored, their losses must agree within a dtype-dependent tolerance: a disagreement means the
merged model is not this adapter merged into this base, and the step fails after writing its results.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft import artifacts
from chatft.config.schema import EvalConfig, ModelSection
from chatft.errors import ChatftError

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"
FINAL = "final"  # a training run's artifact folder (train.loop.FINAL, not imported: it pulls in torch)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Relative loss difference allowed between adapter (base + adapter, unmerged) and merged. float32 differs only
# by summation order; in half precision the merged weights W + BA are rounded once more, and the LoRA weights
# stay float32 in the unmerged model.
AGREEMENT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
# A merged model whose loss differs from base + adapter is not this adapter merged into this base: the id
# convert/merge_lora raises when its own logit check finds the same.
AGREEMENT_ERROR_ID = "merge_not_equivalent"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One validation point: what to load, and where its tokenizer and manifest are."""

    name: str  # base | adapter | merged
    model: str  # a model dir or Hub id; for the adapter target, the base it is loaded on
    revision: str | None = None
    adapter_dir: Path | None = None  # adapter target only
    base_source: str | None = None  # adapter target: where its base came from (config | manifest | adapter_config)
    base_fingerprint: str | None = None  # adapter target: its base's weights fingerprint, once known
    notes: list[str] = field(default_factory=list)

    @property
    def artifact_dir(self) -> Path | None:
        """The local dir of what this target evaluates (the adapter for the adapter target)."""
        if self.adapter_dir is not None:
            return self.adapter_dir
        path = Path(self.model).expanduser()
        return path.resolve() if path.is_dir() else None

    @property
    def tokenizer_source(self) -> str:
        """The adapter's own tokenizer (saved with it by training) when it has one, else the model's."""
        if self.adapter_dir is not None and any((self.adapter_dir / f).is_file() for f in TOKENIZER_FILES):
            return str(self.adapter_dir)
        return self.model

    def model_section(self, cfg: EvalConfig, path: str | None = None) -> ModelSection:
        """Loading settings for the model (or, with `path`, another location such as the adapter dir)."""
        return ModelSection(pretrained_model_name_or_path=path or self.model,
                            revision=self.revision if path in (None, self.model) else None,
                            torch_dtype=cfg.torch_dtype, trust_remote_code=cfg.trust_remote_code)

    def describe(self) -> str:
        if self.adapter_dir is not None:
            return f"{self.adapter_dir} on {self.model}"
        return self.model


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model_path(key: str, value: str) -> str:
    """A model dir (a training run dir means its `final/`), or a Hub id passed on as given."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not _is_model_dir(path) and _is_model_dir(path / FINAL):
            path = path / FINAL
        if _is_adapter_dir(path) and not _is_model_dir(path):
            raise ChatftError(
                "config_invalid",
                f"{key}={value} is a LoRA adapter, not a model",
                f"evaluate it as the adapter target: targets=[base,adapter] adapter={value} (or merge it first "
                "with convert/merge_lora and evaluate the merged dir)",
            )
        return str(path.resolve())
    if path.exists():
        raise ChatftError("config_invalid", f"{key}={value} is a file, not a model dir",
                          "give the save_pretrained dir that holds config.json")
    return value  # a Hub id, or a path that does not exist: loading says which


def adapter_base(adapter_dir: Path, configured: str | None) -> tuple[str, str | None, str]:
    """The base the adapter loads on: `base` when set, else the base its manifest records, else the one its
    adapter_config.json names. Returns (name_or_path, revision, where it came from)."""
    if configured is not None:
        return resolve_model_path("base", configured), None, "config"
    manifest = artifacts.read_manifest(adapter_dir) or {}
    recorded = manifest.get("base_model") or {}
    if recorded.get("name_or_path"):
        return recorded["name_or_path"], recorded.get("revision"), "manifest"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter_config.get("base_model_name_or_path"):
        return adapter_config["base_model_name_or_path"], adapter_config.get("revision"), "adapter_config"
    raise ChatftError(
        "config_invalid",
        f"the adapter {adapter_dir} records no base model (no chatft_manifest.json, and adapter_config.json has "
        "no base_model_name_or_path), and `base` is not set",
        "set base=<the model the adapter was trained on>",
    )


def check_adapter_base(target: Target) -> str | None:
    """Refuse a base whose weights differ from those the adapter's manifest records (`base_model_mismatch`).
    Returns the base's fingerprint, None while its weights are not local (a Hub id not yet downloaded: the
    check runs again once loading has fetched them)."""
    fingerprint = artifacts.weights_fingerprint(target.model, target.revision)
    recorded_base = (artifacts.read_manifest(target.adapter_dir) or {}).get("base_model") or {}
    recorded, name = recorded_base.get("fingerprint"), recorded_base.get("name_or_path")
    if recorded is not None and fingerprint is not None and fingerprint != recorded:
        raise ChatftError(
            "base_model_mismatch",
            f"the adapter {target.adapter_dir} was trained on {name} (weights fingerprint {recorded[:12]}), but "
            f"its base here, {target.model}, has other weights (fingerprint {fingerprint[:12]})",
            f"set base={name} (the base recorded in {target.adapter_dir / artifacts.MANIFEST_FILE})",
        )
    return fingerprint


def base_check_note(target: Target) -> str | None:
    """What the results say when the adapter's base could not be checked by its weights."""
    recorded = ((artifacts.read_manifest(target.adapter_dir) or {}).get("base_model") or {})
    if recorded.get("fingerprint") is None:
        return "base not verified: the adapter has no chatft manifest recording its base's weights"
    if target.base_fingerprint is None:
        return f"base not verified: the weights of {target.model} are not local"
    return None


def resolve_targets(cfg: EvalConfig) -> list[Target]:
    """Every target's paths, checked before anything is loaded."""
    targets = []
    for name in cfg.targets:
        if name == "adapter":
            adapter_dir = artifacts.find_adapter_dir(cfg.adapter, key="adapter")  # a run dir means its final/
            model, revision, source = adapter_base(adapter_dir, cfg.base)
            targets.append(Target(name, model, revision, adapter_dir=adapter_dir, base_source=source))
        else:
            targets.append(Target(name, resolve_model_path(name, getattr(cfg, name))))
    return targets


def check_output_dir(output_dir: Path, targets: list[Target], dataset_path: str) -> None:
    """Results must not land in a model or data dir (it would change that artifact). An output dir that
    merely contains an input is fine: eval only adds its two files and never deletes."""
    inputs = [(t.name, t.artifact_dir) for t in targets]
    inputs += [(f"{t.name}'s base", Path(t.model).resolve()) for t in targets if t.adapter_dir is not None]
    data = Path(dataset_path).expanduser()
    inputs.append(("dataset.path_or_dataset_id", data.resolve() if data.is_dir() else None))
    out = output_dir.resolve()
    for name, path in inputs:
        if path is not None and path.is_dir() and (out == path or path in out.parents):
            raise ChatftError(
                "output_path_overlaps_inputs",
                f"output_dir={output_dir} is {'the' if out == path else 'inside the'} {name} dir {path}",
                "pick an output_dir of its own, e.g. output_dir=runs/eval",
            )


def checked_targets(cfg: EvalConfig, output_dir: Path) -> list[Target]:
    """The refusals that need no model: the data path, every target's path, the output dir."""
    from chatft.data.guards import check_dataset_path

    check_dataset_path(cfg.dataset.path_or_dataset_id)
    targets = resolve_targets(cfg)
    check_output_dir(output_dir, targets, cfg.dataset.path_or_dataset_id)
    return targets


# --------------------------------------------------------------------------- tokenizer, template, rows


def _target_key(target: Target) -> str:
    return "base" if target.adapter_dir is not None else target.name


def load_target_tokenizer(cfg: EvalConfig, target: Target):
    from chatft.train.model import load_tokenizer

    source = target.tokenizer_source
    return load_tokenizer(target.model_section(cfg, source), key=_target_key(target) if source == target.model else "adapter")


def _template_text(tokenizer: Any) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("default")
    return template or None


@dataclass
class TemplateUse:
    tokenizer: Any  # the tokenizer the rows are tokenized with; carries the chosen template
    choice: Any  # data.pipeline.TemplateChoice
    origin: str  # dataset.chat_template | tokenizer of <target>
    differs: list[str]  # targets whose own tokenizer carries another template


def choose_eval_template(cfg: EvalConfig, targets: list[Target]) -> TemplateUse:
    """One template for every target. `dataset.chat_template` when set; else the template of the first
    target (in `targets` order) whose tokenizer has one, so a template-less base next to a fine-tuned model
    is scored with the template it was trained on. Every target must share one vocabulary: the token ids
    are computed once."""
    from chatft.artifacts import text_sha256
    from chatft.data.pipeline import choose_template

    tokenizers = [(t, load_target_tokenizer(cfg, t)) for t in targets]
    first_target, first = tokenizers[0]
    vocabulary = first.get_vocab()
    for target, tokenizer in tokenizers[1:]:
        if tokenizer.get_vocab() != vocabulary or tokenizer.eos_token_id != first.eos_token_id:
            raise ChatftError(
                "config_invalid",
                f"the targets have different tokenizers ({first_target.name}: {first_target.tokenizer_source}, "
                f"{target.name}: {target.tokenizer_source}), so the same token ids cannot score both",
                "evaluate models that share a tokenizer (a base and what was fine-tuned from it) in one run; "
                "score other models in runs of their own",
            )
    if cfg.dataset.chat_template:
        chosen_target, tokenizer, origin = first_target, first, "dataset.chat_template"
    else:
        with_template = [(t, tok) for t, tok in tokenizers if _template_text(tok)]
        chosen_target, tokenizer = with_template[0] if with_template else (first_target, first)
        origin = f"tokenizer of {chosen_target.name}"
    choice = choose_template(tokenizer, cfg.dataset.chat_template)  # chat_template_missing when there is none
    chosen_sha = text_sha256(_template_text(tokenizer) or "")
    differs = [t.name for t, tok in tokenizers
               if _template_text(tok) and t is not chosen_target and text_sha256(_template_text(tok)) != chosen_sha]
    return TemplateUse(tokenizer, choice, origin, differs)


@dataclass
class Prompt:
    row: int  # 1-based source row number
    messages: list[dict[str, Any]]  # the conversation before the last assistant turn
    reference: str  # the last assistant turn's content
    input_ids: list[int]


def generation_prompts(cfg: EvalConfig, data: Any, use: TemplateUse) -> list[Prompt]:
    """`generation.num_prompts` rows chosen with the seed among the rows that were scored, in row order:
    each conversation up to its last assistant turn, rendered with the generation prompt."""
    from chatft.data.masks import template_messages
    from chatft.data.sources import read_message_rows

    wanted = cfg.generation.num_prompts
    if wanted == 0:
        return []
    scored = {row.source_row for row in data.rows}
    candidates = []
    for number, row in read_message_rows(cfg.dataset).rows:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if number not in scored or not last:
            continue
        reference = messages[last].get("content")
        if isinstance(reference, str) and reference.strip():
            candidates.append((number, messages[:last], reference, row.get("tools")))
    chosen = sorted(random.Random(cfg.seed).sample(candidates, min(wanted, len(candidates))), key=lambda c: c[0])
    prompts = []
    for number, messages, reference, tools in chosen:
        text = use.tokenizer.apply_chat_template(template_messages(messages), tools=tools,
                                                 chat_template=use.choice.template, tokenize=False,
                                                 add_generation_prompt=True)
        ids = use.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own specials
        prompts.append(Prompt(number, messages, reference, list(ids)))
    return prompts


# --------------------------------------------------------------------------- scoring one target


def normalise_answer(text: str) -> str:
    return " ".join(text.split()).casefold()


def score_answer(answer: str, reference: str, scoring: str) -> bool | None:
    """exact_match: equal; contains: the answer contains the reference. Both compare case-folded text with
    whitespace runs collapsed. None when scoring is `none`."""
    if scoring == "none":
        return None
    answer, reference = normalise_answer(answer), normalise_answer(reference)
    return answer == reference if scoring == "exact_match" else reference in answer


def load_target_model(cfg: EvalConfig, target: Target, device: Any, dtype: Any):
    """The target's model on `device` in `dtype`, in eval mode; the adapter target is its base with the
    adapter loaded by PEFT, not merged."""
    from chatft.train.model import load_model

    model = load_model(target.model_section(cfg), device, dtype, key=_target_key(target))
    if target.adapter_dir is not None:
        from peft import PeftModel

        if target.base_fingerprint is None:  # a Hub base is in the local cache now that it has loaded
            target.base_fingerprint = check_adapter_base(target)
        note = base_check_note(target)
        if note:
            target.notes.append(note)
            log(f"warning: {note}")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = PeftModel.from_pretrained(model, str(target.adapter_dir), is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ChatftError(
                "base_model_mismatch",
                f"the adapter {target.adapter_dir} does not fit the base {target.model}: {str(exc).splitlines()[0]}",
                "set base to the model the adapter was trained on (its chatft_manifest.json or adapter_config.json "
                "names it)",
            ) from None
        model = model.to(device)
    return model.eval()


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


def generate_answers(model: Any, prompts: list[Prompt], tokenizer: Any, cfg: EvalConfig,
                     device: Any) -> list[dict[str, Any]]:
    """Greedy answers, stopped at the end-of-turn token, `local_batch_size` prompts at a time.

    Decoding one token reads every weight of the model, whatever the number of rows, so on a CPU (memory-bound)
    a batch of prompts costs about what one prompt costs (on 2 cores, 4 prompts of SmolLM2-135M decode a token in
    the time of 2 alone). The prompts of a batch are left-padded and masked out by the attention mask
    (`generate` derives the position ids from it), so each answer is the one its prompt gets alone: identical in
    float32 (tested); in half precision the batch's other matmul shapes may tip a near-tie. `local_batch_size=1`
    answers one prompt at a time."""
    import torch
    from transformers import GenerationConfig

    stop = [i for i in dict.fromkeys([artifacts.end_of_turn_token_id(tokenizer), tokenizer.eos_token_id])
            if i is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    # Every setting spelled out, so no target's own generation_config.json changes how it decodes.
    config = GenerationConfig(max_new_tokens=cfg.generation.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stop, pad_token_id=pad, use_cache=True, temperature=None, top_p=None,
                              top_k=None)
    answers: list[dict[str, Any]] = [{} for _ in prompts]
    for batch in prompt_batches(prompts, cfg.local_batch_size):
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
    return answers


def evaluate_target(cfg: EvalConfig, target: Target, data: Any, prompts: list[Prompt], tokenizer: Any,
                    device: Any, dtype: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load, score, free. Returns the metrics and the answers to `prompts`."""
    import torch

    from chatft.train import batching, losses, padding_free
    from chatft.train.model import probe_vocab_size

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
        score = losses.score_batches(model, batches, device, head)
        model.set_attn_implementation(attn)  # generation runs on the attention the model was loaded with
        answers = generate_answers(model, prompts, tokenizer, cfg, device)
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


# --------------------------------------------------------------------------- comparing and recording


def agreement(results: dict[str, dict[str, Any]], dtype_name: str) -> dict[str, Any] | None:
    """adapter vs merged: relative loss difference against the tolerance of the dtype scored in."""
    if "adapter" not in results or "merged" not in results:
        return None
    adapter, merged = results["adapter"]["metrics"]["loss"], results["merged"]["metrics"]["loss"]
    relative = abs(adapter - merged) / max(abs(adapter), abs(merged), 1e-12)
    tolerance = AGREEMENT_TOLERANCE[dtype_name]
    # A merge by chatft records the adapter it folded in; None when the merged model does not say.
    recorded = ((artifacts.read_manifest(results["merged"]["path"]) or {}).get("adapter") or {}).get("fingerprint") \
        if Path(results["merged"]["path"]).is_dir() else None
    same_adapter = None if recorded is None else recorded == results["adapter"]["model_fingerprint"]
    return {"adapter_loss": adapter, "merged_loss": merged, "relative_difference": relative,
            "tolerance": tolerance, "dtype": dtype_name, "passed": relative <= tolerance,
            "merged_records_this_adapter": same_adapter}


def model_fingerprints(target: Target) -> dict[str, Any]:
    if target.adapter_dir is not None:
        return {"model_fingerprint": artifacts.weights_fingerprint(target.adapter_dir),
                "base_fingerprint": target.base_fingerprint}
    return {"model_fingerprint": artifacts.weights_fingerprint(target.model, target.revision)}


def record_validation(target: Target, record: dict[str, Any]) -> str | None:
    """Append `record` to the target's chatft_manifest.json; a dir without one is never touched.
    Returns the manifest path written, or None."""
    directory = target.artifact_dir
    manifest = artifacts.read_manifest(directory) if directory is not None else None
    if manifest is None:
        return None
    manifest.setdefault("validations", []).append(record)
    return str(artifacts.write_manifest(directory, manifest))


# --------------------------------------------------------------------------- the step


def run_eval(cfg: EvalConfig, output_dir: str | Path, *, resolved_config: dict[str, Any] | None = None,
             ) -> dict[str, Any]:
    """Score every target, write eval_results.json / .md, print the table, append manifest records.
    Returns the results; raises after writing them when adapter and merged disagree."""

    from chatft.config.secrets import redact
    from chatft.data.pipeline import prepare_training_data
    from chatft.eval_report import render_markdown
    from chatft.run import package_versions
    from chatft.train.model import pick_device, resolve_dtype

    output_dir = Path(output_dir)
    targets = checked_targets(cfg, output_dir)
    for target in targets:  # refuse a wrong base before loading anything, where its weights are local
        if target.adapter_dir is not None:
            target.base_fingerprint = check_adapter_base(target)

    use = choose_eval_template(cfg, targets)
    data = prepare_training_data(cfg.dataset, use.tokenizer, key="dataset", log=log)
    prompts = generation_prompts(cfg, data, use)
    device = pick_device()
    dtype = resolve_dtype(cfg.torch_dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    for name in use.differs:
        log(f"warning: the {name} target's tokenizer carries another chat template than the one used "
            f"({use.origin}); set dataset.chat_template to the template it was trained with to score it that way")

    report = data.report
    local_data = Path(cfg.dataset.path_or_dataset_id).expanduser()
    data_location = str(local_data.resolve()) if local_data.exists() else cfg.dataset.path_or_dataset_id
    dataset = {"path": data_location, "split": cfg.dataset.split, "sha256": report.sha256,
               "rows_in": report.rows_in, "rows_used": report.rows_used,
               "dropped_by_reason": report.dropped_by_reason, "truncated": report.truncated,
               "supervised_tokens": report.supervised_tokens}
    settings = {
        "chat_template": {"origin": use.origin, "source": use.choice.source, "sha256": use.choice.sha256,
                          "mask_method": use.choice.method},
        "seq_length": cfg.dataset.seq_length, "truncation": cfg.dataset.truncation,
        "train_on": cfg.dataset.train_on, "mask_generation_prompt": cfg.dataset.mask_generation_prompt,
        "num_samples_limit": cfg.dataset.num_samples_limit, "torch_dtype": dtype_name, "device": device.type,
        "local_batch_size": cfg.local_batch_size, "seed": cfg.seed,
        "generation": {"decoding": "greedy", "num_prompts": len(prompts), "max_new_tokens": cfg.generation.max_new_tokens,
                       "scoring": cfg.generation.scoring, "prompt_rows": [p.row for p in prompts]},
    }
    log(f"eval: {len(targets)} target(s) on {report.rows_used} rows ({report.supervised_tokens:,} supervised tokens) "
        f"of {cfg.dataset.path_or_dataset_id}, template from {use.origin}, {dtype_name} on {device.type}")

    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        log(f"eval: {target.name}: loading {target.describe()}")
        metrics, answers[target.name] = evaluate_target(cfg, target, data, prompts, use.tokenizer, device, dtype)
        manifest = target.artifact_dir and artifacts.read_manifest(target.artifact_dir)
        results[target.name] = {
            "target": target.name,
            "path": str(target.adapter_dir or target.model),
            **({"base": target.model, "base_source": target.base_source} if target.adapter_dir else {}),
            "kind": manifest.get("kind") if manifest else None,
            **model_fingerprints(target),
            "dataset_sha256": report.sha256,
            "metrics": metrics,
            "settings": settings,
            "notes": target.notes,
        }
        log(f"eval: {target.name}: loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3g}, token "
            f"accuracy {metrics['token_accuracy']:.3f} ({metrics['elapsed_s']:.1f}s)")

    check = agreement(results, dtype_name)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    output_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        record = {
            "target": target.name, "time": created, "dataset": data_location,
            "dataset_sha256": report.sha256, "rows": report.rows_used, "metrics": results[target.name]["metrics"],
            "chat_template_sha256": use.choice.sha256, "torch_dtype": dtype_name,
            "eval_results": str((output_dir / RESULTS_JSON).resolve()),
        }
        if target.adapter_dir is not None:
            record["base"] = target.model
        if check is not None and target.name in ("adapter", "merged"):
            record["adapter_merged_agreement"] = check["passed"]
        written = record_validation(target, record)
        results[target.name]["validation_recorded"] = written
        if written is None:
            log(f"eval: {target.name}: {target.describe()} has no {artifacts.MANIFEST_FILE}: nothing recorded there")

    results_doc = {
        "format": 1,
        "created": created,
        "dataset": dataset,
        "settings": settings,
        "targets": results,
        "adapter_vs_merged": check,
        "generations": [
            {"row": p.row, "prompt": p.messages, "reference": p.reference,
             "answers": {name: answers[name][i] for name in results}}
            for i, p in enumerate(prompts)
        ],
        "versions": package_versions(),
        "config": redact(resolved_config if resolved_config is not None else cfg.model_dump(mode="json")),
    }
    (output_dir / RESULTS_JSON).write_text(json.dumps(results_doc, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    table = render_markdown(results_doc)
    (output_dir / RESULTS_MD).write_text(table, encoding="utf-8")
    print(table, flush=True)
    print(f"results: {output_dir / RESULTS_JSON} and {output_dir / RESULTS_MD}", flush=True)
    if check is not None and not check["passed"]:
        raise ChatftError(
            AGREEMENT_ERROR_ID,
            f"adapter and merged disagree: loss {check['adapter_loss']:.6f} (adapter {cfg.adapter} on its base) vs "
            f"{check['merged_loss']:.6f} (merged {cfg.merged}), relative difference {check['relative_difference']:.2e} "
            f"> {check['tolerance']:.0e} allowed in {dtype_name}: the merged model is most likely not this adapter "
            f"merged into this base (results were written to {output_dir})",
            "merge this adapter into this base (chatft run convert/merge_lora lora_checkpoint=ADAPTER "
            "output_hf_path=DIR) and evaluate that, or point adapter/base/merged at artifacts that belong together",
        )
    return results_doc


def preflight(compiled: Any) -> None:
    """For `chatft run` to call before it writes job.yaml into output_dir: refuses a missing adapter or an
    output_dir inside an input before anything lands there."""
    from chatft.run import run_dir

    checked_targets(compiled.validated, run_dir(compiled))


def run_step(compiled: Any) -> None:
    from chatft.run import run_dir

    run_eval(compiled.validated, run_dir(compiled), resolved_config=compiled.effective())
