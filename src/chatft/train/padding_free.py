"""A check, on the loaded model, that padding-free rows keep conversations apart.

Padding-free micro-batches (`batching.collate_packed`) rely on the model reading restarting position ids as
sequence boundaries: transformers' own architectures do (block-diagonal causal mask for sdpa/eager, varlen
kernels for flash attention), but a model with its own modelling code (`trust_remote_code`) or an attention
implementation that ignores position ids would let one conversation attend to the one before it, silently.
So before training, two short token rows are run through the model twice: alone, and packed after another
row (once with each of two different rows in front). The packed logits must equal the alone ones and must
not depend on what was in front; otherwise training falls back to padded micro-batches and says why.

`switch_to_padding_free` picks the attention for such rows and runs the check: with sdpa, chatft's
per-conversation SDPA first (`attention.SEGMENT_SDPA`, where the model's layers allow it), then transformers'
own sdpa with its packed-sequence masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from chatft.config.schema import TrainingConfig
from chatft.errors import ChatftError
from chatft.train import attention
from chatft.train.model import causal_lm

PROBE_LENGTHS = (7, 5)  # the row in front, the probed row
PROBE_SEED = 1234


@torch.no_grad()
def boundary_leak(model: torch.nn.Module, vocab_size: int, device: torch.device) -> float:
    """The largest difference between the probed row's logits alone and packed behind another row,
    relative to the largest logit (0.0 for a model that keeps packed conversations apart)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    front, probed = PROBE_LENGTHS
    high = min(vocab_size, 1000)
    rows = torch.randint(0, high, (3, front + probed), generator=generator)
    probe = rows[0, front:]
    fronts = (rows[1, :front], rows[2, :front])
    positions = torch.cat([torch.arange(front), torch.arange(probed)])[None]
    # With per-conversation SDPA the boundaries come with the batch, as in training.
    segments = ({attention.SEGMENTS_KWARG: attention.segment_bounds(positions)}
                if attention.uses_segment_sdpa(model) else {})
    positions = positions.to(device)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=probe[None].to(device)).logits.float()
        packed = [model(input_ids=torch.cat([f, probe])[None].to(device), position_ids=positions, **segments)
                  .logits[:, front:].float() for f in fronts]
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp_min(1e-6)
    return float(max((p - alone).abs().max() for p in packed) / scale)


def switch_to_padding_free(
    model: torch.nn.Module, attn_implementation: str, vocab_size: int, device: torch.device, dtype: torch.dtype,
    precision: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> tuple[bool, float]:
    """Set the attention padding-free rows use and check it on `model` (under `precision`, the compute's autocast).
    Returns (whether packed conversations stay apart, the probe's leak); when they do not, the model is back on
    `attn_implementation`."""
    candidates = [attn_implementation]
    if attn_implementation == "sdpa" and attention.splittable(causal_lm(model).config):
        candidates.insert(0, attention.SEGMENT_SDPA)
    leak = float("inf")
    for candidate in candidates:
        if candidate == attention.SEGMENT_SDPA:
            attention.use_segment_sdpa(model)
        elif attention.implementation(model) != candidate:
            model.set_attn_implementation(candidate)
        with precision():
            leak = boundary_leak(model, vocab_size, device)
        if leak <= tolerance(dtype):
            return True, leak
    return False, leak


def tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed for kernel rounding: alone and packed rows run different shapes."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def choose_layout(model: torch.nn.Module, cfg: TrainingConfig, vocab_size: int, device: torch.device,
                  dtype: torch.dtype, precision: Callable[[], AbstractContextManager]) -> tuple[bool, str | None]:
    """(padding-free?, the note saying why not). Padding-free micro-batches when the config asks for them (the
    default, or a pack budget) and the loaded model keeps packed conversations apart (`boundary_leak`); with sdpa
    the attention then runs per conversation without any mask (`attention.SEGMENT_SDPA`) where the model's layers
    allow it, else transformers' sdpa uses its packed-sequence masks. A model that lets them mix trains on padded
    micro-batches, except under a pack budget, which cannot be kept: that is refused."""
    packing, attn = cfg.packed_sequence, cfg.model.attn_implementation
    if not (packing.padding_free or packing.packed_sequence_size > 0):
        return False, None
    kept_apart, leak = switch_to_padding_free(model, attn, vocab_size, device, dtype, precision)
    if kept_apart:
        return True, None
    if packing.packed_sequence_size > 0:
        raise ChatftError(
            "config_invalid",
            f"packed_sequence.packed_sequence_size={packing.packed_sequence_size}, but this model lets packed "
            f"conversations see each other (logits of a packed row differ by {leak:.2e} of their scale from the "
            f"row alone, with attn_implementation={attn})",
            "set packed_sequence.packed_sequence_size=0, or model.attn_implementation=sdpa / flash_attention_2",
        )
    return False, (f"note: padded micro-batches: this model does not keep padding-free rows apart (logits differ by "
                   f"{leak:.2e} of their scale), so packed_sequence.padding_free=true was not used")
