"""One stop rule (`artifacts.generation_stop_ids`) for the model training saves, the model merge saves and the
answers eval generates: on a base whose own EOS (`<|endoftext|>`, as in many base models) is not the chat
template's end of turn (`<|im_end|>`), all three stop at both, the base's EOS first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path

from chatft.config.schema import MergeConfig, validate_config
from chatft.eval.loading import load_target_model
from chatft.eval.scoring import stop_ids
from chatft.eval.targets import resolve_targets
from chatft.merge import merge
from chatft.train.model import load_model, load_tokenizer
from chatft.train.step import train

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")
tiny_models = load_module_from_path("chatft_tests_tiny_models", Path(__file__).parent / "fixtures" / "tiny_models.py")


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model, its generation_config.json stopping at <|endoftext|> only (config.json untouched)."""
    base = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("base") / "model")
    path = base / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": 0}))
    return base


def test_training_merge_and_eval_stop_at_the_same_ids(base_dir, tmp_path):
    from transformers import GenerationConfig

    cfg = helpers.training_config(base_dir, tmp_path / "sft", step_scheduler__max_steps=1)
    tokenizer = load_tokenizer(cfg.model)
    pad, end_of_turn = (tokenizer.convert_tokens_to_ids(t) for t in (tiny_models.PAD_TOKEN, tiny_models.EOS_TOKEN))
    assert (pad, end_of_turn) == (0, tokenizer.eos_token_id)
    rows = helpers.prepared(helpers.chat_rows(tokenizer, 4))
    sft = train(cfg, tmp_path / "sft", rows, tokenizer=tokenizer)
    peft_cfg = helpers.training_config(base_dir, tmp_path / "peft", lora=True, step_scheduler__max_steps=1)
    train(peft_cfg, tmp_path / "peft", rows, tokenizer=tokenizer)
    merge(MergeConfig.model_validate({"lora_checkpoint": str(tmp_path / "peft"), "torch_dtype": "float32",
                                      "output_hf_path": str(tmp_path / "merged"), "show_progress": False}))

    expected = [pad, end_of_turn]
    assert GenerationConfig.from_pretrained(sft.final_dir).eos_token_id == expected  # training's final/
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == expected  # merge's output
    eval_cfg = validate_config("eval", {
        "targets": ["base", "adapter", "merged"], "base": str(base_dir), "adapter": str(tmp_path / "peft"),
        "merged": str(tmp_path / "merged"), "dataset": {"path_or_dataset_id": "rows.jsonl"},
        "torch_dtype": "float32"}, "test")
    cpu = torch.device("cpu")
    for target in resolve_targets(eval_cfg):  # eval's answers, on each target
        assert stop_ids(load_target_model(eval_cfg, target, cpu, torch.float32), tokenizer) == expected, target.name
    sft_model = load_model(cfg.model.model_copy(update={"pretrained_model_name_or_path": str(sft.final_dir)}),
                           cpu, torch.float32)
    assert stop_ids(sft_model, tokenizer) == expected


def test_the_end_of_turn_probe_renders_with_the_runs_template_kwargs(tiny_model_dir):
    """A template whose turns end with <|endoftext|> under `plain_close`: the probe finds that token only when
    given the kwargs the run rendered with, which `recorded_template_kwargs` reads from a run's manifest."""
    from transformers import AutoTokenizer

    from chatft import artifacts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = tiny_models.CHATML_TEMPLATE.replace(
        "'<|im_end|>'", "('<|endoftext|>' if plain_close else '<|im_end|>')")
    end_of_text, im_end = tokenizer.convert_tokens_to_ids([tiny_models.PAD_TOKEN, tiny_models.EOS_TOKEN])
    manifest = {"config": {"dataset": {"chat_template_kwargs": {"plain_close": True}}}}
    kwargs = artifacts.recorded_template_kwargs(manifest)
    assert kwargs == {"plain_close": True}
    assert artifacts.recorded_template_kwargs({"config": {"dataset": {}}}) == {}
    assert artifacts.recorded_template_kwargs(None) == {}
    assert artifacts.end_of_turn_token_id(tokenizer) == im_end
    assert artifacts.end_of_turn_token_id(tokenizer, kwargs) == end_of_text
    assert artifacts.generation_stop_ids(tokenizer, im_end, kwargs) == [im_end, end_of_text]
