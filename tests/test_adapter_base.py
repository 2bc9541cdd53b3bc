"""Which base an adapter belongs to, and where outputs may go: eval/model_eval and convert/merge_lora decide both
by one rule (`chatft.adapter_base`, `chatft.output_paths`), so the same adapter and base get the same answer
from both. Fingerprints are hashes of the weight files' bytes, so fake model dirs (a config and a few bytes of
"weights") stand in for models here: no torch, no model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chatft import artifacts
from chatft.adapter_base import NO_FINGERPRINT_NOTE, resolve_adapter_base
from chatft.config.schema import MergeConfig, validate_config
from chatft.errors import ChatftError
from chatft.eval.targets import checked_targets, resolve_targets
from chatft.merge import plan_merge
from chatft.output_paths import check_output_path, held_entries


def fake_model(directory: Path, weights: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_text(weights)
    return directory


def fake_adapter(directory: Path, base: Path | str | None, *, manifest: bool = True) -> Path:
    """A LoRA adapter dir; with `manifest`, a chatft_manifest.json recording `base` and its fingerprint."""
    directory.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    if base is not None:
        config["base_model_name_or_path"] = str(base)
    (directory / artifacts.ADAPTER_CONFIG).write_text(json.dumps(config))
    (directory / artifacts.ADAPTER_WEIGHTS).write_text("lora weights")
    if manifest:
        artifacts.write_manifest(directory, {"kind": "lora", "base_model": artifacts.base_model_record(str(base), None),
                                             "validations": []})
    return directory


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    base = fake_model(tmp_path / "base", "base weights")
    return {"base": base, "copy": fake_model(tmp_path / "copy", "base weights"),
            "other": fake_model(tmp_path / "other", "other weights"),
            "adapter": fake_adapter(tmp_path / "adapter", base.resolve()),
            "bare": fake_adapter(tmp_path / "bare", base.resolve(), manifest=False),
            "nameless": fake_adapter(tmp_path / "nameless", None, manifest=False),
            "empty": (tmp_path / "empty").resolve()}


def eval_decision(adapter: Path, base: Path | None) -> tuple[str, str]:
    tree = {"targets": ["adapter"], "adapter": str(adapter), "dataset": {"path_or_dataset_id": "rows.jsonl"}}
    if base is not None:
        tree["base"] = str(base)
    try:
        target = resolve_targets(validate_config("eval", tree, "test"))[0]
    except ChatftError as err:
        return "refused", err.id
    return "loads on", target.model


def merge_decision(adapter: Path, base: Path | None, output: Path) -> tuple[str, str]:
    keys = {"lora_checkpoint": str(adapter), "output_hf_path": str(output), "show_progress": False}
    if base is not None:
        keys["base_hf_path"] = str(base)
    try:
        plan = plan_merge(MergeConfig.model_validate(keys))
    except ChatftError as err:
        return "refused", err.id
    return "loads on", plan.base


@pytest.mark.parametrize("adapter, base, expected", [
    ("adapter", None, ("loads on", "base")),  # the base the manifest records
    ("adapter", "base", ("loads on", "base")),
    ("adapter", "copy", ("loads on", "copy")),  # a copy of the recorded base is the same model
    ("adapter", "other", ("refused", "base_model_mismatch")),
    ("bare", None, ("loads on", "base")),  # the base adapter_config.json names
    ("bare", "copy", ("loads on", "copy")),
    ("bare", "other", ("refused", "base_model_mismatch")),  # compared with the base adapter_config.json names
    ("nameless", None, ("refused", "config_invalid")),  # no base named anywhere
    ("nameless", "other", ("loads on", "other")),  # nothing to compare with
    ("adapter", "empty", ("refused", "config_invalid")),  # a configured dir without weight files
])
def test_eval_and_merge_take_the_same_decision(models, tmp_path, adapter, base, expected):
    if base == "empty":
        models["empty"].mkdir()
        (models["empty"] / "config.json").write_text("{}")
    base_path = models[base] if base is not None else None
    verdict, what = expected
    want = (verdict, str(models[what].resolve()) if verdict == "loads on" else what)
    assert eval_decision(models[adapter], base_path) == want
    assert merge_decision(models[adapter], base_path, tmp_path / "merged") == want


def test_a_recorded_base_changed_in_place_is_refused_by_both(models, tmp_path):
    shutil.rmtree(models["base"])
    fake_model(models["base"], "retrained weights")
    assert eval_decision(models["adapter"], None) == ("refused", "base_model_mismatch")
    assert merge_decision(models["adapter"], None, tmp_path / "merged") == ("refused", "base_model_mismatch")
    with pytest.raises(ChatftError) as err:
        resolve_adapter_base(models["adapter"], "base")
    assert "has changed since" in err.value.message and "set base to" in err.value.hint


def test_messages_name_the_step_key_and_both_bases(models):
    with pytest.raises(ChatftError) as err:
        resolve_adapter_base(models["adapter"], "base_hf_path", str(models["other"]))
    assert f"base_hf_path={models['other']}" in err.value.message
    assert str(models["base"].resolve()) in err.value.message and str(models["adapter"]) in err.value.message
    with pytest.raises(ChatftError) as err:
        resolve_adapter_base(models["bare"], "base", str(models["other"]))
    assert "adapter_config.json" in err.value.message and err.value.hint.startswith("omit base")


def test_what_was_not_verified_is_said_by_both(models, tmp_path):
    base = resolve_adapter_base(models["adapter"], "base")
    assert base.source == "manifest" and base.unverified is None
    assert base.fingerprint == base.recorded_fingerprint == artifacts.weights_fingerprint(models["base"])
    # No manifest: the base is used, with a note in eval's results and a warning from merge.
    assert resolve_targets(validate_config("eval", {"targets": ["adapter"], "adapter": str(models["bare"]),
                                                    "dataset": {"path_or_dataset_id": "d"}}, "test")
                           )[0].adapter_base.unverified == NO_FINGERPRINT_NOTE
    plan = plan_merge(MergeConfig.model_validate({"lora_checkpoint": str(models["bare"]),
                                                  "output_hf_path": str(tmp_path / "merged")}))
    assert any(w.startswith(NO_FINGERPRINT_NOTE) for w in plan.warnings)


def test_a_recorded_base_not_here_yet_is_checked_after_loading_by_eval_and_refused_by_merge(tmp_path):
    """The one difference: merge checks before anything is downloaded, eval once loading has fetched it."""
    adapter = fake_adapter(tmp_path / "adapter", "someone/not-downloaded-model", manifest=False)
    manifest = {"kind": "lora", "base_model": {"name_or_path": "someone/not-downloaded-model",
                                               "fingerprint": "f" * 64}}
    artifacts.write_manifest(adapter, manifest)
    base = resolve_adapter_base(adapter, "base")
    assert base.name_or_path == "someone/not-downloaded-model" and base.fingerprint is None
    assert base.unverified == "base not verified: the weights of someone/not-downloaded-model are not local"
    assert merge_decision(adapter, None, tmp_path / "merged") == ("refused", "config_invalid")


# --------------------------------------------------------------------------- output paths


def test_an_output_inside_an_input_is_refused_by_both(models, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")
    cfg = validate_config("eval", {"targets": ["adapter"], "adapter": str(models["adapter"]),
                                   "dataset": {"path_or_dataset_id": str(rows)}}, "test")
    for output in (models["adapter"], models["adapter"] / "results", models["base"] / "results"):
        with pytest.raises(ChatftError) as err:
            checked_targets(cfg, output)
        assert err.value.id == "output_path_overlaps_inputs" and str(output) in err.value.message
        assert merge_decision(models["adapter"], None, output) == ("refused", "output_path_overlaps_inputs")
    # An output that holds an input: eval only adds two files, merge would replace the whole dir.
    assert checked_targets(cfg, tmp_path)[0].adapter_dir == models["adapter"].resolve()
    assert merge_decision(models["adapter"], None, tmp_path) == ("refused", "output_path_overlaps_inputs")


def test_check_output_path_relations(tmp_path):
    inputs = [("the model dir", tmp_path / "model"), ("nothing", None)]
    hint = "pick another"
    assert check_output_path("out", tmp_path / "elsewhere", inputs, hint) == (tmp_path / "elsewhere").resolve()
    for output, relation in ((tmp_path / "model", "is"), (tmp_path / "model" / "x", "sits inside"),
                             (tmp_path, "contains")):
        with pytest.raises(ChatftError) as err:
            check_output_path("out", output, inputs, hint)
        assert err.value.message == f"out={output} {relation} the model dir" and err.value.hint == hint
    assert check_output_path("out", tmp_path, inputs, hint, may_contain_inputs=True) == tmp_path.resolve()
    (tmp_path / "job.yaml").write_text("step: x\n")
    (tmp_path / "notes.txt").write_text("")
    assert held_entries(tmp_path) == ["notes.txt"] and held_entries(tmp_path / "missing") == []
