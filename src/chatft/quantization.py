"""QLoRA: the frozen base held in 4 bits (bitsandbytes NF4 or FP4) under a LoRA adapter trained in full precision.

In: the `model` section (`quantization`, `double_quantization`, `quantization_compute_dtype`) and the run's compute
dtype. Out: the `BitsAndBytesConfig` transformers loads the base with, the checks a run makes before anything loads
(bitsandbytes installed; LoRA, not full SFT; not FSDP2-sharded), the preparation of a loaded 4-bit base for
training, and the manifest's `quantization` record, read back by merge and eval to load the base the adapter was
trained on.

The base's fingerprint stays the one of its unquantized weight files: quantizing is part of loading, so merge
and eval check the same files and quantize them again the same way.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

from chatft.errors import ChatftError

INSTALL = "pip install 'chatft[qlora]'"
# bitsandbytes' CPU backend asks the Hugging Face Hub, when it is imported (PEFT imports it whenever it is
# installed), for an optional faster inference kernel through the `kernels` package, and logs a warning when it
# cannot have it (offline, or from an unverified publisher), then uses its own kernel. Those lines say nothing a
# user can act on; chatft's runs are meant to use no Hub kernels (`train.model.no_hub_kernels`).
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_logger).setLevel(logging.ERROR)


def bitsandbytes_version() -> str | None:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_bitsandbytes(what: str) -> None:
    """The optional extra is installed (and imports), or a refusal that says how to install it."""
    problem = "it is not installed" if bitsandbytes_version() is None else None
    if problem is None:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # a broken native library fails here, not halfway through loading
            problem = f"it does not import: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if problem:
        raise ChatftError("config_invalid", f"{what} needs bitsandbytes, but {problem}",
                          f"{INSTALL} (or pip install bitsandbytes), or drop the quantization to train plain LoRA")


def check_training(cfg: Any) -> None:
    """Before anything loads: a 4-bit base trains a LoRA adapter only, replicated on each process (not FSDP2
    sharded), with bitsandbytes installed; the keys that tune the quantization are refused when there is none
    (they would do nothing)."""
    model = cfg.model
    if model.quantization is None:
        stray = [f"model.{key}={getattr(model, key)}" for key, default in
                 (("double_quantization", True), ("quantization_compute_dtype", "auto"))
                 if getattr(model, key) != default]
        if stray:
            raise ChatftError("config_invalid", f"{', '.join(stray)} set without model.quantization",
                              "set model.quantization=nf4 (or fp4) for a 4-bit base, or drop these keys")
        return
    if cfg.distributed.strategy == "fsdp2":
        raise ChatftError(
            "not_available_yet",
            f"model.quantization={model.quantization} with distributed.strategy=fsdp2: sharding a 4-bit bitsandbytes "
            "base across processes is not implemented",
            "drop distributed.strategy (LoRA runs ddp: each process holds the whole 4-bit base, which is what makes "
            "QLoRA small)",
        )
    if cfg.peft is None:
        raise ChatftError(
            "config_invalid",
            f"model.quantization={model.quantization} with full SFT: 4-bit weights cannot be trained",
            "train a LoRA adapter on the 4-bit base: peft=lora (or run peft/automodel); for full SFT, drop "
            "model.quantization",
        )
    require_bitsandbytes(f"model.quantization={model.quantization}")


def compute_dtype(section: Any, run_compute: Any) -> Any:
    """The dtype each 4-bit weight is dequantized to for its matmul: `quantization_compute_dtype`, or with
    `auto` the run's compute dtype (bfloat16 on a GPU that has it; float32 on CPU, where bitsandbytes'
    dequantize-and-matmul path runs no faster in bfloat16 and loses precision)."""
    import torch

    name = section.quantization_compute_dtype
    if name == "auto":
        return run_compute
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def bnb_config(section: Any, run_compute: Any):
    """transformers' `BitsAndBytesConfig` for `section` (which has `quantization` set)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=section.quantization,
                              bnb_4bit_use_double_quant=section.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype(section, run_compute))


def device_map(device: Any) -> dict[str, Any]:
    """Where transformers places a quantized model: it quantizes each weight on the device it loads it to. A CUDA
    device without an index is this process's current one (each process of a multi-GPU run sets its own)."""
    if device.type != "cuda":
        return {"": device.type}
    import torch

    return {"": device.index if device.index is not None else torch.cuda.current_device()}


def linear4bit_modules(model: Any) -> list[Any]:
    import bitsandbytes as bnb

    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def keep_computing_as_configured(model: Any) -> Any:
    """Keep every 4-bit layer on bitsandbytes' dequantize-and-matmul path, in the compute dtype asked for.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight into another layout the first time the layer
    runs in eval mode without gradients (a validation pass, an eval, a merge check) and from then on multiplies in
    bfloat16 whatever the compute dtype, through a kernel with no backward: after a validation pass the gradient
    through the base would be silently dropped (seen with bitsandbytes 0.50: the input's gradient is None), and
    eval and merge would not score the model as it was trained."""
    for module in linear4bit_modules(model):
        module.support_avx512bf16_for_cpu = False
    return model


def prepare_for_training(model: Any) -> Any:
    """A loaded 4-bit base made ready for LoRA, as PEFT prescribes (`prepare_model_for_kbit_training`: every
    base weight frozen, the weights left in 16 bits (norms, embeddings, head) upcast to float32 for stable
    gradients). Activation checkpointing is not switched on here: the run's own setting decides it."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantization_config(model: Any) -> Any:
    """The `BitsAndBytesConfig` a loaded model was quantized with, or None."""
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    return quant if getattr(quant, "load_in_4bit", False) else None


def record(model: Any) -> dict[str, Any] | None:
    """The manifest's `quantization`, read from the loaded model: what merge and eval need to load the base the
    adapter was trained on, and the bitsandbytes release that quantized it."""
    quant = quantization_config(model)
    if quant is None:
        return None
    from chatft.train.precision import dtype_name  # torch: this module stays torch-free for merge's preflight

    return {"type": quant.bnb_4bit_quant_type, "double_quantization": bool(quant.bnb_4bit_use_double_quant),
            "compute_dtype": dtype_name(quant.bnb_4bit_compute_dtype), "bits": 4, "method": "bitsandbytes",
            "bitsandbytes": bitsandbytes_version()}


def section_update(recorded: dict[str, Any]) -> dict[str, Any]:
    """The `model` section keys that load a base as a manifest's `quantization` record describes."""
    return {"quantization": recorded["type"], "double_quantization": recorded.get("double_quantization", True),
            "quantization_compute_dtype": recorded.get("compute_dtype", "auto")}


def describe(recorded: dict[str, Any]) -> str:
    double = ", double quantization" if recorded.get("double_quantization") else ""
    return f"4-bit {recorded['type'].upper()}{double}, compute {recorded.get('compute_dtype')}"
