"""Does a saved LoRA adapter fit a loaded base model? Checked before merge applies it, without PEFT.

In: the base model (loaded, no adapter) and the adapter dir (`adapter_model.safetensors`, read for names and
shapes only). Out: nothing, a `base_model_mismatch` error, or (with `strict=false`) warnings about weights that
land on no module of the base.

Three kinds of saved weights:
- a factor of a wrapped module, `<module>.lora_A.weight` (in-features wide) / `.lora_B.weight` (out-features
  tall), also `lora_embedding_A/B` of an embedding; DoRA's magnitude vectors and token deltas name only their
  module;
- a fully saved module (`modules_to_save`): the base's parameter of the same name and shape;
- a stacked expert weight of a mixture of experts (PEFT's `target_parameters`): PEFT wraps the module holding
  it once per adapted parameter, each wrap around the last, so the keys are `<experts>.lora_A.weight`,
  `<experts>.base_layer.lora_A.weight`, ..., one `.base_layer` deeper per parameter. Which depth holds which
  parameter is PEFT's business; what must hold is that the wraps together fit the module's adapted parameters:
  each (experts x out x in) weight takes an A of (rank * experts) x in and a B of out x (rank * experts).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from chatft import artifacts
from chatft.adapter_base import read_adapter_config
from chatft.errors import ChatftError

# Where a saved adapter key names its module, and which LoRA factor it is (None: only the module is checked,
# e.g. DoRA's magnitude vector or trainable-token deltas).
_LORA_PARTS = {".lora_A.": "A", ".lora_B.": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
               ".lora_magnitude_vector": None, ".token_adapter.": None}
_NESTED = ".base_layer"


def adapter_tensors(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the adapter's weights file: name -> shape (read from the header, not loaded)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / artifacts.ADAPTER_WEIGHTS), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_adapter_fits(model, adapter_dir: Path, strict: bool) -> list[str]:
    """Every LoRA weight of the adapter must sit on a module of the base with matching sizes.

    A size mismatch means another model (`base_model_mismatch`); a weight with no module to land on is an
    error with `strict` (the default), else a warning (returned)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    stacked_targets = _stacked_targets(adapter_dir)
    mismatched, homeless = [], []
    stacked: dict[str, dict[int, dict[str, tuple[int, ...]]]] = defaultdict(lambda: defaultdict(dict))
    for key, shape in adapter_tensors(adapter_dir).items():
        name = key.removeprefix("base_model.model.")
        part = next(((marker, side) for marker, side in _LORA_PARTS.items() if marker in name), None)
        if part is None:  # a fully saved module (modules_to_save): same shape as the base's parameter
            target = params.get(name)
            if target is None:
                homeless.append(key)
            elif tuple(target.shape) != shape:
                mismatched.append(f"{name} {list(shape)} vs base {list(target.shape)}")
            continue
        module_name = name[:name.index(part[0])]
        plain = module_name.replace(_NESTED, "")
        if stacked_targets and part[1] is not None and _stacked_parameters(modules.get(plain), stacked_targets):
            stacked[plain][module_name.count(_NESTED)][part[1]] = shape
            continue
        module = modules.get(module_name)
        if module is None:
            homeless.append(key)
            continue
        if part[1] is None:
            continue
        problem = _linear_factor_mismatch(module, part[1], shape)
        if problem == "homeless":
            homeless.append(key)
        elif problem:
            mismatched.append(f"{module_name} {problem}")
    for module_name, wraps in stacked.items():
        problem = _stacked_mismatch(_stacked_parameters(modules[module_name], stacked_targets), wraps)
        if problem:
            mismatched.append(f"{module_name} {problem}")
    if mismatched:
        raise ChatftError(
            "base_model_mismatch",
            f"the adapter {adapter_dir} does not fit this base: {len(mismatched)} weight(s) differ in size, "
            f"e.g. {'; '.join(mismatched[:3])}",
            "give the base model the adapter was trained on (base_model_name_or_path in its adapter_config.json)",
        )
    if homeless and strict:
        raise ChatftError(
            "base_model_mismatch",
            f"{len(homeless)} adapter weight(s) of {adapter_dir} match no module of this base, e.g. "
            f"{', '.join(homeless[:3])}",
            "give the base model the adapter was trained on, or strict=false to merge the weights that do match",
        )
    if homeless:
        return [f"strict=false: {len(homeless)} adapter weight(s) match no module of the base and are left out, "
                f"e.g. {', '.join(homeless[:3])}"]
    return []


def _linear_factor_mismatch(module, side: str, shape: tuple[int, ...]) -> str | None:
    """What is wrong with LoRA factor `side` ("A"/"B") of `shape` on a linear-like module or an embedding:
    None, "homeless" (no 2-D weight to adapt), or the size that differs."""
    from torch import nn

    if isinstance(module, nn.Embedding):
        sizes = {"A": module.num_embeddings, "B": module.embedding_dim}
        got = {"A": shape[1], "B": shape[0]}
    else:
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            return "homeless"
        if isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        elif hasattr(module, "nf"):  # transformers' Conv1D (GPT-2): weight is [in, out]
            in_features, out_features = weight.shape
        else:
            out_features, in_features = weight.shape
        sizes = {"A": in_features, "B": out_features}
        got = {"A": shape[-1], "B": shape[0]}
    if got[side] != sizes[side]:
        return f"lora_{side} {list(shape)} vs base size {sizes[side]}"
    return None


def _stacked_targets(adapter_dir: Path) -> list[str]:
    """`target_parameters` of the adapter's config (names or dotted suffixes of stacked expert weights)."""
    try:
        config = read_adapter_config(adapter_dir)
    except ChatftError:
        return []
    return list(config.get("target_parameters") or [])


def _stacked_parameters(module, targets: list[str]) -> list[tuple[int, ...]]:
    """Shapes of the 3-D parameters of `module` that `targets` name (by their own name or a dotted suffix)."""
    if module is None:
        return []
    shapes = []
    for name, param in module.named_parameters(recurse=False):
        if param.dim() == 3 and any(target == name or target.endswith("." + name) for target in targets):
            shapes.append(tuple(param.shape))
    return shapes


def _stacked_mismatch(parameters: list[tuple[int, ...]], wraps: dict[int, dict[str, tuple[int, ...]]]) -> str | None:
    """Whether the wraps' factors fit the module's adapted stacked weights (see the module docstring), in some
    order; None when they do, else what differs."""
    if len(wraps) != len(parameters) or any(set(factors) != {"A", "B"} for factors in wraps.values()):
        return f"holds {len(wraps)} adapted expert weight(s) where the base has {len(parameters)} to adapt"
    experts = {shape[0] for shape in parameters}
    expected = sorted((out, width) for _, out, width in parameters)
    got = sorted((factors["B"][0], factors["A"][-1]) for factors in wraps.values())
    ranks_fit = all(factors["A"][0] == factors["B"][-1] and any(factors["A"][0] % count == 0 for count in experts)
                    for factors in wraps.values())
    if got != expected or not ranks_fit:
        return f"expert factors (out, in) {got} vs base expert weights {expected}"
    return None
