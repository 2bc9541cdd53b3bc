"""float16 trains with dynamic loss scaling: overflowing steps are skipped, counted and reported. LoRA keeps its
float32 adapters on the float16 base; full SFT keeps float32 master weights and computes in float16."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from safetensors.torch import load_file

from chatft.train.step import train

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")


@pytest.fixture(scope="module")
def data(tokenizer):
    return helpers.prepared(helpers.chat_rows(tokenizer, 8))


def run(model_dir, run_dir, data, tokenizer, **overrides):
    cfg = helpers.training_config(model_dir, run_dir, **{"model__torch_dtype": "float16",
                                                          "step_scheduler__max_steps": 3, **overrides})
    result = train(cfg, run_dir, data, tokenizer=tokenizer)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((result.final_dir / "chatft_manifest.json").read_text())
    return rows, manifest


def test_float16_lora_scales_the_loss_and_learns(tiny_model_dir, tokenizer, data, tmp_path, capsys):
    rows, manifest = run(tiny_model_dir, tmp_path, data, tokenizer, lora=True)
    assert "dynamic loss scaling" in capsys.readouterr().out
    assert manifest["metrics"]["loss_scaling"] is True
    assert manifest["metrics"]["skipped_steps"] == sum(r["skipped"] for r in rows)
    assert all(r["loss_scale"] >= 1 and r["loss"] == r["loss"] for r in rows)
    assert any(not r["skipped"] for r in rows)
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and t.abs().max() > 0 for name, t in adapter.items())  # B left zero


def test_overflowing_steps_are_skipped_and_counted(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch, capsys):
    # A scale no float16 gradient survives: every update must be skipped, the scale halved each time.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**60))
    rows, manifest = run(tiny_model_dir, tmp_path, data, tokenizer, lora=True)
    assert [r["skipped"] for r in rows] == [True, True, True]
    assert [r["loss_scale"] for r in rows] == [2.0**59, 2.0**58, 2.0**57]
    assert all(r["grad_norm"] is None for r in rows)  # not Infinity in the JSON
    assert manifest["metrics"]["skipped_steps"] == 3
    assert capsys.readouterr().out.count("the update was skipped") == 3
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert all(t.abs().max() == 0 for name, t in adapter.items() if name.endswith("lora_B.weight"))  # never updated


def test_float16_full_sft_keeps_float32_master_weights_and_follows_float32(tiny_model_dir, tokenizer, data, tmp_path,
                                                                            capsys):
    """Mixed precision: float32 weights, gradients and AdamW moments, float16 compute under autocast, dynamic loss
    scaling; the loss curve stays with float32's and the artifact is written in float16, as asked."""
    rows, manifest = run(tiny_model_dir, tmp_path / "fp16", data, tokenizer, step_scheduler__max_steps=6)
    assert "float32 master weights computed in float16 under autocast, dynamic loss scaling" in capsys.readouterr().out
    assert manifest["metrics"]["precision"] == {"weights": "float32", "trainable": "float32", "compute": "float16",
                                                "saved": "float16", "optimizer_moments": "float32",
                                                "weight_update": "round to nearest"}
    assert manifest["metrics"]["loss_scaling"] is True and "loss_scale" in rows[0]
    assert not any(r["skipped"] for r in rows)
    cfg = helpers.training_config(tiny_model_dir, tmp_path / "fp32", step_scheduler__max_steps=6)
    train(cfg, tmp_path / "fp32", data, tokenizer=tokenizer)
    fp32 = [json.loads(line)["loss"] for line in (tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx(fp32, rel=2e-2)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    weights = load_file(str(tmp_path / "fp16" / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    config = json.loads((tmp_path / "fp16" / "final" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
