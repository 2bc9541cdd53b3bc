"""What chatft prints, in the three forms the command line offers (`chatft.console`): text with progress lines
when output is not a terminal, `--quiet`, and `--log-format json`; through the real CLI, plus the progress line
cadence on its own."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from clirun import run_chatft

from chatft import console

ROWS = 240  # above console.PLAIN_MIN_ITEMS: tokenizing them reports progress


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("console")
    rows = [{"messages": [{"role": "user", "content": f"Count to {i % 7}."},
                          {"role": "assistant", "content": " ".join(str(n) for n in range(i % 7 + 1))}]}
            for i in range(ROWS)]
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def train(work: Path, model: Path, run: str, *flags: str):
    return run_chatft(*flags, "run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model}",
                      "dataset.path_or_dataset_id=train.jsonl", f"checkpoint.checkpoint_dir={run}",
                      "step_scheduler.max_steps=2", "step_scheduler.global_batch_size=4",
                      "step_scheduler.local_batch_size=2", cwd=work,
                      env={"CHATFT_CACHE_DIR": str(work / f"cache-{run}")})  # each run tokenizes: progress to see


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_text_output_reports_progress_in_plain_lines_when_not_a_terminal(work, tiny_model_dir):
    result = train(work, tiny_model_dir, "text")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tokenizing dataset: {ROWS:,}/{ROWS:,} rows (" in result.stderr
    assert "step 1/2" in result.stdout and "done: 2 steps" in result.stdout
    assert "\r" not in result.stdout + result.stderr  # lines, not a bar redrawn in place


def test_json_lines_carry_every_event_and_nothing_else(work, tiny_model_dir):
    result = train(work, tiny_model_dir, "json", "--log-format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    out, err = json_lines(result.stdout), json_lines(result.stderr)  # every line of both streams is JSON
    steps = [e for e in out if e["event"] == "step"]
    rows = [json.loads(line) for line in (work / "json" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in e.items() if k != "event"} for e in steps] == rows
    assert any(e["event"] == "result" and e["message"].startswith("done: 2 steps") for e in out)
    assert any(e["event"] == "info" and "memory estimate" in e["message"] for e in out)
    progress = [e for e in err if e["event"] == "progress"]
    assert progress and progress[-1]["task"] == "tokenizing dataset" and progress[-1]["done"] == ROWS == \
        progress[-1]["total"]


def test_quiet_keeps_results_and_warnings_only(work, tiny_model_dir):
    result = train(work, tiny_model_dir, "quiet", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 2 steps" in result.stdout and "artifact:" in result.stdout
    assert "memory estimate" not in result.stdout and "step 1/2" not in result.stdout
    assert "tokenizing dataset" not in result.stderr


def test_an_error_is_one_json_line_on_stderr_with_exit_status_2(tmp_path):
    result = run_chatft("--log-format", "json", "run", "sft/automodel", "-c", "tiny", "optimizer.lrr=1",
                        "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    (error,) = json_lines(result.stderr)
    assert error["event"] == "error" and error["id"] == "config_invalid" and "optimizer.lrr" in error["message"]
    assert error["hint"] and "Traceback" not in result.stderr
    refused = run_chatft("--log-format", "yaml", "steps", "list", cwd=tmp_path)
    assert refused.returncode == 2 and "error[config_invalid]: --log-format yaml" in refused.stderr


def test_plain_progress_lines_come_at_tenths_and_at_most_one_a_second(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv(console.FORMAT_ENV, "text")
    monkeypatch.setenv(console.QUIET_ENV, "0")
    stream = io.StringIO()
    with console.Progress("tokenizing", 1000, stream=stream) as progress:
        for _ in range(100):  # 1,000 rows in 12.5 s: a line at each tenth
            clock[0] += 0.125
            progress.advance(10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[0] == "tokenizing: 100/1,000 rows (80/s, eta 0:00:11)"
    assert lines[-1] == "tokenizing: 1,000/1,000 rows (80/s)"
    often = io.StringIO()
    with console.Progress("tokenizing", 1000, stream=often) as progress:
        for _ in range(100):  # 1,000 rows in 2.5 s: tenths come faster than one a second
            clock[0] += 0.025
            progress.advance(10)
    assert [line.split()[1] for line in often.getvalue().splitlines()] == [  # a second apart, and the last
        "100/1,000", "500/1,000", "900/1,000", "1,000/1,000"]
    fast = io.StringIO()
    with console.Progress("tokenizing", 1000, stream=fast) as progress:
        clock[0] += 0.5
        progress.advance(1000)  # done at once: the one line says so
    assert fast.getvalue().splitlines() == ["tokenizing: 1,000/1,000 rows (2,000/s)"]
    small = io.StringIO()
    with console.Progress("tokenizing", 10, stream=small) as progress:
        progress.advance(10)
    assert small.getvalue() == ""  # too small to report
