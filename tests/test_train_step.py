"""`run_step`, the entry point `chatft run sft/automodel | peft/automodel` dispatches to, and the slow
real-model check on SmolLM2-135M-Instruct (whose pad token is its EOS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from safetensors.torch import load_file

from chatft.config.compile import compile_config
from chatft.errors import ChatftError
from chatft.steps.registry import resolve_step
from chatft.train import batching
from chatft.train.loop import Trainer, TrainResult
from chatft.train.step import train
from chatft.train.model import load_tokenizer
from chatft.train.step import run_step

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")
REPO = Path(__file__).resolve().parent.parent


def compiled_for(step_id: str, model_dir: Path, run_dir: Path, *extra: str):
    overrides = [f"model.pretrained_model_name_or_path={model_dir}", f"checkpoint.checkpoint_dir={run_dir}",
                 "dataset.path_or_dataset_id=train.jsonl", "step_scheduler.max_steps=2",
                 "step_scheduler.global_batch_size=4", "step_scheduler.local_batch_size=2", *extra]
    return compile_config(resolve_step(step_id), "tiny", overrides)


@pytest.fixture
def fake_pipeline(monkeypatch, tiny_model_dir):
    """Stands in for chatft.data.pipeline.prepare_training_data: tiny chat rows, whatever the path."""
    import chatft.data.pipeline as pipeline

    calls = []

    def prepare(section, tokenizer, *, key="dataset", **_):
        calls.append(key)
        return helpers.prepared(helpers.chat_rows(tokenizer, 8, offset=0 if key == "dataset" else 50),
                                section.path_or_dataset_id)

    monkeypatch.setattr(pipeline, "prepare_training_data", prepare)
    return calls


@pytest.mark.parametrize("step_id, kind", [("sft/automodel", "full"), ("peft/automodel", "lora")])
def test_run_step_trains_and_writes_the_artifact(tiny_model_dir, tmp_path, fake_pipeline, step_id, kind):
    compiled = compiled_for(step_id, tiny_model_dir, tmp_path, "validation_dataset.path_or_dataset_id=val.jsonl")
    run_step(compiled)
    assert fake_pipeline == ["dataset", "validation_dataset"]
    manifest = json.loads((tmp_path / "final" / "chatft_manifest.json").read_text())
    assert manifest["kind"] == kind
    assert manifest["config"] == compiled.effective()
    assert manifest["data"]["validation"]["path"] == "val.jsonl"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_run_step_decides_fit_on_the_data_rows(tiny_model_dir, tmp_path, fake_pipeline, monkeypatch, capsys):
    """Before the data is read, only what no data changes (weights, gradients, optimizer states) can refuse a run;
    after it, the largest micro-batch its rows form. A seq_length far above the rows' lengths therefore does not
    refuse a run that fits."""
    from chatft.train import memory

    compiled = compiled_for("sft/automodel", tiny_model_dir, tmp_path, "dataset.seq_length=4096")
    cfg = compiled.validated
    bound = memory.estimate_memory(cfg)
    rows = helpers.chat_rows(load_tokenizer(cfg.model), 8)
    measured = memory.estimate_memory(cfg, lengths=[len(r) for r in rows])
    assert measured.training < bound.training
    monkeypatch.setattr(memory, "free_memory", lambda device: (measured.training + bound.training) // 2)
    run_step(compiled)
    assert "the largest this run forms" in capsys.readouterr().out
    assert (tmp_path / "final" / "model.safetensors").is_file()

    monkeypatch.setattr(memory, "free_memory", lambda device: bound.weights_and_optimizer().training // 2)
    fake_pipeline.clear()
    with pytest.raises(ChatftError) as err:
        run_step(compiled_for("sft/automodel", tiny_model_dir, tmp_path / "small", "dataset.seq_length=4096"))
    assert err.value.id == "oom" and "weights, gradients and optimizer states alone" in err.value.message
    assert fake_pipeline == []  # refused before any data was read


def test_run_step_exits_143_when_stopped_by_sigterm(tiny_model_dir, tmp_path, fake_pipeline, monkeypatch):
    monkeypatch.setattr(Trainer, "train", lambda self: TrainResult(tmp_path, None, 1, 1.0, None, None, 10, 1.0,
                                                                   stopped_by="SIGTERM", exit_code=143))
    with pytest.raises(SystemExit) as exit_info:
        run_step(compiled_for("sft/automodel", tiny_model_dir, tmp_path))
    assert exit_info.value.code == 143


def test_training_outside_a_launcher_refuses_a_config_for_several_processes(tiny_model_dir, tmp_path):
    # `chatft run` starts the processes; called directly, one process must not train a share of each step
    with pytest.raises(ChatftError) as err:
        run_step(compiled_for("sft/automodel", tiny_model_dir, tmp_path, "run.env.nprocs_per_node=2"))
    assert err.value.id == "config_invalid" and "but 1 was started" in err.value.message


def write_messages(path: Path, n: int) -> Path:
    with open(path, "w") as handle:
        for i in range(n):
            question, answer = helpers.conversation(i)
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cli_runs_sft_end_to_end(tiny_model_dir, tmp_path, dtype):
    data = write_messages(tmp_path / "train.jsonl", 12)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "chatft", "run", "sft/automodel", "-c", "tiny",
               f"model.pretrained_model_name_or_path={tiny_model_dir}", f"dataset.path_or_dataset_id={data}",
               f"checkpoint.checkpoint_dir={run_dir}", "step_scheduler.max_steps=3", "step_scheduler.val_every_steps=null",
               f"model.torch_dtype={dtype}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "job.yaml").is_file()
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {getattr(torch, dtype)}
    if dtype == "float16":  # mixed precision on CPU too: float32 master weights, float16 autocast, loss scaling
        assert "float32 master weights computed in float16 under autocast" in done.stdout
        return
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert again.returncode == 2 and "error[config_invalid]" in again.stderr and "finished run" in again.stderr


@pytest.mark.slow
def test_smollm2_lora_keeps_eos_labels_and_saves_a_loadable_adapter(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = helpers.training_config(smollm2_dir, tmp_path, lora=True, step_scheduler__max_steps=3,
                                  optimizer__lr=2e-4, peft__dim=8, peft__alpha=16)
    tokenizer = load_tokenizer(cfg.model)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case this test is about
    rows = helpers.chat_rows(tokenizer, 12)
    batch = batching.collate(rows[:4], tokenizer.pad_token_id)
    eos_labels = int((batch["labels"] == tokenizer.eos_token_id).sum())
    assert eos_labels == 4  # each answer's end-of-turn is learnt, the padding (same id) is not
    val = helpers.prepared(helpers.chat_rows(tokenizer, 4, offset=40), "val.jsonl")
    result = train(cfg, tmp_path, helpers.prepared(rows), val, tokenizer=tokenizer)
    assert result.val_loss is not None and result.val_loss < 5
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = PeftModel.from_pretrained(base, result.final_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
