"""`prepare` end to end: real data, every input kind, the split, the report and the row accounting."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from chatft.config.schema import DataPrepConfig
from chatft.data.prep import REPORT_FILE, prepare, quantiles, summary, validation_count
from chatft.errors import ChatftError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    """A real data file beside the checkout (see ../shared/data/SOURCE.md)."""
    path = SHARED_DATA / name
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} is not here")
    return path


def run(tmp_path: Path, input, **settings):
    settings.setdefault("output", str(tmp_path / "out" / "train.jsonl"))
    return prepare(DataPrepConfig(input=str(input), **settings))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_real_sharegpt_file_with_a_validation_split(tmp_path):
    result = run(tmp_path, shared("dummy_conversation.json"), val_fraction=0.1)
    assert (result.format, result.format_detected, result.source_kind) == ("sharegpt", True, "json")
    assert (result.rows_in, result.rows_out, result.dropped) == (500, 500, {})
    assert (result.train_rows, result.validation_rows) == (450, 50)
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    validation = read_jsonl(tmp_path / "out" / "train.val.jsonl")
    assert (len(train), len(validation)) == (450, 50)
    for row in train + validation:
        assert set(row) == {"messages"}
        assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "assistant"
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["rows_in"] == 500 and report["rows_out"] == 500 and report["format"] == "sharegpt"
    assert report["outputs"]["validation"] == str((tmp_path / "out" / "train.val.jsonl").resolve())
    assert report["turns"]["max"] == 6 and report["turns"]["p50"] <= report["turns"]["p90"] <= report["turns"]["p99"]
    assert set(report["characters"]) == {"p50", "p90", "p99", "max"}
    assert report["elapsed_s"] >= 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [REPORT_FILE, "train.jsonl", "train.val.jsonl"]


def test_real_alpaca_file(tmp_path):
    result = run(tmp_path, shared("alpaca_en_demo.json"))
    assert (result.format, result.rows_in, result.rows_out, result.validation_rows) == ("alpaca", 999, 999, 0)
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    source = json.loads(shared("alpaca_en_demo.json").read_text())
    with_input = next(i for i, row in enumerate(source) if row["input"])
    expected = source[with_input]["instruction"] + "\n\n" + source[with_input]["input"]
    assert rows[with_input]["messages"][0]["content"] == expected
    assert rows[0]["messages"] == [{"role": "user", "content": source[0]["instruction"]},
                                   {"role": "assistant", "content": source[0]["output"]}]
    assert not (tmp_path / "out" / "train.val.jsonl").exists()


@pytest.mark.parametrize(("fixture", "fmt", "rows_out", "changed"), [
    # tool calls come out with ids paired to their results, object arguments and OpenAI-form tools
    ("messages_tools.jsonl", "messages", 4, {"trailing_turns_trimmed": 1, "tool_arguments_decoded": 1,
                                             "tool_call_ids_added": 1}),
    ("sharegpt_roles.json", "sharegpt", 3, {"tool_arguments_decoded": 1, "tool_call_ids_added": 2,
                                            "tools_normalised": 1}),
    ("alpaca_history.jsonl", "alpaca", 2, {}),
    ("prompt_completion.jsonl", "prompt_completion", 4, {}),
    ("hh.jsonl", "hh", 3, {"consecutive_user_merged": 1}),
])
def test_each_fixture_format_is_detected_and_written(tmp_path, fixture, fmt, rows_out, changed):
    result = run(tmp_path, FIXTURES / fixture)
    assert (result.format, result.rows_out, result.changed) == (fmt, rows_out, changed)
    assert result.rows_in == result.rows_out + sum(result.dropped.values())
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == rows_out


def test_tools_are_written_beside_messages(tmp_path):
    run(tmp_path, FIXTURES / "messages_tools.jsonl")
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert rows[0]["tools"][0]["function"]["name"] == "get_weather"
    assert rows[1]["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert "tools" not in rows[2]
    assert "18 °C" in (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")  # UTF-8, not \u escapes


def test_gzip_parquet_and_dataset_folder_inputs(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    source = FIXTURES / "prompt_completion.jsonl"
    expected = read_jsonl(run(tmp_path, source).outputs["train"])

    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress(source.read_bytes()))
    assert read_jsonl(run(tmp_path, gz).outputs["train"]) == expected

    table = pa.Table.from_pylist([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)])
    pq.write_table(table, tmp_path / "rows.parquet")
    result = run(tmp_path, tmp_path / "rows.parquet", limit=25)
    assert (result.source_kind, result.format, result.rows_in) == ("parquet", "prompt_completion", 25)

    folder = tmp_path / "dataset"
    folder.mkdir()
    lines = (FIXTURES / "messages_tools.jsonl").read_text(encoding="utf-8").splitlines()
    # load_dataset's JSON reader fails on blank lines (chatft's own reader skips them)
    (folder / "train.jsonl").write_text("".join(line + "\n" for line in lines if line.strip()), encoding="utf-8")
    result = run(tmp_path, folder, split="train[:2]")
    assert (result.source_kind, result.split, result.rows_in, result.rows_out) == ("dataset_dir", "train[:2]", 2, 2)
    # load_dataset turned the rows into Arrow and back: the tool call survives in OpenAI form
    rows = read_jsonl(result.outputs["train"])
    assert rows[0]["messages"][2]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_the_split_is_deterministic_disjoint_and_complete(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(200)))

    def split(seed: int, name: str) -> tuple[list[str], list[str]]:
        out = tmp_path / name / "train.jsonl"
        run(tmp_path, source, output=str(out), val_fraction=0.25, seed=seed)
        prompts = lambda path: [row["messages"][0]["content"] for row in read_jsonl(path)]  # noqa: E731
        return prompts(out), prompts(out.with_name("train.val.jsonl"))

    train, validation = split(7, "a")
    assert (len(train), len(validation)) == (150, 50)
    assert not set(train) & set(validation)
    assert sorted(train + validation, key=lambda p: int(p[1:])) == [f"q{i}" for i in range(200)]
    assert train == sorted(train, key=lambda p: int(p[1:]))  # each file keeps the source order
    assert split(7, "b") == (train, validation)
    assert split(8, "c")[1] != validation


def test_split_sizes_never_leave_a_side_empty(tmp_path):
    assert [validation_count(n, 0.01) for n in (0, 1, 2, 10, 1000)] == [0, 0, 1, 1, 10]
    assert [validation_count(n, 0.99) for n in (2, 3, 100)] == [1, 2, 99]
    assert validation_count(100, 0.0) == 0
    source = tmp_path / "two.jsonl"
    source.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    result = run(tmp_path, source, val_fraction=0.01, validation_output=str(tmp_path / "held" / "val.jsonl"))
    assert (result.train_rows, result.validation_rows) == (1, 1)
    assert len(read_jsonl(tmp_path / "held" / "val.jsonl")) == 1


def test_rows_in_always_equals_rows_out_plus_drops(tmp_path):
    lines = []
    for i in range(60):
        kind = i % 6
        if kind == 0:
            lines.append("{broken")
        elif kind == 1:
            lines.append(json.dumps([i]))
        elif kind == 2:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"u{i}"}]}))
        elif kind == 3:
            lines.append("")  # a blank line is not a row
        else:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"u{i}"},
                                                  {"role": "assistant", "content": f"a{i}"}]}))
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = run(tmp_path, source, val_fraction=0.2)
    assert result.rows_in == 50 and result.rows_out == 20
    assert result.dropped == {"invalid_json": 10, "no_assistant": 10, "not_an_object": 10}
    assert result.dropped_first_rows["invalid_json"] == [1, 7, 13, 19, 25]  # JSONL line numbers, first five
    assert result.rows_in == result.rows_out + sum(result.dropped.values())
    assert result.train_rows + result.validation_rows == result.rows_out
    text = summary(result)
    assert "50 rows in, 20 out" in text and "invalid_json" in text and "first at line 1, 7, 13" in text


def test_an_uncounted_drop_is_caught_by_the_accounting_check(tmp_path, monkeypatch):
    from chatft.data import prep

    monkeypatch.setattr(prep.Tally, "add", lambda self, reason, row: None)  # a drop that goes uncounted
    with pytest.raises(AssertionError, match="row accounting is off"):
        run(tmp_path, FIXTURES / "sharegpt_roles.json")


def test_lone_surrogates_are_kept_as_escapes(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text('{"prompt": "odd \\ud800 char", "completion": "ok é"}\n', encoding="utf-8")
    result = run(tmp_path, source)
    text = Path(result.outputs["train"]).read_text(encoding="utf-8")
    assert "\\ud800" in text and json.loads(text)["messages"][0]["content"] == "odd \ud800 char"


def test_limit_and_an_existing_output_is_replaced_whole(tmp_path):
    out = tmp_path / "out" / "train.jsonl"
    out.parent.mkdir()
    out.write_text("old content\n")
    result = run(tmp_path, FIXTURES / "prompt_completion.jsonl", limit=2)
    assert result.rows_in == 2 and len(read_jsonl(out)) == 2
    # A failed run leaves the previous output as it was.
    with pytest.raises(ChatftError):
        run(tmp_path, FIXTURES / "sharegpt_roles.json", strict=True)
    assert len(read_jsonl(out)) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == [REPORT_FILE, "train.jsonl"]


def test_ambiguous_detection_names_source_row_numbers(tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_text('not json\n{"prompt": "p", "completion": "c"}\n{"instruction": "i", "output": "o"}\n')
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, source)
    assert caught.value.id == "config_invalid"
    assert "prompt_completion (rows 2)" in caught.value.message and "alpaca (rows 3)" in caught.value.message


def test_nothing_usable_is_an_error_not_an_empty_file(tmp_path):
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, FIXTURES / "alpaca_history.jsonl", format="sharegpt")
    assert caught.value.id == "messages_missing" and "missing_fields 2" in caught.value.message
    source = tmp_path / "bad.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, source)
    assert caught.value.id == "bad_row" and "no_assistant 1 (first at line 1)" in caught.value.message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, empty, format="messages")
    assert caught.value.id == "messages_missing"
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_outputs_may_not_overwrite_the_input(tmp_path):
    source = tmp_path / "rows.jsonl"
    shutil.copy(FIXTURES / "prompt_completion.jsonl", source)
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, source, output=str(source))
    assert caught.value.id == "output_path_overlaps_inputs"
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, tmp_path, output=str(tmp_path / "train.jsonl"))
    assert caught.value.id == "output_path_overlaps_inputs"
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, source, val_fraction=0.5, validation_output=str(tmp_path / "out" / "train.jsonl"))
    assert caught.value.id == "config_invalid"


def test_quantiles_are_nearest_rank():
    assert quantiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert quantiles([5]) == {"p50": 5, "p90": 5, "p99": 5, "max": 5}
    assert quantiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}


def test_a_second_prep_into_the_same_folder_keeps_the_first_report(tmp_path, capsys):
    from chatft.data.prep import run_step

    out = tmp_path / "out"
    first = run(tmp_path, FIXTURES / "prompt_completion.jsonl", output=str(out / "train.jsonl"))
    assert first.outputs["report"] == str(out / REPORT_FILE)
    second = run(tmp_path, FIXTURES / "hh.jsonl", output=str(out / "extra.jsonl"))
    assert second.outputs["report"] == str(out / "extra.prep_report.json")
    reports = {p.name: json.loads(p.read_text()) for p in out.glob("*prep_report.json")}
    assert reports[REPORT_FILE]["outputs"]["train"] == str(out / "train.jsonl")
    assert reports["extra.prep_report.json"]["outputs"]["train"] == str(out / "extra.jsonl")
    assert any("extra.prep_report.json" in w and REPORT_FILE in w for w in second.warnings)
    again = run(tmp_path, FIXTURES / "prompt_completion.jsonl", output=str(out / "train.jsonl"), limit=1)
    assert again.outputs["report"] == str(out / REPORT_FILE)  # the same output again: its own report, replaced
    assert json.loads((out / REPORT_FILE).read_text())["rows_in"] == 1

    class Compiled:  # what `chatft prep` hands run_step
        validated = DataPrepConfig(input=str(FIXTURES / "hh.jsonl"), output=str(out / "extra.jsonl"))

    run_step(Compiled())
    printed = capsys.readouterr()
    assert f"report:      {out / 'extra.prep_report.json'}" in printed.out
    assert "extra.prep_report.json" in printed.err


def test_unfilled_template_placeholders_are_reported_not_dropped(tmp_path):
    rows = [{"prompt": "Hi {{ name }}!", "completion": "Hello."}, {"prompt": "plain", "completion": "row"},
            {"prompt": "Write {{product}} copy", "completion": "Buy {{ product }}"},
            {"prompt": "set {x} and {{ 1 + 1 }}", "completion": "not placeholders"}]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run(tmp_path, source)
    assert result.rows_out == 4 and result.dropped == {}
    assert result.flagged == {"template_placeholder": 2}
    assert result.flagged_first_rows == {"template_placeholder": [1, 3]}
    assert any("2 rows contain an unfilled template placeholder such as {{ name }} (first at line 1, 3)" in w
               for w in result.warnings)
    assert "flagged 2:" in summary(result) and "template_placeholder" in summary(result)


def test_a_latin1_file_is_named_as_not_utf8_with_the_iconv_fix(tmp_path):
    source = tmp_path / "latin1.jsonl"
    source.write_bytes('{"prompt": "a", "completion": "b"}\n{"prompt": "café", "completion": "oui"}\n'
                       .encode("latin-1"))
    result = run(tmp_path, source)
    assert result.dropped == {"not_utf8": 1} and result.dropped_first_rows == {"not_utf8": [2]}
    warning = next(w for w in result.warnings if "not UTF-8" in w)
    assert "line 2" in warning and "iconv -f latin1 -t utf-8" in warning and str(source) in warning
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, source, strict=True)
    assert caught.value.id == "bad_row" and "not_utf8: byte 0xe9 at column 16 (file offset 50)" in caught.value.message
    assert "iconv" in caught.value.hint
    only_latin1 = tmp_path / "only.jsonl"
    only_latin1.write_bytes('{"prompt": "café", "completion": "oui"}\n'.encode("latin-1"))
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, only_latin1, format="prompt_completion")
    assert "not_utf8 1" in caught.value.message and "iconv" in caught.value.hint


def test_an_output_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "somefile.txt").write_text("x")
    with pytest.raises(ChatftError) as caught:
        run(tmp_path, FIXTURES / "prompt_completion.jsonl", output=str(tmp_path / "somefile.txt" / "out.jsonl"))
    assert caught.value.id == "config_invalid"
    assert f"{tmp_path / 'somefile.txt'} is a file" in caught.value.message
