"""Model and tokenizer loading, and LoRA wrapping.

In: the `model` and `peft` sections. Out: a tokenizer, a causal LM on its device in the configured dtype
(wrapped as a `PeftModel` when `peft` is set, with its trainable LoRA weights kept in float32), and the
parameter counts the start-up summary prints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatft import console, quantization
from chatft.config.schema import LoraSection, ModelSection
from chatft.errors import ChatftError
from chatft.train import recompute
from chatft.train.precision import dtype_name
from chatft.data.guards import check_model_location


# --------------------------------------------------------------------------- device and dtype


def pick_device() -> torch.device:
    """CUDA when present, else CPU. (A later issue picks `cuda:LOCAL_RANK` per process.)"""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_location(section: ModelSection) -> str:
    """A local dir as an absolute path (so adapters name their base from anywhere), a Hub id as given."""
    path = Path(section.pretrained_model_name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else section.pretrained_model_name_or_path


def check_attn_implementation(name: str) -> None:
    if name not in ("flash_attention_2", "flash_attention_3"):
        return
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = is_flash_attn_2_available() if name == "flash_attention_2" else is_flash_attn_3_available()
    if not available:
        raise ChatftError(
            "config_invalid",
            f"model.attn_implementation={name} but its package is not installed (or there is no CUDA GPU)",
            "use model.attn_implementation=sdpa (the default), or install flash-attn on a CUDA machine",
        )


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_hub_progress() -> Iterator[None]:
    """transformers draws a progress bar for every load and save; chatft draws its own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


HUB_KERNELS_ENV = "USE_HUB_KERNELS"


@contextlib.contextmanager
def no_hub_kernels() -> Iterator[None]:
    """Load a model that runs the code chatft tested and records, not kernels fetched from the Hub.

    Recent transformers releases swap layers (rotary embeddings, norms, ...) for kernels downloaded from the Hub
    when a model is loaded and again at `model.train()` on a GPU, unless `USE_HUB_KERNELS` says no. That code is
    not recorded anywhere, changes the numerics, and stops the first training step with a traceback when the Hub
    is offline (seen on a GPU with transformers 5.25). The choice is fixed at load (`model.use_kernels`), so it
    is made here; a user who sets `USE_HUB_KERNELS` themselves keeps their own choice."""

    if HUB_KERNELS_ENV in os.environ:
        yield
        return
    os.environ[HUB_KERNELS_ENV] = "NO"
    try:
        yield
    finally:
        os.environ.pop(HUB_KERNELS_ENV, None)


@contextlib.contextmanager
def load_errors(key: str, value: str, revision: str | None = None) -> Iterator[None]:
    """A model, tokenizer or adapter that cannot be found or read is a refusal naming the config key, not a
    traceback. A missing path, or an uncached Hub id offline, is refused before the load starts: transformers
    would report the path as a malformed Hub id, and asking the Hub only delays the same answer."""
    check_model_location(key, value)
    try:
        yield
    except (OSError, ValueError) as exc:
        local = Path(value).expanduser()
        missing = f" ({local.resolve()} does not exist locally either)" if not local.exists() else ""
        raise ChatftError(
            "config_invalid",
            f"cannot load {key}={value}{f' (revision {revision})' if revision else ''}: {str(exc).splitlines()[0]}"
            f"{missing}",
            "give a local save_pretrained dir, or a Hub id that is in the local cache when offline "
            "(HF_HUB_OFFLINE=1); a model with custom code also needs trust_remote_code=true",
        ) from None


MODEL_KEY = "model.pretrained_model_name_or_path"


def model_load_errors(section: ModelSection, key: str = MODEL_KEY) -> contextlib.AbstractContextManager[None]:
    return load_errors(key, section.pretrained_model_name_or_path, section.revision)


def load_tokenizer(section: ModelSection, key: str = MODEL_KEY):
    """`key`: the config key that named the model, for refusals (eval loads `base=`, `merged=`, ...)."""
    from transformers import AutoTokenizer

    with model_load_errors(section, key):
        tokenizer = AutoTokenizer.from_pretrained(
            model_location(section), revision=section.revision, trust_remote_code=section.trust_remote_code
        )
    if tokenizer.pad_token_id is None:
        # Only the collator's filler id: padded positions never carry loss (labels come from the loss mask).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(section: ModelSection, device: torch.device, dtype: torch.dtype, key: str = MODEL_KEY, *,
               training: bool = True) -> nn.Module:
    """The causal LM on `device` in `dtype`. With `model.quantization` its linear layers are 4-bit (QLoRA), their
    matmuls in `dtype` unless the section names another compute dtype; `training` prepares such a base for LoRA
    (`quantization.prepare_for_training`)."""
    from transformers import AutoModelForCausalLM

    check_attn_implementation(section.attn_implementation)
    if section.trust_remote_code:
        console.warning("model.trust_remote_code=true: the model repo's own Python code will run")
    placement: dict[str, Any] = {}
    if section.quantization is not None:
        quantization.require_bitsandbytes(f"model.quantization={section.quantization}")
        placement = {"quantization_config": quantization.bnb_config(section, dtype),
                     "device_map": quantization.device_map(device)}
    with quiet_hub_progress(), no_hub_kernels(), model_load_errors(section, key):
        model = AutoModelForCausalLM.from_pretrained(
            model_location(section),
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
            dtype=dtype,
            attn_implementation=section.attn_implementation,
            **placement,
        )
    model.config.use_cache = False  # training never reuses the KV cache; saves memory
    if section.quantization is None:
        return model.to(device)
    quantization.keep_computing_as_configured(model)
    return quantization.prepare_for_training(model) if training else model  # placed by device_map already


def probe_vocab_size(tokenizer: Any, model: nn.Module) -> int:
    """Token ids both the tokenizer and the model's embedding know: the range the start-up probes draw from."""
    return min(len(tokenizer), model.config.get_text_config().vocab_size)


def enable_activation_checkpointing(model: nn.Module, mode: recompute.Mode = "full") -> None:
    """Recompute each decoder layer in the backward, whole or its cheap ops only (`recompute`). Recent
    transformers releases name this `activation_checkpointing_enable` and deprecate
    `gradient_checkpointing_enable`, the only name older ones have."""
    options = recompute.checkpoint_options(mode)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


# --------------------------------------------------------------------------- LoRA


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the `nn.Linear` layers LoRA can wrap."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None)


def _matches(name: str, pattern: str) -> bool:
    """A name matches its own last parts (`q_proj` matches `model.layers.0.self_attn.q_proj`), a glob
    (`*.mlp.*`) or a regular expression over the full name (`.*layers\\.[0-3]\\..*proj`)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def resolve_lora_targets(model: nn.Module, section: LoraSection) -> list[str]:
    """The full names of the linear layers LoRA wraps, after `exclude_modules`.

    `match_all_linear` takes every linear layer except the output head (vLLM cannot serve adapters on it);
    `target_modules` takes what it names, the head included if named.
    """
    linears = linear_module_names(model)
    head = output_head_name(model)
    if section.match_all_linear:
        chosen = [n for n in linears if n != head]
    else:
        patterns = section.target_modules or []
        chosen = [n for n in linears if any(_matches(n, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(_matches(n, p) for n in linears)]
        if unmatched:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ChatftError(
                "config_invalid",
                f"peft.target_modules {unmatched} match no linear layer of this model",
                f"its linear layers are named: {', '.join(kinds)} (or set peft.match_all_linear=true)",
            )
    excluded = [n for n in chosen if any(_matches(n, p) for p in section.exclude_modules or [])]
    chosen = [n for n in chosen if n not in excluded]
    if not chosen:
        raise ChatftError(
            "config_invalid",
            "peft.target_modules / peft.exclude_modules leave no layer for LoRA",
            "exclude fewer modules, or set peft.match_all_linear=true",
        )
    return chosen


def peft_target_modules(model: nn.Module, chosen: list[str]) -> list[str] | str:
    """What goes into `LoraConfig.target_modules`: short names (`["q_proj", ...]`, what vLLM and readers
    expect) when they select exactly `chosen`, else one anchored regex over the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    selected = [n for n in linear_module_names(model) if n.rsplit(".", 1)[-1] in suffixes]
    if selected == chosen:
        return suffixes
    return "^(?:" + "|".join(re.escape(n) for n in chosen) + ")$"


def apply_lora(model: nn.Module, section: LoraSection, seed: int) -> nn.Module:
    """Wrap `model` with LoRA adapters. Adapter weights are float32 whatever the base dtype
    (PEFT's `autocast_adapter_dtype`); the base is frozen."""
    from peft import LoraConfig, get_peft_model

    targets = peft_target_modules(model, resolve_lora_targets(model, section))
    config = LoraConfig(
        r=section.dim,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)  # adapter initialisation depends on the seed only
        return get_peft_model(model, config, autocast_adapter_dtype=True)


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    base_dtype: str
    trainable_dtype: str

    def line(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        dtypes = self.base_dtype if self.base_dtype == self.trainable_dtype else (
            f"base {self.base_dtype}, trainable {self.trainable_dtype}")
        return f"parameters: {self.trainable:,} trainable of {self.total:,} ({share:.2f}%), {dtypes}"


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM itself, under a PEFT wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weights_in(param: torch.Tensor) -> int:
    """A parameter's weight count; a 4-bit one packs two weights a byte and keeps its shape in its quant state."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return shape.numel() if shape is not None else param.numel()


def count_parameters(model: nn.Module) -> ParamCounts:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad] or params
    return ParamCounts(
        total=sum(_weights_in(p) for p in params),
        trainable=sum(p.numel() for p in trainable),
        base_dtype=dtype_name(frozen[0].dtype),
        trainable_dtype=dtype_name(trainable[0].dtype) if trainable else "-",
    )
