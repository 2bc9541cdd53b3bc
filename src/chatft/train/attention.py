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

On a GPU in bfloat16/float16, where torch has the variable-length flash kernel
(`torch.nn.attention.varlen.varlen_attn`), all conversations of the row go through that one kernel instead of
one SDPA call each (a Python loop of conversations x layers launches, which on a GPU can cost as much as the
attention itself). CPU runs, float32 and older torch keep the loop; `VARLEN_KERNEL` and `VARLEN_DEVICES` are
the seams the CPU tests use to run this path with a reference kernel. A kernel that refuses the inputs once is
not tried again in the process; `kernel_use` counts which path ran (the manifest records it), so a run that
fell back to the loop says so.

`attn_implementation="flash_attention_2"` needs none of this: transformers reads the boundaries from the
position ids itself. The function is registered under its own name, so the saved `config.json` and anything
loading the model later never see it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import warnings
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

VARLEN_DEVICES = ("cuda",)
try:
    from torch.nn.attention.varlen import varlen_attn as VARLEN_KERNEL
except ImportError:  # torch < 2.10
    VARLEN_KERNEL = None


@dataclasses.dataclass(frozen=True)
class Segments:
    """The conversations of a padding-free row: where each starts, and the row's end (0, 7, 12, ...); `offsets`
    is the same as int32 on the model's device, for the varlen kernel (sent with the batch, not per layer)."""

    bounds: tuple[int, ...]
    offsets: torch.Tensor | None = None

    @property
    def longest(self) -> int:
        return max(end - start for start, end in itertools.pairwise(self.bounds))

    def offsets_on(self, device: torch.device) -> torch.Tensor:
        if self.offsets is not None and self.offsets.device == device:
            return self.offsets
        return torch.tensor(self.bounds, dtype=torch.int32).to(device, non_blocking=True)


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
    if not isinstance(segments, Segments):
        segments = Segments(tuple(segments))
    kwargs.pop("is_causal", None)
    window = kwargs.pop("sliding_window", None)
    if varlen_applies(query, kwargs, segments, window):
        try:
            output = varlen_forward(query, key, value, segments, window, kwargs.get("scaling"))
            _calls["varlen"] += 1
            return output, None
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # this GPU or shape: the loop instead
            _varlen_refused.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            warnings.warn(f"torch's varlen attention kernel refused these inputs ({_varlen_refused[0]}); attention "
                          "runs one conversation at a time instead", stacklevel=2)
    _calls["per_conversation"] += 1
    outputs = []
    for start, end in itertools.pairwise(segments.bounds):
        piece = slice(start, end)
        if window is None or end - start <= window:
            mask, causal = None, True
        else:
            mask, causal = sliding_window_mask(end - start, window, query.device), False
        outputs.append(sdpa_attention_forward(module, query[:, :, piece], key[:, :, piece], value[:, :, piece], mask,
                                              is_causal=causal, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


@functools.cache
def _kernel_parameters(kernel: Any) -> frozenset[str]:
    return frozenset(inspect.signature(kernel).parameters)


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    """Flash kernels need an Ampere or newer GPU (compute capability 8.0)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


_varlen_refused: list[str] = []  # why the kernel failed once in this process; then it is not tried again
_calls: collections.Counter[str] = collections.Counter()  # padding-free rows' attention calls by path


def reset_kernel_use() -> None:
    _calls.clear()


def kernel_use() -> dict[str, Any]:
    """How the attention calls of padding-free rows ran since `reset_kernel_use`: layer calls through the varlen
    kernel and through the per-conversation loop, and why the kernel was refused (it is then not tried again)."""
    return {"varlen_calls": _calls["varlen"], "per_conversation_calls": _calls["per_conversation"],
            "varlen_refused": _varlen_refused[0] if _varlen_refused else None}


def kernel_use_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """`kernel_use` for a model that runs chatft's per-conversation SDPA; None for any other attention."""
    return kernel_use() if uses_segment_sdpa(model) else None


def varlen_applies(query: torch.Tensor, kwargs: dict[str, Any], segments: Segments, window: int | None) -> bool:
    """The flash varlen kernel exists and takes these inputs: an Ampere+ GPU, half precision, a head size that
    is a multiple of 8 up to 256, no attention dropout, and a sliding window only where this torch's kernel has
    one (`window_size`, after torch 2.10)."""
    if (VARLEN_KERNEL is None or _varlen_refused or query.device.type not in VARLEN_DEVICES
            or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] % 8 or query.shape[-1] > 256
            or not _flash_capable(query.device)):
        return False
    needs_window = window is not None and segments.longest > window
    return not kwargs.get("dropout") and (not needs_window or "window_size" in _kernel_parameters(VARLEN_KERNEL))


def varlen_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                   window: int | None, scaling: float | None) -> torch.Tensor:
    """Causal attention of every conversation in one variable-length kernel call; (1, length, heads, dim)."""
    # (length, heads, head_dim), packed as flash kernels expect (transformers' own varlen path copies too)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    parameters = _kernel_parameters(VARLEN_KERNEL)
    options: dict[str, Any] = {"scale": scaling}
    if "enable_gqa" in parameters:
        options["enable_gqa"] = k.shape[1] != q.shape[1]
    elif k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in parameters:  # (left, right): keys up to `window - 1` positions back, none ahead
        options["window_size"] = (window - 1 if window is not None else -1, 0)
    else:  # torch 2.10: causal only (`varlen_applies` checked that no conversation outruns the window)
        options["is_causal"] = True
    offsets = segments.offsets_on(q.device)
    out = VARLEN_KERNEL(q, k, v, offsets, offsets, segments.longest, segments.longest, **options)
    return out[None]


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


def segments_for(position_ids: torch.Tensor, device: torch.device | None) -> Segments:
    """The `SEGMENTS_KWARG` value for a CPU batch whose model runs on `device`."""
    segments = Segments(segment_bounds(position_ids))
    if device is not None and device.type in VARLEN_DEVICES:
        segments = dataclasses.replace(segments, offsets=segments.offsets_on(device))
    return segments


def use_segment_sdpa(model: torch.nn.Module) -> None:
    """Switch a model loaded with sdpa to per-conversation SDPA for training."""
    register()
    model.set_attn_implementation(SEGMENT_SDPA)


def implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation the causal LM (under any PEFT wrapper) runs now."""
    return getattr(causal_lm(model).config, "_attn_implementation", None)


def uses_segment_sdpa(model: torch.nn.Module) -> bool:
    return implementation(model) == SEGMENT_SDPA
