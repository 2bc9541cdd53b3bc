"""The tiny-model fixtures load like real checkpoints and differ where they should."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def test_loads_with_auto_classes_and_gives_finite_loss(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings is False
    # eos/pad agree across tokenizer, model config and generation config; no bos anywhere.
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == eos_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == pad_id == model.config.pad_token_id == model.generation_config.pad_token_id
    assert tokenizer.bos_token is None and model.config.bos_token_id is None

    batch = tokenizer(["Hello! How can I help you today?"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    # Random init should sit near uniform: loss ~ ln(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(len(tokenizer))).item()) < 1.0


def test_chat_template_renders_chatml(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    # transformers 5: tokenize=True returns a BatchEncoding by default (return_dict=True).
    encoded = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    assert list(encoded["input_ids"]) == tokenizer(expected, add_special_tokens=False)["input_ids"]
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert ids == list(encoded["input_ids"])


def test_special_tokens_are_single_ids_and_text_round_trips(tiny_model_dir: Path, tiny_models_module) -> None:
    tiny_models = tiny_models_module
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in tiny_models.SPECIAL_TOKENS]
    assert special_ids == [0, 1, 2]
    assert 900 <= len(tokenizer) <= 1100

    text = "<|im_start|>user\nÜnïcödé, 日本語 and 🙂!<|im_end|>\n<|endoftext|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    for token, token_id in zip(tiny_models.SPECIAL_TOKENS, special_ids):
        assert ids.count(token_id) == 1, token  # one id, never split into bytes
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nÜnïcödé, 日本語 and 🙂!\n"
    # No bos/eos is added implicitly when encoding plain text.
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode("hello", add_special_tokens=False)


def test_no_template_variant_has_no_chat_template(tiny_model_no_template_dir: Path) -> None:
    files = {p.name for p in tiny_model_no_template_dir.iterdir()}
    assert not {"chat_template.jinja", "chat_template.json", "chat_templates"} & files
    config = json.loads((tiny_model_no_template_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    assert tokenizer.chat_template is None
    assert tokenizer.eos_token == "<|im_end|>"


def test_other_weights_variant_has_same_shapes_but_different_tensors(
    tiny_model_dir: Path, tiny_model_other_weights_dir: Path
) -> None:
    base = load_file(tiny_model_dir / "model.safetensors")
    other = load_file(tiny_model_other_weights_dir / "model.safetensors")
    assert base.keys() == other.keys()
    # Norm weights start at ones in both; every randomly initialised matrix must differ.
    for name, tensor in base.items():
        assert tensor.shape == other[name].shape, name
        if tensor.ndim == 2:
            assert not torch.equal(tensor, other[name]), name
    assert (tiny_model_dir / "config.json").read_text() == (tiny_model_other_weights_dir / "config.json").read_text()
    assert (tiny_model_dir / "tokenizer.json").read_bytes() == (tiny_model_other_weights_dir / "tokenizer.json").read_bytes()


def test_build_is_fast_and_deterministic(tmp_path: Path, tiny_models_module) -> None:
    tiny_models = tiny_models_module
    start = time.perf_counter()
    first = tiny_models.build_tiny_model(tmp_path / "a", seed=0)
    elapsed = time.perf_counter() - start
    second = tiny_models.build_tiny_model(tmp_path / "b", seed=0)
    assert elapsed < 5.0, f"building a tiny model took {elapsed:.1f}s"
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
