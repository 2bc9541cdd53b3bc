"""Resumable checkpoints: resume equals an uninterrupted run, crash safety, keep_last, signals, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from safetensors.torch import load_file

from chatft.errors import ChatftError
from chatft.train import checkpoints, resume_check
from chatft.train.loop import Trainer
from chatft.train.step import train

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")
TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"


@pytest.fixture(scope="module")
def data(tokenizer):
    return helpers.prepared(helpers.chat_rows(tokenizer, 10))  # 3 steps per epoch (4 + 4 + 2 rows)


def config(model_dir, run_dir, lora, **overrides):
    settings = dict(step_scheduler__max_steps=7, step_scheduler__ckpt_every_steps=2, dataloader__shuffle=True)
    if lora:
        settings["peft__dropout"] = 0.1  # exercises the RNG state a resume must restore
    settings.update(overrides)
    return helpers.training_config(model_dir, run_dir, lora=lora, **settings)


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path, lora: bool) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / ("adapter_model.safetensors" if lora else "model.safetensors")))


def assert_same_run(a: Path, b: Path, lora: bool) -> None:
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for key in ("loss", "grad_norm", "lr", "tokens", "epoch", "loss_scale"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    wa, wb = final_weights(a, lora), final_weights(b, lora)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=0)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("lora, dtype, master", [
    (False, "float32", "auto"), (True, "float32", "auto"), (True, "float16", "auto"), (False, "float16", "auto"),
    (False, "bfloat16", "auto"), (False, "bfloat16", "stochastic_rounding"),
], ids=["full", "lora", "lora-float16", "full-float16", "full-bfloat16", "full-bfloat16-stochastic-rounding"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch, lora,
                                                          dtype, master):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    settings = {"model__torch_dtype": dtype, "optimizer__master_weights": master}
    train(config(tiny_model_dir, straight, lora, **settings), straight, data, tokenizer=tokenizer)

    original = Trainer._optimizer_step

    def crash_at_step_5(self, *args):
        if self.step == 4:  # the 5th step, after the checkpoint at step 4 (mid-epoch 2)
            raise Crash("simulated crash")
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash_at_step_5)
    with pytest.raises(Crash):
        train(config(tiny_model_dir, crashed, lora, **settings), crashed, data, tokenizer=tokenizer)
    assert checkpoints.latest_checkpoint(crashed).name == "step_4"
    monkeypatch.setattr(Trainer, "_optimizer_step", original)

    result = train(config(tiny_model_dir, crashed, lora, **settings), crashed, data, tokenizer=tokenizer)  # resume: auto
    assert result.steps == 7
    assert ("loss_scale" in metric_rows(crashed)[0]) == (dtype == "float16")  # float16 LoRA: loss scaling, resumed
    assert_same_run(straight, crashed, lora)


def test_keep_last_and_latest(tiny_model_dir, tokenizer, data, tmp_path):
    cfg = config(tiny_model_dir, tmp_path, False, step_scheduler__max_steps=5, step_scheduler__ckpt_every_steps=1,
                 checkpoint__keep_last=2)
    train(cfg, tmp_path, data, tokenizer=tokenizer)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_4", "step_5"]
    assert (root / "LATEST").read_text().strip() == "step_5"
    assert sorted(p.name for p in (root / "step_5").iterdir()) == [
        "optimizer.pt", "rng.pt", "trainable.safetensors", "trainer_state.json"]
    state = json.loads((root / "step_5" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (5, 1, 2)


def test_checkpoint_files_load_without_pickle(tiny_model_dir, tokenizer, data, tmp_path):
    train(config(tiny_model_dir, tmp_path, True, step_scheduler__max_steps=2), tmp_path, data, tokenizer=tokenizer)
    step = tmp_path / "checkpoints" / "step_2"
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(step / name, weights_only=True)  # raises if anything but tensors and plain data is inside
    assert all("lora_" in name for name in load_file(str(step / "trainable.safetensors")))


def test_a_crash_mid_save_leaves_latest_on_the_previous_checkpoint(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch):
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if ".tmp-step_4" in str(path):
            raise Crash("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    with pytest.raises(Crash):
        train(config(tiny_model_dir, tmp_path, False), tmp_path, data, tokenizer=tokenizer)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_4").is_dir() and not (root / "step_4").exists()
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_2"
    result = train(config(tiny_model_dir, tmp_path, False), tmp_path, data, tokenizer=tokenizer)
    assert result.steps == 7 and not (root / ".tmp-step_4").exists()
    assert [r["step"] for r in metric_rows(tmp_path)] == list(range(1, 8))


def test_a_finished_run_is_refused_unless_overwrite_or_resume_path(tiny_model_dir, tokenizer, data, tmp_path):
    cfg = config(tiny_model_dir, tmp_path, False, step_scheduler__max_steps=4)
    train(cfg, tmp_path, data, tokenizer=tokenizer)
    with pytest.raises(ChatftError) as err:
        train(cfg, tmp_path, data, tokenizer=tokenizer)
    assert err.value.id == "config_invalid" and "final" in err.value.message
    assert "checkpoint.overwrite=true" in err.value.hint and "checkpoint.resume=" in err.value.hint

    more = config(tiny_model_dir, tmp_path, False, step_scheduler__max_steps=6,
                  checkpoint__resume=str(tmp_path / "checkpoints" / "step_4"))
    assert train(more, tmp_path, data, tokenizer=tokenizer).steps == 6
    assert [r["step"] for r in metric_rows(tmp_path)] == list(range(1, 7))

    again = config(tiny_model_dir, tmp_path, False, step_scheduler__max_steps=2, checkpoint__overwrite=True)
    assert train(again, tmp_path, data, tokenizer=tokenizer).steps == 2
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2]
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_2"


def test_resume_false_does_not_mix_with_earlier_checkpoints(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_save_final", lambda self, elapsed, weights: None)  # an unfinished run
    train(config(tiny_model_dir, tmp_path, False, step_scheduler__max_steps=2), tmp_path, data, tokenizer=tokenizer)
    with pytest.raises(ChatftError) as err:
        train(config(tiny_model_dir, tmp_path, False, checkpoint__resume="false"), tmp_path, data, tokenizer=tokenizer)
    assert "step_2" in err.value.message and "checkpoint.resume=auto" in err.value.hint


def test_resume_refuses_a_changed_batch_size(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_save_final", lambda self, elapsed, weights: None)
    train(config(tiny_model_dir, tmp_path, False, step_scheduler__max_steps=2), tmp_path, data, tokenizer=tokenizer)
    changed = config(tiny_model_dir, tmp_path, False, step_scheduler__global_batch_size=8)
    with pytest.raises(ChatftError) as err:
        train(changed, tmp_path, data, tokenizer=tokenizer)
    assert err.value.id == "resume_mismatch"
    assert "step_scheduler.global_batch_size: 4 -> 8" in err.value.message


def test_resume_check_sorts_safe_from_refused_changes(tiny_model_dir, tmp_path):
    """Only settings that leave the trained model and the data position alone may change."""
    before = config(tiny_model_dir, tmp_path, True)
    state = {"config": before.model_dump(mode="json"), "data_sha256": "a" * 64}
    safe = config(tiny_model_dir, tmp_path / "fork", True, step_scheduler__max_steps=9,
                  packed_sequence__packed_sequence_size=1024, distributed__activation_checkpointing=True)
    changes = resume_check.check_resume(safe, state, "ckpt", data_sha256="a" * 64)
    assert changes["step_scheduler.max_steps"] == (7, 9)
    assert changes["packed_sequence.packed_sequence_size"] == (0, 1024)
    assert "checkpoint.checkpoint_dir" in changes  # a fork: recorded, allowed
    for override, key in [({"seed": 8}, "seed"), ({"optimizer__betas": (0.9, 0.95)}, "optimizer.betas"),
                          ({"lr_scheduler__lr_warmup_steps": 3}, "lr_scheduler.lr_warmup_steps"),
                          ({"dataset__seq_length": 128}, "dataset.seq_length"),
                          ({"optimizer__master_weights": "none"}, "optimizer.master_weights"),
                          ({"dataloader__shuffle": False}, "dataloader.shuffle"),
                          ({"peft__target_modules": ["q_proj"]}, "peft.target_modules")]:
        with pytest.raises(ChatftError) as err:
            resume_check.check_resume(config(tiny_model_dir, tmp_path, True, **override), state, "ckpt",
                                      data_sha256="a" * 64)
        assert err.value.id == "resume_mismatch" and f"{key}: " in err.value.message, key
    with pytest.raises(ChatftError) as err:  # the same settings, other rows
        resume_check.check_resume(before, state, "ckpt", data_sha256="b" * 64)
    assert "training data (sha256): 'aaaaaaaaaaaa' -> 'bbbbbbbbbbbb'" in err.value.message
    assert resume_check.check_resume(before, {"train_rows": 8}, "old checkpoint") == {}  # nothing recorded


def test_resume_path_must_hold_a_checkpoint(tmp_path):
    with pytest.raises(ChatftError) as err:
        checkpoints.resolve_resume_path(str(tmp_path))
    assert err.value.id == "config_invalid"


# --------------------------------------------------------------------------- real processes and signals

DRIVER = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import load_module_from_path
helpers = load_module_from_path("chatft_tests_train_rows", Path({tests!r}) / "fixtures" / "train_rows.py")
from chatft.train import checkpoints
from chatft.train.step import train
from chatft.train.model import load_tokenizer
{patch}
cfg = helpers.training_config(Path({model!r}), Path({run!r}), **{overrides!r})
tokenizer = load_tokenizer(cfg.model)
result = train(cfg, Path({run!r}), helpers.prepared(helpers.chat_rows(tokenizer, 10)), tokenizer=tokenizer)
sys.exit(result.exit_code)
"""


def start_driver(model_dir: Path, run_dir: Path, overrides: dict, patch: str = "") -> subprocess.Popen:
    script = run_dir.parent / f"{run_dir.name}-driver.py"
    script.write_text(DRIVER.format(tests=str(TESTS_DIR), model=str(model_dir), run=str(run_dir),
                                    overrides=overrides, patch=textwrap.dedent(patch)))
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_sigterm_finishes_the_step_saves_and_exits_143(tiny_model_dir, tokenizer, data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_driver(tiny_model_dir, run_dir, {"step_scheduler__max_steps": 100000, "optimizer__lr": 1e-4})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    steps = len(metric_rows(run_dir))
    assert checkpoints.latest_checkpoint(run_dir).name == f"step_{steps}"
    assert "stopped by SIGTERM" in out and "to resume" in out and "checkpoint.resume=auto" in out
    assert not (run_dir / "final").exists()

    resumed = train(helpers.training_config(tiny_model_dir, run_dir, step_scheduler__max_steps=steps + 2,
                                            optimizer__lr=1e-4), run_dir, data, tokenizer=tokenizer)
    assert resumed.steps == steps + 2
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, steps + 3))


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate-reads", "deferred-reads"])
def test_sigterm_during_validation_saves_that_step(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch, deferred):
    """A stop requested while validation runs (long on real data) still checkpoints the step just trained and
    logs its row, whether step rows are read at once (CPU) or after the next step is queued (CUDA)."""
    from chatft.train import loop

    monkeypatch.setattr(loop, "DEFERRED_READ_DEVICES", ("cpu",) if deferred else ())
    original = Trainer._validate

    def validate_then_sigterm(self, note):
        row = original(self, note)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler sets its stop flag
        return row

    monkeypatch.setattr(Trainer, "_validate", validate_then_sigterm)
    cfg = config(tiny_model_dir, tmp_path, False, step_scheduler__val_every_steps=2,
                 step_scheduler__ckpt_every_steps=None, validation_dataset={"path_or_dataset_id": "val.jsonl"})
    result = train(cfg, tmp_path, data, data, tokenizer=tokenizer)
    assert (result.stopped_by, result.steps, result.exit_code) == ("SIGTERM", 2, 143)
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_2"
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2]


def test_sigkill_mid_save_recovers_from_the_previous_checkpoint(tiny_model_dir, tokenizer, data, tmp_path):
    overrides = {"step_scheduler__max_steps": 7, "step_scheduler__ckpt_every_steps": 2}
    straight = tmp_path / "straight"
    train(helpers.training_config(tiny_model_dir, straight, **overrides), straight, data, tokenizer=tokenizer)

    killed = tmp_path / "killed"
    patch = """
    import os, signal
    real_save_file = checkpoints.save_file
    def save_file_then_die(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if ".tmp-step_4" in path:
            os.kill(os.getpid(), signal.SIGKILL)  # half-written checkpoint: weights only
    checkpoints.save_file = save_file_then_die
    """
    proc = start_driver(tiny_model_dir, killed, overrides, patch)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    root = killed / "checkpoints"
    assert (root / ".tmp-step_4" / "trainable.safetensors").is_file()
    assert (root / "LATEST").read_text().strip() == "step_2"

    result = train(helpers.training_config(tiny_model_dir, killed, **overrides), killed, data, tokenizer=tokenizer)
    assert result.steps == 7
    assert_same_run(straight, killed, lora=False)
