"""The optimizer of a run: AdamW over the trainable parameters, without weight decay on norms, biases and 1-d
tensors, in the form the run's precision calls for.

In: the model, the `optimizer` section, the run's `Precision`, the device and the seed. Out: the optimizer and the
trainable parameters in its order (what gradient clipping walks).
"""

from __future__ import annotations

import torch
from torch import nn

from chatft.config.schema import OptimizerSection
from chatft.train.precision import Precision
from chatft.train.stochastic_rounding import StochasticRoundingAdamW


def build_optimizer(model: nn.Module, section: OptimizerSection, precision: Precision, device: torch.device,
                    seed: int, *, fused: bool = True) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """`fused=False`: the multi-tensor loop instead of the fused kernel, which cannot take the loss scaler's
    overflow flag beside sharded (DTensor) parameters (`sharding.grad_scaler`)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": section.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if precision.stochastic_rounding:
        optimizer: torch.optim.Optimizer = StochasticRoundingAdamW(groups, lr=section.lr, betas=section.betas,
                                                                   eps=section.eps, seed=seed)
    else:
        # The fused kernel (CUDA, and CPU since torch 2.4) updates every tensor in one pass: on 2 CPU cores it took
        # 63 ms for 134M float32 parameters against 418 ms for the default multi-tensor loop.
        optimizer = torch.optim.AdamW(groups, lr=section.lr, betas=section.betas, eps=section.eps,
                                      fused=True if fused and device.type in ("cuda", "cpu") else None)
    return optimizer, decay + no_decay
