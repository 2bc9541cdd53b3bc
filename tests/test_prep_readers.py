"""Data prep's readers: what each kind of input yields, and the one clear error each broken input gives."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from chatft.data.readers import open_source
from chatft.errors import ChatftError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def refused(error_id: str, input: str, **kwargs) -> str:
    """Open `input`, read its rows, and return the rendered ChatftError (message and hint) it must raise."""
    with pytest.raises(ChatftError) as caught:
        list(open_source(input, **kwargs).rows)
    assert caught.value.id == error_id, caught.value.render()
    assert caught.value.hint
    return caught.value.render()


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep `load_dataset`'s Arrow cache inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_jsonl_keeps_line_numbers_skips_blank_lines_and_flags_invalid_json(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"a": 1}\n\n   \nnot json {\n[1, 2]\n{"b": "é"}\n')
    source = open_source(str(path))
    assert (source.kind, source.compressed, source.row_label) == ("jsonl", False, "line")
    rows = list(source.rows)
    assert [row.number for row in rows] == [1, 4, 5, 6]
    assert rows[0].value == {"a": 1} and rows[0].problem is None
    assert rows[1].value is None and rows[1].problem == "invalid_json" and rows[1].snippet == "not json {"
    assert rows[2].value == [1, 2]  # not an object, but that is for the formats to judge
    assert rows[3].value == {"b": "é"}


def test_jsonl_with_a_byte_order_mark_and_invalid_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"b": "\xff"}\n')
    rows = list(open_source(str(path)).rows)
    assert rows[0].value == {"a": 1}
    assert rows[1].problem == "not_utf8"  # not reported as a JSON error: the JSON is fine, the encoding is not
    assert rows[1].detail == "byte 0xff at column 8 (file offset 19) is not UTF-8"


def test_a_latin1_file_names_the_line_and_byte_of_each_undecodable_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"a": "plain"}\n{"a": "café"}\n{"a": "naïve"}\n'.encode("latin-1"))
    rows = list(open_source(str(path)).rows)
    assert [(row.number, row.problem) for row in rows] == [(1, None), (2, "not_utf8"), (3, "not_utf8")]
    assert rows[1].detail == "byte 0xe9 at column 11 (file offset 25) is not UTF-8"
    assert rows[1].snippet == '{"a": "caf\ufffd"}'


def test_a_json_array_that_is_not_utf8_names_the_byte_and_iconv(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes('[\n{"a": "x"},\n{"a": "café"}\n]\n'.encode("latin-1"))
    message = refused("bad_row", str(path))
    assert "not UTF-8" in message and "line 3" in message and "0xe9" in message and "iconv" in message


def test_limit_reads_only_the_first_rows(tmp_path):
    path = write(tmp_path / "rows.jsonl", "".join(json.dumps({"i": i}) + "\n" for i in range(100)))
    assert [row.value["i"] for row in open_source(str(path), limit=3).rows] == [0, 1, 2]


def test_gzip_is_detected_by_magic_bytes_whatever_the_name(tmp_path):
    lines = '{"a": 1}\n{"a": 2}\n'
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "misnamed.jsonl").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "array.bin").write_bytes(gzip.compress(b'[{"a": 1}, {"a": 2}, {"a": 3}]'))
    for name, kind, count in (("rows.jsonl.gz", "jsonl", 2), ("misnamed.jsonl", "jsonl", 2), ("array.bin", "json", 3)):
        source = open_source(str(tmp_path / name))
        assert (source.kind, source.compressed) == (kind, True), name
        assert [row.value["a"] for row in source.rows] == list(range(1, count + 1))


def test_truncated_gzip_is_one_error_but_a_limit_before_the_cut_reads_fine(tmp_path):
    text = "".join(json.dumps({"i": i, "pad": "x" * 40}) + "\n" for i in range(4000))
    packed = gzip.compress(text.encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: int(len(packed) * 0.8)])
    assert len(list(open_source(str(path), limit=10).rows)) == 10
    message = refused("bad_row", str(path))
    assert "truncated or corrupt gzip" in message and str(path) in message


def test_json_array_rows_are_numbered_by_position(tmp_path):
    path = write(tmp_path / "rows.json", '  [{"a": 1}, "text", {"a": 3}]')
    source = open_source(str(path))
    assert (source.kind, source.row_label) == ("json", "row")
    assert [(row.number, row.value) for row in source.rows] == [(1, {"a": 1}), (2, "text"), (3, {"a": 3})]


def test_truncated_json_array_is_one_error_naming_the_file_and_position(tmp_path):
    whole = (FIXTURES / "sharegpt_roles.json").read_text()
    path = write(tmp_path / "cut.json", whole[:400])
    message = refused("bad_row", str(path))
    assert str(path) in message and "not valid JSON" in message
    assert "line " in message and "column " in message and "truncated" in message


def test_a_single_json_object_file_is_refused_with_its_keys(tmp_path):
    path = write(tmp_path / "wrapped.json", json.dumps({"version": 1, "data": [{"a": 1}]}, indent=2))
    message = refused("config_invalid", str(path))
    assert "one JSON object" in message and "version, data" in message


def test_parquet_is_read_in_batches_whatever_the_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.json")  # a misleading suffix on purpose
    source = open_source(str(tmp_path / "rows.json"))
    assert source.kind == "parquet"
    read = list(source.rows)
    assert len(read) == 2500 and read[-1].number == 2500 and read[-1].value == rows[-1]
    assert len(list(open_source(str(tmp_path / "rows.json"), limit=5).rows)) == 5


def test_packed_parquet_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2], "loss_mask": [0, 1]}]), tmp_path / "packed.parquet")
    refused("packed_parquet_used_with_automodel", str(tmp_path / "packed.parquet"))


def test_packed_parquet_hint_names_only_a_jsonl_that_can_be_its_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    packed = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2], "loss_mask": [0, 1]}]), packed)
    for unrelated in ("notes.jsonl", "eval_results.jsonl", "other.jsonl"):
        write(tmp_path / unrelated, '{"a": 1}\n')
    hint = refused("packed_parquet_used_with_automodel", str(packed)).split("hint:")[1]
    assert not any(name in hint for name in ("notes.jsonl", "eval_results.jsonl", "other.jsonl"))
    assert "Megatron-Bridge" in hint and "chatft prep" in hint  # how to find or make the chat data
    write(tmp_path / "train.jsonl", '{"messages": []}\n')
    hint = refused("packed_parquet_used_with_automodel", str(packed)).split("hint:")[1]
    assert str(tmp_path / "train.jsonl") in hint and "notes.jsonl" not in hint


def test_broken_parquet_and_binary_files_are_one_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is no parquet")
    assert "not a readable Parquet file" in refused("bad_row", str(tmp_path / "bad.parquet"))
    (tmp_path / "blob.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    assert "not UTF-8 text" in refused("config_invalid", str(tmp_path / "blob.jsonl"))


def test_dataset_folder_goes_through_load_dataset_with_a_split_slice(tmp_path, datasets_cache):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(30)]
    write(folder / "train.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    source = open_source(str(folder), split="train[:10]")
    assert (source.kind, source.split) == ("dataset_dir", "train[:10]")
    assert [row.value for row in source.rows] == rows[:10]
    # No split: the folder's only split is used, and the report will say which.
    whole = open_source(str(folder), limit=4)
    assert whole.split == "train" and [row.number for row in whole.rows] == [1, 2, 3, 4]
    assert "Unknown split" in refused("config_invalid", str(folder), split="validation")


def test_a_dataset_folder_that_load_dataset_cannot_read_is_one_error(tmp_path, datasets_cache):
    folder = tmp_path / "broken"
    folder.mkdir()
    write(folder / "train.jsonl", '{"a": 1}\n{"a": \n')
    message = refused("bad_row", str(folder))
    assert "could not be read as a dataset" in message and "pass its data file itself" in message


def test_missing_paths_and_misplaced_split(tmp_path, datasets_cache):
    message = refused("dataset_not_found", str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in message and "does not exist" in message
    refused("dataset_not_found", "./data/raw")  # looks like a path, so the Hub is not asked
    (tmp_path / "empty").mkdir()
    refused("dataset_not_found", str(tmp_path / "empty"))
    path = write(tmp_path / "rows.jsonl", '{"a": 1}\n')
    assert "limit=N" in refused("config_invalid", str(path), split="train")
