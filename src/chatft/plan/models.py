"""What the planner knows about the model: its size and shapes, from the best source at hand, offline.

In: `--model` as the user gave it (a local dir or a Hub id). Out: `ModelFacts` (parameter count, the
shapes the memory formula needs, whether it is a Nemotron, where each fact came from) with a `meta`
skeleton for `chatft.train.memory.estimate_memory`, or a refusal when chatft cannot load the model at all.

Sources, best first:
1. a local `save_pretrained` dir: its `config.json`, built on the `meta` device (exact parameter count);
2. a Hub id whose `config.json` is in the local Hugging Face cache (no network is used);
3. `KNOWN_MODELS`, a small table of common ids with the shapes of their published `config.json`;
4. a size hint in the id ("8B", "135M"), with the shapes of the known model nearest in size.
Sources 3 and 4 build a Llama-shaped stand-in with the table's shapes; its parameter count is corrected to
the published one (hybrid Mamba and MoE models are dense stand-ins, so their estimate is rougher). Every
assumption is recorded in `ModelFacts.assumptions` and printed with the plan.

Mixture-of-experts models have two sizes: `params`, every expert's weights, which memory holds (weights,
gradients and optimizer states of full SFT), and `active_params`, what one token runs through (top-k of the
experts of each MoE layer), which sets the compute per token. The plan prints both.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from chatft.config.schema import TrainingConfig
from chatft.data.locations import looks_like_path
from chatft.errors import ChatftError

SIZE_HINT = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z0-9])", re.IGNORECASE)
NEMOTRON3 = re.compile(r"nemotron[-_ ]?3[-_ ]?(nano|super)|(nano|super)[-_ ]?3(?![0-9])")
MEGATRON_MARKERS = ("latest_checkpointed_iteration.txt", "latest_train_state.pt", "common.pt", "metadata.json")


@dataclass(frozen=True)
class KnownModel:
    """Shapes as in the model's published config.json; `params` is the total from its model card."""

    names: tuple[str, ...]  # the id's last part, lower-case, with -Instruct/-it/-chat removed
    family: str
    params: float  # total parameters
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    max_positions: int
    nemotron: bool = False
    moe: bool = False
    note: str = ""
    active_params: float = 0  # MoE: parameters a token runs through (model card); 0 for dense models


B, M = 1e9, 1e6
KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(("smollm2-135m",), "llama", 135 * M, 576, 30, 1536, 49152, 9, 3, True, 8192),
    KnownModel(("smollm2-360m",), "llama", 362 * M, 960, 32, 2560, 49152, 15, 5, True, 8192),
    KnownModel(("smollm2-1.7b",), "llama", 1.71 * B, 2048, 24, 8192, 49152, 32, 32, True, 8192),
    KnownModel(("llama-3.2-1b",), "llama", 1.24 * B, 2048, 16, 8192, 128256, 32, 8, True, 131072),
    KnownModel(("llama-3.2-3b",), "llama", 3.21 * B, 3072, 28, 8192, 128256, 24, 8, True, 131072),
    KnownModel(("llama-3.1-8b", "meta-llama-3.1-8b", "llama-3-8b", "meta-llama-3-8b"), "llama", 8.03 * B,
               4096, 32, 14336, 128256, 32, 8, False, 131072),
    KnownModel(("llama-3.1-70b", "meta-llama-3.1-70b", "llama-3.3-70b"), "llama", 70.6 * B,
               8192, 80, 28672, 128256, 64, 8, False, 131072),
    KnownModel(("qwen2.5-0.5b",), "qwen2", 494 * M, 896, 24, 4864, 151936, 14, 2, True, 32768),
    KnownModel(("qwen2.5-1.5b",), "qwen2", 1.54 * B, 1536, 28, 8960, 151936, 12, 2, True, 32768),
    KnownModel(("qwen2.5-3b",), "qwen2", 3.09 * B, 2048, 36, 11008, 151936, 16, 2, True, 32768),
    KnownModel(("qwen2.5-7b",), "qwen2", 7.62 * B, 3584, 28, 18944, 152064, 28, 4, False, 32768),
    KnownModel(("qwen2.5-14b",), "qwen2", 14.8 * B, 5120, 48, 13824, 152064, 40, 8, False, 32768),
    KnownModel(("qwen2.5-32b",), "qwen2", 32.8 * B, 5120, 64, 27648, 152064, 40, 8, False, 32768),
    KnownModel(("qwen2.5-72b",), "qwen2", 72.7 * B, 8192, 80, 29568, 152064, 64, 8, False, 32768),
    KnownModel(("mistral-7b-v0.3", "mistral-7b-instruct-v0.3"), "mistral", 7.25 * B,
               4096, 32, 14336, 32768, 32, 8, False, 32768),
    KnownModel(("mistral-7b-v0.1", "mistral-7b-instruct-v0.2", "mistral-7b"), "mistral", 7.24 * B,
               4096, 32, 14336, 32000, 32, 8, False, 32768),
    KnownModel(("llama-3.1-nemotron-nano-8b-v1",), "llama", 8.03 * B, 4096, 32, 14336, 128256, 32, 8, False,
               131072, nemotron=True, note="a Llama-3.1-8B derivative"),
    KnownModel(("nvidia-nemotron-nano-9b-v2", "nemotron-nano-9b-v2"), "nemotron_h", 8.89 * B,
               4480, 56, 15680, 131072, 40, 8, False, 131072, nemotron=True,
               note="hybrid Mamba-2/attention layers, estimated as a dense stand-in"),
    KnownModel(("nvidia-nemotron-3-nano-30b-a3b", "nemotron-3-nano-30b-a3b"), "nemotron_h", 31.6 * B,
               2688, 52, 11136, 131072, 32, 2, False, 262144, nemotron=True, moe=True, active_params=3.6 * B,
               note="hybrid Mamba-2/MoE (about 3.6B active with embeddings), estimated as a dense stand-in with the "
                    "active FFN width"),
    KnownModel(("llama-3_3-nemotron-super-49b-v1", "llama-3_3-nemotron-super-49b-v1_5"), "nemotron-nas", 49.9 * B,
               8192, 80, 28672, 128256, 64, 8, False, 131072, nemotron=True,
               note="heterogeneous pruned Llama-3.3-70B blocks (custom code), estimated as a dense stand-in"),
    # Mixture-of-experts models: `intermediate` is the active FFN width (top-k x expert width), which is what the
    # dense stand-in's activations need; its weights are scaled to the total, every expert included.
    KnownModel(("qwen3-30b-a3b",), "qwen3_moe", 30.5 * B, 2048, 48, 8 * 768, 151936, 32, 4, False, 40960,
               moe=True, active_params=3.3 * B, note="128 experts, 8 per token, estimated as a dense stand-in with "
               "the active FFN width"),
    KnownModel(("mixtral-8x7b-v0.1", "mixtral-8x7b"), "mixtral", 46.7 * B, 4096, 32, 2 * 14336, 32000, 32, 8,
               False, 32768, moe=True, active_params=12.9 * B,
               note="8 experts, 2 per token, estimated as a dense stand-in with the active FFN width"),
)

# Families NVIDIA's Megatron-Bridge ships recipes for (beside Nemotron): the alternative route exists.
MEGATRON_BRIDGE_RECIPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "deepseek_v3")


@dataclass
class ModelFacts:
    given: str  # --model as typed
    location: str  # what configs name: an absolute local dir, or the Hub id
    source: str  # local | hf_cache | known | size_hint | custom
    model_type: str
    params: int  # total parameters (the published count for stand-ins)
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    max_positions: int | None
    nemotron: bool
    moe: bool = False
    active_params: int | None = None  # MoE: parameters one token runs through (None: all of them, a dense model)
    custom_code: bool = False
    assumptions: list[str] = field(default_factory=list)
    config_dir: str | None = None  # a dir with config.json to build the skeleton from (sources 1-2)

    @property
    def billions(self) -> float:
        return self.params / 1e9

    @property
    def nemotron3(self) -> bool:
        """Nemotron 3 Nano or Super: the models NVIDIA's Megatron-Bridge recipes reproduce."""
        return self.nemotron and NEMOTRON3.search(self.given.lower()) is not None

    @property
    def bridge_recipe(self) -> bool:
        return self.model_type in MEGATRON_BRIDGE_RECIPES or self.nemotron

    def shape_line(self) -> str:
        active = ""
        if self.active_params is not None and self.active_params != self.params:
            active = (f" of which {self.active_params / 1e9:,.2f}B active per token (mixture of experts: memory "
                      "holds every expert, compute runs the top-k)")
        return (f"{self.billions:,.2f}B parameters{active} (hidden {self.hidden}, {self.layers} layers, intermediate "
                f"{self.intermediate}, vocab {self.vocab}, {self.heads} heads / {self.kv_heads} kv)")

    def skeleton(self) -> tuple[Any, float]:
        """(the model on the `meta` device, the factor from its parameter count to `params`)."""
        if self.config_dir is not None and not self.custom_code:
            model = _meta_from_dir(self.config_dir)
        else:
            model = _meta_stand_in(self.hidden, self.layers, self.intermediate, self.vocab, self.heads,
                                   self.kv_heads, self.max_positions or 4096)
        built = sum(p.numel() for p in model.parameters())
        return model, (self.params / built if built else 1.0)


# --------------------------------------------------------------------------- skeletons


@cache
def _meta_from_dir(config_dir: str) -> Any:
    from chatft.train.memory import meta_model  # torch loads when a model is sized, not when plan starts

    cfg = TrainingConfig.model_validate({"model": {"pretrained_model_name_or_path": config_dir},
                                         "dataset": {"path_or_dataset_id": "unused"}})
    return meta_model(cfg)


@cache
def _meta_stand_in(hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                   max_positions: int) -> Any:
    """A Llama-shaped decoder with these shapes, on the `meta` device (no memory, about a second)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                         vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------- resolution


def resolve_model(given: str) -> ModelFacts:
    """The model's facts from the best offline source, or a plain refusal when chatft cannot load it."""
    path = Path(given).expanduser()
    if path.exists():
        return _local(given, path.resolve())
    if looks_like_path(given):
        raise ChatftError("config_invalid", f"--model {given} does not exist (resolved to {path.resolve()})",
                          "give a local save_pretrained dir or a Hugging Face model id like org/name")
    cached = _cached_config(given)
    if cached is not None:
        facts = _from_config_dir(given, given, cached.parent, "hf_cache")
        facts.assumptions.insert(0, f"config.json from the local Hugging Face cache: {cached}")
        return facts
    known = _known(given)
    if known is not None:
        return _from_known(given, known, "known", [
            f"{given} is not local and its config.json is not in the Hugging Face cache (no network is used): "
            f"shapes from chatft's table of known models" + (f" ({known.note})" if known.note else "")])
    hint = SIZE_HINT.search(given.rsplit("/", 1)[-1])
    if hint is not None:
        params = float(hint.group(1)) * (B if hint.group(2).lower() == "b" else M)
        nearest = min((k for k in KNOWN_MODELS if not k.nemotron and not k.moe),  # a dense size: dense shapes
                      key=lambda k: abs(math.log(k.params) - math.log(params)))
        facts = _from_known(given, nearest, "size_hint", [
            f"{given} is not local, not cached and not in chatft's table: assumed {params / B:,.2f}B parameters "
            f"from the size in its name, with the shapes of {nearest.names[0]} (the known model nearest in size)"])
        facts.params = int(params)
        facts.nemotron = "nemotron" in given.lower()
        facts.model_type = "unknown"
        return facts
    raise ChatftError(
        "config_invalid",
        f"cannot size --model {given}: it is not a local dir, its config.json is not in the Hugging Face cache "
        "(no network is used), it is not in chatft's table of known models and its name has no size such as 8B",
        "pass a local save_pretrained dir, fetch the model once with network access "
        f"(`hf download {given} config.json`), or use a known id, e.g. meta-llama/Llama-3.1-8B-Instruct",
    )


def _local(given: str, path: Path) -> ModelFacts:
    if path.is_file():
        what = "a GGUF file" if path.suffix == ".gguf" else "a file"
        raise ChatftError(
            "config_invalid",
            f"--model {given} is {what}; chatft fine-tunes save_pretrained dirs (config.json + safetensors)",
            "convert it to a save_pretrained dir first (transformers loads GGUF with gguf_file=... and "
            "save_pretrained writes the dir), then plan with that dir",
        )
    markers = [m for m in MEGATRON_MARKERS if (path / m).is_file()] + [p.name for p in path.glob("iter_*")][:1]
    if markers and not (path / "config.json").is_file():
        raise ChatftError(
            "route_not_supported",
            f"--model {given} is a Megatron checkpoint ({', '.join(markers)}), which chatft cannot load",
            "fine-tune it with Megatron-Bridge, or export it to a Hugging Face dir with Megatron-Bridge "
            "(AutoBridge) and plan with that dir",
        )
    if not (path / "config.json").is_file():
        raise ChatftError("config_invalid", f"--model {given} has no config.json: not a save_pretrained dir",
                          "point --model at the dir that holds config.json and the safetensors weights")
    return _from_config_dir(given, str(path), path, "local")


def _cached_config(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # a malformed id for the hub client: treat as not cached
        return None
    return Path(found) if isinstance(found, str) else None


def _from_config_dir(given: str, location: str, config_dir: Path, source: str) -> ModelFacts:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        raw = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ChatftError("config_invalid", f"--model {given}: config.json cannot be read ({exc})",
                          "re-download or re-save the model dir") from None
    text = raw.get("text_config") or raw
    model_type = str(raw.get("model_type", ""))
    custom = model_type not in CONFIG_MAPPING_NAMES
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if custom and "AutoModelForCausalLM" not in (raw.get("auto_map") or {}):
        raise ChatftError(
            "config_invalid",
            f"--model {given}: model_type {model_type or '(none)'!r} is unknown to transformers and the repo "
            "ships no AutoModelForCausalLM code, so chatft cannot load it",
            "use a causal LM that transformers supports (`AutoModelForCausalLM.from_pretrained` must load it)",
        )
    if not custom and not causal:
        archs = ", ".join(raw.get("architectures") or []) or model_type
        raise ChatftError(
            "config_invalid",
            f"--model {given} is a {model_type} model ({archs}), not a causal LM: chatft cannot load it with "
            "AutoModelForCausalLM",
            "chatft fine-tunes decoder-only chat models (Llama, Qwen, Mistral, SmolLM2, Nemotron, ...)",
        )
    hidden = int(text.get("hidden_size") or text.get("d_model") or 0)
    facts = ModelFacts(
        given=given, location=location, source=source if not custom else "custom", model_type=model_type,
        params=0, hidden=hidden, layers=int(text.get("num_hidden_layers") or 1),
        intermediate=int(text.get("intermediate_size") or 4 * hidden),
        vocab=int(text.get("vocab_size") or 0), heads=int(text.get("num_attention_heads") or 1),
        kv_heads=int(text.get("num_key_value_heads") or text.get("num_attention_heads") or 1),
        max_positions=text.get("max_position_embeddings"),
        nemotron="nemotron" in model_type or "nemotron" in given.lower(),
        moe=any(k in text for k in ("num_experts", "num_local_experts", "n_routed_experts")),
        custom_code=custom, config_dir=str(config_dir),
    )
    if custom:
        facts.assumptions.append(
            f"model_type {model_type!r} comes with the repo's own code (auto_map): loading it needs "
            "model.trust_remote_code=true, which runs that code; the estimate uses a dense stand-in with its shapes")
    try:
        model, _ = facts.skeleton()
    except ChatftError:
        raise
    except Exception as exc:  # transformers refuses the config itself: chatft could not load it either
        raise ChatftError(
            "config_invalid",
            f"--model {given}: transformers cannot build a {model_type} model from its config.json "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            "fix or re-download config.json; `AutoModelForCausalLM.from_pretrained` must load the model",
        ) from None
    facts.params = sum(p.numel() for p in model.parameters())
    if facts.moe and not custom:  # the skeleton is the model itself: its stacked expert weights are counted
        from chatft.train.memory import active_parameter_count

        facts.active_params = active_parameter_count(model)
    return facts


def _known(given: str) -> KnownModel | None:
    name = given.rsplit("/", 1)[-1].lower()
    for suffix in ("-instruct", "-it", "-chat", "-base", "-hf"):
        name = name.removesuffix(suffix)
    stripped = name.replace("-instruct", "")
    return next((k for k in KNOWN_MODELS if name in k.names or stripped in k.names), None)


def _from_known(given: str, known: KnownModel, source: str, assumptions: list[str]) -> ModelFacts:
    return ModelFacts(
        given=given, location=given, source=source, model_type=known.family, params=int(known.params),
        hidden=known.hidden, layers=known.layers, intermediate=known.intermediate, vocab=known.vocab,
        heads=known.heads, kv_heads=known.kv_heads, max_positions=known.max_positions,
        nemotron=known.nemotron, moe=known.moe, custom_code=known.family == "nemotron-nas",
        active_params=int(known.active_params) if known.moe and known.active_params else None,
        assumptions=list(assumptions),
    )
