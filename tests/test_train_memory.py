"""The memory estimate and `error[oom]` (predicted and caught)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path

from chatft.errors import ChatftError
from chatft.train import checkpoints, memory
from chatft.train.loop import Trainer
from chatft.train.step import train

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")


@pytest.fixture(scope="module")
def data(tokenizer):
    return helpers.prepared(helpers.chat_rows(tokenizer, 8))


def test_under_fsdp2_each_process_is_estimated_for_its_shards_and_what_it_gathers(tiny_model_dir, tmp_path):
    """The per-process estimate that `preview`, `error[oom]` and `chatft plan` share: full SFT on 2 processes
    shards (auto), LoRA replicates; float32 master weights are gathered in bfloat16, so autocast makes no copies."""
    cuda = torch.device("cuda")  # an estimate only: nothing touches CUDA
    base = dict(step_scheduler__local_batch_size=2, model__torch_dtype="bfloat16")
    one = helpers.training_config(tiny_model_dir, tmp_path, **base)
    skeleton = memory.meta_model(one)
    single = memory.estimate_memory(one, skeleton, cuda)
    sharded = memory.estimate_memory(one, skeleton, cuda, world_size=2)
    assert (single.strategy, single.world_size, single.gathered) == ("single", 1, 0)
    assert sharded.strategy == "fsdp2" and sharded.world_size == 2
    assert sharded.weights == single.weights // 2 and sharded.optimizer == single.optimizer // 2
    assert single.compute_copies > 0 and sharded.compute_copies == 0
    params = sum(p.numel() for p in skeleton.parameters())
    root = 2 * skeleton.get_input_embeddings().weight.numel()  # embeddings and the untied head, whole all step
    layer = (params - root) / skeleton.config.num_hidden_layers
    assert sharded.gathered == int((root + 2 * layer) * 2 + layer * 4)  # bfloat16 gathers, a float32 gradient
    assert sharded.activations == single.activations and sharded.training < single.training
    assert "per process: fsdp2 over 2 processes" in sharded.lines()[0] and "gathered layers" in sharded.lines()[0]
    lora = helpers.training_config(tiny_model_dir, tmp_path, lora=True, **base)
    assert memory.estimate_memory(lora, skeleton, cuda, world_size=2).strategy == "ddp"
    planned = helpers.training_config(tiny_model_dir, tmp_path, run__env__nprocs_per_node=2,
                                      step_scheduler__global_batch_size=4, **base)
    assert memory.estimate_memory(planned, skeleton, cuda).training == sharded.training  # the config's world


def test_estimate_needs_no_weights_and_tells_lora_from_full(tiny_model_dir, tmp_path):
    full_cfg = helpers.training_config(tiny_model_dir, tmp_path, step_scheduler__local_batch_size=2)
    lora_cfg = helpers.training_config(tiny_model_dir, tmp_path, lora=True, step_scheduler__local_batch_size=2)
    skeleton = memory.meta_model(full_cfg)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    cpu = torch.device("cpu")
    full = memory.estimate_memory(full_cfg, skeleton, cpu)
    lora = memory.estimate_memory(lora_cfg, skeleton, cpu)
    params = sum(p.numel() for p in skeleton.parameters())
    assert full.weights == params * 4 and full.gradients == params * 4 and full.optimizer == params * 8
    assert lora.gradients == 8192 * 4 and lora.optimizer == 8192 * 8  # r=4 on 14 layers, float32 adapters
    assert lora.weights == params * 4 + 8192 * 4
    longer = helpers.training_config(tiny_model_dir, tmp_path, dataset__seq_length=512, step_scheduler__local_batch_size=2)
    cuda = torch.device("cuda")  # no attention scores kept there: activations are linear in the tokens
    assert memory.estimate_memory(longer, skeleton, cuda).activations == 2 * memory.estimate_memory(
        full_cfg, skeleton, cuda).activations
    # Padding-free rows run mask-free causal SDPA per conversation: linear in the tokens on CPU too.
    assert memory.estimate_memory(longer, skeleton, cpu).activations == 2 * full.activations
    padded, longer_padded = (helpers.training_config(tiny_model_dir, tmp_path, dataset__seq_length=n,
                                                     step_scheduler__local_batch_size=2,
                                                     packed_sequence__padding_free=False) for n in (256, 512))
    assert memory.estimate_memory(longer_padded, skeleton, cpu).activations > 2 * memory.estimate_memory(
        padded, skeleton, cpu).activations  # CPU SDPA with a padding mask: S^2 too
    pack = helpers.training_config(tiny_model_dir, tmp_path, packed_sequence__packed_sequence_size=1024,
                                   step_scheduler__local_batch_size=2)
    assert memory.estimate_memory(pack, skeleton, cuda).activations == 2 * memory.estimate_memory(
        full_cfg, skeleton, cuda).activations  # a 1024-token pack against 2 rows of 256
    assert "full SFT" in full.lines()[0] and "LoRA" in lora.lines()[0]
    bf16 = helpers.training_config(tiny_model_dir, tmp_path, model__torch_dtype="bfloat16",
                                   step_scheduler__local_batch_size=2)
    # bfloat16 full SFT: float32 master weights, gradients and moments, plus the bfloat16 copies autocast computes
    # with; stochastic rounding keeps bfloat16 weights and gradients with float32 moments; `none` is all bfloat16
    master = memory.estimate_memory(bf16, skeleton, cpu)
    assert (master.weights, master.gradients, master.optimizer) == (params * 4, params * 4, params * 8)
    assert master.compute_copies == params * 2 and "autocast copies" in master.lines()[0]
    rounded = memory.estimate_memory(bf16.model_copy(update={"optimizer": bf16.optimizer.model_copy(
        update={"master_weights": "stochastic_rounding"})}), skeleton, cpu)
    assert (rounded.weights, rounded.gradients, rounded.optimizer) == (params * 2, params * 2, params * 8)
    pure = memory.estimate_memory(bf16.model_copy(update={"optimizer": bf16.optimizer.model_copy(
        update={"master_weights": "none"})}), skeleton, cpu)
    assert (pure.weights, pure.gradients, pure.optimizer) == (params * 2, params * 2, params * 4)
    # float16 full SFT: float32 master weights, gradients and moments, plus the float16 copies autocast computes
    # with; under autocast the residual stream stays float32 and matmul outputs are float16: between the two
    fp16 = memory.estimate_memory(helpers.training_config(tiny_model_dir, tmp_path, model__torch_dtype="float16",
                                                          step_scheduler__local_batch_size=2), skeleton, cpu)
    assert (fp16.weights, fp16.compute_copies, fp16.gradients, fp16.optimizer) == (
        params * 4, params * 2, params * 4, params * 8)
    assert pure.activations < fp16.activations < full.activations
    assert master.activations == fp16.activations


def test_the_logits_term_follows_the_loss_head(tiny_model_dir, tmp_path, monkeypatch):
    """The chunked head holds one chunk of float32 logits at most; a model whose logits change after the head
    (here: its repo's own code may do anything) keeps logits, a float32 copy and a gradient per position."""
    from chatft.train import chunked_head

    def config(**overrides):
        return helpers.training_config(tiny_model_dir, tmp_path, dataset__seq_length=1024,
                                       step_scheduler__local_batch_size=8, step_scheduler__global_batch_size=8,
                                       **overrides)

    skeleton = memory.meta_model(config())
    vocab, tokens = skeleton.config.vocab_size, 8 * 1024
    monkeypatch.setattr(chunked_head, "CHUNK_ELEMENTS", 512 * vocab)  # 512 positions a chunk: the bound bites
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory.estimate_memory(config(), skeleton, cpu).logits == 512 * vocab * 4
    # bfloat16: beside the float32 chunk, the matmul's output, then (once that is freed) the gradient cast back
    assert memory.estimate_memory(config(model__torch_dtype="bfloat16"), skeleton, cuda).logits == 512 * vocab * 6
    # float16 full SFT: the same, with autocast making the float16 gradient for the next matmul
    assert memory.estimate_memory(config(model__torch_dtype="float16"), skeleton, cuda).logits == 512 * vocab * 6
    assert memory.estimate_memory(config(model__trust_remote_code=True), skeleton, cpu).logits == tokens * vocab * 12
    skeleton.config.final_logit_softcapping = 30.0  # Gemma-style soft-capping after the head
    assert memory.estimate_memory(config(), skeleton, cpu).logits == tokens * vocab * 12


def _peak_bytes_per_logit_of_the_chunked_head(weight_dtype: torch.dtype, autocast: torch.dtype | None) -> float:
    """The most bytes of (positions x vocab) tensors alive at once while one chunk of
    `ChunkedHead.cross_entropy` runs, per logit: op outputs in new storage (not in place, not a view of an input),
    counted from the op that makes them until the tensor is freed."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from chatft.train import chunked_head

    positions, vocab, hidden = 64, 1000, 32
    live = {"now": 0, "peak": 0}

    def freed(nbytes: int) -> None:
        live["now"] -= nbytes

    class LiveLogits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if (isinstance(tensor, torch.Tensor) and tensor.numel() == positions * vocab
                        and tensor.untyped_storage().data_ptr() not in inputs):
                    nbytes = tensor.untyped_storage().nbytes()
                    live["now"] += nbytes
                    live["peak"] = max(live["peak"], live["now"])
                    weakref.finalize(tensor, freed, nbytes)
            return out

    head = torch.nn.Linear(hidden, vocab, bias=False).to(weight_dtype)
    states = torch.randn(positions, hidden, dtype=weight_dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (positions,))
    enabled = autocast is not None
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=enabled), LiveLogits():
        chunked_head.ChunkedHead(decoder=None, head=head).cross_entropy(states, labels)
    return live["peak"] / (positions * vocab)


@pytest.mark.parametrize("dtype, master, weights, autocast", [
    ("float32", "auto", torch.float32, None),
    ("bfloat16", "auto", torch.float32, torch.bfloat16),  # bfloat16 full SFT: float32 master weights, autocast
    ("bfloat16", "none", torch.bfloat16, None),  # pure bfloat16 (and LoRA's bfloat16 base): no autocast at the head
    ("float16", "auto", torch.float32, torch.float16),  # float16 full SFT: float32 master weights under autocast
])
def test_the_chunked_head_term_counts_what_the_head_allocates(dtype, master, weights, autocast, tiny_model_dir,
                                                              tmp_path, monkeypatch):
    from chatft.train import chunked_head

    cfg = helpers.training_config(tiny_model_dir, tmp_path, model__torch_dtype=dtype, dataset__seq_length=1024,
                                  step_scheduler__local_batch_size=8, step_scheduler__global_batch_size=8,
                                  optimizer__master_weights=master)
    skeleton = memory.meta_model(cfg)
    vocab = skeleton.config.vocab_size
    monkeypatch.setattr(chunked_head, "CHUNK_ELEMENTS", 512 * vocab)
    counted = memory.estimate_memory(cfg, skeleton, torch.device("cuda")).logits / (512 * vocab)
    assert counted == _peak_bytes_per_logit_of_the_chunked_head(weights, autocast)


def test_largest_micro_batch_from_the_config_or_the_data(tiny_model_dir, tmp_path):
    def shape(lengths=None, **overrides):
        cfg = helpers.training_config(tiny_model_dir, tmp_path, dataset__seq_length=256,
                                      step_scheduler__local_batch_size=2, **overrides)
        found = memory.largest_micro_batch(cfg, lengths)
        return found.tokens, found.rows, found.width, found.concatenated, found.from_data

    lengths = [10, 50, 30, 20]
    assert shape() == (512, 1, 512, True, False)  # the config's bound: 2 rows of seq_length
    assert shape(lengths) == (80, 1, 80, True, True)  # the two longest rows, whatever order they come in
    assert shape(packed_sequence__padding_free=False) == (512, 2, 256, False, False)
    assert shape(lengths, packed_sequence__padding_free=False) == (100, 2, 50, False, True)  # padded to the longest
    assert shape(packed_sequence__packed_sequence_size=300) == (300, 1, 300, True, False)
    assert shape(lengths, packed_sequence__packed_sequence_size=300) == (110, 1, 110, True, True)  # one step's rows
    lengths = [100, 120, 90, 80, 30]
    assert shape(lengths, packed_sequence__packed_sequence_size=300) == (300, 1, 300, True, True)  # a full pack
    lengths = [400, 20]  # a validation row may outgrow the budget: its micro-batch is that row alone
    assert shape(lengths, packed_sequence__packed_sequence_size=300) == (400, 1, 400, True, True)


def test_estimate_follows_the_data_rows(tiny_model_dir, tokenizer, tmp_path):
    """Short rows against a long seq_length: the activations are for the longest rows the data holds, the rest of
    the estimate does not change."""
    cfg = helpers.training_config(tiny_model_dir, tmp_path, dataset__seq_length=1024, step_scheduler__local_batch_size=4)
    skeleton, cpu = memory.meta_model(cfg), torch.device("cpu")
    bound = memory.estimate_memory(cfg, skeleton, cpu)
    train_rows = helpers.prepared(helpers.chat_rows(tokenizer, 5))
    val_rows = helpers.prepared(helpers.chat_rows(tokenizer, 2, offset=7))
    lengths = memory.row_lengths(train_rows, val_rows)
    assert lengths == memory.RowLengths([len(r) for r in train_rows.rows], [len(r) for r in val_rows.rows])
    lengths = [100, 60, 300, 40, 200]
    measured = memory.estimate_memory(cfg, skeleton, cpu, lengths=lengths)
    assert measured.activations * 4096 == bound.activations * (300 + 200 + 100 + 60)
    assert (measured.weights, measured.gradients, measured.optimizer) == (bound.weights, bound.gradients,
                                                                          bound.optimizer)
    assert measured.lines()[1].endswith("largest micro-batch: 660 tokens, padding-free (the data's longest rows)")
    assert bound.lines()[1].endswith("largest micro-batch: 4,096 tokens, padding-free (rows of seq_length)")
    static = bound.weights_and_optimizer()
    assert static.activations == static.logits == static.heap == 0
    assert static.training == bound.weights + bound.gradients + bound.optimizer
    # CPU: the heap's holes beside the live activations and logits; CUDA has its slack in check_fits instead
    assert measured.heap == int(memory.CPU_HEAP_SLACK * (measured.activations + measured.logits))
    assert memory.estimate_memory(cfg, skeleton, torch.device("cuda")).heap == 0
    assert "+ heap " in measured.lines()[0]


def test_the_estimate_plans_the_micro_batches_the_run_forms(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """Given the rows, the estimate finds the largest micro-batch of the run's own order (shuffled from the seed,
    `max_steps` long, validation included), which is the largest one the trainer then forms."""
    from chatft.train import batching

    rows = helpers.chat_rows(tokenizer, 24)
    lengths = [len(r) for r in rows]
    formed: list[int] = []
    real = batching.micro_batches

    def spy(group_rows, *args, **kwargs):
        batches = real(group_rows, *args, **kwargs)
        formed.extend(int(b["input_ids"].numel()) for b in batches)
        return batches

    monkeypatch.setattr(batching, "micro_batches", spy)
    for overrides in ({}, {"packed_sequence__packed_sequence_size": 300},
                      {"packed_sequence__padding_free": False, "dataloader__shuffle": False}):
        formed.clear()
        cfg = helpers.training_config(tiny_model_dir, tmp_path / str(len(overrides)) / "run",
                                      step_scheduler__max_steps=3, **overrides)
        planned = memory.largest_micro_batch(cfg, memory.RowLengths(lengths, lengths[:3]))
        train(cfg, tmp_path / str(len(overrides)) / "run", helpers.prepared(rows), helpers.prepared(rows[:3]),
              tokenizer=tokenizer)
        assert planned.planned and planned.tokens == max(formed), overrides
        assert planned.tokens <= memory.largest_micro_batch(cfg, lengths).tokens  # never above the worst case
    assert "the largest this run forms" in planned.describe()


def test_predicted_oom_stops_with_the_advice_ladder(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 1024 * 1024)
    with pytest.raises(ChatftError) as full:
        train(helpers.training_config(tiny_model_dir, tmp_path), tmp_path, data, tokenizer=tokenizer)
    assert full.value.id == "oom" and "predicted" in full.value.message
    hint = full.value.hint
    assert hint.index("peft=lora") < hint.index("dataset.seq_length") < hint.index("smaller model")
    assert "step_scheduler.local_batch_size" in hint and "global_batch_size" in hint and "force=true" in hint
    with pytest.raises(ChatftError) as lora:
        train(helpers.training_config(tiny_model_dir, tmp_path, lora=True), tmp_path, data, tokenizer=tokenizer)
    assert lora.value.hint.index("peft.dim") < lora.value.hint.index("dataset.seq_length")
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing trained

    forced = helpers.training_config(tiny_model_dir, tmp_path, force=True, step_scheduler__max_steps=1)
    assert train(forced, tmp_path, data, tokenizer=tokenizer).steps == 1


def test_out_of_memory_during_training_is_caught_with_the_step(tiny_model_dir, tokenizer, data, tmp_path, monkeypatch):
    original = Trainer._loss_sum

    def out_of_memory_at_step_3(self, batch):
        if self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_loss_sum", out_of_memory_at_step_3)
    cfg = helpers.training_config(tiny_model_dir, tmp_path, step_scheduler__ckpt_every_steps=2)
    with pytest.raises(ChatftError) as err:
        train(cfg, tmp_path, data, tokenizer=tokenizer)
    assert err.value.id == "oom" and "step 3 of 4" in err.value.message and "step_2" in err.value.message
    assert err.value.hint.startswith("in order: (1) train a LoRA adapter")
    latest = checkpoints.latest_checkpoint(tmp_path)
    assert latest.name == "step_2" and json.loads((latest / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(Trainer, "_loss_sum", original)
    assert train(cfg, tmp_path, data, tokenizer=tokenizer).steps == 4  # resumes from the intact checkpoint


def test_estimate_and_measured_peak_are_recorded(tiny_model_dir, tokenizer, data, tmp_path, capsys):
    result = train(helpers.training_config(tiny_model_dir, tmp_path, step_scheduler__max_steps=1), tmp_path, data,
                   tokenizer=tokenizer)
    out = capsys.readouterr().out
    assert "memory estimate (full SFT, cpu): " in out and "the largest this run forms" in out
    assert "peak memory" in out and "(estimate" in out
    metrics = json.loads((result.final_dir / "chatft_manifest.json").read_text())["metrics"]
    assert metrics["memory_estimate_mb"] > 0 and metrics["peak_mem_mb"] > 0
    # one estimate: the start-up line, the end line and the manifest give the same number, and nothing else
    # prints a second figure for it
    estimate_line = next(line for line in out.splitlines() if line.startswith("memory estimate"))
    figure = estimate_line.split(": ", 1)[1].split(" = ")[0]
    assert f"(estimate {figure})" in out
    assert abs(float(figure.removesuffix(" MB").replace(",", "")) - metrics["memory_estimate_mb"]) <= 0.6
    assert "needed" not in out and "the estimate fits" in out


def test_free_memory_reads_the_machine():
    free = memory.free_memory(torch.device("cpu"))
    assert free is None or free > 0


def test_the_plan_of_several_processes_covers_every_share_once(tiny_model_dir, tmp_path):
    """With two processes the estimate walks both shares of every step: each row once, in micro-batches no larger
    than a process forms."""
    lengths = [40 + (i * 37) % 200 for i in range(19)]
    settings = {"step_scheduler__global_batch_size": 8, "step_scheduler__local_batch_size": 2,
                "step_scheduler__max_steps": None, "step_scheduler__num_epochs": 1,
                "packed_sequence__padding_free": False}
    two = helpers.training_config(tiny_model_dir, tmp_path, distributed__dp_size=2, **settings)
    planned = memory.planned_micro_batches(two, memory.RowLengths(lengths, lengths[:5]))
    assert sorted(n for group in planned for n in group) == sorted(lengths + lengths[:5])
    assert max(len(group) for group in planned) <= 2


def test_the_peak_is_this_programs_own_not_the_process_it_was_started_from():
    """Python starts a subprocess by vfork + exec, and `ru_maxrss` keeps the peak from before the exec: a chatft
    started from a process holding 600 MB read 600 MB as its own peak. `peak_rss` reads the program's own."""
    held = bytearray(600 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: resident, not just reserved
    child = subprocess.run([sys.executable, "-c", "from chatft.train.memory import peak_rss; print(peak_rss())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) < 300 * 2**20, int(child.stdout) / 2**20
    assert memory.peak_rss() >= len(held)
