"""The run report: every training run ends with one self-contained report.html (no URL; inline CSS, SVG and script),
`chatft report RUN_DIR [EVAL_DIR...]` rewrites it with eval results, several run dirs make a comparison, and what
is neither a run dir nor an eval dir is refused. The mask preview matches `chatft preview --json`; the page is
checked in a real headless Chromium where one is installed."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from clirun import assert_error_block, run_chatft
from headless import Browser, find_chromium

from chatft.report import COMPARE_FILE, write_report, write_report_after_training
from chatft.report.svg import MAX_MARKERS, Series, fmt, line_chart, nice_ticks
from chatft.run_layout import METRICS_FILE, REPORT_FILE

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
# The first row, which the mask preview shows first: a system prompt and two trained turns.
ROWS[0] = {"messages": [{"role": "system", "content": "Answer in <words>."},
                        {"role": "user", "content": "What is 0 plus 0?"}, {"role": "assistant", "content": "Zero."},
                        {"role": "user", "content": "And 1 plus 1?"}, {"role": "assistant", "content": "Two."}]}
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


TRAIN = ["dataset.path_or_dataset_id=train.jsonl", "validation_dataset.path_or_dataset_id=val.jsonl",
         "dataset.seq_length=128", "step_scheduler.global_batch_size=4", "step_scheduler.max_steps=3",
         "step_scheduler.val_every_steps=2"]


def train(work: Path, model_dir: Path, run_dir: str, *overrides: str) -> None:
    result = run_chatft("run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model_dir}",
                        f"checkpoint.checkpoint_dir={run_dir}", *TRAIN, *overrides, cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"report: {run_dir}/{REPORT_FILE}" in result.stdout


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Three LoRA steps through the real CLI, validated at steps 2 and 3; returns the work dir (run in `run/`)."""
    work = tmp_path_factory.mktemp("report")
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS + DROPPED))
    (work / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))
    train(work, tiny_model_dir, "run")
    return work


@pytest.fixture(scope="module")
def eval_dir(lora_run, tiny_model_dir) -> Path:
    """`ev/`: base and adapter of `run/` evaluated on val.jsonl, with one generation."""
    result = run_chatft("run", "eval/model_eval", "-c", "tiny", f"base={tiny_model_dir}", "adapter=run/final",
                        "merged=null", "targets=[base,adapter]", "dataset.path_or_dataset_id=val.jsonl",
                        "generation.num_prompts=1", "generation.max_new_tokens=4", "output_dir=ev", cwd=lora_run)
    assert result.returncode == 0, result.stdout + result.stderr
    return lora_run / "ev"


@pytest.fixture(scope="module")
def second_run(lora_run, tiny_model_dir) -> Path:
    """`run2/`: the same data with another LoRA rank and learning rate, to compare with `run/`."""
    train(lora_run, tiny_model_dir, "run2", "peft.dim=8", "optimizer.lr=0.0003")
    return lora_run / "run2"


@pytest.fixture(scope="module")
def previewed(lora_run, tiny_model_dir, tokenizer) -> list[dict]:
    """`chatft preview --json --rows 3` for the run's config: each row with its text in runs of (text, supervised)."""
    result = run_chatft("preview", "peft/automodel", "-c", "tiny",
                        f"model.pretrained_model_name_or_path={tiny_model_dir}", *TRAIN, "--json", "--rows", "3",
                        cwd=lora_run)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    for row in rows:
        runs: list[list] = []
        for token, supervised in zip(row["input_ids"], row["labels_mask"]):
            if runs and runs[-1][1] == bool(supervised):
                runs[-1][0].append(token)
            else:
                runs.append([[token], bool(supervised)])
        row["segments"] = [(tokenizer.decode(ids), supervised) for ids, supervised in runs]
    return rows


class MaskRows(HTMLParser):
    """The report's mask preview as the HTML says it: per row, its runs of (text, inside <mark>), and the text of
    each special-token box."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[tuple[str, bool]]] = []
        self.headings: list[str] = []
        self.boxes: list[str] = []
        self._in_pre = self._in_mark = self._in_box = self._in_h3 = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "pre" and attrs.get("class") == "mask":
            self._in_pre = True
            self.rows.append([])
        elif tag == "mark" and self._in_pre:
            self._in_mark = True
        elif tag == "span" and self._in_pre and attrs.get("class") == "sp":
            self._in_box = True
            self.boxes.append("")
        elif tag == "h3" and not self._in_pre:
            self._in_h3 = True
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False
        elif tag == "mark":
            self._in_mark = False
        elif tag == "span":
            self._in_box = False
        elif tag == "h3":
            self._in_h3 = False

    def handle_data(self, data):
        if self._in_h3:
            self.headings[-1] += data
        if not self._in_pre:
            return
        if self._in_box:
            self.boxes[-1] += data
        row = self.rows[-1]
        if row and row[-1][1] == self._in_mark:
            row[-1] = (row[-1][0] + data, self._in_mark)
        else:
            row.append((data, self._in_mark))


def no_external_references(page: str) -> None:
    """No src/href leaves the page (in-page #anchors only; a script with src would be listed); no stylesheet
    link, image or CSS url()."""
    parsed = Links(page)
    assert parsed.links and all(link.startswith("#") for link in parsed.links), parsed.links
    assert not parsed.tags & {"link", "img", "iframe", "object", "embed", "image", "use"}
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


def test_report_command_adds_the_eval_table(lora_run, eval_dir):
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


SPECIAL = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>")  # the tiny tokenizer's special tokens


def test_the_mask_preview_shows_what_chatft_preview_shows(lora_run, previewed):
    """The report training wrote: its first rows are preview's, supervised exactly where preview's labels_mask is
    1, every special token boxed and nothing else."""
    page = (lora_run / "run" / REPORT_FILE).read_text(encoding="utf-8")
    shown = MaskRows(page)
    assert shown.rows == [row["segments"] for row in previewed]
    first = previewed[0]  # the system prompt, both user turns and both headers are context; both answers trained
    assert [text for text, supervised in first["segments"] if supervised] == ["Zero.<|im_end|>", "Two.<|im_end|>"]
    assert "Answer in &lt;words&gt;." in page  # the data's text is escaped, not markup
    for row in previewed:
        assert f"row {row['source_row']}: {sum(row['labels_mask'])} supervised / {len(row['input_ids'])} tokens" \
            in shown.headings
    texts = "".join(text for row in previewed for text, _ in row["segments"])
    assert sorted(shown.boxes) == sorted(SPECIAL.findall(texts)) and len(shown.boxes) >= 12


def test_the_mask_preview_reads_the_data_where_the_run_started(lora_run, tmp_path):
    """job.yaml's `cwd` is where relative paths start; changed data is shown with a warning; data or a tokenizer
    that is gone is one line, and the report is still written."""
    run = tmp_path / "run"
    shutil.copytree(lora_run / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    job = yaml.safe_load((run / "job.yaml").read_text())
    (run / "job.yaml").write_text(yaml.safe_dump({**job, "cwd": str(tmp_path)}))
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "What is 7 times 6?"}, {"role": "assistant", "content": "Forty-two."}]}) + "\n")
    result = run_chatft("report", str(run), cwd=lora_run)  # not where the run started: job.yaml says where
    assert result.returncode == 0, result.stdout + result.stderr
    page = (run / REPORT_FILE).read_text(encoding="utf-8")
    assert ("Forty-two.<|im_end|>", True) in MaskRows(page).rows[0]
    assert "the training data changed since the run" in page

    (tmp_path / "train.jsonl").unlink()
    result = run_chatft("report", str(run), cwd=lora_run)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    section = re.search(r'<section id="masks">.*?</section>', (run / REPORT_FILE).read_text()).group()
    assert f"mask preview not shown: the training data train.jsonl is no longer where the run recorded it " \
           f"({tmp_path / 'train.jsonl'} does not exist" in section and "<pre" not in section

    (tmp_path / "train.jsonl").write_text((lora_run / "train.jsonl").read_text())
    manifest_path = run / "final" / "chatft_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["model"]["pretrained_model_name_or_path"] = str(tmp_path / "gone")
    manifest_path.write_text(json.dumps(manifest))
    result = run_chatft("report", str(run), cwd=lora_run)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert f"mask preview not shown: the tokenizer of {tmp_path / 'gone'} is no longer where the run recorded it" \
        in (run / REPORT_FILE).read_text()


def chart_data(page: str, title: str) -> dict:
    """The data-chart JSON of the chart captioned `title`."""
    found = re.search(r'<figure class="chart-box" data-chart="([^"]*)"><figcaption>' + re.escape(title) + "<", page)
    assert found, title
    return json.loads(html.unescape(found.group(1)))


def test_several_runs_are_compared(lora_run, second_run, eval_dir):
    result = run_chatft("report", "ev", "run2", "run", cwd=lora_run)  # told apart by content, in any order
    assert result.returncode == 0, result.stdout + result.stderr
    out = lora_run / COMPARE_FILE
    assert f"report: {out}" in result.stdout
    page = out.read_text(encoding="utf-8")
    no_external_references(page)
    assert "<h1>chatft comparison: run2 vs run</h1>" in page
    for title, file, key in (("train loss", METRICS_FILE, "loss"), ("learning rate", METRICS_FILE, "lr"),
                             ("validation loss", "validation.jsonl", "loss")):
        data = chart_data(page, title)  # one line per run, each with the run's own points
        assert [s["name"] for s in data["series"]] == ["run2", "run"]
        assert [s["css"] for s in data["series"]] == ["s0", "s1"]
        for series, run in zip(data["series"], ("run2", "run")):
            rows = [json.loads(line) for line in (lora_run / run / file).read_text().splitlines()]
            assert series["pts"] == [[row["step"], row[key]] for row in rows]
    legend = re.search(r"<figcaption>train loss(.*?)</figcaption>", page).group(1)
    assert legend == '<span class="key s0">run2</span><span class="key s1">run</span>'
    differing = re.search(r"<h3>(\d+) setting\(s\) differ</h3>(.*?)</table>", page)
    rows = dict(re.findall(r"<tr class=differs><th>([^<]*)</th>(.*?)</tr>", differing.group(2)))
    assert rows["peft.dim"] == "<td><code>8</code></td><td><code>16</code></td>"
    assert rows["optimizer.lr"] == "<td><code>0.0003</code></td><td><code>0.0001</code></td>"
    assert "dataset.seq_length" not in rows and "manifest: train data sha256" not in rows  # the same in both
    assert "<tr><th>dataset.seq_length</th><td><code>128</code></td><td><code>128</code></td></tr>" in page
    assert "<th class=num>base</th><th class=num>adapter</th>" in page  # the eval, shown below

    shutil.copytree(second_run, lora_run / "other" / "run", ignore=shutil.ignore_patterns("checkpoints"))
    result = run_chatft("report", "run", "other/run", "-o", "same-names.html", cwd=lora_run)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (lora_run / "same-names.html").read_text(encoding="utf-8")  # runs of one name: their paths tell them apart
    assert "<h1>chatft comparison: run vs other/run</h1>" in page

    stderr = assert_error_block(run_chatft("report", "ev", cwd=lora_run), "config_invalid")
    assert "no training run dir among ev" in stderr
    stderr = assert_error_block(run_chatft("report", "run", "./run", cwd=lora_run), "config_invalid")
    assert "given twice" in stderr


CHART_GEOMETRY = """(title => {
  const figure = [...document.querySelectorAll('figure[data-chart]')]
    .find(f => f.querySelector('figcaption').firstChild.textContent === title);
  figure.scrollIntoView({block: 'center'});
  const box = figure.querySelector('svg.chart').getBoundingClientRect();
  return {data: JSON.parse(figure.dataset.chart), left: box.left, top: box.top, scale: box.width / 560};
})"""  # 560: svg.WIDTH, the charts' viewBox width


class Chart:
    """One chart of a page open in Chromium: where a step is on screen, and what the page shows there."""

    def __init__(self, page, title: str) -> None:
        self.page, self.title = page, title
        geometry = page.evaluate(f"{CHART_GEOMETRY}({json.dumps(title)})")
        self.data, self.left, self.top, self.scale = (geometry[k] for k in ("data", "left", "top", "scale"))
        self.select = f"[...document.querySelectorAll('figure[data-chart]')].find(f => " \
                      f"f.querySelector('figcaption').firstChild.textContent === {json.dumps(title)})"

    def at(self, step: float) -> tuple[float, float]:
        left, top, width, height = self.data["box"]
        low, high = self.data["x"]
        return (self.left + (left + (step - low) / (high - low) * width) * self.scale,
                self.top + (top + height / 2) * self.scale)

    def hover(self, step: float) -> str:
        self.page.mouse("mouseMoved", *self.at(step))
        return self.page.evaluate(f"{self.select}.querySelector('.tip').innerText")

    def x_ticks(self) -> list[float]:
        return [float(t) for t in self.page.evaluate(
            f"[...{self.select}.querySelectorAll('text.tick.x')].map(t => t.textContent)")]


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium is not installed: `make test` installs Debian's chromium where it runs as root with "
                    "apt-get; elsewhere install it (or set CHATFT_CHROMIUM) to check the report in a browser")
    with Browser(executable) as running:
        yield running


def test_the_report_in_a_real_browser(browser, lora_run, eval_dir, second_run, previewed, tmp_path):
    """Chromium loads the report from disk with DNS answering nothing: no request but the file, no console error;
    hover names each step's values, a drag zooms and a double-click zooms out; the mask preview marks exactly
    preview's supervised tokens. A screenshot is kept beside the report."""
    report = lora_run / "run" / REPORT_FILE
    page = browser.open(report.as_uri())
    loss = Chart(page, "loss")
    metrics = [json.loads(line) for line in (lora_run / "run" / METRICS_FILE).read_text().splitlines()]
    assert [p for p in loss.data["series"][0]["pts"]] == [[row["step"], row["loss"]] for row in metrics]
    for row in metrics:
        assert f"train loss {fmt(row['loss'])}" in loss.hover(row["step"]).splitlines()
    validations = [json.loads(line) for line in (lora_run / "run" / "validation.jsonl").read_text().splitlines()]
    tip = loss.hover(validations[0]["step"])
    assert f"validation loss {fmt(validations[0]['loss'])}" in tip.splitlines()

    x, y = loss.at(1.5)
    page.mouse("mousePressed", x, y, buttons=1, clicks=1)
    page.mouse("mouseMoved", loss.at(3)[0], y, buttons=1)
    page.mouse("mouseReleased", loss.at(3)[0], y, clicks=1)
    zoomed = loss.x_ticks()
    assert zoomed[0] >= 1.5 and 1 not in zoomed and len(zoomed) >= 3
    page.mouse("mousePressed", x, y, clicks=2)
    page.mouse("mouseReleased", x, y, clicks=2)
    assert loss.x_ticks()[0] == 1

    dom_rows = page.evaluate("""[...document.querySelectorAll('pre.mask')].map(pre => [...pre.childNodes].map(
        node => [node.textContent, node.nodeName === 'MARK']))""")
    merged = []
    for row in dom_rows:
        runs: list[tuple[str, bool]] = []
        for text, supervised in row:
            runs[-1:] = [(runs[-1][0] + text, supervised)] if runs and runs[-1][1] == supervised else \
                runs[-1:] + [(text, supervised)]
        merged.append(runs)
    assert merged == [row["segments"] for row in previewed]
    styles = page.evaluate("""(() => { const pre = document.querySelector('pre.mask'), mark = pre.querySelector('mark'),
        box = pre.querySelector('.sp'), style = e => getComputedStyle(e);
        return [style(pre).backgroundColor, style(mark).backgroundColor, style(box).borderTopStyle]; })()""")
    assert styles[1] != styles[0] and styles[2] == "dashed"  # trained text stands out, special tokens are boxed
    shot = page.screenshot(tmp_path / "report.png", full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    if os.environ.get("CHATFT_TEST_ARTIFACTS"):
        shutil.copy(shot, Path(os.environ["CHATFT_TEST_ARTIFACTS"]) / "report.png")
    assert page.problems == [] and page.requests == [report.as_uri()]

    compared = lora_run / "compared.html"
    assert run_chatft("report", "run", "run2", "-o", str(compared), cwd=lora_run).returncode == 0
    page = browser.open(compared.as_uri())
    tip = Chart(page, "train loss").hover(2).splitlines()
    for run in ("run", "run2"):
        step2 = json.loads((lora_run / run / METRICS_FILE).read_text().splitlines()[1])
        assert f"{run} {fmt(step2['loss'])}" in tip
    assert page.problems == [] and page.requests == [compared.as_uri()]
