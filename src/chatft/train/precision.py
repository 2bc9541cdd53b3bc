"""Which dtype each part of a training run is in, decided once from `model.torch_dtype` and the kind of run.

| run                         | weights (loaded as) | trainable: grads, AdamW moments | compute                  | saved    |
|-----------------------------|---------------------|---------------------------------|--------------------------|----------|
| full SFT, float32/bfloat16  | the dtype           | the dtype                       | the dtype                | the dtype|
| full SFT, float16           | float32 (master)    | float32                         | float16 under autocast   | float16  |
| LoRA, float32               | float32             | float32 adapters                | float32                  | float32  |
| LoRA, bfloat16/float16      | the dtype, frozen   | float32 adapters                | the dtype under autocast | float32  |

float16 always comes with dynamic loss scaling (`torch.amp.GradScaler`), which needs float32 gradients to unscale:
so full SFT in float16 keeps float32 master weights and computes in float16 under autocast, as mixed precision
training does (float16 weights updated in place would lose small updates, and their gradients underflow). Its
final checkpoint is written in float16, the dtype the config asked for. bfloat16 has float32's range, so full
SFT in bfloat16 trains the bfloat16 weights directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # what the model is loaded in
    trainable: torch.dtype  # the trained parameters, their gradients and the optimizer's moments
    compute: torch.dtype  # what the matmuls run in
    saved: torch.dtype  # what the final artifact is written in: the adapters' dtype, or the dtype the config asked

    @property
    def autocast(self) -> bool:
        """Compute differs from the trained parameters: autocast casts them per op (LoRA's float32 adapters on a
        bfloat16 base: instead of PEFT casting every activation to float32 and back around each adapter)."""
        return self.compute != self.trainable

    @property
    def loss_scaling(self) -> bool:
        return self.compute == torch.float16

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Where forward passes run: autocast to the compute dtype when it differs from the trained parameters'."""
        return torch.autocast(device.type, dtype=self.compute) if self.autocast else contextlib.nullcontext()

    def to_json(self) -> dict[str, str]:
        return {"weights": dtype_name(self.weights), "trainable": dtype_name(self.trainable),
                "compute": dtype_name(self.compute), "saved": dtype_name(self.saved)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_for(dtype: torch.dtype, lora: bool) -> Precision:
    """The precision of a run whose `model.torch_dtype` resolved to `dtype` (see the module's table)."""
    if lora:
        return Precision(weights=dtype, trainable=torch.float32, compute=dtype, saved=torch.float32)
    if dtype == torch.float16:
        return Precision(weights=torch.float32, trainable=torch.float32, compute=torch.float16, saved=torch.float16)
    return Precision(weights=dtype, trainable=dtype, compute=dtype, saved=dtype)
