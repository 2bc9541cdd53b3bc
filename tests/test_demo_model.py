"""The converted SmolLM2 demo dir is a plain HF checkpoint that chats sensibly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow


def test_demo_model_is_plain_hf_and_answers(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "SOURCE.json"} <= files
    assert not any(name.endswith(".gguf") for name in files)
    config_json = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config_json

    # A None entry in sys.modules makes `import gguf` fail: loading must not need it.
    monkeypatch.setitem(sys.modules, "gguf", None)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    # Tied in the GGUF, saved once, tied again on load.
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight

    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    eos_id = tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == eos_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert "Paris" in answer
    assert new_tokens[-1] == eos_id, f"did not stop at <|im_end|>: {tokenizer.decode(new_tokens)!r}"
