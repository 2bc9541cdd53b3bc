"""The step registry: manifests, artifact types, step configs and the consistency between them."""

from __future__ import annotations

import pytest

from chatft.config.compile import compile_config, get_path
from chatft.config.schema import SCHEMAS, known_paths
from chatft.errors import ERROR_IDS, ChatftError
from chatft.steps.registry import (
    all_steps,
    artifact_types,
    filter_steps,
    is_a,
    resolve_step,
)

STEP_IDS = ["convert/merge_lora", "data_prep/chat_jsonl", "eval/model_eval", "peft/automodel", "sft/automodel"]
STEPS = list(all_steps().values())


def test_the_five_steps_are_registered():
    assert list(all_steps()) == STEP_IDS


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.id)
def test_manifest_names_only_known_types_errors_and_keys(step):
    types = artifact_types()
    assert step.consumes and step.produces
    for port in step.consumes + step.produces:
        assert port.type in types, port
        assert port.description
    assert step.category == step.id.split("/")[0]
    assert step.config_schema in SCHEMAS
    paths = known_paths(SCHEMAS[step.config_schema])
    assert step.output_key in paths
    for parameter in step.parameters:
        assert parameter.name in paths, f"{step.id}: parameter {parameter.name} is not a config key"
        assert parameter.description
    assert step.errors and all(error.id in ERROR_IDS and error.recovery for error in step.errors)
    assert step.strategies and all(s.when and s.then for s in step.strategies)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.id)
def test_step_dir_has_both_configs(step):
    assert {"default", "tiny"} <= set(step.config_names())


@pytest.mark.parametrize(
    ("step", "config"), [(s, c) for s in STEPS for c in s.config_names()], ids=lambda v: getattr(v, "id", v)
)
def test_every_shipped_config_compiles(step, config, monkeypatch):
    for var in ("CHATFT_DEMO_MODEL", "CHATFT_RUNS_DIR"):
        monkeypatch.delenv(var, raising=False)
    compiled = compile_config(step, config)
    assert compiled.warnings == []  # chatft's own configs use only keys that apply
    assert compiled.validated.model_dump()


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.id)
def test_manifest_defaults_match_default_yaml(step):
    effective = compile_config(step, "default").effective()
    for parameter in step.parameters:
        if parameter.default is None:
            continue
        assert get_path(effective, parameter.name) == parameter.default, parameter.name
        if parameter.choices:  # a list-valued parameter picks several of its choices
            picked = parameter.default if isinstance(parameter.default, list) else [parameter.default]
            assert set(picked) <= set(parameter.choices)


def test_chatft_configs_never_trust_remote_code():
    for step in STEPS:
        for config in step.config_names():
            effective = compile_config(step, config).effective()
            assert effective.get("model", {}).get("trust_remote_code", False) is False
            assert effective.get("trust_remote_code", False) is False


def test_peft_step_defaults_to_lora_and_sft_to_full():
    assert compile_config(resolve_step("peft/automodel")).validated.peft is not None
    assert compile_config(resolve_step("sft/automodel")).validated.peft is None
    assert compile_config(resolve_step("sft/automodel"), None, ["peft=lora"]).validated.peft.dim == 16


def test_artifact_type_relations_are_consistent():
    types = artifact_types()
    steps = all_steps()
    for name, artifact in types.items():
        for parent in artifact.is_a:
            assert parent in types
        for conversion in artifact.convert_to:
            assert conversion["type"] in types
            via = steps[conversion["via"]]
            assert any(is_a(name, port.type) for port in via.consumes), (name, via.id)
            assert any(port.type == conversion["type"] for port in via.produces), (name, via.id)
    assert types["checkpoint_lora"].convert_to == [{"type": "checkpoint_hf", "via": "convert/merge_lora"}]


def test_is_a_is_reflexive_and_transitive():
    assert is_a("training_jsonl", "training_jsonl")
    assert is_a("training_jsonl", "chat_data")
    assert not is_a("chat_data", "training_jsonl")
    assert not is_a("checkpoint_lora", "checkpoint_hf")


@pytest.mark.parametrize(("query", "step_id"), [("merge_lora", "convert/merge_lora"), ("chat_jsonl", "data_prep/chat_jsonl"),
                                                ("sft/automodel", "sft/automodel")])
def test_resolve_exact_or_by_unambiguous_last_part(query, step_id):
    assert resolve_step(query).id == step_id


def test_ambiguous_last_part_is_refused():
    with pytest.raises(ChatftError) as err:
        resolve_step("automodel")
    assert "ambiguous" in err.value.message and "peft/automodel" in err.value.hint


def test_unknown_step_suggests_at_most_three():
    with pytest.raises(ChatftError) as err:
        resolve_step("merge_lor")
    assert err.value.id == "config_invalid"
    assert "merge_lora" in err.value.hint
    assert err.value.hint.split("?")[0].count(",") <= 2


def test_filters():
    assert [s.id for s in filter_steps(consumes="checkpoint_lora")] == ["convert/merge_lora", "eval/model_eval"]
    assert [s.id for s in filter_steps(produces="checkpoint_lora")] == ["peft/automodel", "sft/automodel"]
    # A training_jsonl is also chat_data, so data prep accepts it too.
    assert "data_prep/chat_jsonl" in [s.id for s in filter_steps(consumes="training_jsonl")]
    assert [s.id for s in filter_steps(category="eval")] == ["eval/model_eval"]
    with pytest.raises(ChatftError, match="unknown artifact type"):
        filter_steps(consumes="checkpoint_loar")


def test_every_registered_step_names_functions_that_exist():
    """step.toml names the function `chatft run` calls (and the preflight, where there is one)."""
    import importlib

    for step in all_steps().values():
        for entry in filter(None, (step.entry_point, step.preflight)):
            module, _, function = entry.partition(":")
            assert callable(getattr(importlib.import_module(module), function)), (step.id, entry)
    assert all_steps()["sft/automodel"].entry_point == "chatft.train.step:run_step"
