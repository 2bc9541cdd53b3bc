"""What chatft prints, in the three forms the command line offers (`chatft.console`): text with progress lines
when output is not a terminal, `--quiet`, and `--log-format json`; through the real CLI, plus the progress line
cadence on its own."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
from clirun import CHATFT, run_chatft

from chatft import console

ROWS = 240  # above console.PLAIN_MIN_ITEMS: tokenizing them, or validating on them a row a batch, reports progress
FEW = 8  # validation rows where their progress shows whatever the size (a terminal, JSON lines): a faster run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("console")
    rows = [{"messages": [{"role": "user", "content": f"Count to {i % 7}."},
                          {"role": "assistant", "content": " ".join(str(n) for n in range(i % 7 + 1))}]}
            for i in range(ROWS)]
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "few.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:FEW]))
    return directory


def train_args(model: Path, run: str, validation: str) -> list[str]:
    """Two steps, the second followed by a validation on `validation`'s rows (one a batch) while the training bar is
    still up: training's own validation of its last step."""
    return ["run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model}",
            "dataset.path_or_dataset_id=train.jsonl", f"validation_dataset.path_or_dataset_id={validation}",
            f"checkpoint.checkpoint_dir={run}", "step_scheduler.max_steps=2", "step_scheduler.val_every_steps=2",
            "step_scheduler.global_batch_size=4", "step_scheduler.local_batch_size=1"]


def train(work: Path, model: Path, run: str, *flags: str, validation: str = "train.jsonl"):
    return run_chatft(*flags, *train_args(model, run, validation), cwd=work,
                      env={"CHATFT_CACHE_DIR": str(work / f"cache-{run}")})  # each run tokenizes: progress to see


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_text_output_reports_progress_in_plain_lines_when_not_a_terminal(work, tiny_model_dir):
    result = train(work, tiny_model_dir, "text")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tokenizing dataset: {ROWS:,}/{ROWS:,} rows (" in result.stderr
    assert "step 1/2" in result.stdout and "done: 2 steps" in result.stdout
    progress = result.stdout.index(f"validation (step 2): {ROWS:,}/{ROWS:,} batches (")  # its progress, then it
    assert result.stdout.index("step 2/2") < progress < result.stdout.index("validation at step 2: loss")
    assert "\r" not in result.stdout + result.stderr  # lines, not a bar redrawn in place


def test_json_lines_carry_every_event_and_nothing_else(work, tiny_model_dir):
    result = train(work, tiny_model_dir, "json", "--log-format", "json", validation="few.jsonl")
    assert result.returncode == 0, result.stdout + result.stderr
    out, err = json_lines(result.stdout), json_lines(result.stderr)  # every line of both streams is JSON
    steps = [e for e in out if e["event"] == "step"]
    rows = [json.loads(line) for line in (work / "json" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in e.items() if k != "event"} for e in steps] == rows
    assert any(e["event"] == "result" and e["message"].startswith("done: 2 steps") for e in out)
    assert any(e["event"] == "info" and "memory estimate" in e["message"] for e in out)
    tokenizing = [e for e in err if e["event"] == "progress" and e["task"] == "tokenizing dataset"]
    assert any(e["done"] == ROWS == e["total"] for e in tokenizing)
    (validating,) = [e for e in out if e["event"] == "progress" and e["task"].startswith("validation")]
    assert validating["task"] == "validation (step 2)" and validating["unit"] == "batches"
    assert validating["done"] == FEW == validating["total"] and validating["rate"] > 0  # few, and still reported
    assert out.index(validating) < next(i for i, e in enumerate(out) if e["event"] == "validation")


def test_quiet_keeps_results_and_warnings_only(work, tiny_model_dir):
    result = train(work, tiny_model_dir, "quiet", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 2 steps" in result.stdout and "artifact:" in result.stdout
    assert "memory estimate" not in result.stdout and "step 1/2" not in result.stdout
    assert "tokenizing dataset" not in result.stderr and "validation (step" not in result.stdout
    assert "validation at step" not in result.stdout and "validation loss" in result.stdout  # it ran, silently


def run_on_a_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """`chatft ARGS` with stdout on a pseudo-terminal, as a person sees it; its exit status and what it drew there,
    escape sequences removed."""
    leader, follower = pty.openpty()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160", "LINES": "40", "TERM": "xterm", **env}
    process = subprocess.Popen([CHATFT, *args], cwd=cwd, env=environment, stdout=follower,
                               stderr=subprocess.DEVNULL)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process is gone and the terminal with it
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    status = process.wait(timeout=60)
    return status, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.decode(errors="replace"))


def test_on_a_terminal_validation_draws_its_bar_in_place_of_the_training_bar(work, tiny_model_dir):
    status, drawn = run_on_a_terminal(train_args(tiny_model_dir, "terminal", "few.jsonl"), work,
                                      {"CHATFT_CACHE_DIR": str(work / "cache-terminal")})
    assert status == 0, drawn
    assert "Traceback" not in drawn and "LiveError" not in drawn
    training, validation = drawn.index("step 2/2"), drawn.index(f"validation (step 2) {FEW}/{FEW}")
    assert training < validation < drawn.index("validation at step 2: loss")
    assert re.search(r"step 2/2.*validation \(step 2\) \d+/8.*step 2/2", drawn, re.S)  # the training bar came back
    assert "done: 2 steps" in drawn


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
    slow = io.StringIO()
    with console.Progress("validation", 4, "batches", stream=slow) as progress:
        for _ in range(4):  # few batches, 0.6 s each: lines once the work has run a second
            clock[0] += 0.6
            progress.advance()
    assert slow.getvalue().splitlines() == ["validation: 2/4 batches (2/s, eta 0:00:01)",
                                            "validation: 4/4 batches (2/s)"]


def test_json_lines_report_the_end_of_any_work_unless_it_is_not_shown(monkeypatch):
    monkeypatch.setenv(console.FORMAT_ENV, "json")
    monkeypatch.setenv(console.QUIET_ENV, "0")
    stream = io.StringIO()
    with console.Progress("merge check", 3, stream=stream) as progress:
        assert list(progress.each("abc")) == ["a", "b", "c"]
    (event,) = json_lines(stream.getvalue())  # too small for a plain line, still one event for scripts
    assert {k: event[k] for k in ("event", "task", "done", "total", "unit")} == {
        "event": "progress", "task": "merge check", "done": 3, "total": 3, "unit": "rows"}
    hidden = io.StringIO()
    with console.Progress("merge check", 3, stream=hidden, show=False) as progress:
        progress.advance(3)
    assert hidden.getvalue() == ""
