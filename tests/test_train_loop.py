"""The training loop on tiny models: learning, loss normalisation, stopping, artifacts and manifests."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from safetensors.torch import load_file

from chatft.errors import ChatftError
from chatft.train import batching
from chatft.train.loop import Trainer
from chatft.train.step import train
from chatft.train.model import (
    apply_lora,
    count_parameters,
    load_model,
    peft_target_modules,
    resolve_lora_targets,
)
from chatft.config.support import check_supported

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")

METRIC_FIELDS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mb", "elapsed_s"}


def rows_eval_loss(model, rows, pad_id) -> float:
    """Mean cross-entropy per supervised token over `rows`, computed independently of the trainer."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batching.micro_batches(rows, 2, pad_id):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum"))
            count += batching.supervised_tokens(batch)
    return total / count


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full-run")
    cfg = helpers.training_config(tiny_model_dir, run_dir, step_scheduler__max_steps=12,
                                  step_scheduler__val_every_steps=5)
    val = helpers.prepared(helpers.chat_rows(tokenizer, 6, offset=100), "val.jsonl")
    result = train(cfg, run_dir, helpers.prepared(helpers.chat_rows(tokenizer, 24)), val, tokenizer=tokenizer)
    return result, val


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora-run")
    cfg = helpers.training_config(tiny_model_dir, run_dir, lora=True, step_scheduler__max_steps=6,
                                  optimizer__lr=1e-2, peft__dropout=0.1)
    val = helpers.prepared(helpers.chat_rows(tokenizer, 6, offset=100), "val.jsonl")
    result = train(cfg, run_dir, helpers.prepared(helpers.chat_rows(tokenizer, 24)), val, tokenizer=tokenizer)
    return result, val


def test_full_sft_loss_decreases_and_metrics_have_every_field(full_run):
    result, _ = full_run
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(set(r) == METRIC_FIELDS for r in rows)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < sum(r["loss"] for r in rows[:3]) / 3 - 0.5
    assert rows[5]["epoch"] == 1.0  # 24 rows / 4 per step: 6 steps per epoch
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)


def test_validation_runs_every_n_steps_and_at_the_end(full_run):
    result, _ = full_run
    val_rows = [json.loads(line) for line in (result.run_dir / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val_rows] == [5, 10, 12]
    assert all(0.0 <= r["token_accuracy"] <= 1.0 and r["tokens"] > 0 for r in val_rows)
    assert val_rows[-1]["loss"] < val_rows[0]["loss"]
    assert (result.run_dir / "loss.png").stat().st_size > 1000


def test_full_sft_artifact_loads_with_plain_transformers_and_generates(full_run, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    result, val = full_run
    final = result.final_dir
    assert (final / "model.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    loaded_tokenizer = AutoTokenizer.from_pretrained(final)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    # The saved weights are the trained ones: same validation loss as the trainer measured.
    assert rows_eval_loss(model, val.rows, 0) == pytest.approx(result.val_loss, rel=1e-5)
    eos = GenerationConfig.from_pretrained(final).eos_token_id
    assert 2 in (eos if isinstance(eos, list) else [eos])
    prompt = loaded_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  add_generation_prompt=True, tokenize=False)
    ids = loaded_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_manifest_has_every_field(full_run, lora_run, tiny_model_dir):
    from chatft.artifacts import weights_fingerprint

    for result, kind in ((full_run[0], "full"), (lora_run[0], "lora")):
        manifest = json.loads((result.final_dir / "chatft_manifest.json").read_text())
        assert manifest["kind"] == kind
        base = manifest["base_model"]
        assert base["name_or_path"] == str(Path(tiny_model_dir).resolve())
        assert base["fingerprint"] == weights_fingerprint(tiny_model_dir) and len(base["fingerprint"]) == 64
        assert len(manifest["tokenizer"]["fingerprint"]) == 64 and len(manifest["tokenizer"]["chat_template_sha256"]) == 64
        train_report = manifest["data"]["train"]
        assert {"path", "sha256", "rows_in", "rows_used", "dropped_by_reason"} <= set(train_report)
        assert train_report["rows_used"] == 24 and train_report["dropped_by_reason"] == {"too_long": 1}
        assert manifest["data"]["validation"]["path"] == "val.jsonl"
        assert manifest["config"]["model"]["pretrained_model_name_or_path"] == str(tiny_model_dir)
        assert manifest["metrics"]["train_loss"] == pytest.approx(result.train_loss)
        assert manifest["metrics"]["val_loss"] == pytest.approx(result.val_loss)
        assert {"chatft", "torch", "transformers", "peft"} <= set(manifest["versions"])
        assert manifest["validations"] == []
        assert ("lora" in manifest) == (kind == "lora")
    lora = json.loads((lora_run[0].final_dir / "chatft_manifest.json").read_text())["lora"]
    assert lora == {"r": 4, "alpha": 8, "dropout": 0.1,
                    "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}


def test_lora_artifact_loads_with_peft(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, val = lora_run
    final = result.final_dir
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert "lm_head" not in config["target_modules"]
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    base_loss = rows_eval_loss(base, val.rows, 0)
    model = PeftModel.from_pretrained(base, final).eval()
    assert rows_eval_loss(model, val.rows, 0) == pytest.approx(result.val_loss, rel=1e-5)
    assert result.val_loss < base_loss  # the adapter learned something
    assert AutoTokenizer.from_pretrained(final).chat_template is not None


def test_loss_is_normalised_over_the_whole_step_not_per_micro_batch(tiny_model_dir, tokenizer, tmp_path):
    # Rows of very different supervised lengths: a per-micro-batch mean would weigh them differently.
    rows = helpers.chat_rows(tokenizer, 8)
    assert len({r.num_supervised for r in rows}) > 3
    outcomes = []
    for local in (8, 2, 1):
        run_dir = tmp_path / f"local{local}"
        cfg = helpers.training_config(tiny_model_dir, run_dir, step_scheduler__global_batch_size=8,
                                      step_scheduler__local_batch_size=local, step_scheduler__max_steps=2,
                                      dataloader__shuffle=False)
        train(cfg, run_dir, helpers.prepared(rows), tokenizer=tokenizer)
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        outcomes.append((losses, load_file(str(run_dir / "final" / "model.safetensors"))))
    reference_losses, reference_weights = outcomes[0]
    for losses, weights in outcomes[1:]:
        assert losses == pytest.approx(reference_losses, abs=1e-6)
        for name, tensor in reference_weights.items():
            # Adam divides by the root of the squared gradient, so rounding in near-zero gradients (the
            # packed rows differ in shape per split) shows up a little larger in the weights than in the loss.
            torch.testing.assert_close(weights[name], tensor, atol=5e-5, rtol=1e-4)


def test_stops_at_num_epochs_or_max_steps_whichever_first(tiny_model_dir, tokenizer, tmp_path):
    data = helpers.prepared(helpers.chat_rows(tokenizer, 10))
    epochs = helpers.training_config(tiny_model_dir, tmp_path / "a", step_scheduler__max_steps=None,
                                     step_scheduler__num_epochs=2)
    assert train(epochs, tmp_path / "a", data, tokenizer=tokenizer).steps == 6  # 3 steps (4+4+2 rows) per epoch
    capped = helpers.training_config(tiny_model_dir, tmp_path / "b", step_scheduler__max_steps=4,
                                     step_scheduler__num_epochs=5)
    assert train(capped, tmp_path / "b", data, tokenizer=tokenizer).steps == 4


def test_lora_targets_exclude_the_output_head_unless_named(tiny_model_dir, tmp_path):
    cfg = helpers.training_config(tiny_model_dir, tmp_path, lora=True)
    model = load_model(cfg.model, torch.device("cpu"), torch.float32)
    every = resolve_lora_targets(model, cfg.peft)
    assert "lm_head" not in every and len(every) == 14
    assert peft_target_modules(model, every) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    def targets(**peft):
        return resolve_lora_targets(model, helpers.training_config(tiny_model_dir, tmp_path, lora=True,
                                                                   **{f"peft__{k}": v for k, v in peft.items()}).peft)

    assert targets(match_all_linear=False, target_modules=["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert targets(match_all_linear=False, target_modules=["lm_head"]) == ["lm_head"]
    layer0 = targets(match_all_linear=False, target_modules=[r"model\.layers\.0\..*_proj"])
    assert len(layer0) == 7
    assert peft_target_modules(model, layer0).startswith("^(?:")  # not expressible as short names
    assert "model.layers.0.mlp.up_proj" not in targets(exclude_modules=["*.mlp.up_proj"])
    with pytest.raises(ChatftError) as err:
        targets(match_all_linear=False, target_modules=["qkv_proj"])
    assert err.value.id == "config_invalid" and "q_proj" in err.value.hint


def test_models_load_without_kernels_from_the_hub(tiny_model_dir, tmp_path, monkeypatch):
    """transformers 5.x swaps layers for kernels downloaded from the Hub, at load and again at `model.train()` on a
    GPU: unrecorded code, and on an offline GPU machine a traceback at the first step. chatft loads with them off
    and leaves the environment as it found it; a user who sets USE_HUB_KERNELS keeps their choice."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    cfg = helpers.training_config(tiny_model_dir, tmp_path)
    model = load_model(cfg.model, torch.device("cpu"), torch.float32)
    assert getattr(model, "use_kernels", False) is False
    assert "USE_HUB_KERNELS" not in os.environ
    if not hasattr(model, "set_use_kernels"):
        return  # a transformers without Hub kernels: nothing more to check
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    assert load_model(cfg.model, torch.device("cpu"), torch.float32).use_kernels is True


def test_lora_weights_stay_float32_on_a_bfloat16_base(tiny_model_dir, tmp_path):
    cfg = helpers.training_config(tiny_model_dir, tmp_path, lora=True, model__torch_dtype="bfloat16")
    model = apply_lora(load_model(cfg.model, torch.device("cpu"), torch.bfloat16), cfg.peft, cfg.seed)
    counts = count_parameters(model)
    assert (counts.base_dtype, counts.trainable_dtype) == ("bfloat16", "float32")
    assert counts.trainable == 8192 and "base bfloat16, trainable float32" in counts.line()


def test_bfloat16_lora_trains_on_cpu(tiny_model_dir, tokenizer, tmp_path):
    cfg = helpers.training_config(tiny_model_dir, tmp_path, lora=True, model__torch_dtype="bfloat16",
                                  step_scheduler__max_steps=2)
    result = train(cfg, tmp_path, helpers.prepared(helpers.chat_rows(tokenizer, 8)), tokenizer=tokenizer)
    assert result.final_dir is not None and result.train_loss is not None


def test_weight_decay_skips_norms_and_biases(tiny_model_dir, tokenizer, tmp_path):
    cfg = helpers.training_config(tiny_model_dir, tmp_path)
    trainer = Trainer(cfg, tmp_path, tokenizer, helpers.prepared(helpers.chat_rows(tokenizer, 4)))
    trainer.setup()
    decay, no_decay = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert not any("norm" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(trainer.model.parameters()))


@pytest.mark.parametrize("override, words", [
    ({"packed_sequence__split_across_pack": True}, "splitting a conversation"),
])
def test_refuses_what_is_not_available_yet(tiny_model_dir, tmp_path, override, words):
    with pytest.raises(ChatftError) as err:
        check_supported(helpers.training_config(tiny_model_dir, tmp_path, **override))
    assert err.value.id == "not_available_yet" and words in err.value.message


def test_seed_makes_cpu_runs_identical(tiny_model_dir, tokenizer, tmp_path):
    data = helpers.prepared(helpers.chat_rows(tokenizer, 8))
    losses = []
    for name in ("a", "b"):
        cfg = helpers.training_config(tiny_model_dir, tmp_path / name, lora=True, peft__dropout=0.2,
                                      step_scheduler__max_steps=3)
        train(cfg, tmp_path / name, data, tokenizer=tokenizer)
        losses.append([json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert losses[0] == losses[1]


def test_bfloat16_lora_follows_the_float32_loss_curve(tiny_model_dir, tokenizer, tmp_path):
    # bfloat16 LoRA: frozen base stored in bfloat16, float32 adapters computed under autocast.
    data = helpers.prepared(helpers.chat_rows(tokenizer, 16))
    curves, adapters = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = helpers.training_config(tiny_model_dir, tmp_path / dtype, lora=True, model__torch_dtype=dtype,
                                      step_scheduler__max_steps=6, dataloader__shuffle=False,
                                      validation_dataset={"path_or_dataset_id": "val.jsonl"})
        result = train(cfg, tmp_path / dtype, data, data, tokenizer=tokenizer)
        curves[dtype] = [json.loads(line)["loss"] for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        adapters[dtype] = load_file(str(result.final_dir / "adapter_model.safetensors"))
        assert result.val_loss is not None
    assert curves["float32"][-1] < curves["float32"][0] and curves["bfloat16"][-1] < curves["bfloat16"][0]
    assert curves["bfloat16"] == pytest.approx(curves["float32"], rel=3e-2)
    assert all(t.dtype == torch.float32 for t in adapters["bfloat16"].values())  # adapters stay float32


def test_compiled_layers_train_like_eager(tiny_model_dir, tokenizer, tmp_path):
    from torch._dynamo.utils import counters

    data = helpers.prepared(helpers.chat_rows(tokenizer, 8))
    outcome = {}
    counters.clear()
    for name, overrides in {"eager": {}, "compiled": {"compile__enabled": True}}.items():
        cfg = helpers.training_config(tiny_model_dir, tmp_path / name, step_scheduler__max_steps=3,
                                      dataloader__shuffle=False, **overrides)
        result = train(cfg, tmp_path / name, data, tokenizer=tokenizer)
        weights = load_file(str(result.final_dir / "model.safetensors"))
        outcome[name] = ([json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()],
                         weights)
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = outcome["eager"], outcome["compiled"]
    assert counters["stats"]["unique_graphs"] > 0  # graphs were really compiled
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert set(compiled_weights) == set(eager_weights)  # same parameter names: nothing wrapped
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_trains_like_keeping_activations(tiny_model_dir, tokenizer, tmp_path, lora):
    """Recomputing each layer in the backward, whole or its cheap ops only (the memory knobs), changes nothing but
    memory: same losses, gradient norms and weights, with padding-free rows and the chunked loss head. The default
    (auto) is selective for full SFT on CPU and off for LoRA."""
    data = helpers.prepared(helpers.chat_rows(tokenizer, 8))
    outcome = {}
    for name, checkpointing in (("kept", False), ("full", True), ("selective", "selective"), ("default", None)):
        overrides = {} if checkpointing is None else {"distributed__activation_checkpointing": checkpointing}
        cfg = helpers.training_config(tiny_model_dir, tmp_path / name, lora=lora, step_scheduler__max_steps=3,
                                      dataloader__shuffle=False, **overrides)
        result = train(cfg, tmp_path / name, data, tokenizer=tokenizer)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(str(result.final_dir / ("adapter_model.safetensors" if lora else "model.safetensors")))
        metrics = json.loads((result.final_dir / "chatft_manifest.json").read_text())["metrics"]
        outcome[name] = (rows, weights, metrics)
    kept_rows, kept_weights, kept_metrics = outcome["kept"]
    assert kept_metrics["activation_checkpointing"] == "off"
    assert outcome["default"][2]["activation_checkpointing"] == ("off" if lora else "selective")
    for mode in ("full", "selective"):
        rows, weights, metrics = outcome[mode]
        assert metrics["activation_checkpointing"] == mode
        assert metrics["loss_head"] == kept_metrics["loss_head"] == "chunked" and metrics["padding_free"]
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in kept_rows], rel=1e-5)
        assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in kept_rows], rel=1e-4)
        assert weights.keys() == kept_weights.keys()
        for name, tensor in kept_weights.items():
            torch.testing.assert_close(weights[name], tensor, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_deferred_reads_log_the_same_rows_one_step_later(tiny_model_dir, tokenizer, tmp_path, monkeypatch, dtype):
    """Where a step is queued rather than done when it returns (CUDA), its loss and gradient norm are read after
    the next step is queued. Forced on CPU here: every row, validation and checkpoint is what immediate reads
    give, rows are written one step late except where validation, a checkpoint or the end needs them. In float16
    (LoRA, loss scaling from a scale that overflows at first, so it changes from step to step) each row keeps
    its own step's loss scale."""
    import functools

    from chatft.train import loop

    if dtype == "float16":
        monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**30))

    data = helpers.prepared(helpers.chat_rows(tokenizer, 16))
    logged_while_at = {}
    original_log = Trainer._log_step

    def log_step(self, step, *args):
        logged_while_at[step.known["step"]] = self.step  # the trainer's step when this row was read
        return original_log(self, step, *args)

    outcome = {}
    for name, devices in (("immediate", ()), ("deferred", ("cpu",))):
        monkeypatch.setattr(loop, "DEFERRED_READ_DEVICES", devices)
        monkeypatch.setattr(Trainer, "_log_step", log_step)
        logged_while_at.clear()
        cfg = helpers.training_config(tiny_model_dir, tmp_path / name, lora=dtype == "float16",
                                      model__torch_dtype=dtype, step_scheduler__max_steps=9,
                                      step_scheduler__val_every_steps=4, step_scheduler__ckpt_every_steps=6,
                                      validation_dataset={"path_or_dataset_id": "val.jsonl"})
        result = train(cfg, tmp_path / name, data, data, tokenizer=tokenizer)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        state = json.loads((tmp_path / name / "checkpoints" / "step_6" / "trainer_state.json").read_text())
        outcome[name] = (rows, (tmp_path / name / "validation.jsonl").read_text(), state["train_loss"],
                         result.train_loss, dict(logged_while_at))
    (rows, val, ckpt_loss, final_loss, at), (d_rows, d_val, d_ckpt_loss, d_final_loss, d_at) = outcome.values()
    timing = {"tokens_per_s", "peak_mem_mb", "elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in d_rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert all(r["tokens_per_s"] > 0 for r in d_rows)
    if dtype == "float16":
        assert len({r["loss_scale"] for r in rows}) > 1 and any(r["skipped"] for r in rows)
    assert (d_val, d_ckpt_loss, d_final_loss) == (val, ckpt_loss, final_loss)
    assert at == {s: s for s in range(1, 10)}
    # read late except at validation (4, 8), the checkpoint (6) and the end (9)
    assert d_at == {s: s if s in (4, 6, 8, 9) else s + 1 for s in range(1, 10)}


def test_a_step_read_late_is_timed_as_it_ran(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """A deferred read waits for the next step too; the row's seconds and elapsed_s must still be the step's own
    (the bench times from them). Here collating each step's micro-batches takes 0.2 s on the host: every step
    includes its own 0.2 s, and no row is stamped with the time its successor finished."""
    from chatft.train import loop

    monkeypatch.setattr(loop, "DEFERRED_READ_DEVICES", ("cpu",))
    original = Trainer._next_micro_batches

    def slow_collation(self):
        time.sleep(0.2)
        return original(self)

    monkeypatch.setattr(Trainer, "_next_micro_batches", slow_collation)
    cfg = helpers.training_config(tiny_model_dir, tmp_path, step_scheduler__max_steps=5)
    train(cfg, tmp_path, helpers.prepared(helpers.chat_rows(tokenizer, 10)), tokenizer=tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in rows]
    assert all(0.2 <= s < 5 for s in seconds), seconds  # read late, the last one would be near 0
    ends = [r["elapsed_s"] for r in rows]
    assert ends[0] >= seconds[0] - 0.002
    for before, after, own in zip(ends, ends[1:], seconds[1:]):
        assert after - before >= own - 0.002, ends  # stamped at its successor's end, these would be equal
