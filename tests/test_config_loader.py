"""YAML inheritance, command-line overrides and interpolation (chatft.config.loader)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatft.config.loader import (
    deep_merge,
    load_with_defaults,
    parse_overrides,
    resolve_interpolations,
)
from chatft.errors import ChatftError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_child_overrides_one_key_and_keeps_the_others(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  name: a\n  dtype: float32\noptimizer:\n  lr: 0.1\n")
    child = write(tmp_path / "child.yaml", "defaults: base.yaml\nmodel:\n  dtype: bfloat16\n")
    merged, files = load_with_defaults(child)
    assert merged == {"model": {"name": "a", "dtype": "bfloat16"}, "optimizer": {"lr": 0.1}}
    assert "defaults" not in merged
    assert files == [(tmp_path / "base.yaml").resolve(), child.resolve()]


def test_defaults_list_later_entries_win_and_paths_are_relative_to_the_child(tmp_path):
    write(tmp_path / "shared/a.yaml", "x: 1\ny: 1\n")
    write(tmp_path / "shared/b.yaml", "y: 2\nz: 2\n")
    child = write(tmp_path / "configs/run.yaml", "defaults: [../shared/a.yaml, ../shared/b]\nz: 3\n")
    merged, files = load_with_defaults(child)
    assert merged == {"x": 1, "y": 2, "z": 3}
    assert len(files) == 3


def test_self_entry_places_the_file_before_its_bases(tmp_path):
    write(tmp_path / "base.yaml", "x: base\n")
    child = write(tmp_path / "child.yaml", "defaults: [_self_, base.yaml]\nx: child\n")
    assert load_with_defaults(child)[0] == {"x": "base"}


def test_multi_level_inheritance(tmp_path):
    write(tmp_path / "a.yaml", "s:\n  a: 1\n  b: 1\n  c: 1\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\ns:\n  b: 2\n")
    child = write(tmp_path / "c.yaml", "defaults: b.yaml\ns:\n  c: 3\n")
    assert load_with_defaults(child)[0] == {"s": {"a": 1, "b": 2, "c": 3}}


def test_a_scalar_may_replace_a_mapping_and_back():
    assert deep_merge({"peft": {"dim": 8}}, {"peft": "lora"}) == {"peft": "lora"}
    assert deep_merge({"peft": "lora"}, {"peft": {"dim": 8}}) == {"peft": {"dim": 8}}
    assert deep_merge({"peft": {"dim": 8}}, {"peft": None}) == {"peft": None}


def test_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    write(tmp_path / "b.yaml", "defaults: c.yaml\n")
    write(tmp_path / "c.yaml", "defaults: a.yaml\n")
    with pytest.raises(ChatftError) as err:
        load_with_defaults(tmp_path / "a.yaml")
    assert err.value.id == "config_invalid"
    chain = err.value.message
    assert "loops" in chain
    assert chain.index("a.yaml") < chain.index("b.yaml") < chain.index("c.yaml")
    assert chain.count("a.yaml") == 2


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "child.yaml", "defaults: nowhere.yaml\n")
    with pytest.raises(ChatftError) as err:
        load_with_defaults(child)
    assert str(child.resolve()) in err.value.message
    assert str((tmp_path / "nowhere.yaml").resolve()) in err.value.message


def test_invalid_yaml_and_non_mapping_files_are_config_errors(tmp_path):
    with pytest.raises(ChatftError, match="not valid YAML"):
        load_with_defaults(write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(ChatftError, match="not a mapping"):
        load_with_defaults(write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(ChatftError, match="defaults"):
        load_with_defaults(write(tmp_path / "d.yaml", "defaults: {a: 1}\n"))


def test_yaml_numbers_are_typed(tmp_path):
    merged, _ = load_with_defaults(write(tmp_path / "n.yaml", "eps: 1e-8\nlr: 1.0e-5\nsteps: 10\n"))
    assert merged == {"eps": 1e-8, "lr": 1e-5, "steps": 10}


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("peft=null", {"peft": None}),
        ("peft=lora", {"peft": "lora"}),
        ("a.b.c=3", {"a": {"b": {"c": 3}}}),
        ("lr=1e-4", {"lr": 1e-4}),
        ("flag=true", {"flag": True}),
        ("t=[q_proj,v_proj]", {"t": ["q_proj", "v_proj"]}),
        ("s='007'", {"s": "007"}),
        ("path=/data/x.jsonl", {"path": "/data/x.jsonl"}),
    ],
)
def test_overrides_are_yaml_typed(item, expected):
    assert parse_overrides([item]) == expected


def test_overrides_merge_into_each_other():
    assert parse_overrides(["a.x=1", "a.y=2", "a.x=3"]) == {"a": {"x": 3, "y": 2}}


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1"])
def test_malformed_overrides_are_refused(item):
    with pytest.raises(ChatftError) as err:
        parse_overrides([item])
    assert err.value.id == "config_invalid"


def test_env_interpolation_with_and_without_default(monkeypatch):
    monkeypatch.setenv("CHATFT_TEST_DIR", "/mnt/runs")
    monkeypatch.delenv("CHATFT_TEST_UNSET", raising=False)
    cfg = {
        "a": "${oc.env:CHATFT_TEST_DIR,unused}/x",
        "b": "${oc.env:CHATFT_TEST_UNSET,fallback}",
        "c": "${oc.env:CHATFT_TEST_UNSET,null}",
    }
    assert resolve_interpolations(cfg) == {"a": "/mnt/runs/x", "b": "fallback", "c": None}


def test_missing_env_without_default_is_a_config_error(monkeypatch):
    monkeypatch.delenv("CHATFT_TEST_UNSET", raising=False)
    with pytest.raises(ChatftError) as err:
        resolve_interpolations({"a": {"b": "${oc.env:CHATFT_TEST_UNSET}"}})
    assert err.value.id == "config_invalid"
    assert "a.b" in err.value.message


def test_select_and_plain_references():
    cfg = {"dataset": {"seq_length": 512}, "val": {"n": "${oc.select:dataset.seq_length,64}",
                                                  "m": "${oc.select:missing.key,64}", "k": "${dataset.seq_length}"}}
    assert resolve_interpolations(cfg)["val"] == {"n": 512, "m": 64, "k": 512}


def test_invalid_yaml_prints_the_position_and_the_offending_line(tmp_path):
    with pytest.raises(ChatftError) as caught:
        load_with_defaults(write(tmp_path / "bad.yaml", "model:\n  name: x\n   bad: 1\noptimizer:\n  lr: 1\n"))
    message = caught.value.message
    assert "line 3, column 7: mapping values are not allowed" in message
    assert "\n     3 |    bad: 1\n       |       ^" in message
    assert "line 3, column 7" in caught.value.hint
    with pytest.raises(ChatftError) as caught:  # the problem is found later than where it starts: show both lines
        load_with_defaults(write(tmp_path / "flow.yaml", "model:\n  dtype: [a, b\nstep_scheduler:\n  max_steps: 3\n"))
    message = caught.value.message
    assert "did not find expected ',' or ']'" in message and "while parsing a flow sequence" in message
    assert "     2 |   dtype: [a, b\n" in message and "     3 | step_scheduler:\n" in message
    with pytest.raises(ChatftError) as caught:
        load_with_defaults(write(tmp_path / "tab.yaml", "model:\n\tname: x\n"))
    assert "tab" in caught.value.hint
