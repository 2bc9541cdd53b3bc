"""Activation checkpointing modes (`train/recompute.py`): which mode each setting gives, what the selective policy
keeps, and what the memory estimate counts for each. Training with each mode is compared with keeping every
activation in `test_train_loop.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from torch.utils.checkpoint import CheckpointPolicy

from chatft.train import memory, recompute
from chatft.train.memory import meta_model

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
aten = torch.ops.aten


@pytest.mark.parametrize(("setting", "lora", "device", "compiled", "expected"), [
    ("auto", False, CPU, False, "selective"),  # measured: less memory at the same speed
    ("auto", True, CPU, False, None),  # LoRA: little memory saved, slower
    ("auto", False, CUDA, False, None),  # not measured on a GPU yet
    ("auto", False, CPU, True, None),  # compiled layers save memory their own way
    ("selective", True, CUDA, False, "selective"),
    (True, False, CPU, False, "full"),
    (False, False, CPU, False, None),
])
def test_mode_for_each_setting(setting, lora, device, compiled, expected):
    assert recompute.mode_for(setting, lora, device, compiled) == expected


@pytest.mark.parametrize(("op", "policy"), [
    (aten.mm.default, CheckpointPolicy.MUST_SAVE),
    (aten.addmm.default, CheckpointPolicy.MUST_SAVE),
    (aten._scaled_dot_product_flash_attention_for_cpu.default, CheckpointPolicy.MUST_SAVE),
    (aten._grouped_mm.default, CheckpointPolicy.MUST_SAVE),  # the experts' matmuls
    (aten._softmax.default, CheckpointPolicy.MUST_SAVE),  # eager attention's probabilities
    # routing: outputs that mixture-of-experts blocks then change in place, so they must not be kept
    (aten.topk.default, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.index_put_.default, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.empty_like.default, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.mul.Tensor, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.silu.default, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.rsqrt.default, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.mean.dim, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.cat.default, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.view.default, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten.transpose.int, CheckpointPolicy.PREFER_RECOMPUTE),
    (aten._to_copy.default, CheckpointPolicy.PREFER_RECOMPUTE),
])
def test_selective_policy_keeps_costly_outputs_and_recomputes_cheap_ones(op, policy):
    assert recompute._policy(None, op) == policy


def test_schema_takes_automodel_words_and_defaults_to_auto(tiny_model_dir, tmp_path):
    def setting(**overrides):
        return helpers.training_config(tiny_model_dir, tmp_path, **overrides).distributed.activation_checkpointing

    assert setting() == "auto"
    assert setting(distributed__activation_checkpointing="full") is True
    assert setting(distributed__activation_checkpointing="none") is False
    assert setting(distributed__activation_checkpointing="Selective") == "selective"
    with pytest.raises(Exception, match="activation_checkpointing"):
        setting(distributed__activation_checkpointing="sometimes")


def test_memory_estimate_follows_the_mode(tiny_model_dir, tmp_path):
    """Selective keeps less than keeping everything and more than full recomputation."""
    def activations(setting):
        cfg = helpers.training_config(tiny_model_dir, tmp_path, distributed__activation_checkpointing=setting)
        return memory.estimate_memory(cfg, meta_model(cfg), CPU).activations

    kept, selective, full = activations(False), activations("selective"), activations(True)
    assert full < selective < kept
    assert activations("auto") == selective  # full SFT on CPU
