"""The artifact of a finished run, `final/`: a `save_pretrained` model (full SFT) or a PEFT adapter (LoRA), with its
tokenizer and `chatft_manifest.json`.

In: the trained model, its tokenizer, the manifest (`Trainer._manifest`). Out: `final/`, written into `final.tmp/`
first and renamed, so a `final/` that exists is whole. A full model is made ready for whoever loads it: the KV cache
on again, generation stopping at the chat's end of turn (`artifacts.stop_at_end_of_turn`), and the weights in the
dtype the config asked for (float32 master weights are written as bfloat16 or float16).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatft import artifacts, quantization
from chatft.config.schema import TrainingConfig
from chatft.config.secrets import redact
from chatft.data.types import PreparedData
from chatft.run_layout import FINAL, final_dir
from chatft.train.model import causal_lm, model_location, quiet_hub_progress


def save_final(run_dir: Path, model: nn.Module, tokenizer: Any, manifest: dict[str, Any], *, lora: bool,
               saved_dtype: torch.dtype, pad_id: int, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """`state_dict`: the weights to write when the model's own are shards of them (FSDP2, gathered by the caller)."""
    final, tmp = final_dir(run_dir), run_dir / (FINAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if not lora:
        model.config.use_cache = True  # off while training; on for whoever loads the artifact
        artifacts.stop_at_end_of_turn(model, tokenizer, pad_id,
                                      template_kwargs=artifacts.recorded_template_kwargs(manifest))
        if state_dict is not None:  # master weights: written in the dtype asked for
            state_dict = {name: tensor.to(saved_dtype) if tensor.is_floating_point() else tensor
                          for name, tensor in state_dict.items()}
        elif next(model.parameters()).dtype != saved_dtype:
            model.to(saved_dtype)
    with quiet_hub_progress():
        # full: weights + config + generation_config; LoRA: the adapter only
        model.save_pretrained(tmp, state_dict=state_dict)
        if state_dict is not None and not lora:  # the config names the dtype of the model's own (sharded) weights
            model.config.dtype = str(saved_dtype).removeprefix("torch.")
            model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    artifacts.write_manifest(tmp, manifest)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def run_manifest(cfg: TrainingConfig, model: nn.Module, tokenizer: Any, metrics: dict[str, Any],
                 train_data: PreparedData, val_data: PreparedData | None,
                 resolved_config: dict[str, Any]) -> dict[str, Any]:
    """chatft_manifest.json of a training run: its base, tokenizer, data, config (secrets redacted), metrics,
    versions and, for LoRA, the adapter's settings."""
    data = {"train": train_data.report.to_json(), "validation": val_data.report.to_json() if val_data else None}
    manifest = artifacts.build_manifest(
        kind="lora" if cfg.peft is not None else "full",
        base_model=artifacts.base_model_record(model_location(cfg.model), cfg.model.revision),
        tokenizer=tokenizer, data=data, config=redact(resolved_config), metrics=metrics,
        versions=artifacts.package_versions(),
        # the adapter's settings as PEFT holds them: the modules it really wrapped, the expert weights it adapted
        lora=artifacts.lora_record(model.peft_config["default"].to_dict()) if cfg.peft is not None else None,
    )
    # QLoRA: how the base was quantized (its fingerprint above stays the one of the unquantized weight files)
    quant = quantization.record(causal_lm(model))
    if quant is not None:
        manifest["quantization"] = quant
    return manifest
