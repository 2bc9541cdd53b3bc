"""Every key the training schema accepts is either read by training or warned about as having no effect, and what
this release cannot do is refused when the config compiles (so `--dry-run` reports it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_module_from_path

from chatft.config import support
from chatft.config.schema import Section, TrainingConfig, known_paths
from chatft.train.step import train

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")

# Read only under other settings, with the setting that makes training read them; or refused outright.
CONDITIONAL = {
    "compile.mode": "compile.enabled=true (train/layer_compile.py)",
    "compile.dynamic": "compile.enabled=true",
    "compile.fullgraph": "compile.enabled=true",
    "compile.backend": "compile.enabled=true",
    "checkpoint.checkpoint_dir": "read by `chatft run` from the compiled config (CompiledConfig.output_dir); tests pass the dir",
    **{f"wandb.{key}": "read when the wandb section is on (chatft.trackers, tests/test_trackers.py)"
       for key in ("project", "entity", "name", "group", "tags", "notes", "save_dir")},
    **{f"mlflow.{key}": "read when the mlflow section is on (chatft.trackers, tests/test_trackers.py)"
       for key in ("experiment_name", "run_name", "tracking_uri", "artifact_location", "tags", "description",
                   "flatten_depth", "resume")},
}


def leaf_paths() -> list[str]:
    paths = known_paths(TrainingConfig)
    return [p for p in paths if not any(other.startswith(p + ".") for other in paths)]


def test_every_schema_key_is_read_or_warned_about(tiny_model_dir, tmp_path, monkeypatch):
    """Two short runs through the one entry into training (full SFT with validation; LoRA on named modules),
    recording each field of the config that chatft's own code reads."""
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(n) for n in range(i + 1))}]}
            for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    read: set[str] = set()
    where: dict[int, str] = {}

    def index(section: Section, prefix: str = "") -> None:
        where[id(section)] = prefix
        for name in type(section).model_fields:
            value = object.__getattribute__(section, name)
            if isinstance(value, Section):
                index(value, f"{prefix}{name}.")

    original = Section.__getattribute__

    def recording(self, name):
        if name in type(self).model_fields and id(self) in where and \
                "/chatft/" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
            read.add(where[id(self)] + name)
        return original(self, name)

    monkeypatch.setattr(Section, "__getattribute__", recording)
    monkeypatch.chdir(tmp_path)
    for name, overrides in [("full", {"validation_dataset": {"path_or_dataset_id": "val.jsonl"}}),
                            ("lora", {"lora": True, "peft__target_modules": ["q_proj", "v_proj"],
                                      "peft__match_all_linear": False})]:
        cfg = helpers.training_config(tiny_model_dir, tmp_path / name, step_scheduler__max_steps=2,
                                      step_scheduler__val_every_steps=1, step_scheduler__ckpt_every_steps=1,
                                      dataset__path_or_dataset_id="train.jsonl", **overrides)
        index(cfg)
        train(cfg, tmp_path / name)
    monkeypatch.setattr(Section, "__getattribute__", original)
    neither = [key for key in leaf_paths()
               if key not in read and key not in support.NO_EFFECT and key not in CONDITIONAL
               and key not in support.ONLY_WITH_SEVERAL_PROCESSES]  # warned at one process, tested with two
    assert neither == [], f"accepted but neither read nor warned about: {neither}"
    for key in support.NO_EFFECT:  # a key that gains an effect must leave the table
        assert key not in read, f"{key} is read now: drop it from NO_EFFECT"


def test_unread_keys_warn_once_and_unsupported_settings_are_refused_at_compile_time(tiny_model_dir, tmp_path):
    quiet = helpers.training_config(tiny_model_dir, tmp_path)
    assert support.no_effect_warnings(quiet) == [] and support.unsupported(quiet) is None
    loud = helpers.training_config(tiny_model_dir, tmp_path, dataloader__num_workers=8,
                                   validation_dataloader__shuffle=True, dist_env__timeout_minutes=99,
                                   distributed__strategy="ddp")
    warnings = support.no_effect_warnings(loud)
    assert [w.split("`")[1] for w in warnings] == ["dataloader.num_workers: 8", "validation_dataloader.shuffle: true",
                                                   "dist_env.timeout_minutes: 99", "distributed.strategy: ddp"]
    assert all(" does not apply: " in w for w in warnings)
    two = helpers.training_config(tiny_model_dir, tmp_path, distributed__dp_size=2,
                                  step_scheduler__global_batch_size=4, dist_env__timeout_minutes=99)
    assert support.unsupported(two) is None and support.no_effect_warnings(two) == []
    for overrides, words in [({"packed_sequence__split_across_pack": True}, "splitting a conversation")]:
        refusal = support.unsupported(helpers.training_config(tiny_model_dir, tmp_path, **overrides))
        assert refusal is not None and refusal.id == "not_available_yet" and words in refusal.message


@pytest.mark.parametrize("key", sorted(CONDITIONAL))
def test_conditional_keys_are_known_to_the_schema(key):
    assert key in leaf_paths()
