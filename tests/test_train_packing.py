"""Padding-free micro-batches: layout, loss equal to padded batches, no attention across conversations,
the supervised-position loss head, the boundary probe and the trainer's fallback."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from transformers import AttentionInterface, MistralConfig, MistralForCausalLM, masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chatft.errors import ChatftError
from chatft.train import attention, batching, losses, memory, padding_free
from chatft.train.step import train
from chatft.train.memory import MB
from chatft.train.model import load_model

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")

# transformers' own packed-sequence handling, and chatft's per-conversation SDPA on top of it.
ATTENTION = ["sdpa", "eager", attention.SEGMENT_SDPA]


@pytest.fixture(scope="module")
def rows(tokenizer):
    rows = helpers.chat_rows(tokenizer, 5)
    assert len({len(r) for r in rows}) > 2  # different lengths, so the padded layout really pads
    return rows


def tiny_model(model_dir: Path, attn: str) -> torch.nn.Module:
    cfg = helpers.training_config(model_dir, Path("unused"))
    model = load_model(cfg.model, torch.device("cpu"), torch.float32)
    if attn == attention.SEGMENT_SDPA:
        attention.use_segment_sdpa(model)
    else:
        model.set_attn_implementation(attn)
    return model


def test_packed_layout_keeps_every_token_and_restarts_positions(rows):
    padded = batching.collate(rows, pad_id=0)
    packed = batching.collate_packed(rows)
    assert set(packed) == {"input_ids", "position_ids", "labels"} and packed["input_ids"].shape == (1, sum(map(len, rows)))
    assert batching.input_tokens(packed) == batching.input_tokens(padded) == sum(map(len, rows))
    assert batching.supervised_tokens(packed) == batching.supervised_tokens(padded)
    starts = [0]
    for row in rows[:-1]:
        starts.append(starts[-1] + len(row))
    assert (packed["position_ids"][0] == 0).nonzero().squeeze(1).tolist() == starts
    assert all(packed["labels"][0, s] == batching.IGNORE_INDEX for s in starts)
    assert attention.segment_bounds(packed["position_ids"]) == (*starts, sum(map(len, rows)))


def test_token_budget_groups_consecutive_rows_and_drops_nothing(rows):
    lengths = [len(r) for r in rows]
    budget = max(lengths) + min(lengths)
    groups = batching.group_rows(rows, local_batch_size=2, token_budget=budget)
    assert [r for g in groups for r in g] == list(rows)  # same rows, same order
    assert all(sum(map(len, g)) <= budget for g in groups)
    for first, second in zip(groups, groups[1:]):  # greedy: the next row did not fit
        assert sum(map(len, first)) + len(second[0]) > budget
    assert batching.group_rows(rows, 1, token_budget=1) == [[r] for r in rows]  # a row over budget goes alone


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_loss_and_gradients_equal_padded(tiny_model_dir, rows, attn):
    model = tiny_model(tiny_model_dir, attn)
    results = []
    for batch in (batching.collate(rows, pad_id=0), batching.collate_packed(rows)):
        model.zero_grad()
        loss, correct = losses.loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), int(correct), [p.grad.clone() for p in model.parameters()]))
    (padded_loss, padded_correct, padded_grads), (packed_loss, packed_correct, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=1e-5)
    assert packed_correct == padded_correct
    for packed_grad, padded_grad in zip(packed_grads, padded_grads):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn", ATTENTION)
def test_no_conversation_attends_to_another(tiny_model_dir, rows, attn):
    model = tiny_model(tiny_model_dir, attn).eval()
    first, rest = rows[0], rows[1:]
    edited = dataclasses.replace(first, input_ids=[(t + 17) % 1000 for t in first.input_ids])
    changed = batching.collate_packed([edited, *rest])
    original = batching.collate_packed(rows)
    assert not torch.equal(original["input_ids"], changed["input_ids"])
    with torch.no_grad():
        logits = [model(**{k: b[k] for k in ("input_ids", "position_ids")},
                        **({attention.SEGMENTS_KWARG: attention.segment_bounds(b["position_ids"])}
                           if attn == attention.SEGMENT_SDPA else {})).logits for b in (original, changed)]
    later = slice(len(first), None)
    assert not torch.allclose(logits[0][:, :len(first)], logits[1][:, :len(first)])  # the edit is visible...
    torch.testing.assert_close(logits[0][:, later], logits[1][:, later], rtol=0, atol=1e-6)  # ...only there


def test_supervised_head_equals_the_full_logits_loss(tiny_model_dir, rows):
    model = tiny_model(tiny_model_dir, "sdpa")
    batch = batching.collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                     ignore_index=batching.IGNORE_INDEX, reduction="sum")
        expected_correct = int(((logits.argmax(-1) == labels) & (labels != batching.IGNORE_INDEX)).sum())
        loss, correct = losses.loss_sum(model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    assert int(correct) == expected_correct

    class NoLogitsToKeep(torch.nn.Module):  # a causal LM whose forward predates `logits_to_keep`
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    wrapped = NoLogitsToKeep(model)
    assert losses.accepts_logits_to_keep(model) and not losses.accepts_logits_to_keep(wrapped)
    with torch.no_grad():
        fallback, fallback_correct = losses.loss_sum(wrapped, batch)
    torch.testing.assert_close(fallback, expected, rtol=1e-6, atol=1e-5)
    assert int(fallback_correct) == expected_correct


LEAKY = "chatft_test_leaky_attention"


def leaky_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal attention over the whole row, ignoring the conversations' boundaries."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_boundary_probe_tells_a_leaking_model_apart(tiny_model_dir):
    AttentionInterface.register(LEAKY, leaky_attention)
    AttentionMaskInterface.register(LEAKY, sdpa_mask)
    for attn in ATTENTION:
        leak = padding_free.boundary_leak(tiny_model(tiny_model_dir, attn), 1000, torch.device("cpu"))
        assert leak <= padding_free.tolerance(torch.float32), attn
    leak = padding_free.boundary_leak(tiny_model(tiny_model_dir, LEAKY), 1000, torch.device("cpu"))
    assert leak > 10 * padding_free.tolerance(torch.bfloat16)


def step_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_losses_do_not_depend_on_the_layout(tiny_model_dir, tokenizer, tmp_path):
    data = helpers.prepared(helpers.chat_rows(tokenizer, 8))
    runs = {
        "padded": {"packed_sequence__padding_free": False},
        "padding_free": {},
        "token_budget": {"packed_sequence__packed_sequence_size": 256},
    }
    outcome = {}
    for name, overrides in runs.items():
        cfg = helpers.training_config(tiny_model_dir, tmp_path / name, step_scheduler__max_steps=3,
                                      dataloader__shuffle=False, **overrides)
        result = train(cfg, tmp_path / name, data, tokenizer=tokenizer)
        manifest = json.loads((result.final_dir / "chatft_manifest.json").read_text())
        outcome[name] = (step_losses(tmp_path / name), manifest["metrics"]["padding_free"])
    assert outcome["padded"][1] is False and outcome["padding_free"][1] is True and outcome["token_budget"][1] is True
    for name in ("padding_free", "token_budget"):
        assert outcome[name][0] == pytest.approx(outcome["padded"][0], rel=1e-5)


def test_trainer_falls_back_to_padding_when_the_model_leaks(tiny_model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(padding_free, "boundary_leak", lambda *args: 0.5)
    data = helpers.prepared(helpers.chat_rows(tokenizer, 4))
    cfg = helpers.training_config(tiny_model_dir, tmp_path / "a", step_scheduler__max_steps=1)
    before_loading = dataclasses.replace(memory.estimate_memory(cfg, lengths=[1]), runtime=123 * MB)
    result = train(cfg, tmp_path / "a", data, tokenizer=tokenizer, estimate=before_loading)
    out = capsys.readouterr().out
    assert "padded micro-batches: this model does not keep padding-free rows apart" in out
    manifest = json.loads((result.final_dir / "chatft_manifest.json").read_text())
    assert manifest["metrics"]["padding_free"] is False
    # the memory estimate is made again for the padded layout it fell back to, keeping the process size read
    # before the weights were loaded (read after, it would count them twice)
    expected = memory.estimate_memory(cfg.padded(), lengths=memory.row_lengths(data)).training + 123 * MB
    assert "rows padded to" in out
    assert manifest["metrics"]["memory_estimate_mb"] == pytest.approx(expected / MB, abs=0.1)

    packed = helpers.training_config(tiny_model_dir, tmp_path / "b", step_scheduler__max_steps=1,
                                     packed_sequence__packed_sequence_size=512)
    with pytest.raises(ChatftError) as err:
        train(packed, tmp_path / "b", data, tokenizer=tokenizer)
    assert err.value.id == "config_invalid" and "see each other" in err.value.message

    # a run that fits padding-free but not padded is refused after the fallback (an estimate made for 1-token rows):
    # as much free memory as the weights, gradients and optimizer states need, less than the padded rows add
    static = memory.estimate_memory(cfg).weights_and_optimizer().training
    padded = memory.estimate_memory(cfg.padded(), lengths=memory.row_lengths(data))
    assert padded.training - padded.weights > static
    monkeypatch.setattr(memory, "free_memory", lambda device: static)
    with pytest.raises(ChatftError) as err:
        train(helpers.training_config(tiny_model_dir, tmp_path / "c", step_scheduler__max_steps=1, force=False),
              tmp_path / "c", data, tokenizer=tokenizer, estimate=memory.estimate_memory(cfg, lengths=[1]))
    assert err.value.id == "oom" and "padded micro-batches, beyond the loaded weights" in err.value.message


def test_padded_fallback_still_counts_the_float16_copy_autocast_makes(tiny_model_dir, tokenizer, tmp_path,
                                                                      monkeypatch):
    """float16 full SFT loads float32 master weights; the float16 copy autocast makes of them does not exist yet
    when the padded layout is checked, so only the float32 weights are taken off the estimate."""
    monkeypatch.setattr(padding_free, "boundary_leak", lambda *args: 0.5)
    data = helpers.prepared(helpers.chat_rows(tokenizer, 4))
    cfg = helpers.training_config(tiny_model_dir, tmp_path, step_scheduler__max_steps=1, model__torch_dtype="float16",
                                  force=False)
    padded = cfg.padded()
    estimate = memory.estimate_memory(padded, lengths=memory.row_lengths(data))
    float16_copy = estimate.compute_copies  # of the float32 master weights, made by autocast once training runs
    assert float16_copy == estimate.weights // 2
    # enough for everything beyond the loaded weights but half the float16 copy
    monkeypatch.setattr(memory, "free_memory", lambda device: estimate.training - estimate.weights - float16_copy // 2)
    with pytest.raises(ChatftError) as err:
        train(cfg, tmp_path, data, tokenizer=tokenizer, estimate=memory.estimate_memory(cfg, lengths=[1]))
    assert err.value.id == "oom" and "padded micro-batches, beyond the loaded weights" in err.value.message


def test_a_pack_smaller_than_a_row_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(Exception, match="at least dataset.seq_length"):
        helpers.training_config(tiny_model_dir, tmp_path, packed_sequence__packed_sequence_size=128)


def test_summed_cross_entropy_matches_torch_in_value_and_gradient():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 50, generator=generator) * 4
    labels = torch.randint(0, 50, (12,), generator=generator)
    labels[[2, 7]] = batching.IGNORE_INDEX
    ours_in, reference_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = losses._SummedCrossEntropy.apply(ours_in * 1.0, labels)  # `* 1.0`: backward may reuse its input
    reference = torch.nn.functional.cross_entropy(reference_in, labels, ignore_index=batching.IGNORE_INDEX,
                                                  reduction="sum")
    (ours * 0.5).backward()
    (reference * 0.5).backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours_in.grad, reference_in.grad)
    assert ours_in.grad[[2, 7]].abs().max() == 0  # ignored positions get no gradient


def count_packed_sequence_scans(monkeypatch) -> list[int]:
    """Calls of transformers' scan of the position ids for packed sequences (a host-device sync on a GPU)."""
    calls: list[int] = []
    original = masking_utils.find_packed_sequence_indices

    def counted(position_ids):
        calls.append(1)
        return original(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counted)
    return calls


def test_segment_sdpa_builds_no_mask(tiny_model_dir, rows, monkeypatch):
    scans = count_packed_sequence_scans(monkeypatch)
    batch = batching.collate_packed(rows)
    model = tiny_model(tiny_model_dir, "sdpa")
    expected, _ = losses.loss_sum(model, batch)
    assert scans  # transformers' own sdpa scans the position ids and builds the block mask
    scans.clear()
    attention.use_segment_sdpa(model)
    loss, _ = losses.loss_sum(model, batch)
    assert not scans
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def sliding_window_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's tokenizer with a Mistral body whose window (40 tokens) is shorter than some rows."""
    out = tmp_path_factory.mktemp("tiny-mistral")
    for path in tiny_model_dir.iterdir():
        if "token" in path.name or path.name.endswith(".jinja"):
            shutil.copy(path, out / path.name)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=40, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        MistralForCausalLM(config).save_pretrained(out)
    return out


def test_segment_sdpa_keeps_the_sliding_window(sliding_window_model_dir, rows):
    assert max(len(r) for r in rows) > 40 >= min(len(r) for r in rows)  # some rows fit the window, some do not
    model = tiny_model(sliding_window_model_dir, "sdpa")
    results = {}
    for name, attn, batch in (("padded", "sdpa", batching.collate(rows, pad_id=0)),
                              ("packed", "sdpa", batching.collate_packed(rows)),
                              ("segments", attention.SEGMENT_SDPA, batching.collate_packed(rows))):
        if attn == attention.SEGMENT_SDPA:
            attention.use_segment_sdpa(model)
        model.zero_grad()
        loss, _ = losses.loss_sum(model, batch)
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    padded = {k: v for k, v in batching.collate(rows, pad_id=0).items() if k != "labels"}
    full_window = tiny_model(sliding_window_model_dir, "sdpa")
    full_window.config.sliding_window = None
    windowed = tiny_model(sliding_window_model_dir, "sdpa")
    with torch.no_grad():  # the window matters for these rows
        assert not torch.allclose(full_window(**padded).logits, windowed(**padded).logits)
    for name in ("packed", "segments"):
        torch.testing.assert_close(results[name][0], results["padded"][0], rtol=1e-6, atol=1e-5)
        for grad, expected in zip(results[name][1], results["padded"][1]):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_which_models_the_split_serves(tiny_model_dir, sliding_window_model_dir):
    llama, mistral = (load_model(helpers.training_config(d, Path("unused")).model, torch.device("cpu"),
                                 torch.float32).config for d in (tiny_model_dir, sliding_window_model_dir))
    assert attention.splittable(llama) and attention.splittable(mistral)
    chunked = MistralConfig(layer_types=["full_attention", "chunked_attention"], num_hidden_layers=2)
    assert not attention.splittable(chunked)  # chunked attention exists only in the mask


@pytest.mark.parametrize("model", ["llama", "mistral-sliding-window", "segments-leak"])
def test_trainer_picks_the_attention(tiny_model_dir, sliding_window_model_dir, tokenizer, tmp_path, capsys,
                                     monkeypatch, model):
    model_dir = sliding_window_model_dir if model == "mistral-sliding-window" else tiny_model_dir
    expected = attention.SEGMENT_SDPA
    if model == "segments-leak":  # a model whose attention calls the split cannot honour: transformers' masks
        real = padding_free.boundary_leak
        monkeypatch.setattr(padding_free, "boundary_leak", lambda m, *args: 1.0 if attention.uses_segment_sdpa(m)
                            else real(m, *args))
        expected = "sdpa"
    cfg = helpers.training_config(model_dir, tmp_path, step_scheduler__max_steps=1)
    result = train(cfg, tmp_path, helpers.prepared(helpers.chat_rows(tokenizer, 4)), tokenizer=tokenizer)
    metrics = json.loads((result.final_dir / "chatft_manifest.json").read_text())["metrics"]
    assert metrics["padding_free"] is True and metrics["attention"] == expected
    if expected == attention.SEGMENT_SDPA:  # CPU: every layer call runs the per-conversation loop
        kernels = metrics["attention_kernels"]
        assert kernels["varlen_calls"] == 0 and kernels["varlen_refused"] is None
        assert kernels["per_conversation_calls"] >= cfg.step_scheduler.max_steps * 2  # 2 layers, forward at least
    else:
        assert metrics["attention_kernels"] is None
    assert f"padding-free ({expected} attention)" in capsys.readouterr().out
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved.get("_attn_implementation") in (None, "sdpa")  # the saved model never names chatft's attention


def reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, is_causal=None):
    """What the flash varlen kernel computes, spelled out per conversation: q/k/v (tokens, heads, dim), keys
    from `left` positions back to `right` ahead ((-1, -1): all; torch 2.10's `is_causal`: (-1, 0))."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    bounds = cu_seq_q.tolist()
    assert max_q == max_k == max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    left, right = (-1, 0) if is_causal else window_size
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if ki.shape[0] != qi.shape[0]:
            assert enable_gqa
            ki, vi = (t.repeat_interleave(qi.shape[0] // t.shape[0], dim=0) for t in (ki, vi))
        distance = torch.arange(end - start)[:, None] - torch.arange(end - start)[None, :]
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            allowed &= distance <= left
        if right >= 0:
            allowed &= -distance <= right
        outputs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, scale=scale)
                       .transpose(0, 1))
    return torch.cat(outputs)


def reference_varlen_torch_2_10(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
    """torch 2.10's signature: causal only, no sliding window, no grouped-query heads."""
    assert q.shape[1] == k.shape[1]
    return reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, is_causal=is_causal)


@pytest.mark.parametrize("kernel", [reference_varlen, reference_varlen_torch_2_10], ids=["torch-2.11+", "torch-2.10"])
@pytest.mark.parametrize("model", ["llama-gqa", "mistral-sliding-window"])
def test_varlen_kernel_path_equals_the_per_conversation_loop(tiny_model_dir, sliding_window_model_dir, rows,
                                                             monkeypatch, kernel, model):
    """The GPU path (one varlen flash call per layer) against the loop, on CPU with the kernel replaced by its
    reference: layout, offsets, longest conversation, scale, grouped heads and the window all reach it right."""
    calls = []

    @functools.wraps(kernel)  # the kernel's signature says what it supports
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    model_dir = tiny_model_dir if model == "llama-gqa" else sliding_window_model_dir
    net = load_model(helpers.training_config(model_dir, Path("unused")).model, torch.device("cpu"), torch.bfloat16)
    attention.use_segment_sdpa(net)
    batch = batching.collate_packed(rows)
    results = {}
    for path in ("loop", "varlen"):
        if path == "varlen":
            monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cpu",))
            monkeypatch.setattr(attention, "VARLEN_KERNEL", counted)
        net.zero_grad()
        loss, _ = losses.loss_sum(net, batch)
        loss.backward()
        results[path] = (loss.detach().float(), [p.grad.float().clone() for p in net.parameters()])
    window_outran = model == "mistral-sliding-window" and kernel is reference_varlen_torch_2_10
    assert len(calls) == (0 if window_outran else 2)  # torch 2.10 has no window: the loop serves those rows
    torch.testing.assert_close(results["varlen"][0], results["loop"][0], rtol=1e-2, atol=0)
    for grad, expected in zip(results["varlen"][1], results["loop"][1]):
        assert (grad - expected).norm() <= 5e-2 * expected.norm().clamp_min(1e-6)


@pytest.mark.parametrize("kernel", [reference_varlen, reference_varlen_torch_2_10], ids=["torch-2.11+", "torch-2.10"])
@pytest.mark.parametrize("window", [None, 8])
def test_varlen_forward_matches_the_loop_exactly_in_float32(monkeypatch, kernel, window):
    if window is not None and kernel is reference_varlen_torch_2_10:
        pytest.skip("torch 2.10's kernel has no window: the loop serves such rows")
    generator = torch.Generator().manual_seed(11)
    length, heads, kv_heads, dim = 67, 4, 2, 16
    query = torch.randn(1, heads, length, dim, generator=generator)
    key, value = (torch.randn(1, kv_heads, length, dim, generator=generator) for _ in range(2))
    segments = attention.Segments((0, 5, 55, 67))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    loop, _ = attention.segment_sdpa_forward(module, query, key, value, None, scaling=0.3, sliding_window=window,
                                             **{attention.SEGMENTS_KWARG: segments})
    monkeypatch.setattr(attention, "VARLEN_KERNEL", kernel)
    fused = attention.varlen_forward(query, key, value, segments, window, 0.3)
    assert fused.shape == loop.shape == (1, length, heads, dim)
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)


def test_a_refusing_varlen_kernel_falls_back_to_the_loop_once(monkeypatch):
    calls = []

    def refusing(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(1)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "VARLEN_KERNEL", refusing)
    monkeypatch.setattr(attention, "_varlen_refused", [])
    attention.reset_kernel_use()
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(1, 2, 12, 16, generator=generator, dtype=torch.bfloat16) for _ in range(3))
    module = torch.nn.Module()
    segments = {attention.SEGMENTS_KWARG: attention.Segments((0, 5, 12))}
    with pytest.warns(UserWarning, match="Ampere GPUs"):
        first, _ = attention.segment_sdpa_forward(module, query, key, value, None, **segments)
    second, _ = attention.segment_sdpa_forward(module, query, key, value, None, **segments)
    assert len(calls) == 1 and torch.equal(first, second)  # tried once, then the loop
    # what the manifest records: the fallback is visible, not only warned about
    assert attention.kernel_use() == {"varlen_calls": 0, "per_conversation_calls": 2,
                                      "varlen_refused": "FlashAttention only supports Ampere GPUs or newer."}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(attention, "VARLEN_KERNEL", out_of_memory)
    monkeypatch.setattr(attention, "_varlen_refused", [])
    with pytest.raises(torch.OutOfMemoryError):  # never hidden: the trainer turns it into error[oom]
        attention.segment_sdpa_forward(module, query, key, value, None, **segments)
