"""`chatft prep` and `chatft run data_prep/chat_jsonl`, run as a subprocess exactly as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHATFT = str(Path(sys.executable).parent / "chatft")
FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def chatft(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # HF_HUB_OFFLINE: no test may wait on the network; a Hub id must fail fast as "not cached".
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cwd / "hf-cache"), **(env or {})}
    return subprocess.run([CHATFT, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120)


def error_block(result: subprocess.CompletedProcess, error_id: str) -> str:
    """Exit status 2, one `error[id]:` block with a hint line, and no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("error[") == 1 and f"error[{error_id}]: " in result.stderr, result.stderr
    assert "\n  hint: " in result.stderr[result.stderr.index("error["):]
    assert "Traceback" not in result.stderr
    return result.stderr


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
