"""The run report: every training run ends with one self-contained report.html (no URL, no script), and
`chatft report RUN_DIR [EVAL_DIR...]` rewrites it with eval results; what is not a run dir is refused."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from clirun import assert_error_block, run_chatft

from chatft.report import write_report, write_report_after_training
from chatft.report.svg import MAX_MARKERS, Series, fmt, line_chart, nice_ticks
from chatft.run_layout import METRICS_FILE, REPORT_FILE

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
DROPPED = [{"messages": [{"role": "user", "content": "no answer <b>here</b>"}]},  # no_assistant
           {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "word " * 300}]}]  # too_long


class Links(HTMLParser):
    """Every tag and every src/href-like attribute value of a page, as a browser's parser reads them."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href", "xlink:href", "action")]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Three LoRA steps through the real CLI, validated at steps 2 and 3; returns the work dir (run in `run/`)."""
    work = tmp_path_factory.mktemp("report")
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS + DROPPED))
    (work / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))
    result = run_chatft("run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                        "dataset.path_or_dataset_id=train.jsonl", "validation_dataset.path_or_dataset_id=val.jsonl",
                        "checkpoint.checkpoint_dir=run", "dataset.seq_length=128", "step_scheduler.global_batch_size=4",
                        "step_scheduler.max_steps=3", "step_scheduler.val_every_steps=2", cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"report: run/{REPORT_FILE}" in result.stdout
    return work


def no_external_references(page: str) -> None:
    """No src/href leaves the page (in-page #anchors only); no script, stylesheet link, image or CSS url()."""
    parsed = Links(page)
    assert parsed.links and all(link.startswith("#") for link in parsed.links), parsed.links
    assert not parsed.tags & {"script", "link", "img", "iframe", "object", "embed", "image", "use"}
    style = page[page.index("<style>"):page.index("</style>")]
    assert "url(" not in style and "@import" not in style


def test_training_writes_a_self_contained_report(lora_run):
    run = lora_run / "run"
    page = (run / REPORT_FILE).read_text(encoding="utf-8")
    no_external_references(page)
    manifest = json.loads((run / "final" / "chatft_manifest.json").read_text())
    assert manifest["base_model"]["fingerprint"] in page
    assert manifest["data"]["train"]["sha256"] in page
    steps = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert len(steps) == 3
    for row in steps:  # every step's loss is a point of the loss chart, with its value on hover
        assert f"<title>step {row['step']}: train loss {fmt(row['loss'])}</title>" in page
        assert f"<title>step {row['step']}: lr {fmt(row['lr'])}</title>" in page
    assert "validation loss" in page and page.count("<svg") >= 5
    train = manifest["data"]["train"]
    assert (train["rows_in"], train["rows_used"]) == (14, 12)
    row = re.search(r"<tr><td>train</td>.*?</tr>", page).group()
    assert "<td class=num>14</td><td class=num>12</td>" in row
    assert "no_assistant 1" in row and "too_long 1" in row
    assert "rank 16" in page and "q_proj" in page  # LoRA rank and targets
    assert "measured peak" in page and "of the estimate" in page


def test_report_command_adds_the_eval_table(lora_run, tiny_model_dir):
    result = run_chatft("run", "eval/model_eval", "-c", "tiny", f"base={tiny_model_dir}", "adapter=run/final",
                        "merged=null", "targets=[base,adapter]", "dataset.path_or_dataset_id=val.jsonl",
                        "generation.num_prompts=1", "generation.max_new_tokens=4", "output_dir=ev", cwd=lora_run)
    assert result.returncode == 0, result.stdout + result.stderr
    out = lora_run / "elsewhere" / "r.html"
    result = run_chatft("report", "run", "ev", "-o", str(out), cwd=lora_run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(out) in result.stdout
    page = out.read_text(encoding="utf-8")
    no_external_references(page)
    results = json.loads((lora_run / "ev" / "eval_results.json").read_text())
    assert "<th class=num>base</th><th class=num>adapter</th>" in page  # the targets side by side
    for name in ("base", "adapter"):
        assert f">{results['targets'][name]['metrics']['loss']:.4f}<" in page
    (generation,) = results["generations"]
    assert "What is" in page and 'class="gens"' in page and generation["reference"] in page
    assert "Validations recorded in the manifest" in page  # the eval appended one to final/'s manifest


def test_what_is_not_a_run_dir_is_refused(lora_run, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    stderr = assert_error_block(run_chatft("report", str(tmp_path)), "config_invalid")
    assert "not a training run dir" in stderr and "checkpoint.checkpoint_dir" in stderr
    stderr = assert_error_block(run_chatft("report", "run", "run/final", cwd=lora_run), "config_invalid")
    assert "eval_results.json" in stderr
    assert not (tmp_path / REPORT_FILE).exists()


def test_text_from_the_run_is_escaped_and_an_unfinished_run_still_reports(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    manifest_path = run / "final" / "chatft_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["data"]["train"]["path"] = "<script>alert(1)</script>.jsonl"
    manifest["base_model"]["name_or_path"] = 'a"b<img src=https://example.com/x.png>'
    manifest_path.write_text(json.dumps(manifest))
    page = write_report(run).read_text(encoding="utf-8")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.jsonl" in page
    assert "<img" not in page and "&lt;img src=https://example.com/x.png&gt;" in page
    no_external_references(page)

    shutil.rmtree(run / "final")  # stopped before the end: job.yaml and metrics.jsonl are enough
    page = write_report(run).read_text(encoding="utf-8")
    assert "no final/ yet" in page and "3 of 3 steps logged" in page and "train loss" in page


def test_a_report_failure_is_a_warning(tmp_path, capsys):
    assert write_report_after_training(tmp_path / "missing") is None
    err = capsys.readouterr().err
    assert err.startswith("warning: report.html not written") and err.count("\n") == 1


def test_long_runs_keep_the_chart_small():
    points = [(float(step), 1.0 / step) for step in range(1, 20001)]
    chart = line_chart("loss", [Series("train loss", points)], y_label="loss")
    assert MAX_MARKERS <= chart.count("<circle") <= MAX_MARKERS + 1
    assert "step 20000: train loss" in chart and "step 1: train loss 1<" in chart
    assert len(chart) < 400_000
    assert line_chart("empty", [Series("x", [(1.0, float("nan"))])], y_label="y") == ""
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
