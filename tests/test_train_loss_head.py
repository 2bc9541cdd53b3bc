"""The chunked loss head: same loss, right-prediction count and gradients as the full-logits head, chunk by
chunk; used only where decoder + head give the model's own logits; recorded by the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM

from chatft.train import batching, chunked_head, losses
from chatft.train.step import train
from chatft.train.model import load_model

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rows(tokenizer):
    return helpers.chat_rows(tokenizer, 5)


def tiny_model(model_dir: Path, lora: bool = False) -> torch.nn.Module:
    model = load_model(helpers.training_config(model_dir, Path("unused")).model, CPU, torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    return model


def loss_and_grads(model, batch, head):
    model.zero_grad()
    loss, correct = losses.loss_sum(model, batch, head=head)
    (loss * 0.5).backward()  # a scale, as the trainer divides by the step's supervised tokens
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(correct), grads


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_head_equals_the_logits_head(tiny_model_dir, rows, monkeypatch, lora, layout):
    model = tiny_model(tiny_model_dir, lora)
    batch = batching.collate(rows, pad_id=0) if layout == "padded" else batching.collate_packed(rows)
    head = losses.head_for(model, 1000, CPU)
    assert head is not None
    vocab = head.head.weight.size(0)
    monkeypatch.setattr(chunked_head, "CHUNK_ELEMENTS", 7 * vocab)  # several chunks, the last one short
    assert batching.supervised_tokens(batch) > 3 * 7
    expected_loss, expected_correct, expected_grads = loss_and_grads(model, batch, None)
    loss, correct, grads = loss_and_grads(model, batch, head)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-5)
    assert correct == expected_correct
    assert grads.keys() == expected_grads.keys() and (lora or "lm_head.weight" in grads)
    for name, grad in grads.items():  # summation order differs by chunk: compare against each tensor's scale
        scale = expected_grads[name].abs().max()
        assert scale > 0 and (grad - expected_grads[name]).abs().max() <= 1e-5 * scale, name
    with torch.no_grad():  # evaluation: no gradients taken, the same numbers
        no_grad_loss, no_grad_correct = losses.loss_sum(model, batch, head=head)
    torch.testing.assert_close(no_grad_loss, expected_loss, rtol=1e-6, atol=1e-5)
    assert int(no_grad_correct) == expected_correct


def test_chunked_cross_entropy_with_a_bias_matches_autograd():
    generator = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(8, 40)
    hidden = torch.randn(23, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 40, (23,), generator=generator)
    labels[[0, 9, 22]] = batching.IGNORE_INDEX
    head = chunked_head.ChunkedHead(decoder=torch.nn.Identity(), head=linear)
    loss, correct = head.cross_entropy(hidden, labels)
    (loss * 0.25).backward()
    ours = (hidden.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone())
    hidden.grad, linear.weight.grad, linear.bias.grad = None, None, None
    logits = linear(hidden)
    reference = torch.nn.functional.cross_entropy(logits, labels, ignore_index=batching.IGNORE_INDEX, reduction="sum")
    (reference * 0.25).backward()
    torch.testing.assert_close(loss, reference)
    assert int(correct) == int(((logits.argmax(-1) == labels) & (labels != batching.IGNORE_INDEX)).sum())
    for got, want in zip(ours, (hidden.grad, linear.weight.grad, linear.bias.grad)):
        torch.testing.assert_close(got, want)
    assert ours[0][[0, 9, 22]].abs().max() == 0  # ignored positions send nothing back


def test_models_that_change_their_logits_after_the_head_keep_the_logits_head(tiny_model_dir):
    capped = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            final_logit_softcapping=0.5))
    assert chunked_head.find_head(capped) is not None  # the structure is there...
    assert losses.head_for(capped, 300, CPU) is None  # ...but soft-capping changes the logits
    capped.config.final_logit_softcapping = None
    assert losses.head_for(capped, 300, CPU) is not None

    model = tiny_model(tiny_model_dir)
    wrapped_head = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"]))
    assert chunked_head.find_head(wrapped_head) is None  # a LoRA-wrapped head is not a plain linear layer


def step_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_is_the_same_with_either_head(tiny_model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    data = helpers.prepared(helpers.chat_rows(tokenizer, 8))
    outcome = {}
    for name in ("chunked", "logits"):
        if name == "logits":
            monkeypatch.setattr(chunked_head, "matches_model", lambda *args: False)
        cfg = helpers.training_config(tiny_model_dir, tmp_path / name, step_scheduler__max_steps=3,
                                      dataloader__shuffle=False)
        result = train(cfg, tmp_path / name, data, tokenizer=tokenizer)
        manifest = json.loads((result.final_dir / "chatft_manifest.json").read_text())
        outcome[name] = (step_losses(tmp_path / name), manifest["metrics"]["loss_head"], capsys.readouterr().out)
    assert outcome["chunked"][1] == "chunked" and outcome["logits"][1] == "logits"
    assert "the chunked head is not used" in outcome["logits"][2] and "not used" not in outcome["chunked"][2]
    assert outcome["chunked"][0] == pytest.approx(outcome["logits"][0], rel=1e-5)
