"""`chatft run convert/merge_lora`: fold a LoRA adapter into its base model.

In: a `MergeConfig`: the adapter (`lora_checkpoint`: an adapter dir or a peft/automodel run dir, whose
`final/` is used), the base (`base_hf_path`, by default the one the adapter's `chatft_manifest.json` records)
and `output_hf_path`. Out: `output_hf_path` as a plain `save_pretrained` dir (safetensors weights in the base's
dtype or `torch_dtype`, config and generation config, the base's tokenizer and chat template) with a
`chatft_manifest.json` of kind `merged`; transformers alone loads it.

1. Checks that load nothing (`plan_merge`): the adapter is found; it is validated (`adapter_not_validated`:
   a warning, or an error with `require_validated=true`); the base is the one the adapter was trained on
   (`adapter_base`, the rule eval uses too: weights fingerprint against the adapter's manifest; without a
   manifest, the base named in `adapter_config.json`); the output overlaps neither input (`output_paths`) and
   is empty, or `overwrite=true`.
2. The base is loaded in float32 and checked against the adapter's weight shapes, the adapter is applied
   with PEFT, and a few probe rows give the reference logits of base+adapter (and of the base alone, to show
   how much the adapter moves them). `merge_and_unload` folds the adapter in, in float32, then the weights are
   cast to the output dtype once and saved into a temporary dir next to the output.
3. The saved model is loaded back (upcast to float32) and its logits on the same rows are compared with the
   reference: the largest absolute difference must stay within a tolerance set by the output dtype's
   rounding. Only then does the temporary dir become `output_hf_path`.

Progress (`chatft.console`, off with `show_progress=false`): over the check's forward passes and over the LoRA
layers as they are merged; transformers' own loading and saving bars only on a terminal.

A QLoRA adapter (its manifest records a 4-bit base) is merged the same way, into the full-precision base, never
into 4-bit weights. The merged model is also compared with the 4-bit base + adapter it was trained as; that
difference is reported (and warned about beyond `QUANTIZED_TOLERANCE_FACTOR` times what quantizing moves the base
alone), since the merged model cannot keep the 4-bit rounding the adapter was trained against.

Tokens: the tokenizer is the base's own, eos and pad untouched; config.json keeps the base's eos/pad ids, and
generation_config.json keeps the base's eos ids followed by the chat template's end-of-turn token and the
tokenizer's EOS where missing (`artifacts.generation_stop_ids`, the rule training and eval use), so servers stop
at the end of a turn. The probe rows and the end-of-turn probe render the template with the
`dataset.chat_template_kwargs` the adapter's manifest records (e.g. `{enable_thinking: false}`), as training did. The chat template is the
base's, unless the adapter's manifest shows training used another one: then that one, with a warning.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft import artifacts, console, quantization
from chatft.adapter_base import read_adapter_config, resolve_adapter_base
from chatft.adapter_fit import check_adapter_fits
from chatft.config.compile import CompiledConfig
from chatft.config.schema import MergeConfig, ModelSection
from chatft.config.secrets import redact
from chatft.errors import ChatftError
from chatft.output_paths import check_output_path, held_entries
from chatft.run_layout import JOB_FILE

# Max |logit difference| allowed between the reloaded merged model and base+adapter, per output dtype, as a
# fraction of the largest |logit| (at least 1). Rounding the merged weights to the output dtype is the only
# expected difference: measured on SmolLM2-135M (30 layers, logits up to ~38) it is 2.4e-6 (float32; the
# merged matmul only reorders sums), 1.3e-3 (float16) and 9.6e-3 (bfloat16) of the largest logit.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
PROBE_MAX_TOKENS = 64
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a helpful assistant. Answer the question briefly and politely."},
     {"role": "user", "content": "Please write a short poem about the sea and the sky."},
     {"role": "assistant", "content": "The sea is blue, the sky is wide; the light goes down with the tide."}],
    [{"role": "user", "content": "Translate the following sentence into French: the cat sleeps on the mat."}],
)
TMP_SUFFIX = ".merging"
# QLoRA: the merge goes into the full-precision base, so the merged model differs from what was trained (the 4-bit
# base + adapter) by what quantizing changes in the base, carried through the layers the adapter moved. Allowed
# before a warning: this many times the 4-bit base's own max |logit difference| to the full-precision base. Measured
# (float32 merges, nf4 with double quantization, the probe rows): 1.4x on the tiny test model (random weights, 6 steps
# at lr 1e-2), 1.0x on the demo model (SmolLM2-135M, 6 steps at lr 1e-4; both differences about 25 logits); 3x
# leaves room for longer training. Beyond it the adapter leans on the 4-bit rounding, which a merge cannot keep.
QUANTIZED_TOLERANCE_FACTOR = 3.0


# --------------------------------------------------------------------------- plan: checks that load nothing


@dataclass
class MergePlan:
    """What `plan_merge` found: the inputs, resolved, and the warnings to print before merging."""

    adapter_dir: Path
    adapter_config: dict[str, Any]
    adapter_manifest: dict[str, Any] | None
    base: str  # absolute local dir, or a Hub id
    base_revision: str | None
    output: Path
    warnings: list[str] = field(default_factory=list)


def plan_merge(cfg: MergeConfig) -> MergePlan:
    """Every check that needs no model in memory, in the order a user would fix them."""
    if cfg.backend == "megatron_bridge":  # compile refuses it already; a direct caller gets the same answer
        raise ChatftError("route_not_supported", "backend=megatron_bridge asks for Megatron-Bridge",
                          "merge Megatron checkpoints with Megatron-Bridge's merge_lora; backend=auto or hf_peft "
                          "merges PEFT adapters into HF checkpoints")
    if not cfg.safe_serialization:
        raise ChatftError("config_invalid", "safe_serialization=false: chatft writes safetensors only",
                          "drop safe_serialization (or set it to true); pickled weights are never written")
    adapter_dir = artifacts.find_adapter_dir(cfg.lora_checkpoint)
    adapter_config = _read_adapter_config(adapter_dir)
    manifest = artifacts.read_manifest(adapter_dir)
    warnings = [_validation_warning(cfg, adapter_dir, manifest)]
    # The base must be here to be checked: merge's checks run before anything is downloaded.
    base = resolve_adapter_base(adapter_dir, "base_hf_path", cfg.base_hf_path, require_local=True)
    if base.unverified:
        warnings.append(f"{base.unverified}; merging after checking every adapter weight's shape")
    output = _check_output(cfg, adapter_dir, base.name_or_path, base.revision)
    return MergePlan(adapter_dir, adapter_config, manifest, base.name_or_path, base.revision, output,
                     [w for w in warnings if w])


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter saved as safetensors; anything else is refused."""
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / artifacts.ADAPTER_CONFIG
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ChatftError("config_invalid", f"{path} is a {config.get('peft_type')} adapter, not LoRA",
                          "convert/merge_lora merges LoRA adapters only")
    if not (adapter_dir / artifacts.ADAPTER_WEIGHTS).is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise ChatftError(
            "adapter_not_found",
            f"no {artifacts.ADAPTER_WEIGHTS} in {adapter_dir}"
            + (" (it holds adapter_model.bin, a pickle, which chatft never loads)" if pickled else ""),
            "save the adapter with safetensors (PEFT's default: save_pretrained(dir)), or point lora_checkpoint "
            "at a complete adapter dir",
        )
    return config


def _validation_warning(cfg: MergeConfig, adapter_dir: Path, manifest: dict[str, Any] | None) -> str | None:
    if manifest is not None and manifest.get("validations"):
        return None
    why = "its chatft_manifest.json has no eval record" if manifest is not None else "it has no chatft_manifest.json"
    message = f"the adapter {adapter_dir} is not validated: {why}"
    hint = f"run `chatft run eval/model_eval adapter={adapter_dir}` first"
    if cfg.require_validated:
        raise ChatftError("adapter_not_validated", message, f"{hint}, or drop require_validated to merge anyway")
    return f"[adapter_not_validated] {message}; merging anyway ({hint}; require_validated=true refuses this)"


def _check_output(cfg: MergeConfig, adapter_dir: Path, base: str, revision: str | None) -> Path:
    """output_hf_path overlaps no input (the merge replaces the whole dir) and is empty, or `overwrite=true`
    replaces an earlier model there. Returns it, resolved."""
    inputs = [(f"lora_checkpoint={cfg.lora_checkpoint}", Path(cfg.lora_checkpoint)),
              (f"the adapter dir {adapter_dir}", adapter_dir),
              (f"the base {base}", artifacts.local_model_dir(base, revision))]
    output = check_output_path("output_hf_path", cfg.output_hf_path, inputs,
                               "write the merged model to a separate dir, e.g. output_hf_path=runs/merged")
    if output.exists() and not output.is_dir():
        raise ChatftError("config_invalid", f"output_hf_path={cfg.output_hf_path} is a file",
                          "give a dir path for the merged model")
    held = held_entries(output)
    if held and not cfg.overwrite:
        raise ChatftError("config_invalid",
                          f"output_hf_path={cfg.output_hf_path} is not empty ({', '.join(held[:5])}"
                          f"{', ...' if len(held) > 5 else ''})",
                          "pick a new output_hf_path, or overwrite=true to replace what is there")
    if held and not ({"config.json", artifacts.MANIFEST_FILE} & set(held)):
        raise ChatftError("config_invalid",
                          f"overwrite=true would delete {output}, which does not hold a model ({', '.join(held[:5])})",
                          "overwrite only replaces an earlier model or merge output; pick a new output_hf_path")
    return output


# --------------------------------------------------------------------------- merge


@dataclass(frozen=True)
class MergeResult:
    output: Path
    dtype: str
    max_abs_diff: float
    tolerance: float
    adapter_effect: float  # max |logit change| the adapter makes on the probe rows
    probe_rows: int
    probe_tokens: int
    as_trained: dict[str, Any] | None = None  # QLoRA: the merged model against the 4-bit base + adapter


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """transformers' own loading and saving bars: tqdm's, which redraw with carriage returns on stderr, so only where
    a bar can be drawn in place (`console.shows_bars`), never in a log, in JSON lines or with --quiet."""
    from chatft.train.model import quiet_hub_progress  # keeps torch out of the fast CLI path (preflight)

    with contextlib.nullcontext() if show and console.shows_bars(sys.stderr) else quiet_hub_progress():
        yield


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def output_dtype(cfg: MergeConfig, base: str, revision: str | None) -> str:
    """`torch_dtype`, or with `auto` the dtype the base checkpoint is stored in (float32 if it says none)."""
    if cfg.torch_dtype != "auto":
        return cfg.torch_dtype
    directory = artifacts.local_model_dir(base, revision)
    stored = artifacts.checkpoint_dtype(directory) if directory is not None else None
    return stored if stored in TOLERANCE else "float32"


def probe_rows(tokenizer, template_kwargs: dict[str, Any] | None = None) -> list[list[int]]:
    """A few short rows to compare logits on: chat conversations when the tokenizer has a template, rendered
    with the variables training rendered its rows with (`template_kwargs`)."""
    rows = []
    for messages in PROBE_CONVERSATIONS:
        text = "\n".join(m["content"] for m in messages)
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=messages[-1]["role"] == "user",
                                                     **(template_kwargs or {}))
            except Exception:  # a template that refuses these roles (no system turn, say): plain text will do
                pass
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROBE_MAX_TOKENS]
        rows.append(ids or [tokenizer.eos_token_id or 0])
    return rows


def _logits(model, rows: list[list[int]], progress: console.Progress) -> list:
    """The logits of each row, counted on `progress` (each is read back to the CPU, so the count is what is done)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()
                for ids in progress.each(rows)]


def _logits_with_and_without_adapter(model, rows: list[list[int]], task: str, show: bool) -> tuple[list, list]:
    """The logits of base + adapter and of the base alone (the adapter disabled), with progress over both."""
    with console.Progress(task, 2 * len(rows), "rows", show=show) as progress:
        adapted = _logits(model, rows, progress)
        with model.disable_adapter():
            return adapted, _logits(model, rows, progress)


def _merge_layers(model, show: bool):
    """`merge_and_unload`, with progress over the LoRA layers (PEFT's own bar is tqdm's: carriage returns, no JSON).
    Each outermost LoRA layer is merged by PEFT's own `merge`, loaded first where offloaded, as merge_and_unload
    does; merge_and_unload then finds every layer merged and only unloads them and updates the config."""
    from peft.tuners.tuners_utils import BaseTunerLayer, onload_layer

    tuners = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    layers = [module for name, module in tuners.items() if not any(name.startswith(f"{o}.") for o in tuners)]
    with console.Progress("merging LoRA layers", len(layers), "layers", show=show) as progress:
        for layer in progress.each(layers):
            with onload_layer(layer):
                layer.merge(safe_merge=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged", category=UserWarning)
        return model.merge_and_unload(safe_merge=True, progressbar=False)


def _max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _template_warning(tokenizer, adapter_dir: Path, manifest: dict[str, Any] | None) -> str | None:
    """Use the chat template training used when the manifest shows it was not the base's."""
    trained = ((manifest or {}).get("tokenizer") or {}).get("chat_template_sha256")
    if not trained or trained == artifacts.chat_template_sha256(tokenizer):
        return None
    from transformers import AutoTokenizer

    try:
        adapter_tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    except (OSError, ValueError):
        adapter_tokenizer = None
    if adapter_tokenizer is None or artifacts.chat_template_sha256(adapter_tokenizer) != trained:
        return ("the adapter was trained with a chat template other than the base's, and its dir does not hold "
                "that template: the merged model gets the base's, check it before serving")
    tokenizer.chat_template = adapter_tokenizer.chat_template
    return ("the adapter was trained with a chat template other than the base's (dataset.chat_template): the "
            "merged model gets the one it was trained with, from the adapter dir")


def _lora_record(adapter_config: dict[str, Any], manifest: dict[str, Any] | None) -> dict[str, Any]:
    if manifest and manifest.get("lora"):
        return manifest["lora"]
    return artifacts.lora_record(adapter_config)


def _as_trained_logits(plan: MergePlan, rows: list[list[int]], trust_remote_code: bool,
                       show: bool) -> tuple[list, list] | None:
    """QLoRA: the logits of the 4-bit base + adapter, as training ran them, and of the 4-bit base alone; None for
    an adapter trained on an unquantized base."""
    record = (plan.adapter_manifest or {}).get("quantization")
    if not record:
        return None
    import torch
    from peft import PeftModel

    from chatft.train.model import load_model, pick_device  # keeps torch out of the fast CLI path (preflight)

    section = ModelSection(pretrained_model_name_or_path=plan.base, revision=plan.base_revision,
                           trust_remote_code=trust_remote_code, **quantization.section_update(record))
    console.info(f"   the adapter was trained on the base in {quantization.describe(record)}: comparing with that too")
    base = load_model(section, pick_device(), torch.float32, key="base_hf_path", training=False).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base, plan.adapter_dir).eval()
    trained, quantized_base = _logits_with_and_without_adapter(model, rows, "merge check (4-bit base + adapter)", show)
    del model, base
    gc.collect()
    return trained, quantized_base


def _against_as_trained(merged: list, base_logits: list, as_trained: tuple[list, list]) -> dict[str, Any]:
    """How far the merged model is from the 4-bit base + adapter, against what quantizing moves the base alone."""
    trained, quantized_base = as_trained
    diff, quantization_effect = _max_abs_diff(merged, trained), _max_abs_diff(quantized_base, base_logits)
    return {"max_abs_logit_diff": diff, "base_quantization_max_abs_logit_diff": quantization_effect,
            "tolerance": QUANTIZED_TOLERANCE_FACTOR * quantization_effect,
            "within_tolerance": diff <= QUANTIZED_TOLERANCE_FACTOR * quantization_effect}


def merge(cfg: MergeConfig, resolved_config: dict[str, Any] | None = None) -> MergeResult:
    """Merge, save, reload and verify; see the module docstring. Raises `ChatftError` on any refusal."""
    plan = plan_merge(cfg)  # refusals come before torch is even imported

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatft.train.model import load_errors, no_hub_kernels  # keeps torch out of the fast CLI path (preflight)

    for line in plan.warnings:
        console.warning(line)
    if cfg.trust_remote_code:
        console.warning("trust_remote_code=true: the model repo's own Python code will run")
    dtype = output_dtype(cfg, plan.base, plan.base_revision)
    load_args = {"revision": plan.base_revision, "trust_remote_code": cfg.trust_remote_code}
    model_args = {"dtype": torch.float32, **({"device_map": cfg.device_map} if cfg.device_map else {})}

    console.info(f"merging {plan.adapter_dir}\n   into {plan.base}\n   -> {plan.output} ({dtype}, safetensors)")
    with _loading_bars(cfg.show_progress), no_hub_kernels(), load_errors("base_hf_path", plan.base):
        tokenizer = AutoTokenizer.from_pretrained(plan.base, **load_args)
        base_model = AutoModelForCausalLM.from_pretrained(plan.base, **load_args, **model_args)
    base_model.eval()
    for line in check_adapter_fits(base_model, plan.adapter_dir, cfg.strict):
        console.warning(line)
    template_note = _template_warning(tokenizer, plan.adapter_dir, plan.adapter_manifest)
    if template_note:
        console.warning(template_note)

    with load_errors("lora_checkpoint", str(plan.adapter_dir)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base_model, plan.adapter_dir, low_cpu_mem_usage=cfg.low_cpu_mem_usage)
    model.eval()
    template_kwargs = artifacts.recorded_template_kwargs(plan.adapter_manifest)  # e.g. {enable_thinking: false}
    rows = probe_rows(tokenizer, template_kwargs)
    # The check's reference: base + adapter, and the base alone (how far the adapter moves the logits).
    reference, base_logits = _logits_with_and_without_adapter(model, rows, "merge check (base + adapter)",
                                                              cfg.show_progress)
    adapter_effect = _max_abs_diff(reference, base_logits)
    as_trained = _as_trained_logits(plan, rows, cfg.trust_remote_code,  # QLoRA: never merged into 4-bit weights
                                    cfg.show_progress)
    merged = _merge_layers(model, cfg.show_progress)
    merged.to(_torch_dtype(dtype))
    artifacts.stop_at_end_of_turn(merged, tokenizer, template_kwargs=template_kwargs)

    tmp = plan.output.with_name(f".{plan.output.name}{TMP_SUFFIX}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _loading_bars(cfg.show_progress):
            merged.save_pretrained(tmp)
        if cfg.save_tokenizer:
            tokenizer.save_pretrained(tmp)
        del model, merged, base_model
        gc.collect()

        with _loading_bars(cfg.show_progress), no_hub_kernels(), load_errors("output_hf_path", str(tmp)):
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=cfg.trust_remote_code,
                                                            **model_args).eval()
        with console.Progress("merge check (merged model)", len(rows), "rows", show=cfg.show_progress) as progress:
            merged_logits = _logits(reloaded, rows, progress)
        diff = _max_abs_diff(merged_logits, reference)
        del reloaded
        gc.collect()
        scale = max(1.0, max(float(r.abs().max()) for r in reference))
        tolerance = TOLERANCE[dtype] * scale
        if not diff <= tolerance:  # also catches NaN
            raise ChatftError(
                "merge_not_equivalent",
                f"the merged model's logits differ from base+adapter by up to {diff:.3g} on {len(rows)} probe "
                f"rows, above the {dtype} tolerance {tolerance:.3g}; nothing was written to {plan.output}",
                "merge in a wider dtype (torch_dtype=float32, or bfloat16 instead of float16), and check that the "
                "adapter and base load correctly with PEFT",
            )
        against_trained = _against_as_trained(merged_logits, base_logits, as_trained) if as_trained else None
        result = MergeResult(plan.output, dtype, diff, tolerance, adapter_effect, len(rows), sum(map(len, rows)),
                             against_trained)
        if against_trained and not against_trained["within_tolerance"]:
            console.warning(
                f"the merged model's logits differ from the 4-bit base + adapter it was trained as by up to "
                f"{against_trained['max_abs_logit_diff']:.3g}, more than {QUANTIZED_TOLERANCE_FACTOR:g}x what "
                f"quantizing moves the base alone ({against_trained['base_quantization_max_abs_logit_diff']:.3g}): "
                "the adapter leans on the 4-bit rounding; evaluate the merged model before serving it")
        if adapter_effect <= tolerance:
            console.warning(
                f"the adapter moves the probe logits by at most {adapter_effect:.3g}, within the {dtype} tolerance "
                f"{tolerance:.3g}: at this dtype the check cannot tell the merge from the base (an untrained adapter, "
                "or torch_dtype=float32 to keep a small change)")

        adapter_metrics = (plan.adapter_manifest or {}).get("metrics") or {}
        manifest = artifacts.build_manifest(
            kind="merged",
            base_model=artifacts.base_model_record(plan.base, plan.base_revision),
            tokenizer=tokenizer,
            data=(plan.adapter_manifest or {}).get("data") or {},
            config=redact(resolved_config if resolved_config is not None else cfg.model_dump(mode="json")),
            metrics={"train_loss": adapter_metrics.get("train_loss"), "val_loss": adapter_metrics.get("val_loss"),
                     "merge_check": {"max_abs_logit_diff": diff, "tolerance": tolerance, "dtype": dtype,
                                     "adapter_max_abs_logit_change": adapter_effect, "probe_rows": len(rows),
                                     "probe_tokens": result.probe_tokens,
                                     **({"against_4bit_base": against_trained} if against_trained else {})}},
            versions=artifacts.package_versions(),
            lora=_lora_record(plan.adapter_config, plan.adapter_manifest),
        )
        manifest["adapter"] = artifacts.adapter_record(plan.adapter_dir, plan.adapter_manifest)
        artifacts.write_manifest(tmp, manifest)
        _move_into_place(tmp, plan.output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    console.result(f"done: merged model in {plan.output} [checkpoint_hf, {dtype}]\n"
                   f"check: max |logit diff| vs base+adapter {diff:.3g} (tolerance {tolerance:.3g}) over {len(rows)} "
                   f"probe rows, {result.probe_tokens} tokens; the adapter moves logits by up to {adapter_effect:.3g}")
    if against_trained:
        console.result(f"QLoRA: merged into the full-precision base; vs the 4-bit base + adapter as trained, max "
                       f"|logit diff| {against_trained['max_abs_logit_diff']:.3g} (tolerance "
                       f"{against_trained['tolerance']:.3g}: {QUANTIZED_TOLERANCE_FACTOR:g}x the 4-bit base's own "
                       f"difference {against_trained['base_quantization_max_abs_logit_diff']:.3g})")
    return result


def _move_into_place(tmp: Path, output: Path) -> None:
    """Replace `output` by `tmp`, keeping the job.yaml `chatft run` wrote for this merge."""

    if output.is_dir():
        if (output / JOB_FILE).is_file():
            shutil.move(str(output / JOB_FILE), str(tmp / JOB_FILE))
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(output)


def run_step(compiled: CompiledConfig) -> None:
    merge(compiled.validated, resolved_config=compiled.effective())


def preflight(compiled: CompiledConfig) -> None:
    """The refusals that need no model, for `chatft run` to call before it writes job.yaml into the output
    (which would otherwise land in an overlapping input before `output_path_overlaps_inputs` is raised)."""
    plan_merge(compiled.validated)
