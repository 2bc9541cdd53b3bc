"""Resuming through the real CLI: a checkpoint continues only with settings that leave what is trained alone.
Changed learning rate, LoRA rank or data are refused before anything loads, with every difference listed; a
longer run or another cadence is accepted and recorded in the manifest as changed at the checkpoint's step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import assert_error_block, run_chatft

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(16)]


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    """Two LoRA steps with a checkpoint after each: a finished run whose step_2 checkpoint the tests resume."""
    work = tmp_path_factory.mktemp("resume")
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    result = train(work, tiny_model_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return work


def train(work: Path, model: Path, *overrides: str):
    return run_chatft("run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model}",
                      "dataset.path_or_dataset_id=train.jsonl", "checkpoint.checkpoint_dir=run",
                      "step_scheduler.global_batch_size=4", "step_scheduler.max_steps=2",
                      "step_scheduler.ckpt_every_steps=1", "optimizer.lr=3e-4", *overrides, cwd=work)


def resume(work: Path, model: Path, *overrides: str):
    return train(work, model, "checkpoint.resume=run/checkpoints/step_2", *overrides)


def test_a_changed_learning_rate_or_rank_is_refused_before_loading(first_run, tiny_model_dir):
    result = resume(first_run, tiny_model_dir, "optimizer.lr=1e-3", "peft.dim=8", "step_scheduler.max_steps=4")
    stderr = assert_error_block(result, "resume_mismatch")
    assert "2 setting(s) that change what is trained" in stderr
    assert "optimizer.lr: 0.0003 -> 0.001" in stderr and "peft.dim: 16 -> 8" in stderr
    assert "max_steps" not in stderr.split("hint:")[0]  # a safe change is not listed as a problem
    assert "memory estimate" not in result.stdout and "model:" not in result.stdout  # nothing was loaded
    assert "checkpoint.checkpoint_dir" in stderr  # how to start over or fork


def test_changed_data_is_refused(first_run, tiny_model_dir):
    edited = first_run / "edited"
    edited.mkdir()
    (edited / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[::-1]))
    result = train(edited, tiny_model_dir, f"checkpoint.resume={first_run / 'run' / 'checkpoints' / 'step_2'}",
                   "step_scheduler.max_steps=4")
    stderr = assert_error_block(result, "resume_mismatch")
    assert "training data (sha256)" in stderr


def test_safe_changes_are_accepted_and_recorded_at_their_step(first_run, tiny_model_dir):
    result = resume(first_run, tiny_model_dir, "step_scheduler.max_steps=4", "step_scheduler.ckpt_every_steps=2",
                    "step_scheduler.local_batch_size=4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed with changed settings" in result.stdout
    manifest = json.loads((first_run / "run" / "final" / "chatft_manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4
    (record,) = manifest["metrics"]["resumes"]
    assert record["step"] == 2 and record["from"].endswith("step_2")
    assert record["changed"]["step_scheduler.max_steps"] == [2, 4]
    assert record["changed"]["step_scheduler.ckpt_every_steps"] == [1, 2]
    assert record["changed"]["step_scheduler.local_batch_size"] == [2, 4]
    assert "optimizer.lr" not in record["changed"]
