"""CUDA-only checks of what CPU tests cannot reach: padding-free loss equality and conversation isolation on
GPU kernels (float32 and bfloat16), flash-attention varlen, no host-device sync in `loss_sum` nor in a whole
optimizer step, real CLI training runs on the GPU, and a real CUDA out-of-memory. Skipped without a GPU (CI);
`bench/device/session.sh tests` runs them on a lent GPU machine. All on the tiny random models of
`tests/fixtures/tiny_models.py`; about a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import CHATFT, run_chatft
from conftest import REPO_ROOT, load_module_from_path
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chatft.errors import ChatftError
from chatft.train import attention, batching, losses, padding_free
from chatft.train.loop import Trainer
from chatft.train.step import train
from chatft.train.model import apply_lora, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bench/device/session.sh tests runs these on one)")

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")

DEVICE = torch.device("cuda")
FLASH = "flash_attention_2"
LEAKY = "chatft_test_cuda_leaky_attention"


@pytest.fixture(scope="module")
def rows(tokenizer):
    rows = helpers.chat_rows(tokenizer, 6)
    assert len({len(r) for r in rows}) > 2  # different lengths, so the padded layout really pads
    return rows


def tiny_model(model_dir: Path, attn: str, dtype: torch.dtype, *, lora: bool = False) -> torch.nn.Module:
    """The tiny model on DEVICE with `attn`, set up the way the trainer sets it up (LoRA first, then the
    attention; float32 adapters under autocast on a bfloat16 base)."""
    cfg = helpers.training_config(model_dir, Path("unused"), lora=lora,
                                  model__attn_implementation=FLASH if attn == FLASH else "sdpa")
    model = load_model(cfg.model, DEVICE, dtype)
    if lora:
        model = apply_lora(model, cfg.peft, cfg.seed)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = dtype == torch.float32
    if attn == attention.SEGMENT_SDPA:
        attention.use_segment_sdpa(model)
    elif attn != FLASH:
        model.set_attn_implementation(attn)
    return model


def precision(dtype: torch.dtype, lora: bool):
    return torch.autocast(DEVICE.type, dtype=dtype) if lora and dtype != torch.float32 else contextlib.nullcontext()


def loss_head(model: torch.nn.Module, tokenizer, path: str, dtype: torch.dtype = torch.float32, lora: bool = False):
    """The loss path the trainer takes: the chunked head where it reproduces the model's logits (always for the
    tiny Llama), else the model's own logits at the supervised positions. Probed as the trainer probes it."""
    if path == "logits":
        return None
    with precision(dtype, lora):
        head = losses.head_for(model, vocab(model, tokenizer), DEVICE)
    assert head is not None, "the tiny Llama's decoder + head should reproduce its logits"
    return head


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], head=None) -> tuple[torch.Tensor, int, list]:
    model.zero_grad(set_to_none=True)
    loss, correct = losses.loss_sum(model, batch, DEVICE, head)
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
    return loss.detach().float().cpu(), int(correct), grads


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def vocab(model: torch.nn.Module, tokenizer) -> int:
    return min(len(tokenizer), model.config.get_text_config().vocab_size)


# --------------------------------------------------------------------------- padding-free = padded


@pytest.fixture(scope="module")
def cpu_padded_loss(tiny_model_dir, rows) -> torch.Tensor:
    """The float32 loss of the padded batch on CPU: what the GPU must reproduce."""
    cfg = helpers.training_config(tiny_model_dir, Path("unused"))
    model = load_model(cfg.model, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        loss, _ = losses.loss_sum(model, batching.collate(rows, pad_id=0))
    return loss


@pytest.mark.parametrize("path", ["chunked", "logits"])
@pytest.mark.parametrize("attn", [attention.SEGMENT_SDPA, "sdpa", "eager"])
def test_padding_free_loss_and_gradients_equal_padded_float32(tiny_model_dir, tokenizer, rows, cpu_padded_loss,
                                                              attn, path):
    model = tiny_model(tiny_model_dir, attn, torch.float32)
    head = loss_head(model, tokenizer, path)
    padded_loss, padded_correct, padded_grads = loss_and_grads(model, batching.collate(rows, pad_id=0), head)
    packed_loss, packed_correct, packed_grads = loss_and_grads(model, batching.collate_packed(rows), head)
    tf32 = f"(TF32 matmuls: {torch.backends.cuda.matmul.allow_tf32})" if DEVICE.type == "cuda" else ""
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4, msg=lambda m: f"{m} {tf32}")
    torch.testing.assert_close(packed_loss, cpu_padded_loss, rtol=1e-5, atol=1e-4, msg=lambda m: f"{m} {tf32}")
    assert abs(packed_correct - padded_correct) <= 1  # an argmax may flip on a near-tie, no more
    assert len(packed_grads) == len(padded_grads)
    for packed_grad, padded_grad in zip(packed_grads, padded_grads):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("path", ["chunked", "logits"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-autocast"])
@pytest.mark.parametrize("attn", [attention.SEGMENT_SDPA, "sdpa"])
def test_padding_free_loss_and_gradients_equal_padded_bfloat16(tiny_model_dir, tokenizer, rows, attn, lora, path):
    model = tiny_model(tiny_model_dir, attn, torch.bfloat16, lora=lora)
    head = loss_head(model, tokenizer, path, torch.bfloat16, lora)
    with precision(torch.bfloat16, lora):
        padded_loss, _, padded_grads = loss_and_grads(model, batching.collate(rows, pad_id=0), head)
        packed_loss, _, packed_grads = loss_and_grads(model, batching.collate_packed(rows), head)
    assert torch.isfinite(packed_loss)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=2e-2, atol=0)
    assert len(packed_grads) == len(padded_grads) > 0
    worst = max(relative_difference(a, b) for a, b in zip(packed_grads, padded_grads))
    assert worst <= 5e-2, f"a gradient differs by {worst:.3g} of its norm between padding-free and padded rows"


# --------------------------------------------------------------------------- conversations stay apart


def leaky_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal attention over the whole packed row, ignoring the conversations' boundaries."""
    kwargs.pop("is_causal", None)
    kwargs.pop(attention.SEGMENTS_KWARG, None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("attn", [attention.SEGMENT_SDPA, "sdpa", "eager"])
def test_boundary_probe_finds_no_leak(tiny_model_dir, tokenizer, attn, dtype):
    model = tiny_model(tiny_model_dir, attn, dtype)
    leak = padding_free.boundary_leak(model, vocab(model, tokenizer), DEVICE)
    assert leak <= padding_free.tolerance(dtype), f"{attn} {dtype}: packed logits differ by {leak:.3g}"


def test_boundary_probe_catches_a_leaking_model(tiny_model_dir, tokenizer):
    AttentionInterface.register(LEAKY, leaky_attention)
    AttentionMaskInterface.register(LEAKY, sdpa_mask)
    model = tiny_model(tiny_model_dir, LEAKY, torch.bfloat16)
    leak = padding_free.boundary_leak(model, vocab(model, tokenizer), DEVICE)
    assert leak > 10 * padding_free.tolerance(torch.bfloat16)


@pytest.mark.parametrize("attn", [attention.SEGMENT_SDPA, "sdpa"])
def test_editing_one_conversation_changes_no_other(tiny_model_dir, rows, attn):
    model = tiny_model(tiny_model_dir, attn, torch.float32).eval()
    first, rest = rows[0], rows[1:]
    edited = dataclasses.replace(first, input_ids=[(t + 17) % 1000 for t in first.input_ids])
    logits = []
    for batch in (batching.collate_packed(rows), batching.collate_packed([edited, *rest])):
        extra = ({attention.SEGMENTS_KWARG: attention.segment_bounds(batch["position_ids"])}
                 if attn == attention.SEGMENT_SDPA else {})
        with torch.no_grad():
            logits.append(model(input_ids=batch["input_ids"].to(DEVICE), position_ids=batch["position_ids"].to(DEVICE),
                                **extra).logits.float().cpu())
    head = slice(0, len(first))
    assert not torch.allclose(logits[0][:, head], logits[1][:, head])  # the edit is visible...
    later = slice(len(first), None)
    torch.testing.assert_close(logits[0][:, later], logits[1][:, later], rtol=0, atol=1e-5)  # ...only there


# --------------------------------------------------------------------------- flash attention (varlen)


def test_flash_attention_2_varlen_equals_padded(tiny_model_dir, tokenizer, rows):
    pytest.importorskip("flash_attn")
    model = tiny_model(tiny_model_dir, FLASH, torch.bfloat16)
    head = loss_head(model, tokenizer, "chunked")
    padded_loss, _, padded_grads = loss_and_grads(model, batching.collate(rows, pad_id=0), head)
    packed_loss, _, packed_grads = loss_and_grads(model, batching.collate_packed(rows), head)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=2e-2, atol=0)
    worst = max(relative_difference(a, b) for a, b in zip(packed_grads, padded_grads))
    assert worst <= 5e-2
    sdpa = tiny_model(tiny_model_dir, "sdpa", torch.bfloat16)
    sdpa_loss, _, _ = loss_and_grads(sdpa, batching.collate(rows, pad_id=0))
    torch.testing.assert_close(packed_loss, sdpa_loss, rtol=3e-2, atol=0)
    assert padding_free.boundary_leak(model, vocab(model, tokenizer), DEVICE) <= padding_free.tolerance(torch.bfloat16)


# --------------------------------------------------------------------------- no host-device sync


@pytest.mark.parametrize("path", ["chunked", "logits"])
@pytest.mark.parametrize(("dtype", "lora"), [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["full-float32", "lora-bfloat16-autocast"])
def test_loss_sum_makes_no_host_device_sync(tiny_model_dir, tokenizer, rows, dtype, lora, path):
    """`loss_sum` on a padding-free micro-batch with per-conversation SDPA (the training default), through the
    chunked head (the trainer's path) or the model's logits, must queue its GPU work without waiting for the
    GPU. A failure names the synchronizing call in its traceback. (transformers' scan of GPU position ids for
    packed sequences, masking_utils `find_packed_sequence_indices`, is skipped: the mask-free registration of
    the per-conversation SDPA builds no mask.)"""
    model = tiny_model(tiny_model_dir, attention.SEGMENT_SDPA, dtype, lora=lora)
    head = loss_head(model, tokenizer, path, dtype, lora)
    batch = batching.collate_packed(rows)
    with precision(dtype, lora):
        losses.loss_sum(model, batch, DEVICE, head)  # warm-up: first-call set-up (handles, workspaces) may sync
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with precision(dtype, lora):
            loss, correct = losses.loss_sum(model, batch, DEVICE, head)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert loss.device.type == "cuda" and bool(torch.isfinite(loss)) and int(correct) >= 0
    # a sync inside the varlen kernel would be caught as a refusal and the loop run instead: not a pass
    assert attention.kernel_use()["varlen_refused"] is None, attention.kernel_use()


@pytest.mark.parametrize("lora", [False, True], ids=["full-bfloat16", "lora-bfloat16"])
def test_optimizer_step_makes_no_host_device_sync(tiny_model_dir, tokenizer, tmp_path, lora):
    """A whole optimizer step (micro-batches, clipping, fused AdamW) is queued without waiting for the GPU: its
    loss and gradient norm come back as device tensors, read by the loop after the next step is queued."""
    cfg = helpers.training_config(tiny_model_dir, tmp_path, lora=lora, model__torch_dtype="bfloat16",
                                  step_scheduler__max_steps=3, clip_grad_norm__max_norm=1.0)
    trainer = Trainer(cfg, tmp_path, tokenizer, helpers.prepared(helpers.chat_rows(tokenizer, 12)))
    trainer.setup()
    clock = trainer._clock
    # warm-up: optimizer state, kernels' first-call set-up
    trainer._optimizer_step(trainer._next_micro_batches(), clock.mark())
    began = clock.mark()
    micro_batches = trainer._next_micro_batches()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step = trainer._optimizer_step(micro_batches, began)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert step.loss.device.type == "cuda" and step.grad_norm.device.type == "cuda"
    loss, grad_norm, seconds, since_began = step.read(clock, began)
    assert math.isfinite(loss) and grad_norm is not None and grad_norm > 0
    assert 0 < seconds == pytest.approx(since_began)  # CUDA events: the step's own time on the GPU


# --------------------------------------------------------------------------- the CLI on the GPU


def chatft_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real `chatft` command with each run's caches and runs inside `cwd`. Where the console script is
    not installed (the lent GPU machine runs from the checkout), the same CLI as `python -m chatft.cli`."""
    env = {"CHATFT_RUNS_DIR": str(cwd / "runs")}
    if Path(CHATFT).exists():
        return run_chatft(*args, cwd=cwd, env=env)
    path = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env |= {"HF_HUB_OFFLINE": "1", "CHATFT_CACHE_DIR": str(cwd / "cache"), "HF_DATASETS_CACHE": str(cwd / "hf-cache"),
            "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "chatft.cli", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def write_chats(path: Path, n: int, offset: int = 0) -> None:
    lines = []
    for i in range(n):
        question, answer = helpers.conversation(i + offset)
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", ["lora-bfloat16", "full-auto", "full-float16"])
def test_cli_training_run(tiny_model_dir, tmp_path, kind):
    lora, dtype = kind.startswith("lora"), kind.split("-")[1]
    write_chats(tmp_path / "train.jsonl", 32)
    write_chats(tmp_path / "val.jsonl", 8, offset=100)
    result = chatft_cli(
        "run", "peft/automodel" if lora else "sft/automodel", "-c", "tiny",
        f"model.pretrained_model_name_or_path={tiny_model_dir}",
        f"model.torch_dtype={dtype}",
        "dataset.path_or_dataset_id=train.jsonl", "validation_dataset.path_or_dataset_id=val.jsonl",
        "step_scheduler.max_steps=6", "step_scheduler.num_epochs=2", "step_scheduler.global_batch_size=8",
        "step_scheduler.local_batch_size=4", "step_scheduler.ckpt_every_steps=3", "step_scheduler.val_every_steps=3",
        f"optimizer.lr={3e-2 if lora else 3e-3}", "peft.dropout=0.0" if lora else "peft=null",
        cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / ("tiny-peft" if lora else "tiny-sft")
    assert f"on {DEVICE.type} (" in result.stdout

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    # a float16 step whose gradients overflowed is skipped and logs no gradient norm
    assert all(math.isfinite(m["loss"]) and (m.get("skipped") or math.isfinite(m["grad_norm"])) for m in metrics), \
        metrics
    ends = [m["elapsed_s"] for m in metrics]  # each row stamped when its own step ended on the GPU
    assert all(a < b for a, b in zip(ends, ends[1:])) and all(m["tokens_per_s"] > 0 for m in metrics), metrics
    assert metrics[-1]["loss"] < metrics[0]["loss"], [m["loss"] for m in metrics]
    assert all(m["peak_mem_mb"] > 0 for m in metrics)
    validation = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [3, 6] and all(math.isfinite(v["loss"]) for v in validation)
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_6"

    manifest = json.loads((run / "final" / "chatft_manifest.json").read_text())
    assert manifest["kind"] == ("lora" if lora else "full")
    assert manifest["metrics"]["device"] == DEVICE.type and manifest["metrics"]["padding_free"] is True
    assert manifest["metrics"]["loss_head"] == "chunked"
    kernels = manifest["metrics"]["attention_kernels"]
    if dtype != "float16" and attention.VARLEN_KERNEL is not None:  # bfloat16: every layer call is one varlen call
        assert kernels["varlen_calls"] > 0 and kernels["per_conversation_calls"] == 0, kernels
    if dtype == "float16":  # mixed precision: float32 master weights, float16 compute, loss scaling
        assert manifest["metrics"]["precision"] == {"weights": "float32", "trainable": "float32", "compute": "float16",
                                                    "saved": "float16"}
        assert manifest["metrics"]["loss_scaling"] is True

    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = torch.float16 if dtype == "float16" else torch.bfloat16  # auto: bfloat16 on a GPU
    if lora:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=expected).to(DEVICE)
        model = PeftModel.from_pretrained(base, run / "final").to(DEVICE)
    else:
        model = AutoModelForCausalLM.from_pretrained(run / "final").to(DEVICE)
        assert model.dtype == expected
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad(), precision(expected, lora):
        logits = model(input_ids=ids.to(DEVICE)).logits
    assert logits.device.type == DEVICE.type and bool(torch.isfinite(logits).all())


def test_stochastic_rounding_draws_the_same_bits_on_the_gpu():
    """The bits that round a weight are a hash of its place (`stochastic_rounding`): the same on the GPU as on the
    CPU, so a run rounds alike on either, and FSDP2 shards on GPUs round as one process does."""
    from chatft.train.stochastic_rounding import StochasticRoundingAdamW, random_low_bits, rounding_key

    key = rounding_key(3, 7, 2)
    assert torch.equal(random_low_bits(key, 1000, 1 << 20, DEVICE).cpu(),
                       random_low_bits(key, 1000, 1 << 20, torch.device("cpu")))
    torch.manual_seed(0)
    start, gradients = torch.randn(4096).to(torch.bfloat16), [torch.randn(4096).to(torch.bfloat16) for _ in range(3)]
    updated = {}
    for device in (torch.device("cpu"), DEVICE):
        param = torch.nn.Parameter(start.clone().to(device))
        optimizer = StochasticRoundingAdamW([param], lr=1e-3, seed=5)
        for gradient in gradients:
            param.grad = gradient.to(device)
            optimizer.step()
        updated[device.type] = param.detach().cpu()
    # the float32 update itself may differ by a rounding between the two devices' kernels: almost every weight
    # lands on the same bfloat16 value
    assert (updated["cpu"] != updated["cuda"]).float().mean().item() < 0.01


def test_a_mixture_of_experts_model_trains_on_the_gpu(tiny_mixtral_dir, tmp_path):
    """Full SFT of the tiny Mixtral in bfloat16: the experts run as grouped matmuls on the GPU."""
    write_chats(tmp_path / "train.jsonl", 16)
    result = chatft_cli("run", "sft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={tiny_mixtral_dir}",
                        "dataset.path_or_dataset_id=train.jsonl", "step_scheduler.max_steps=4",
                        "step_scheduler.global_batch_size=4", "step_scheduler.local_batch_size=2",
                        "step_scheduler.val_every_steps=null", "step_scheduler.ckpt_every_steps=null",
                        "optimizer.lr=3e-3", "lr_scheduler.lr_warmup_steps=0", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "tiny-sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"], [m["loss"] for m in metrics]


# --------------------------------------------------------------------------- a real out-of-memory (last)


def test_a_real_cuda_out_of_memory_becomes_error_oom(tiny_model_dir, tokenizer, tmp_path):
    """The allocator is capped a few MB above what is in use, so the first step's activations cannot fit: the
    trainer must turn torch's OutOfMemoryError into `error[oom]` and leave the GPU usable."""
    answer = "Hello! How can I help you today?"
    while len(helpers.chat_row(tokenizer, "Say it again.", answer)) < 700:
        answer += " Hello! How can I help you today?"
    rows = [helpers.chat_row(tokenizer, "Say it again.", answer, source_row=i) for i in range(8)]
    assert len(rows[0]) < 1000  # the tiny model has 1024 positions
    cfg = helpers.training_config(tiny_model_dir, tmp_path / "run", dataset__seq_length=1024, force=True,
                                  step_scheduler__global_batch_size=8, step_scheduler__local_batch_size=8,
                                  step_scheduler__max_steps=2)
    warm = tiny_model(tiny_model_dir, "sdpa", torch.float32)  # cuBLAS workspace etc. exist before the cap
    loss_and_grads(warm, batching.collate_packed(rows[:1]))
    del warm
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    index = torch.cuda.current_device()  # the cap wants an index: torch.device("cuda") alone is refused
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(DEVICE) + 12 * 2**20) / total, index)
    try:
        with pytest.raises(ChatftError) as err:
            train(cfg, tmp_path / "run", helpers.prepared(rows), tokenizer=tokenizer)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
    assert err.value.id == "oom", err.value.render()
    assert "out of memory at step 1 of 2 (cuda)" in err.value.message
    after = torch.ones(1024, 1024, device=DEVICE) @ torch.ones(1024, 1024, device=DEVICE)
    assert float(after[0, 0]) == 1024.0


# --------------------------------------------------------------------------- the varlen flash kernel


def test_segment_sdpa_uses_the_varlen_kernel_in_bfloat16(tiny_model_dir, rows, monkeypatch):
    """On CUDA in bfloat16 every layer's attention is one varlen flash call (torch >= 2.10), and the loss is the
    per-conversation loop's."""
    if attention.VARLEN_KERNEL is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    import functools

    calls = []
    real = attention.VARLEN_KERNEL

    @functools.wraps(real)
    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    model = tiny_model(tiny_model_dir, attention.SEGMENT_SDPA, torch.bfloat16)
    batch = batching.collate_packed(rows)
    monkeypatch.setattr(attention, "VARLEN_KERNEL", counted)
    fused, _, fused_grads = loss_and_grads(model, batch)
    assert len(calls) == model.config.num_hidden_layers, attention.kernel_use()  # names a refusal, if any
    monkeypatch.setattr(attention, "VARLEN_KERNEL", None)
    loop, _, loop_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(fused, loop, rtol=2e-2, atol=0)
    worst = max(relative_difference(a, b) for a, b in zip(fused_grads, loop_grads))
    assert worst <= 5e-2
