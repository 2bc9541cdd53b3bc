"""Model and tokenizer loading, and LoRA wrapping.

In: the `model` and `peft` sections. Out: a tokenizer, a causal LM on its device in the configured dtype
(wrapped as a `PeftModel` when `peft` is set, with its trainable LoRA weights kept in float32), and the
parameter counts the start-up summary prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


def model_skeleton(section: ModelSection, dtype: torch.dtype | None = None, key: str = MODEL_KEY) -> nn.Module:
    """The causal LM's module tree on the `meta` device, as `load_model` would build it (config, dtype, attention)
    but with no weights read: shapes only, in about a second. The memory estimate reads it; under FSDP2 every
    process but rank 0 builds its model this way and receives its shards from rank 0 (`sharding.fill_from_rank0`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with model_load_errors(section, key):
        config = AutoConfig.from_pretrained(model_location(section), revision=section.revision,
                                            trust_remote_code=section.trust_remote_code)
    settings: dict[str, Any] = {} if dtype is None else {"dtype": dtype,
                                                         "attn_implementation": section.attn_implementation}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code, **settings)
    model.config.use_cache = False
    return model


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


# Names a mixture-of-experts block gives the linear layer that scores experts for each token (Mixtral/Qwen-MoE
# `gate`, others `router`; Qwen2-MoE's `shared_expert_gate` scales its shared expert). In transformers 5 most
# routers are their own module with a bare weight, which LoRA never wraps; where one is an `nn.Linear`, "all
# linear layers" still leaves it alone: a low-rank change to the router moves tokens between experts, which
# fine-tuning recipes avoid (AutoModel and PEFT's own `all-linear` do not adapt routers either).
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Full names of a mixture-of-experts model's stacked expert weights.

    transformers 5 stores each MoE layer's experts as 3-D parameters (experts x out x in) of one `...Experts`
    module (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not one `nn.Linear` per expert, so
    `linear_module_names` does not see them: LoRA reaches them only through PEFT's `target_parameters`."""
    names = []
    for module_name, module in model.named_modules():
        if not (module_name.rsplit(".", 1)[-1] == "experts" or type(module).__name__.endswith("Experts")):
            continue
        names += [f"{module_name}.{name}" for name, param in module.named_parameters(recurse=False)
                  if param.ndim == 3]
    return names


def peft_expert_aliases(model: nn.Module) -> set[str]:
    """Linear-layer names PEFT takes to mean a mixture of experts' weights on this model type.

    So that adapters trained on transformers 4 (one `nn.Linear` per expert) still load, PEFT 0.21 rewrites a LoRA
    config for the MoE families transformers 5 converts (Mixtral: `w1`, `w2`, `w3`, `gate`; Qwen3-MoE, DeepSeek-V2/3,
    GLM-4-MoE, OLMoE, ...: `gate_proj`, `up_proj`, `down_proj`, `gate`) whenever it injects or loads one: those
    names become the stacked expert weights and the router. A linear layer with one of these names (a dense MLP
    layer, a shared expert) therefore cannot carry LoRA in an adapter that plain PEFT loads back as trained.
    PEFT is asked itself, with a throwaway config of every linear layer's name; where its (private) rewrite is
    missing, nothing is reserved, and the check after wrapping (`apply_lora`) still catches a difference."""
    if not expert_parameter_names(model):
        return set()
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return set()
    names = sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)} | set(ROUTER_NAMES))
    probe = LoraConfig(target_modules=list(names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return set(names) - set(probe.target_modules or [])


def router_module_names(model: nn.Module) -> list[str]:
    """The linear layers beside an experts module that route tokens to it (`ROUTER_NAMES`)."""
    blocks = {name.rsplit(".", 2)[0] for name in expert_parameter_names(model)}  # the module holding `experts`
    return [name for name in linear_module_names(model)
            if name.rsplit(".", 1)[0] in blocks and name.rsplit(".", 1)[-1] in ROUTER_NAMES]


@dataclass(frozen=True)
class LoraTargets:
    """What LoRA adapts: `modules` (full names of `nn.Linear` layers, PEFT's `target_modules`) and
    `expert_parameters` (full names of stacked expert weights, PEFT's `target_parameters`); `frozen_experts`
    lists the expert weights a mixture-of-experts model keeps frozen, `routers` its linear routers, `left_out` the
    linear layers chosen but left out because PEFT reads their names as the experts (`peft_expert_aliases`)."""

    modules: list[str]
    expert_parameters: list[str]
    frozen_experts: list[str]
    routers: list[str]
    left_out: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str | None:
        """One line for a mixture-of-experts model saying what is adapted and what stays frozen (None for a
        dense model, where the start-up summary says enough)."""
        if not self.expert_parameters and not self.frozen_experts:
            return None
        kinds = sorted({name.rsplit(".", 1)[-1] for name in self.modules})
        adapted = f"linear layers {', '.join(kinds)}" if kinds else "no linear layer"
        experts = sorted({".".join(name.rsplit(".", 2)[-2:]) for name in self.expert_parameters})
        if experts:
            adapted += f" and the expert weights {', '.join(experts)} (every expert, PEFT target_parameters)"
        frozen = sorted({".".join(name.rsplit(".", 2)[-2:]) for name in self.frozen_experts})
        line = f"LoRA on a mixture-of-experts model: adapts {adapted}"
        if frozen:
            line += (f"; the expert weights {', '.join(frozen)} stay frozen (they are not linear layers: name them "
                     "in peft.target_modules, with peft.dropout=0, to train them)")
        line += "; the router stays frozen" if not any(r in self.modules for r in self.routers) else \
            "; the router is adapted (named in peft.target_modules)"
        if self.left_out:
            names = sorted({name.rsplit(".", 1)[-1] for name in self.left_out})
            line += (f"; the linear layers {', '.join(names)} ({len(self.left_out)}, e.g. {self.left_out[0]}) are left "
                     "out: PEFT reads these names as the experts of this model type when it loads an adapter")
        return line


def lora_targets(model: nn.Module, section: LoraSection) -> LoraTargets:
    """The layers and expert weights LoRA adapts, after `exclude_modules`.

    `match_all_linear` takes every linear layer except the output head (vLLM cannot serve adapters on it) and
    the routers of mixture-of-experts blocks (`ROUTER_NAMES`); a mixture of experts' stacked expert weights are
    not linear layers and stay frozen, as with PEFT's `all-linear`. `target_modules` takes what it names: linear
    layers (the head and routers included if named) and, by the same patterns, expert weights
    (`experts.gate_up_proj`, `down_proj`, `experts`, ...), which PEFT adapts per expert without dropout.
    """
    linears = linear_module_names(model)
    experts = expert_parameter_names(model)
    head = output_head_name(model)
    routers = router_module_names(model)
    if section.match_all_linear:
        chosen = [n for n in linears if n != head and n not in routers]
        chosen_experts: list[str] = []
    else:
        patterns = section.target_modules or []
        chosen = [n for n in linears if any(_matches(n, p) for p in patterns)]
        # An expert weight matches its own name or its experts module's name (`experts` takes both of a layer's).
        chosen_experts = [n for n in experts if any(_matches(n, p) or _matches(n.rsplit(".", 1)[0], p)
                                                    for p in patterns)]
        unmatched = [p for p in patterns if p not in _matched_patterns(patterns, linears, experts)]
        if unmatched:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
            expert_kinds = sorted({".".join(n.rsplit(".", 2)[-2:]) for n in experts})
            also = f"; its expert weights: {', '.join(expert_kinds)}" if expert_kinds else ""
            raise ChatftError(
                "config_invalid",
                f"peft.target_modules {unmatched} match no linear layer of this model",
                f"its linear layers are named: {', '.join(kinds)}{also} (or set peft.match_all_linear=true)",
            )
    excluded = [n for n in chosen if any(_matches(n, p) for p in section.exclude_modules or [])]
    chosen = [n for n in chosen if n not in excluded]
    aliases = peft_expert_aliases(model)
    left_out = [n for n in chosen if n.rsplit(".", 1)[-1] in aliases]
    chosen = [n for n in chosen if n not in left_out]
    chosen_experts = [n for n in chosen_experts if not any(
        _matches(n, p) or _matches(n.rsplit(".", 1)[0], p) for p in section.exclude_modules or [])]
    if not chosen and not chosen_experts:
        why = (f" (PEFT reads {', '.join(sorted(aliases))} as the experts of this model type: name them with "
               "peft.dropout=0 to adapt the experts)") if left_out else ""
        raise ChatftError(
            "config_invalid",
            f"peft.target_modules / peft.exclude_modules leave no layer for LoRA{why}",
            "exclude fewer modules, or set peft.match_all_linear=true",
        )
    if chosen_experts and section.dropout > 0:
        # PEFT adds the low-rank update to the stacked weight itself (a parametrization), so there is no input
        # of the adapter alone to drop out: its ParamWrapper refuses any lora_dropout.
        kinds = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in chosen_experts}))
        raise ChatftError(
            "config_invalid",
            f"peft.target_modules names expert weights ({kinds}) and peft.dropout={section.dropout}: PEFT adapts "
            "stacked expert weights without dropout",
            "set peft.dropout=0, or leave the experts out of peft.target_modules (attention-only LoRA)",
        )
    return LoraTargets(modules=chosen, expert_parameters=chosen_experts,
                       frozen_experts=[n for n in experts if n not in chosen_experts], routers=routers,
                       left_out=left_out)


def _matched_patterns(patterns: list[str], linears: list[str], experts: list[str]) -> set[str]:
    return {p for p in patterns if any(_matches(n, p) for n in linears)
            or any(_matches(n, p) or _matches(n.rsplit(".", 1)[0], p) for n in experts)}


def resolve_lora_targets(model: nn.Module, section: LoraSection) -> list[str]:
    """The full names of the linear layers LoRA wraps (`lora_targets(...).modules`)."""
    return lora_targets(model, section).modules


def peft_target_modules(model: nn.Module, chosen: list[str]) -> list[str] | str:
    """What goes into `LoraConfig.target_modules`: short names (`["q_proj", ...]`, what vLLM and readers
    expect) when they select exactly `chosen`, else one anchored regex over the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    selected = [n for n in linear_module_names(model) if n.rsplit(".", 1)[-1] in suffixes]
    if selected == chosen:
        return suffixes
    return "^(?:" + "|".join(re.escape(n) for n in chosen) + ")$"


def peft_target_parameters(model: nn.Module, chosen: list[str]) -> list[str]:
    """What goes into `LoraConfig.target_parameters` (matched by PEFT as a full name or its dotted suffix; it
    takes no regex): `experts.gate_up_proj`-style names when they select exactly `chosen`, else the full names."""
    short = sorted({".".join(n.rsplit(".", 2)[-2:]) for n in chosen})
    selected = [n for n in expert_parameter_names(model) if any(n.endswith("." + s) for s in short)]
    return short if selected == chosen else sorted(chosen)


def apply_lora(model: nn.Module, section: LoraSection, seed: int, targets: LoraTargets | None = None) -> nn.Module:
    """Wrap `model` with LoRA adapters. Adapter weights are float32 whatever the base dtype
    (PEFT's `autocast_adapter_dtype`); the base is frozen. What it adapts is `targets` (by default
    `lora_targets(model, section)`, which a caller that has resolved them already passes in), checked against what
    PEFT wrapped."""
    from peft import LoraConfig, get_peft_model

    if targets is None:
        targets = lora_targets(model, section)
    config = LoraConfig(
        r=section.dim,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=peft_target_modules(model, targets.modules),
        target_parameters=peft_target_parameters(model, targets.expert_parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # PEFT 0.21 fills rank/alpha patterns for expert weights itself and then warns that they matched nothing
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
        torch.manual_seed(seed)  # adapter initialisation depends on the seed only
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    _check_wrapped_as_resolved(wrapped, targets)
    return wrapped


def _check_wrapped_as_resolved(wrapped: nn.Module, targets: LoraTargets) -> None:
    """PEFT may rewrite a LoRA config on the way in (`peft_expert_aliases`); what it adapted must be what chatft
    resolved, printed and records, or the run would train (and the manifest describe) other weights."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    linear, stacked = set(), set()
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            stacked.add(f"{plain}.{module.parameter_name}")
        else:
            linear.add(plain)
    if linear != set(targets.modules) or stacked != set(targets.expert_parameters):
        differences = sorted(linear ^ set(targets.modules)) + sorted(stacked ^ set(targets.expert_parameters))
        raise ChatftError(
            "config_invalid",
            f"PEFT adapted other weights than chatft resolved from peft.target_modules: {', '.join(differences[:4])}",
            "name the layers to adapt in peft.target_modules (`chatft preview` lists them); please report this "
            "model type, since chatft should have resolved it as PEFT does",
        )


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
