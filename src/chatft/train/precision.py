"""Which dtype each part of a training run is in, decided once from `model.torch_dtype`, the kind of run and
`optimizer.master_weights`.

| run                             | weights (loaded as) | trainable + grads | AdamW moments | compute                | saved    |
|---------------------------------|---------------------|-------------------|---------------|------------------------|----------|
| full SFT, float32               | float32             | float32           | float32       | float32                | float32  |
| full SFT, bfloat16, `float32`   | float32 (master)    | float32           | float32       | bfloat16 under autocast| bfloat16 |
| full SFT, bfloat16, `stochastic_rounding` | bfloat16  | bfloat16          | float32       | bfloat16               | bfloat16 |
| full SFT, bfloat16, `none`      | bfloat16            | bfloat16          | bfloat16      | bfloat16               | bfloat16 |
| full SFT, float16               | float32 (master)    | float32           | float32       | float16 under autocast | float16  |
| LoRA, float32                   | float32             | float32 adapters  | float32       | float32                | float32  |
| LoRA, bfloat16/float16          | the dtype, frozen   | float32 adapters  | float32       | the dtype, autocast    | float32  |

Why: an AdamW update at a fine-tuning learning rate is far smaller than the spacing of bfloat16 numbers near a
weight (8 bits of mantissa: 1/256 of its size), so updating bfloat16 weights in place rounds most updates away
(`none`: three steps at lr 1e-5 moved under 2% of a model's weights). Float32 master weights keep every update
and cast to bfloat16 for the matmuls; stochastic rounding keeps bfloat16 weights and rounds each updated weight up
or down at random, in proportion to how near it is, so that small updates survive on average. `bench/precision.py`
measures the three; `auto` is float32 master weights (`AUTO_MASTER_WEIGHTS`).

float16 always comes with dynamic loss scaling (`torch.amp.GradScaler`), which needs float32 gradients to unscale:
so full SFT in float16 always keeps float32 master weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

MasterWeights = Literal["auto", "float32", "stochastic_rounding", "none"]
# What `auto` means for full SFT in bfloat16: the measured best (bench/README.md, "bfloat16 full SFT").
AUTO_MASTER_WEIGHTS: MasterWeights = "float32"


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # what the model is loaded in
    trainable: torch.dtype  # the trained parameters and their gradients
    compute: torch.dtype  # what the matmuls run in
    saved: torch.dtype  # what the final artifact is written in: the adapters' dtype, or the dtype the config asked
    moments: torch.dtype  # AdamW's two moments
    stochastic_rounding: bool = False  # bfloat16 weights updated in float32 and rounded stochastically

    @property
    def autocast(self) -> bool:
        """Compute differs from the trained parameters: autocast casts them per op (LoRA's float32 adapters on a
        bfloat16 base: instead of PEFT casting every activation to float32 and back around each adapter)."""
        return self.compute != self.trainable

    @property
    def loss_scaling(self) -> bool:
        return self.compute == torch.float16

    @property
    def loses_small_updates(self) -> bool:
        """Weights below float32 updated in place with round-to-nearest: `optimizer.master_weights=none`."""
        return self.trainable != torch.float32 and not self.stochastic_rounding

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Where forward passes run: autocast to the compute dtype when it differs from the trained parameters'."""
        return torch.autocast(device.type, dtype=self.compute) if self.autocast else contextlib.nullcontext()

    def to_json(self) -> dict[str, str]:
        update = "stochastic rounding" if self.stochastic_rounding else "round to nearest"
        return {"weights": dtype_name(self.weights), "trainable": dtype_name(self.trainable),
                "compute": dtype_name(self.compute), "saved": dtype_name(self.saved),
                "optimizer_moments": dtype_name(self.moments), "weight_update": update}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_for(dtype: torch.dtype, lora: bool, master_weights: MasterWeights = "auto") -> Precision:
    """The precision of a run whose `model.torch_dtype` resolved to `dtype` (see the module's table).
    `master_weights` matters only for full SFT in bfloat16 (float16 full SFT with `none` or `stochastic_rounding`
    is refused by the config schema)."""
    if lora:
        return Precision(weights=dtype, trainable=torch.float32, compute=dtype, saved=torch.float32,
                         moments=torch.float32)
    if dtype == torch.float16:
        return Precision(weights=torch.float32, trainable=torch.float32, compute=torch.float16, saved=torch.float16,
                         moments=torch.float32)
    if dtype == torch.bfloat16:
        mode = AUTO_MASTER_WEIGHTS if master_weights == "auto" else master_weights
        if mode == "float32":
            return Precision(weights=torch.float32, trainable=torch.float32, compute=dtype, saved=dtype,
                             moments=torch.float32)
        if mode == "stochastic_rounding":
            return Precision(weights=dtype, trainable=dtype, compute=dtype, saved=dtype, moments=torch.float32,
                             stochastic_rounding=True)
    return Precision(weights=dtype, trainable=dtype, compute=dtype, saved=dtype, moments=dtype)


def master_weights_note(dtype: torch.dtype, lora: bool, master_weights: MasterWeights) -> str | None:
    """One line for the run's start-up notes when the setting has no effect or is a risky choice."""
    if master_weights == "auto":
        return None
    if lora or dtype != torch.bfloat16:
        what = "LoRA trains float32 adapters" if lora else f"full SFT in {dtype_name(dtype)} decides its own"
        return f"note: optimizer.master_weights={master_weights} has no effect here ({what})"
    if master_weights == "none":
        return ("warning: optimizer.master_weights=none: bfloat16 weights updated in place lose every update smaller "
                "than their rounding step, so at fine-tuning learning rates most weights barely move; "
                "optimizer.master_weights=float32 (the default) or stochastic_rounding keep them")
    return None
