"""`compile.enabled=true`: torch.compile each decoder layer, not the whole model.

Every decoder layer of a transformers model runs the same code, so compiling layer by layer compiles that
code once and reuses it for all layers: minutes less than one whole-model graph, and the model object, its
parameter names and `save_pretrained` stay exactly as they were (no `_orig_mod.` prefix in checkpoints).
The layer classes are the ones the model names in `_no_split_modules` (what transformers itself uses to
keep a layer on one device); a model that names none is compiled whole. Row lengths change every step, so
graphs are compiled for dynamic shapes unless `compile.dynamic=false`. chatft's per-conversation attention
stays outside the graphs (`attention.segment_sdpa_forward` is excluded): the number of conversations in a
row changes from step to step.
"""

from __future__ import annotations

import torch

from chatft.config.schema import CompileSection
from chatft.train.model import causal_lm


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = causal_lm(model)
    names = set(getattr(inner, "_no_split_modules", None) or [])
    return [module for module in inner.modules() if type(module).__name__ in names]


def compile_layers(model: torch.nn.Module, settings: CompileSection) -> str:
    """Compile in place; returns what was compiled, for the run summary."""
    options = {"mode": settings.mode, "dynamic": settings.dynamic, "fullgraph": settings.fullgraph,
               "backend": settings.backend}
    layers = decoder_layers(model)
    if not layers:
        model.compile(**options)
        return "torch.compile: the whole model (it names no decoder layer class)"
    for layer in layers:
        layer.compile(**options)
    return f"torch.compile: {len(layers)} x {type(layers[0]).__name__} ({settings.backend}, dynamic={settings.dynamic})"
