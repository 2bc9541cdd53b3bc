"""float16 LoRA trains with dynamic loss scaling: overflowing steps are skipped, counted and reported; full SFT in
float16 is warned about instead (its float16 gradients cannot be unscaled)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from safetensors.torch import load_file

from chatft.train.loop import train

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")


@pytest.fixture(scope="module")
def data(tokenizer):
    return helpers.prepared(helpers.chat_rows(tokenizer, 8))


def run(model_dir, run_dir, data, tokenizer, **overrides):
    cfg = helpers.training_config(model_dir, run_dir, model__torch_dtype="float16", step_scheduler__max_steps=3,
                                  **overrides)
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


def test_float16_full_sft_warns_that_it_is_not_scaled(tiny_model_dir, tokenizer, data, tmp_path, capsys):
    rows, manifest = run(tiny_model_dir, tmp_path, data, tokenizer)
    assert "full SFT in float16 trains without loss scaling" in capsys.readouterr().out
    assert "loss_scaling" not in manifest["metrics"] and "loss_scale" not in rows[0]
