"""data_prep/chat_jsonl: chat data in any supported shape → `messages` JSONL, a validation split, a report.

In: a `DataPrepConfig` (config/schema.py). Out, beside `output`: the `messages` JSONL (one
`{"messages": [...], "tools"?: [...]}` object per line, UTF-8), the validation JSONL when `val_fraction` > 0,
and `prep_report.json` (`<output stem>.prep_report.json` when the folder's prep_report.json is another output's);
`prepare` returns the same account as a `PrepResult`, and `run_step` (what `chatft run`/`chatft prep` call)
prints a short summary.

Every source row is written or counted under one drop reason (formats.DROP_REASONS), so
rows_in == rows_out + sum(dropped) always; with `strict` the first unusable row stops the run instead.
Rows that are written but look wrong (formats.FLAGS: an unfilled `{{ name }}`) are counted and warned about.
Files are written to a temporary name in the same folder and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO, Any

from chatft import __version__, console
from chatft.config.schema import DataPrepConfig
from chatft.data.formats import Conversation, RowDropped, convert_row, detect_format, unfilled_placeholder
from chatft.data.readers import Source, SourceRow, not_utf8_hint, open_source
from chatft.errors import ChatftError
from chatft.output_paths import refuse_file_in_the_way

REPORT_FILE = "prep_report.json"
DETECT_ROWS = 20  # object rows that format detection looks at
DETECT_SCAN_LIMIT = 1000  # rows read at most to find them (a file that starts with many broken lines)
FIRST_ROWS_KEPT = 5
SNIPPET_CHARS = 160


@dataclass
class Tally:
    """Counts per reason, with the first few row numbers of each."""

    counts: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, row: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.first_rows.setdefault(reason, [])
        if len(examples) < FIRST_ROWS_KEPT:
            examples.append(row)

    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Account:
    """What happened to the rows while converting."""

    rows_in: int = 0
    dropped: Tally = field(default_factory=Tally)
    changed: Tally = field(default_factory=Tally)
    flagged: Tally = field(default_factory=Tally)  # kept as they are, but look wrong (formats.FLAGS)
    placeholder: str | None = None  # the first unfilled placeholder seen, for the warning
    turns: list[int] = field(default_factory=list)  # per written row
    characters: list[int] = field(default_factory=list)  # per written row

    @property
    def rows_out(self) -> int:
        return len(self.turns)


@dataclass
class PrepResult:
    """What prep_report.json holds."""

    input: str
    source_kind: str
    split: str | None
    format: str
    format_detected: bool
    row_numbers: str  # what the row numbers below count
    rows_in: int
    rows_out: int
    train_rows: int
    validation_rows: int
    dropped: dict[str, int]
    dropped_first_rows: dict[str, list[int]]
    changed: dict[str, int]
    changed_first_rows: dict[str, list[int]]
    flagged: dict[str, int]  # rows kept as they are that look wrong (formats.FLAGS), warned about
    flagged_first_rows: dict[str, list[int]]
    turns: dict[str, int | None]  # messages per written row: p50, p90, p99, max
    characters: dict[str, int | None]  # characters of content (and tool calls) per written row
    outputs: dict[str, str]  # train, validation (when written), report: absolute paths
    config: dict[str, Any]  # the settings this ran with
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    chatft_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OutputPaths:
    train: Path
    validation: Path | None
    report: Path


def run_step(compiled: Any) -> None:
    """`chatft run data_prep/chat_jsonl` / `chatft prep`: prepare, then print warnings and the summary."""
    result = prepare(compiled.validated)
    for line in result.warnings:
        console.warning(line)
    console.result(summary(result))


def prepare(config: DataPrepConfig) -> PrepResult:
    """Read, convert, check, split and write; return the account of every row."""
    started = time.perf_counter()
    paths = output_paths(config)
    _refuse_blocked_folders(config, paths)
    _refuse_overlaps(config.input, paths)
    source = open_source(config.input, split=config.split, name=config.name, limit=config.limit)
    rows, fmt = _rows_and_format(source, config)
    spool = _temp_path(paths.train, "all")  # every kept row, before the split decides where it goes
    try:
        account = _convert_all(rows, fmt, config, source, spool)
        if account.rows_out == 0:
            raise _nothing_left(source, account.rows_in, account.dropped)
        validation_rows = validation_count(account.rows_out, config.val_fraction)
        _write_split(spool, paths, account.rows_out, validation_rows, config.seed)
    finally:
        spool.unlink(missing_ok=True)
    # The account must balance: a row that is neither written nor counted would be a silent loss.
    if account.rows_in != account.rows_out + account.dropped.total():
        raise AssertionError(f"row accounting is off: {account.rows_in} in, {account.rows_out} out, "
                             f"dropped {account.dropped.counts}")
    result = PrepResult(
        input=config.input,
        source_kind=source.kind + (" (gzip)" if source.compressed else ""),
        split=source.split,
        format=fmt,
        format_detected=config.format == "auto",
        row_numbers=f"1-based {'line numbers of the JSONL file' if source.row_label == 'line' else 'row positions'}",
        rows_in=account.rows_in,
        rows_out=account.rows_out,
        train_rows=account.rows_out - validation_rows,
        validation_rows=validation_rows,
        dropped=dict(sorted(account.dropped.counts.items())),
        dropped_first_rows=dict(sorted(account.dropped.first_rows.items())),
        changed=dict(sorted(account.changed.counts.items())),
        changed_first_rows=dict(sorted(account.changed.first_rows.items())),
        flagged=dict(sorted(account.flagged.counts.items())),
        flagged_first_rows=dict(sorted(account.flagged.first_rows.items())),
        turns=quantiles(account.turns),
        characters=quantiles(account.characters),
        outputs={name: str(path.resolve()) for name, path in
                 (("train", paths.train), ("validation", paths.validation), ("report", paths.report)) if path},
        config=config.model_dump(mode="json"),
        warnings=_warnings(config, source, account, paths),
    )
    result.elapsed_s = round(time.perf_counter() - started, 3)
    with atomic_open(paths.report) as handle:
        handle.write(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    return result


def summary(result: PrepResult) -> str:
    """A few lines for the terminal: rows in/out, drops by reason, where the files are."""
    how = "detected" if result.format_detected else "as named"
    lines = [f"prep: {result.rows_in} rows in, {result.rows_out} out  [{result.input}: {result.format}, {how}]"]
    label = "line" if result.row_numbers.startswith("1-based line") else "row"
    for title, counts, first in (("dropped", result.dropped, result.dropped_first_rows),
                                 ("changed", result.changed, result.changed_first_rows),
                                 ("flagged", result.flagged, result.flagged_first_rows)):
        if counts:
            lines.append(f"  {title} {sum(counts.values())}:")
            for reason, count in counts.items():
                lines.append(f"    {reason:<24} {count:>7}   first at {label} {', '.join(map(str, first[reason]))}")
    if not result.dropped:
        lines.append("  dropped 0")
    lines.append(f"  train:       {result.outputs['train']} ({_rows(result.train_rows)})")
    if "validation" in result.outputs:
        lines.append(f"  validation:  {result.outputs['validation']} ({_rows(result.validation_rows)})")
    lines.append(f"  report:      {result.outputs['report']}")
    return "\n".join(lines)


def _rows(count: int) -> str:
    return f"{count} row" + ("" if count == 1 else "s")


# --------------------------------------------------------------------------- reading and converting


def _rows_and_format(source: Source, config: DataPrepConfig) -> tuple[Iterator[SourceRow], str]:
    """The format to use (detected from the first object rows when `auto`) and all rows, none consumed."""
    if config.format != "auto":
        return source.rows, config.format
    head: list[SourceRow] = []
    objects: list[SourceRow] = []
    for source_row in source.rows:
        head.append(source_row)
        if isinstance(source_row.value, dict):
            objects.append(source_row)
        if len(objects) >= DETECT_ROWS or len(head) >= DETECT_SCAN_LIMIT:
            break
    fmt = detect_format([row.value for row in objects], config.text_field, config.input,
                        numbers=[row.number for row in objects])
    return chain(head, source.rows), fmt


def _convert_all(rows: Iterator[SourceRow], fmt: str, config: DataPrepConfig, source: Source, spool: Path) -> Account:
    """Convert every row, writing the kept ones to `spool` and counting the rest (strict: raise at the first)."""
    account = Account()
    with spool.open("w", encoding="utf-8", newline="\n") as handle, console.Progress("reading rows", None) as progress:
        for source_row in rows:
            account.rows_in += 1
            progress.advance()
            try:
                conversation = _convert(source_row, fmt, config)
            except RowDropped as drop:
                if config.strict:
                    raise _strict_error(source, source_row, drop) from None
                account.dropped.add(drop.reason, source_row.number)
                continue
            for change in conversation.changes:
                account.changed.add(change, source_row.number)
            if (placeholder := unfilled_placeholder(conversation.messages)) is not None:
                account.flagged.add("template_placeholder", source_row.number)
                account.placeholder = account.placeholder or placeholder
            _write_row(handle, conversation.to_row())
            account.turns.append(len(conversation.messages))
            account.characters.append(_characters(conversation))
    return account


def _convert(source_row: SourceRow, fmt: str, config: DataPrepConfig) -> Conversation:
    if source_row.problem is not None:
        raise RowDropped(source_row.problem, source_row.detail or "the line is not valid JSON")
    if not isinstance(source_row.value, dict):
        raise RowDropped("not_an_object", f"the row is a {type(source_row.value).__name__}, not an object")
    return convert_row(source_row.value, fmt, text_field=config.text_field, consecutive_user=config.consecutive_user,
                       inline_think=True, map_tools=True)


def _snippet(source_row: SourceRow) -> str:
    if source_row.problem is not None:
        return source_row.snippet
    text = json.dumps(source_row.value, ensure_ascii=False, default=str)
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "..."


def _strict_error(source: Source, source_row: SourceRow, drop: RowDropped) -> ChatftError:
    return ChatftError(
        "bad_row",
        f"{source.row_label} {source_row.number} of {source.input}: {drop.reason}: {drop.detail}\n"
        f"  row: {_snippet(source_row)}",
        not_utf8_hint(source.input) if drop.reason == "not_utf8" else
        "fix or delete that row, or leave out --strict (strict=false) to drop such rows and count them in "
        "prep_report.json",
    )


def _nothing_left(source: Source, rows_in: int, dropped: Tally) -> ChatftError:
    if rows_in == 0:
        return ChatftError("messages_missing", f"{source.input} has no rows",
                           "check the input (and split/limit): it holds no data rows")
    reasons = ", ".join(f"{reason} {count} (first at {source.row_label} {dropped.first_rows[reason][0]})"
                        for reason, count in sorted(dropped.counts.items()))
    only_fields = set(dropped.counts) == {"missing_fields"}
    hint = ("name the right shape with --format (format=...)" if only_fields else
            "run with --strict (strict=true) to see the first bad row in full; --format names the shape if "
            "detection picked the wrong one")
    return ChatftError(
        "messages_missing" if only_fields else "bad_row",
        f"none of the {rows_in} rows of {source.input} could be used: {reasons}",
        not_utf8_hint(source.input) if "not_utf8" in dropped.counts else hint,
    )


def _write_row(handle: IO[str], row: dict[str, Any]) -> None:
    """One JSONL line, UTF-8 as is; a lone surrogate (valid JSON, not encodable) is kept as a \\u escape."""
    try:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    except UnicodeEncodeError:  # raised before anything is written, so the line is not doubled
        handle.write(json.dumps(row) + "\n")


def _characters(conversation: Conversation) -> int:
    total = 0
    for message in conversation.messages:
        total += len(message["content"])
        if "tool_calls" in message:
            total += len(json.dumps(message["tool_calls"], ensure_ascii=False))
        total += len(message.get("reasoning_content", ""))
    return total


def quantiles(values: list[int]) -> dict[str, int | None]:
    """Nearest-rank p50/p90/p99 and the max (None for no values)."""
    ordered = sorted(values)

    def rank(p: float) -> int | None:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)] if ordered else None

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1] if ordered else None}


def _warnings(config: DataPrepConfig, source: Source, account: Account, paths: OutputPaths) -> list[str]:
    warnings = []
    if config.validation_output and config.val_fraction == 0:
        warnings.append("validation_output is ignored: val_fraction is 0, so nothing is held out")
    if config.val_fraction > 0 and account.rows_out < 2:
        warnings.append(f"only {account.rows_out} row left: the validation file is empty")
    label = source.row_label
    if count := account.dropped.counts.get("not_utf8"):
        first = ", ".join(map(str, account.dropped.first_rows["not_utf8"]))
        # Dropping them would quietly remove exactly the rows with accents or non-Latin text.
        warnings.append(f"{_rows(count)} of {source.input} {'is' if count == 1 else 'are'} not UTF-8 (first at "
                        f"{label} {first}) and {'was' if count == 1 else 'were'} dropped: "
                        f"{not_utf8_hint(source.input)}")
    if count := account.flagged.counts.get("template_placeholder"):
        first = ", ".join(map(str, account.flagged.first_rows["template_placeholder"]))
        warnings.append(f"{_rows(count)} {'contains' if count == 1 else 'contain'} an unfilled template placeholder "
                        f"such as {account.placeholder} (first at {label} {first}): the prompt template was "
                        "probably not rendered; the rows are kept as they are")
    if paths.report.name != REPORT_FILE:
        warnings.append(f"{paths.report.parent / REPORT_FILE} belongs to another output, so this run's report is "
                        f"{paths.report}")
    return warnings


# --------------------------------------------------------------------------- paths, split, atomic writes


def output_paths(config: DataPrepConfig) -> OutputPaths:
    train = Path(config.output).expanduser()
    validation = None
    if config.val_fraction > 0:
        validation = (Path(config.validation_output).expanduser() if config.validation_output
                      else train.with_name(f"{train.stem}.val.jsonl"))
    return OutputPaths(train, validation, report_path(train))


def report_path(train: Path) -> Path:
    """`prep_report.json` beside the output, unless that file is the report of another output in the same
    folder (a second prep there): then `<output stem>.prep_report.json`, so no run's account is lost."""
    shared = train.parent / REPORT_FILE
    if not shared.exists():
        return shared
    try:
        owner = json.loads(shared.read_text(encoding="utf-8"))["outputs"]["train"]
    except (OSError, ValueError, KeyError, TypeError):
        owner = None  # not a report chatft can read: not ours to overwrite
    if owner is not None and Path(owner) == train.resolve():
        return shared
    return train.with_name(f"{train.stem}.{REPORT_FILE}")


def _refuse_blocked_folders(config: DataPrepConfig, paths: OutputPaths) -> None:
    """An output whose folder cannot exist because a file sits where a folder must be (out.txt/train.jsonl)."""
    for key, value, path in (("output", config.output, paths.train),
                             ("validation_output", config.validation_output, paths.validation)):
        if path is not None:
            refuse_file_in_the_way(path.parent, key, value or str(path))


def _refuse_overlaps(input: str, paths: OutputPaths) -> None:
    outputs = [p for p in (paths.train, paths.validation, paths.report) if p is not None]
    if paths.train.is_dir():
        raise ChatftError("config_invalid", f"output {paths.train} is a folder; it must name the JSONL file to write",
                          f"e.g. output={paths.train / 'train.jsonl'}")
    resolved = [p.resolve() for p in outputs]
    if len(set(resolved)) < len(resolved):
        raise ChatftError("config_invalid", f"output, validation_output and {REPORT_FILE} must be different files "
                          f"(got {', '.join(map(str, outputs))})", "give validation_output another name")
    source = Path(input).expanduser()
    if not source.exists():
        return
    source = source.resolve()
    for path in resolved:
        if path == source or source in path.parents:
            raise ChatftError("output_path_overlaps_inputs", f"output {path} would overwrite or sit inside the input "
                              f"{source}", "write the output somewhere else, e.g. output=data/train.jsonl")


def validation_count(rows: int, fraction: float) -> int:
    """Rows held out: round(rows * fraction), but at least 1 and never all of them (with 2+ rows)."""
    if fraction <= 0 or rows < 2:
        return 0
    return min(rows - 1, max(1, round(rows * fraction)))


def validation_indices(rows: int, count: int, seed: int) -> set[int]:
    """Which 0-based rows go to validation: the first `count` of a seeded shuffle, so a seed fixes the split."""
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    return set(order[:count])


def _write_split(spool: Path, paths: OutputPaths, rows: int, validation_rows: int, seed: int) -> None:
    """Move the converted rows into place: all to train, or split by a seeded shuffle (each file keeps
    the source order, so its rows can be traced back)."""
    if paths.validation is None:
        os.replace(spool, paths.train)
        return
    held_out = validation_indices(rows, validation_rows, seed)
    with spool.open(encoding="utf-8", newline="\n") as lines, atomic_open(paths.train) as train, \
            atomic_open(paths.validation) as validation:
        for index, line in enumerate(lines):
            (validation if index in held_out else train).write(line)


def _temp_path(path: Path, tag: str) -> Path:
    """A hidden file beside `path`, so the final rename stays on one file system."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{tag}.{os.getpid()}.tmp")


@contextmanager
def atomic_open(path: Path) -> Iterator[IO[str]]:
    """A text file that appears at `path` only once the block has finished without an error."""
    temp = _temp_path(path, "part")
    try:
        with temp.open("w", encoding="utf-8", newline="\n") as handle:
            yield handle
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
