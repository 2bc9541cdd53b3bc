"""`chatft preview`, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from clirun import assert_error_block, run_chatft


def preview(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_chatft("preview", *args, cwd=cwd, env=env)


@pytest.fixture
def data_dir(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi there"}]},
        {"messages": [{"role": "user", "content": "a very long question " * 80},
                      {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "q"}]},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_preview_marks_trained_tokens_and_reports_the_length_policy(data_dir, tiny_model_dir):
    result = preview("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                     "dataset.path_or_dataset_id=train.jsonl", "dataset.seq_length=128", cwd=data_dir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "row 1: " in out and "[[hi there<|im_end|>]]" in out
    assert out.split("supervised tokens:")[0].count("[[") == 1  # nothing else is trained: not the system prompt, not the header
    assert "rows: 3 in, 1 used, 1 no_assistant, 1 too_long" in out
    assert "over seq_length=128: 1 rows, dropped (counted) (dataset.truncation=drop)" in out
    assert "memory estimate (full SFT, cpu): " in out and "optimizer" in out


def test_preview_json(data_dir, tiny_model_dir):
    result = preview("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                     "dataset.path_or_dataset_id=train.jsonl", "dataset.truncation=error", "--json", cwd=data_dir)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    row = payload["rows"][0]
    assert set(row) == {"source_row", "message", "input_ids", "labels_mask", "text"}
    assert row["message"] is None  # one row per conversation: ChatML keeps history
    assert len(row["input_ids"]) == len(row["labels_mask"]) and 0 < sum(row["labels_mask"]) < len(row["input_ids"])
    assert payload["stats"]["truncation"] == "error"
    assert payload["stats"]["rows_in"] == 3 and payload["stats"]["over_seq_length"] == 0
    assert payload["stats"]["memory_estimate"]["training_mb"] > 0


def test_preview_refuses_a_model_without_template(data_dir, tiny_model_no_template_dir):
    result = preview("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_no_template_dir}",
                     "dataset.path_or_dataset_id=train.jsonl", cwd=data_dir)
    assert result.returncode == 2
    assert "error[chat_template_missing]" in result.stderr and "Traceback" not in result.stderr
    ok = preview("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_no_template_dir}",
                 "dataset.path_or_dataset_id=train.jsonl", "dataset.chat_template=chatml", cwd=data_dir)
    assert ok.returncode == 0, ok.stderr


def test_uncached_hub_dataset_offline_is_not_found(data_dir, tiny_model_dir):
    result = preview("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                     "dataset.path_or_dataset_id=someone/not-cached-anywhere", cwd=data_dir,
                     env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(data_dir / "hf")})
    assert result.returncode == 2
    assert "error[dataset_not_found]" in result.stderr and "not cached" in result.stderr


def test_a_model_that_cannot_be_found_is_refused(data_dir):
    result = preview("-c", "tiny", "model.pretrained_model_name_or_path=org/not-cached-model",
                     "dataset.path_or_dataset_id=train.jsonl", cwd=data_dir, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error[config_invalid]: cannot load model.pretrained_model_name_or_path=org/not-cached-model" in result.stderr


def test_preview_reports_padding_and_pack_fill_on_real_data(tmp_path, tiny_model_dir):
    prep = run_chatft("prep", str(Path(__file__).parents[2] / "shared" / "data" / "alpaca_en_demo.json"),
                      "-o", str(tmp_path / "train.jsonl"), cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    common = ("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
              "dataset.path_or_dataset_id=train.jsonl", "dataset.num_samples_limit=80", "dataset.seq_length=512",
              "dataloader.shuffle=false", "step_scheduler.global_batch_size=8", "step_scheduler.local_batch_size=4")
    result = preview(*common, "packed_sequence.packed_sequence_size=1024", "--json", "--rows", "1000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    lengths = [len(row["input_ids"]) for row in payload["rows"]]
    assert len(lengths) == payload["stats"]["rows_used"] > 30
    padded = sum(len(chunk) * max(chunk) for chunk in (lengths[i:i + 4] for i in range(0, len(lengths), 4)))
    packs = 0
    for step in (lengths[i:i + 8] for i in range(0, len(lengths), 8)):  # greedy packs inside each step
        used = None
        for n in step:
            if used is None or used + n > 1024:
                packs, used = packs + 1, n
            else:
                used += n
    batching = payload["stats"]["batching"]
    assert batching["layout"] == "packed" and batching["tokens"] == sum(lengths)
    assert batching["padding_fraction"] == pytest.approx(1 - sum(lengths) / padded)
    assert batching["packs"] == packs and batching["pack_fill"] == pytest.approx(sum(lengths) / (packs * 1024))
    assert 0.1 < batching["padding_fraction"] < 0.9  # Alpaca rows differ in length

    human = preview(*common, cwd=tmp_path)
    assert human.returncode == 0, human.stderr
    assert (f"batching: padding-free rows, no padding computed (padded micro-batches of 4 would be "
            f"{batching['padding_fraction']:.1%} padding)") in human.stdout


def test_preview_counts_validation_rows_and_sizes_the_estimate_for_them(data_dir, tiny_model_dir):
    """Training sizes its memory estimate for validation micro-batches too; preview must say the same."""
    val = [{"messages": [{"role": "user", "content": "a longer validation question " * 30},
                         {"role": "assistant", "content": "a longer validation answer " * 30}]},
           {"messages": [{"role": "user", "content": "no answer"}]}]
    (data_dir / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    common = ("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
              "dataset.path_or_dataset_id=train.jsonl", "dataset.seq_length=1024")
    alone = preview(*common, "--json", cwd=data_dir)
    both = preview(*common, "validation_dataset.path_or_dataset_id=val.jsonl", "--json", cwd=data_dir)
    assert alone.returncode == 0 and both.returncode == 0, alone.stderr + both.stderr
    alone_stats, both_stats = json.loads(alone.stdout)["stats"], json.loads(both.stdout)["stats"]
    assert alone_stats["validation"] is None
    assert both_stats["validation"]["rows_in"] == 2 and both_stats["validation"]["rows_used"] == 1
    assert both_stats["validation"]["dropped_by_reason"] == {"no_assistant": 1}
    # The validation row is longer than every training row, so the largest micro-batch (and the estimate) grows.
    assert both_stats["memory_estimate"]["training_mb"] > alone_stats["memory_estimate"]["training_mb"]
    human = preview(*common, "validation_dataset.path_or_dataset_id=val.jsonl", cwd=data_dir)
    assert human.returncode == 0, human.stderr
    assert "validation rows: 2 in, 1 used, 1 no_assistant; 0 over seq_length" in human.stdout


def test_preview_takes_the_step_whose_config_it_previews(data_dir, tiny_model_dir):
    """`chatft preview peft/automodel -c tiny` previews peft/automodel's tiny config (LoRA), as the README's
    next command runs it; without a step id it is sft/automodel's, as before."""
    common = ("-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
              "dataset.path_or_dataset_id=train.jsonl", "--json")
    lora = preview("peft/automodel", *common, cwd=data_dir)
    assert lora.returncode == 0, lora.stderr
    assert json.loads(lora.stdout)["stats"]["memory_estimate"]["lora"]
    full = preview(*common, cwd=data_dir)
    assert full.returncode == 0, full.stderr
    assert not json.loads(full.stdout)["stats"]["memory_estimate"]["lora"]
    text = preview("peft/automodel", *common[:-1], cwd=data_dir)
    assert text.returncode == 0 and "memory estimate (LoRA" in text.stdout, text.stdout + text.stderr


def test_preview_refuses_a_step_that_does_not_train(data_dir):
    result = preview("eval/model_eval", "-c", "tiny", cwd=data_dir)
    stderr = assert_error_block(result, "config_invalid")
    assert "eval/model_eval" in stderr and "sft/automodel" in stderr and "peft/automodel" in stderr
    typo = preview("peft/automdel", "-c", "tiny", cwd=data_dir)
    assert "did you mean peft/automodel" in assert_error_block(typo, "config_invalid")
