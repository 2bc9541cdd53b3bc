"""Activation checkpointing modes: what a decoder layer keeps for the backward, and what it recomputes there.

`distributed.activation_checkpointing`:
- `false`: every activation autograd needs is kept (fastest, most memory);
- `true` (AutoModel's `full`): each decoder layer keeps only its input and is run again in the backward;
- `selective`: each decoder layer keeps the outputs of its costly ops (matmuls, attention, softmax) and
  recomputes the rest (pointwise ops, views, the norms' reductions, concatenations, casts, routing) in the
  backward, one layer at a time (torch's selective checkpointing with a per-op policy);
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
# What a layer keeps: the outputs of its costly ops. Everything else is recomputed, which is cheap (pointwise ops,
# views, the norms' reductions, casts) and also safe: a kept output must never change afterwards, and
# mixture-of-experts blocks write in place into tensors made by other ops (a top-k's weights divided by their sum,
# an accumulator of expert outputs filled by `index_put_`/`index_add_`), which torch refuses to recompute around.
_COSTLY = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
           _aten._grouped_mm.default,  # the experts' matmuls, all experts at once
           _aten._softmax.default,  # eager attention's probabilities: as large as the scores, and not cheap
           _aten._scaled_dot_product_flash_attention_for_cpu.default,
           _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
           _aten._scaled_dot_product_cudnn_attention.default, _aten._flash_attention_forward.default,
           _aten._efficient_attention_forward.default}


def mode_for(setting: bool | str, lora: bool, device: torch.device, compiled: bool = False) -> Mode | None:
    """The mode a run uses for its `distributed.activation_checkpointing` setting (None: keep every activation).
    `auto` also stays off for compiled layers, which were measured to save memory their own way."""
    if setting == "auto":
        return "selective" if device.type == "cpu" and not lora and not compiled else None
    if setting == "selective":
        return "selective"
    return "full" if setting else None


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _COSTLY else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """`context_fn` for `torch.utils.checkpoint.checkpoint`: the selective policy above."""
    return create_selective_checkpoint_contexts(_policy)


def checkpoint_options(mode: Mode) -> dict:
    """Keyword arguments for transformers' checkpointing of each decoder layer (non-reentrant, as torch advises)."""
    options: dict = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = selective_context
    return options
