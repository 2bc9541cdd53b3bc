"""Activation checkpointing modes: what a decoder layer keeps for the backward, and what it recomputes there.

`distributed.activation_checkpointing`:
- `false`: every activation autograd needs is kept (fastest, most memory);
- `true` (AutoModel's `full`): each decoder layer keeps only its input and is run again in the backward;
- `selective`: each decoder layer keeps the outputs of its costly ops (matmuls, attention) and recomputes the
  cheap ones (pointwise ops, views, the norms' reductions, concatenations, casts) in the backward, one layer at a
  time (torch's selective checkpointing with a per-op policy);
- `auto` (the steps' default): `selective` for full SFT on CPU without `compile`, off otherwise.

Why `auto` stops there (bench/README.md has the figures): on CPU, full SFT of SmolLM2-135M kept about 10% less
peak memory with `selective`, at the same speed and with the same losses. LoRA gained little and lost speed: a
frozen layer's matmul keeps no input for its own backward, so saving every matmul output costs about what the
recomputation saves. On a GPU, pointwise ops are a larger share of the step and it is not measured yet.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

Mode = Literal["full", "selective"]
DESCRIPTIONS = {"full": "full (each decoder layer runs again in the backward)",
                "selective": "selective (each decoder layer keeps its matmul and attention outputs and recomputes "
                             "pointwise ops, norms and casts in the backward)"}

_aten = torch.ops.aten
# Cheap ops that are neither pointwise nor views: the norms' mean, rotary embeddings' cat, dtype casts, copies.
_CHEAP = {_aten.mean.dim, _aten.sum.dim_IntList, _aten.cat.default, _aten._to_copy.default, _aten.clone.default}


def mode_for(setting: bool | str, lora: bool, device: torch.device, compiled: bool = False) -> Mode | None:
    """The mode a run uses for its `distributed.activation_checkpointing` setting (None: keep every activation).
    `auto` also stays off for compiled layers, which were measured to save memory their own way."""
    if setting == "auto":
        return "selective" if device.type == "cpu" and not lora and not compiled else None
    if setting == "selective":
        return "selective"
    return "full" if setting else None


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if getattr(op, "is_view", False) or torch.Tag.pointwise in getattr(op, "tags", ()) or op in _CHEAP:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE  # matmuls, attention kernels, and anything not known to be cheap


def selective_context():
    """`context_fn` for `torch.utils.checkpoint.checkpoint`: the selective policy above."""
    return create_selective_checkpoint_contexts(_policy)


def checkpoint_options(mode: Mode) -> dict:
    """Keyword arguments for transformers' checkpointing of each decoder layer (non-reentrant, as torch advises)."""
    options: dict = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = selective_context
    return options
