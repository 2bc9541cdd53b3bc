"""Per-turn rows through the CLI: `chatft preview` reports the expansion (text and --json) and `chatft run` of the
tiny LoRA config trains on a history-rewriting template (Qwen3's original) and records it in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import assert_error_block, run_chatft
from test_per_turn import NO_REASONING, REASONING, TRL_DIR, original

pytestmark = pytest.mark.skipif(TRL_DIR is None, reason="trl (a test extra) ships the original templates")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("per-turn")
    rows = [{"messages": REASONING}, {"messages": NO_REASONING[:2]}, {"messages": NO_REASONING}]
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (work / "qwen3.jinja").write_text(original("qwen3"))
    return work


def settings(model: Path) -> list[str]:
    return ["-c", "tiny", f"model.pretrained_model_name_or_path={model}", "dataset.path_or_dataset_id=train.jsonl",
            "dataset.chat_template=qwen3.jinja"]


def test_preview_reports_the_expansion(work, tiny_model_dir):
    result = run_chatft("preview", *settings(tiny_model_dir), "--rows", "3", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "rows: 3 in, 7 used" in result.stdout
    assert "row 1, assistant message 2: " in result.stdout and "row 1, assistant message 6: " in result.stdout
    assert "multi-turn: 2 of 3 conversations trained one row per assistant turn (dataset.multi_turn=auto, chosen " \
           "where the chat template rewrites earlier turns, first at row 1): 3 -> 7 rows" in result.stdout
    payload = json.loads(run_chatft("preview", *settings(tiny_model_dir), "--json", "--rows", "4", cwd=work).stdout)
    assert [(row["source_row"], row["message"]) for row in payload["rows"]] == [(1, 2), (1, 4), (1, 6), (2, None)]
    stats = payload["stats"]
    assert stats["multi_turn"] == "auto" and stats["rows_used"] == 7
    expansion = stats["expansion"]
    assert (expansion["rows_before"], expansion["rows_after"], expansion["per_turn_conversations"]) == (3, 7, 2)
    assert expansion["tokens_after"] == stats["total_tokens"] > expansion["tokens_before"]

    refused = run_chatft("preview", *settings(tiny_model_dir), "dataset.multi_turn=as_rendered", cwd=work)
    assert "dataset.multi_turn=per_turn" in assert_error_block(refused, "template_not_prefix_stable")


def test_thinking_off_counts_in_preview_and_refuses_training(work, tiny_model_dir):
    off = "dataset.chat_template_kwargs={enable_thinking: false}"
    result = run_chatft("preview", *settings(tiny_model_dir), off, cwd=work)
    assert result.returncode == 0, result.stderr
    assert "rows: 3 in, 4 used, 3 generation_prompt_mismatch" in result.stdout
    assert "generation_prompt_mismatch: 3 rows, refused by training with error[template_not_prefix_stable] " \
           "(first: row 1: " in result.stdout
    stderr = assert_error_block(run_chatft("run", "peft/automodel", *settings(tiny_model_dir), off,
                                           "checkpoint.checkpoint_dir=run-off", cwd=work), "template_not_prefix_stable")
    assert "enable_thinking" in stderr.split("hint:")[1]


def test_a_lora_run_trains_per_turn_rows_and_records_the_expansion(work, tiny_model_dir):
    result = run_chatft("run", "peft/automodel", *settings(tiny_model_dir), "checkpoint.checkpoint_dir=run",
                        "step_scheduler.global_batch_size=2", "step_scheduler.local_batch_size=2",
                        "step_scheduler.max_steps=2", "lr_scheduler.lr_warmup_steps=0", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "dataset: multi-turn: 2 of 3 conversations trained one row per assistant turn" in result.stderr
    manifest = json.loads((work / "run" / "final" / "chatft_manifest.json").read_text())
    data = manifest["data"]["train"]
    assert data["rows_in"] == 3 and data["rows_used"] == 7 and data["multi_turn"] == "auto"
    assert data["expansion"]["rows_after"] == 7 and data["expansion"]["per_turn_conversations"] == 2
    assert manifest["config"]["dataset"]["multi_turn"] == "auto"
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]


def test_prep_writes_reasoning_content_from_every_shape(tmp_path):
    def row(**assistant):
        return {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", **assistant}]}

    rows = [row(content="4", reasoning="add"), row(content="4", thinking="add"),
            row(content="<think>\nadd\n</think>\n\n4"), row(content="4", reasoning_content="add"), row(content="4")]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_chatft("prep", "raw.jsonl", "-o", "train.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = [json.loads(line)["messages"][1] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert written == [{"role": "assistant", "content": "4", "reasoning_content": "add"}] * 4 + [
        {"role": "assistant", "content": "4"}]
    report = json.loads((tmp_path / "prep_report.json").read_text())
    assert report["changed"] == {"reasoning_from_field": 2, "reasoning_from_think_tags": 1}
    assert report["changed_first_rows"] == {"reasoning_from_field": [1, 2], "reasoning_from_think_tags": [3]}
