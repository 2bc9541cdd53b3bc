"""The report's mask preview: the first training rows as the run tokenized them, supervised tokens highlighted and
special tokens boxed.

In: a `RunRecord`: its resolved config (the dataset and model sections) and job.yaml's `cwd`, where the run's
relative paths start (the current directory when job.yaml does not record it). Out: a `MaskPreview` and its HTML
section. The rows come from chatft's own pipeline, as `chatft preview` builds them (`reporting_section`,
`supervised_segments`), so the report shows the same rows as `chatft preview --rows N --json`. Only the first
`SOURCE_ROWS` rows of the data are read, and nothing is cached, so a report stays quick on any dataset.

It never fails the report: a data file or tokenizer no longer where the run recorded it, a Hub dataset (a report
downloads nothing), or anything else that stops it becomes one line in the section instead. Data or a tokenizer
that changed since the run is shown with a warning saying so. Loading a tokenizer imports torch (transformers
does), which makes this the slow part of `chatft report`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft import artifacts
from chatft.config.schema import DatasetSection, ModelSection
from chatft.data.guards import hub_model_cached
from chatft.data.locations import looks_like_path
from chatft.errors import ChatftError
from chatft.report.load import RunRecord
from chatft.report.markup import code, esc, note, section

PREVIEW_ROWS = 3
SOURCE_ROWS = 100  # enough source rows to find a few usable ones after drops, few enough to tokenize at once


@dataclass
class MaskRow:
    source_row: int
    message: int | None  # a per-turn row: the assistant message it trains
    supervised: int
    tokens: int
    segments: list[tuple[str, bool]]  # the row's text in runs of (text, supervised)


@dataclass
class MaskPreview:
    rows: list[MaskRow] = field(default_factory=list)
    special_tokens: list[str] = field(default_factory=list)
    mask_method: str | None = None
    template_source: str | None = None
    warnings: list[str] = field(default_factory=list)  # what differs from the run's own data or tokenizer
    unavailable: str | None = None  # why there are no rows, in one line


class Unavailable(Exception):
    """Why the preview cannot be made, in one line for the section."""


def _at_run_cwd(base: Path, value: str) -> Path | None:
    """`value` (a path as the run's config wrote it) where it is now, or None when nothing is there."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    return path if path.exists() else None


def _locate(run: RunRecord, dataset: dict[str, Any], model: dict[str, Any]) -> tuple[Path, str, str | None]:
    """The data file, the model (a local dir, or a cached Hub id) and the chat template option, found from where
    the run started; `Unavailable` names what is gone."""
    base = Path(run.job.get("cwd") or Path.cwd())
    data_value = str(dataset.get("path_or_dataset_id"))
    data = _at_run_cwd(base, data_value)
    if data is None:
        raise Unavailable(f"the training data {data_value} is no longer where the run recorded it "
                          f"({base / data_value} does not exist; a report downloads no Hub dataset: `chatft preview` "
                          "with the run's config shows its masks)")
    model_value = str(model.get("pretrained_model_name_or_path"))
    local_model = _at_run_cwd(base, model_value)
    if local_model is None and (looks_like_path(model_value) or not hub_model_cached(model_value)):
        raise Unavailable(f"the tokenizer of {model_value} is no longer where the run recorded it "
                          f"({base / model_value} does not exist, nor is it in the Hugging Face cache)")
    template = dataset.get("chat_template")
    if isinstance(template, str) and (found := _at_run_cwd(base, template)) is not None and found.is_file():
        template = str(found)
    return data, str(local_model) if local_model is not None else model_value, template


def _special_tokens(tokenizer: Any) -> list[str]:
    named = set(map(str, tokenizer.all_special_tokens))
    named |= {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
    return sorted((t for t in named if t), key=len, reverse=True)


def _warnings(run: RunRecord, data: Any, tokenizer: Any) -> list[str]:
    manifest = run.manifest or {}
    recorded_data = ((manifest.get("data") or {}).get("train") or {}).get("sha256")
    recorded_tokenizer = manifest.get("tokenizer") or {}
    warnings = []
    if recorded_data and data.report.sha256 and recorded_data != data.report.sha256:
        warnings.append(f"the training data changed since the run (sha256 {recorded_data[:12]} then, "
                        f"{data.report.sha256[:12]} now): these rows are what it holds now")
    now = {"fingerprint": artifacts.tokenizer_fingerprint(tokenizer),
           "chat_template_sha256": artifacts.chat_template_sha256(tokenizer)}
    if any(recorded_tokenizer.get(key) and recorded_tokenizer[key] != value for key, value in now.items()):
        warnings.append("the tokenizer or chat template found now differs from the run's (manifest `tokenizer`): "
                        "these masks are what it makes now")
    return warnings


def _compute(run: RunRecord, rows: int) -> MaskPreview:
    dataset, model = run.config.get("dataset"), run.config.get("model")
    if not isinstance(dataset, dict) or not isinstance(model, dict):
        return MaskPreview(unavailable="the run records no dataset and model sections (job.yaml `resolved`)")
    data_path, model_path, template = _locate(run, dataset, model)  # before the seconds of importing torch

    # torch loads here, once the paths are found: a report whose data is gone stays quick
    from chatft.data.pipeline import prepare_training_data
    from chatft.preview import reporting_section, supervised_segments
    from chatft.train.model import load_tokenizer

    limit = min(dataset.get("num_samples_limit") or SOURCE_ROWS, SOURCE_ROWS)
    section_ = DatasetSection.model_validate({**dataset, "path_or_dataset_id": str(data_path),
                                              "chat_template": template, "num_samples_limit": limit})
    tokenizer = load_tokenizer(ModelSection.model_validate({**model, "pretrained_model_name_or_path": model_path}))
    data = prepare_training_data(reporting_section(section_), tokenizer, use_cache=False, log=lambda _line: None,
                                 refuse_template_drops=False)
    shown = [MaskRow(row.source_row, row.message, row.num_supervised, len(row), supervised_segments(tokenizer, row))
             for row in data.rows[:rows]]
    unavailable = None if shown else f"none of the first {limit} rows of the training data is used for training"
    return MaskPreview(shown, _special_tokens(tokenizer), data.report.mask_method, data.report.template_source,
                       _warnings(run, data, tokenizer), unavailable)


def mask_preview(run: RunRecord, rows: int = PREVIEW_ROWS) -> MaskPreview:
    """The first `rows` training rows with their masks, or one line saying why not."""
    try:
        return _compute(run, rows)
    except Unavailable as gone:
        return MaskPreview(unavailable=str(gone))
    except ChatftError as err:  # what training would refuse too (a template that no longer loads, ...)
        return MaskPreview(unavailable=err.message)
    except Exception as exc:  # noqa: BLE001 (a report shows what it can; the run's data is not the report's to fix)
        return MaskPreview(unavailable=f"{type(exc).__name__}: {exc}")


def _with_special_tokens(text: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is None:
        return esc(text)
    pieces = pattern.split(text)  # the pattern is one group: odd pieces are the special tokens
    return "".join(f'<span class="sp">{esc(piece)}</span>' if i % 2 else esc(piece)
                   for i, piece in enumerate(pieces) if piece)


def mask_section(preview: MaskPreview) -> str:
    if preview.unavailable:
        return section("masks", "Masks", note(f"mask preview not shown: {esc(preview.unavailable)}"))
    pattern = re.compile("(" + "|".join(map(re.escape, preview.special_tokens)) + ")") \
        if preview.special_tokens else None
    head = (f'<p class="note legend">The first {len(preview.rows)} training row(s) as the run\'s tokenizer and chat '
            'template make them: <mark>supervised</mark> tokens carry the loss, the rest is context; '
            f'<span class="sp">special</span> tokens are boxed. Masks by {esc(preview.mask_method)}, template from '
            f"{esc(preview.template_source)}; the same rows as {code('chatft preview --json')}.</p>")
    head += "".join(f'<p><span class="badge warn">{esc(line)}</span></p>' for line in preview.warnings)
    rows = []
    for row in preview.rows:
        label = f"row {row.source_row}" + (f", assistant message {row.message}" if row.message else "")
        text = "".join(f"<mark>{_with_special_tokens(part, pattern)}</mark>" if supervised
                       else _with_special_tokens(part, pattern) for part, supervised in row.segments)
        rows.append(f'<div class="mask-row" data-source-row="{row.source_row}"><h3>{esc(label)}: '
                    f"{row.supervised:,} supervised / {row.tokens:,} tokens</h3><pre class=\"mask\">{text}</pre></div>")
    return section("masks", "Masks", head + "".join(rows))
