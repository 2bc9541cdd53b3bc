"""`chatft prep` and `chatft run data_prep/chat_jsonl`, run as a subprocess exactly as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clirun import assert_error_block as error_block
from clirun import run_chatft as chatft

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_prep_converts_splits_and_reports(tmp_path):
    source = SHARED_DATA / "dummy_conversation.json"
    if not source.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{source} is missing in CI")
        pytest.skip(f"{source} is not here")
    result = chatft("prep", str(source), "-o", "data/train.jsonl", "--val-fraction", "0.1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "500 rows in, 500 out" in result.stdout and "sharegpt, detected" in result.stdout
    assert "train.val.jsonl (50 rows)" in result.stdout and "prep_report.json" in result.stdout
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == ["job.yaml", "prep_report.json", "train.jsonl", "train.val.jsonl"]
    assert len((data / "train.jsonl").read_text().splitlines()) == 450
    assert json.loads((data / "prep_report.json").read_text())["validation_rows"] == 50


def test_run_step_with_overrides_counts_drops(tmp_path):
    result = chatft("run", "data_prep/chat_jsonl", f"input={FIXTURES / 'sharegpt_roles.json'}", "output=out/chat.jsonl",
                    "format=sharegpt", "consecutive_user=drop", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 rows in, 3 out" in result.stdout and "unknown_role" in result.stdout and "first at row 4" in result.stdout
    report = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert report["dropped"] == {"unknown_role": 1} and report["dropped_first_rows"] == {"unknown_role": [4]}


def test_failures_are_one_error_block(tmp_path):
    stderr = error_block(chatft("prep", "missing.jsonl", "-o", "out/train.jsonl", cwd=tmp_path), "dataset_not_found")
    assert "missing.jsonl" in stderr

    stderr = error_block(chatft("prep", "some-org/not-cached-ds", "--split", "train", "-o", "out/train.jsonl",
                                cwd=tmp_path), "dataset_not_found")
    assert "some-org/not-cached-ds" in stderr and "not cached" in stderr

    (tmp_path / "cut.json").write_text((FIXTURES / "sharegpt_roles.json").read_text()[:300])
    stderr = error_block(chatft("prep", "cut.json", "-o", "out/train.jsonl", cwd=tmp_path), "bad_row")
    assert "cut.json is not valid JSON" in stderr and "line " in stderr


def test_strict_names_the_bad_row(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 7}\n')
    stderr = error_block(chatft("prep", "rows.jsonl", "-o", "out/train.jsonl", "--strict", cwd=tmp_path), "bad_row")
    assert "line 2 of rows.jsonl: non_string_content" in stderr and '"completion": 7' in stderr
    assert not (tmp_path / "out" / "train.jsonl").exists()
