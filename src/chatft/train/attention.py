"""Attention for padding-free rows with `sdpa`: each conversation attends only to itself, computed alone.

With restarting position ids and `attn_implementation="sdpa"`, transformers builds one block-diagonal
causal mask over the whole packed row and SDPA computes every query against every key of the row, then
masks most of it away: for four conversations that is about four times the attention work of running them
one by one, and an explicit mask also rules out SDPA's causal fast path. So training with sdpa registers
`SEGMENT_SDPA`, which runs SDPA with `is_causal=True` on each conversation's slice of the row (the
boundaries come with the batch as `chatft_segments`) and concatenates the outputs. Anything it does not
know how to split (a sliding window, logit soft-capping, attention sinks, a batch of several rows, no
boundaries) goes to transformers' own sdpa with the mask transformers built, which is always correct.

Two registrations of the same function:
- `SEGMENT_SDPA` has no mask function, so transformers builds no mask at all: no L x L block mask per forward
  and no scan of the position ids for packed sequences (on a GPU that scan is a host-device sync). Every call
  must then be splittable; a model whose attention calls are not (see above) would attend across the whole row;
- `SEGMENT_SDPA_MASKED` gets sdpa's masks for those calls.
The trainer tries them in that order with the boundary probe (`padding_free.boundary_leak`), which sees such a
leak at once.

Flash attention needs none of this: it reads the boundaries from the position ids itself (varlen kernel).
The functions are registered under their own names, so the saved `config.json` and anything loading the model
later never see them.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chatft.train.model import causal_lm

SEGMENT_SDPA = "chatft_segment_sdpa"
SEGMENT_SDPA_MASKED = "chatft_segment_sdpa_masked"
SEGMENTS_KWARG = "chatft_segments"
# Per-call settings that change which keys a query may see or how scores are formed: not split here.
_NOT_SPLITTABLE = ("sliding_window", "softcap", "s_aux", "position_bias")


@torch.compiler.disable  # the segment count changes every step: compiled layers call this as it is
def segment_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`query`/`key`/`value`: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim)."""
    segments = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None or query.shape[0] != 1 or any(kwargs.get(name) is not None for name in _NOT_SPLITTABLE):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                               is_causal=True, **kwargs)[0]
        for start, end in zip(segments[:-1], segments[1:])
    ]
    return torch.cat(outputs, dim=1), None


def register() -> None:
    """Make both names valid `attn_implementation`s (idempotent); only the masked one gets sdpa's masks."""
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)
    AttentionInterface.register(SEGMENT_SDPA_MASKED, segment_sdpa_forward)
    AttentionMaskInterface.register(SEGMENT_SDPA_MASKED, sdpa_mask)


def segment_bounds(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Start of every conversation in a padding-free row, and the row's end: (0, 7, 12, ...)."""
    starts = (position_ids[0] == 0).nonzero().squeeze(1).tolist()
    return (*starts, position_ids.shape[1])


def use_segment_sdpa(model: torch.nn.Module, masked: bool = False) -> None:
    """Switch a model loaded with sdpa to per-conversation SDPA for training."""
    register()
    model.set_attn_implementation(SEGMENT_SDPA_MASKED if masked else SEGMENT_SDPA)


def uses_segment_sdpa(model: torch.nn.Module) -> bool:
    inner = causal_lm(model)
    return getattr(inner.config, "_attn_implementation", None) in (SEGMENT_SDPA, SEGMENT_SDPA_MASKED)
