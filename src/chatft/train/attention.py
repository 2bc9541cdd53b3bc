"""Attention for padding-free rows with `sdpa`: each conversation attends only to itself, computed alone.

With restarting position ids and `attn_implementation="sdpa"`, transformers builds one block-diagonal
causal mask over the whole packed row and SDPA computes every query against every key of the row, then
masks most of it away: for four conversations that is about four times the attention work of running them
one by one, and an explicit mask also rules out SDPA's causal fast path. So training with sdpa registers
`SEGMENT_SDPA`, which runs SDPA on each conversation's slice of the row (the boundaries come with the batch
as `chatft_segments`) and concatenates the outputs: `is_causal=True`, or, for a sliding-window layer and a
conversation longer than the window, that conversation's own sliding-window mask.

`SEGMENT_SDPA` has no mask function, so transformers builds no mask at all: no L x L block mask per forward
and no scan of the position ids for packed sequences (on a GPU that scan is a host-device sync). This is
only right for models whose layers are causal or sliding-window (`splittable`: chunked attention, for one,
lives in the mask alone) and whose attention calls carry nothing the split cannot honour (soft-capping,
attention sinks, a position bias: those calls get no mask, attend across the whole row, and the trainer's
boundary probe, `padding_free.boundary_leak`, sees it at once). Otherwise training keeps transformers' sdpa
with its packed-sequence masks.

Flash attention needs none of this: it reads the boundaries from the position ids itself (varlen kernel).
The function is registered under its own name, so the saved `config.json` and anything loading the model
later never see it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chatft.train.model import causal_lm

SEGMENT_SDPA = "chatft_segment_sdpa"
SEGMENTS_KWARG = "chatft_segments"
# Per-call settings that change how scores are formed: not split here.
_NOT_SPLITTABLE = ("softcap", "s_aux", "position_bias")
# Layer kinds whose mask the split reproduces (transformers' `config.layer_types`).
_SPLITTABLE_LAYERS = {"full_attention", "sliding_attention"}


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
    window = kwargs.pop("sliding_window", None)
    outputs = []
    for start, end in zip(segments[:-1], segments[1:]):
        piece = slice(start, end)
        if window is None or end - start <= window:
            mask, causal = None, True
        else:
            mask, causal = sliding_window_mask(end - start, window, query.device), False
        outputs.append(sdpa_attention_forward(module, query[:, :, piece], key[:, :, piece], value[:, :, piece], mask,
                                              is_causal=causal, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


def sliding_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(1, 1, length, length) boolean: query q sees keys k with q - window < k <= q, as transformers' sliding
    window does."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def register() -> None:
    """Make `SEGMENT_SDPA` a valid `attn_implementation` (idempotent). Deliberately no mask function."""
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)


def splittable(config: Any) -> bool:
    """Whether every layer's mask is causal or sliding-window, so splitting at the boundaries reproduces it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    return set(layer_types) <= _SPLITTABLE_LAYERS and getattr(text, "attention_chunk_size", None) is None


def segment_bounds(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Start of every conversation in a padding-free row, and the row's end: (0, 7, 12, ...)."""
    starts = (position_ids[0] == 0).nonzero().squeeze(1).tolist()
    return (*starts, position_ids.shape[1])


def use_segment_sdpa(model: torch.nn.Module) -> None:
    """Switch a model loaded with sdpa to per-conversation SDPA for training."""
    register()
    model.set_attn_implementation(SEGMENT_SDPA)


def uses_segment_sdpa(model: torch.nn.Module) -> bool:
    inner = causal_lm(model)
    return getattr(inner.config, "_attn_implementation", None) == SEGMENT_SDPA
