"""A training dataset from its config section: rows → token ids + loss masks, with every drop counted.

In: `dataset` (or `validation_dataset`) config section and the tokenizer. Out: `PreparedData`, and the
tokenizer's `chat_template` set to the template trained with (it is saved with the model).

Steps: refuse missing paths and packed Parquet; choose the chat template and the masking method; read
and validate `messages` rows (the same row guards as `chatft prep`); render + mask each conversation (in several
processes for large files) as one row, or as one row per assistant turn where the template rewrites history
(`dataset.multi_turn`, reported as the expansion); check that the rendering carries what each row says (tool
calls, tools, reasoning, content: `template_fields`) and that each turn follows its generation prompt, and
refuse training when not (`template_drops_field`, `template_not_prefix_stable`; preview counts instead);
apply the over-length policy to each training row; refuse a dataset with nothing to learn. The result is cached on disk
per (data, tokenizer, template, settings).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Callable, NamedTuple

from chatft import artifacts, console
from chatft.data import cache
from chatft.data.chat_templates import (BUNDLED, RENDERS_TOOLS, has_generation_tags, resolve_chat_template,
                                         strip_generation_tags, template_sha256, training_template_for)
from chatft.data.guards import check_dataset_path
from chatft.data.masks import MaskOptions, RowMaskError, TemplateDropsFields, conversation_rows
from chatft.data.readers import not_utf8_hint
from chatft.data.sources import read_message_rows
from chatft.data.types import DataReport, PreparedData, TokenizedRow
from chatft.errors import ChatftError

PARALLEL_MIN_ROWS = 4000  # below this, starting worker processes costs more than it saves
SERIAL_CHUNK_ROWS = 256  # rows tokenized between two progress updates in this process
MAX_EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class TemplateChoice:
    template: str  # what the tokenizer carries and the saved model is served with
    source: str  # tokenizer | bundled:<name> | file:<path> | inline
    sha256: str
    tagged: str | None  # a generation-tagged twin that renders identically, used for masks
    method: str  # generation_tags | prefix_rendering


def choose_template(tokenizer: Any, chat_template: str | None) -> TemplateChoice:
    """The config's template if it names one, else the tokenizer's; refuse when there is neither. A
    template given in the config is set on the tokenizer without its generation tags (a transformers
    extension other runtimes reject); the tags are still used for the masks."""
    if chat_template:
        template, source = resolve_chat_template(chat_template)
        tokenizer.chat_template = strip_generation_tags(template) if has_generation_tags(template) else template
    else:
        template, source = tokenizer.chat_template, "tokenizer"
        if isinstance(template, dict):  # tokenizers with named templates: the default one is for chat
            template = template.get("default")
        if not template:
            raise ChatftError(
                "chat_template_missing",
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat template "
                "and dataset.chat_template is not set",
                f"name one: dataset.chat_template=<{' | '.join(sorted(BUNDLED))}> (chatft's bundled templates), "
                "a path to a .jinja file, or an inline Jinja string",
            )
    tagged = template if has_generation_tags(template) else training_template_for(template)
    method = "generation_tags" if tagged else "prefix_rendering"
    return TemplateChoice(tokenizer.chat_template, source, template_sha256(template), tagged, method)


# --------------------------------------------------------------------------- per-row work

_worker_state: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state.update(state)


@dataclass
class RowResult:
    """One training row of a conversation, built (`ids`, `mask`) or not (`reason`, and the fields its template
    dropped or a detail); plain data, so that worker processes can return it."""

    ids: list[int] | None = None
    mask: list[bool] | None = None
    reason: str | None = None
    dropped: list[Any] = field(default_factory=list)
    detail: str | None = None
    message: int | None = None  # per-turn rows: the 1-based number of the assistant message trained


class Result(NamedTuple):
    """What one source row became (plain data, returned by worker processes)."""

    row_number: int
    rows: list[RowResult]
    per_turn: bool
    whole_tokens: int  # the conversation rendered as one row
    thinking_off_turns: int = 0  # turns without reasoning rendered with thinking off (masks.ConversationRows)


def _row_result(outcome: Any) -> RowResult:
    if isinstance(outcome, TemplateDropsFields):
        return RowResult(reason=outcome.reason, dropped=outcome.dropped)
    if isinstance(outcome, RowMaskError):
        return RowResult(reason=outcome.reason, detail=str(outcome))
    ids, mask, message = outcome
    return RowResult(ids, mask, message=message)


def _tokenize_chunk(chunk: list[tuple[int, dict[str, Any]]]) -> list[Result]:
    """(row number, row) → (row number, its training rows, per turn or not, its tokens as one row)."""
    state = _worker_state
    results = []
    for row_number, row in chunk:
        try:
            built = conversation_rows(state["tokenizer"], state["template"], row["messages"], row.get("tools"),
                                      state["options"], state["tagged"])
        except ChatftError:
            raise
        except Exception:  # the template itself refused the row (e.g. raise_exception on role order)
            results.append(Result(row_number, [RowResult(reason="template_error")], False, 0))
            continue
        results.append(Result(row_number, [_row_result(o) for o in built.outcomes], built.per_turn,
                              built.whole_tokens, built.thinking_off_turns))
    return results


def _tokenize_all(rows: list[tuple[int, dict[str, Any]]], state: dict[str, Any], task: str) -> list[Result]:
    """Every row rendered, masked and tokenized, in order; progress (`task`) on stderr, chunk by chunk."""
    results: list[Result] = []
    with console.Progress(task, len(rows), "rows", stream=sys.stderr) as progress:
        if len(rows) < PARALLEL_MIN_ROWS or (os.cpu_count() or 1) < 2:
            _init_worker(state)
            for start in range(0, len(rows), SERIAL_CHUNK_ROWS):
                results += _tokenize_chunk(rows[start:start + SERIAL_CHUNK_ROWS])
                progress.advance(min(SERIAL_CHUNK_ROWS, len(rows) - start))
            return results
        workers = min(os.cpu_count() or 2, 8)
        size = max(256, len(rows) // (workers * 4))
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        # fork: the tokenizer is inherited by the workers instead of being pickled per chunk.
        with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                                 initargs=(state,)) as pool:
            for chunk, part in zip(chunks, pool.map(_tokenize_chunk, chunks)):
                results += part
                progress.advance(len(chunk))
    return results


# --------------------------------------------------------------------------- the dataset


def _apply_length_policy(ids: list[int], mask: list[bool], seq_length: int, truncation: str, row_number: int,
                         key: str) -> tuple[list[int], list[bool], str | None]:
    """Returns the (possibly cut) row and a drop reason, or raises for truncation=error."""
    if len(ids) <= seq_length:
        return ids, mask, None
    if truncation == "error":
        raise ChatftError(
            "sequence_too_long",
            f"row {row_number} of {key} is {len(ids)} tokens, longer than dataset.seq_length={seq_length}",
            "raise dataset.seq_length, or set dataset.truncation=drop (skip and count such rows) or "
            "truncate (cut them); `chatft preview` shows how many rows are affected",
        )
    if truncation == "drop":
        return ids, mask, "too_long"
    ids, mask = ids[:seq_length], mask[:seq_length]
    return ids, mask, None if any(mask) else "truncated_to_no_supervised"


def length_quantiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def training_rows(report: DataReport) -> int:
    """The rows the data came to: the source rows, with each conversation trained per turn counted per turn."""
    return report.rows_in + report.expansion.get("rows_after", 0) - report.expansion.get("rows_before", 0)


def template_drops_error(report: DataReport, key: str) -> ChatftError:
    """The refusal of a dataset whose chat template leaves out fields of some rows' messages."""
    fields = report.fields_dropped_by_template
    rows = report.dropped_by_reason.get("template_drops_field", 0)
    found = "; ".join(f"{field} in {count} rows (first: {report.template_drop_examples[field]})"
                      for field, count in fields.items())
    hints = []
    if {"tool_calls", "tools"} & set(fields):
        hints.append("set dataset.chat_template to a template that renders tool calls and tools: the model's own "
                     "tool-aware template (the path of its chat_template.jinja), or the bundled one of its family "
                     f"where that renders them ({', '.join(RENDERS_TOOLS)})")
    if "reasoning_content" in fields:
        hints.append("for reasoning_content, set dataset.chat_template to a template that renders it (the reasoning "
                     "model's own, or the bundled deepseek_r1_distill for R1 distills), or remove reasoning_content "
                     "from the rows if the reasoning is not to be trained")
    if "content" in fields:
        hints.append("for content, give a template that writes the assistant's content as the rows have it (this "
                     "one rewrites it, e.g. strips <think> blocks)")
    hints.append("`chatft preview -c CONFIG` counts the rows affected per field")
    return ChatftError(
        "template_drops_field",
        f"the chat template ({report.template_source}) cannot render what the messages say in {rows} of "
        f"{training_rows(report)} rows of {key} ({report.path}); training them would teach the model turns "
        f"without it: {found}",
        "; ".join(hints),
    )


def generation_prompt_error(report: DataReport, section: Any, key: str) -> ChatftError:
    """The refusal of a dataset whose template cannot render some turns after its own generation prompt."""
    count = report.dropped_by_reason["generation_prompt_mismatch"]
    hint = ("give a template that renders the turn it asks the model to generate right after its generation "
            "prompt (dataset.chat_template=...: the model's own, or its family's training variant)")
    if section.chat_template_kwargs.get("enable_thinking") is False:
        hint = ("with enable_thinking=false the generation prompt closes an empty reasoning block, so a turn that "
                "carries reasoning cannot follow it: remove those turns' reasoning_content, or unset "
                "dataset.chat_template_kwargs.enable_thinking; " + hint)
    else:
        hint = ("where the generation prompt opens a reasoning block, a turn without reasoning_content cannot follow "
                "it: with dataset.chat_template_kwargs.enable_thinking unset, such turns are rendered with thinking "
                "off where the template has that switch; pinned to true, give those turns their reasoning; " + hint)
    return ChatftError(
        "template_not_prefix_stable",
        f"in {count} training rows of {key} ({report.path}) the chat template renders the assistant turn "
        f"differently from the generation prompt it gives the model, so the turn cannot be trained as generated "
        f"({report.drop_details.get('generation_prompt_mismatch', '')})",
        hint + "; `chatft preview -c CONFIG` counts the rows (generation_prompt_mismatch)",
    )


def _refuse_unrenderable(report: DataReport, section: Any, key: str) -> None:
    """Refuse rows whose template cannot say what the assistant said: trained, they would teach something else."""
    if report.fields_dropped_by_template:
        raise template_drops_error(report, key)
    if report.dropped_by_reason.get("generation_prompt_mismatch"):
        raise generation_prompt_error(report, section, key)


def expansion_summary(report: DataReport) -> str:
    """One line: how conversations became training rows (`dataset.multi_turn`)."""
    expansion = report.expansion
    setting = f"dataset.multi_turn={report.multi_turn}"
    thinking_off = expansion.get("thinking_off_turns") or 0
    off = (f"; {thinking_off} turns without reasoning rendered with enable_thinking=false (the template's "
           "thinking-on prompt opens a reasoning block they do not have)") if thinking_off else ""
    if not expansion.get("per_turn_conversations"):
        return f"multi-turn: one row per conversation ({setting}){off}"
    why = ("" if report.multi_turn == "per_turn" else
           f", chosen where the chat template rewrites earlier turns, first at row {expansion['first_per_turn_row']}")
    return (f"multi-turn: {expansion['per_turn_conversations']} of {expansion['rows_before']} conversations trained "
            f"one row per assistant turn ({setting}{why}): {expansion['rows_before']} -> {expansion['rows_after']} "
            f"rows, {expansion['tokens_before']:,} -> {expansion['tokens_after']:,} tokens{off}")


def _expansion_worth_a_line(expansion: dict[str, Any]) -> bool:
    """Log the expansion when it changed anything: rows per turn, or turns rendered with thinking off."""
    return bool(expansion.get("per_turn_conversations") or expansion.get("thinking_off_turns"))


def _count_template_drops(counts: Counter[str], examples: dict[str, str], row_number: int,
                          dropped: list[Any]) -> None:
    """Count a row under each field its template dropped; keep the first row's account per field."""
    for item in dropped:
        examples.setdefault(item.field, f"row {row_number}, {item.describe()}")
        counts[item.field] += 1


def _expansion(results: list[Result]) -> dict[str, int | None]:
    """Conversations → training rows, for `DataReport.expansion`. Rows that could not be built add no tokens."""
    return {
        "per_turn_conversations": sum(result.per_turn for result in results),
        "first_per_turn_row": next((result.row_number for result in results if result.per_turn), None),
        "rows_before": len(results), "rows_after": sum(len(result.rows) for result in results),
        "tokens_before": sum(result.whole_tokens for result in results),
        "tokens_after": sum(len(item.ids) for result in results for item in result.rows if item.ids is not None),
        "thinking_off_turns": sum(result.thinking_off_turns for result in results),
    }


def _log(line: str) -> None:
    """Data loading speaks on stderr (stdout may carry a command's own output: `preview --json`); a WARNING line is a
    warning, shown under --quiet too."""
    if line.startswith("WARNING "):
        console.warning(line.removeprefix("WARNING "))
    else:
        console.info(line, sys.stderr)


def prepare_training_data(
    section: Any, tokenizer: Any, *, key: str = "dataset", use_cache: bool = True,
    log: Callable[[str], None] | None = None, refuse_template_drops: bool = True,
) -> PreparedData:
    """Token ids and loss masks for every usable row of `section` (a DatasetSection). A chat template that
    drops fields of some rows' messages (`template_drops_field`), or cannot render a turn after its own
    generation prompt (`template_not_prefix_stable`), is refused unless `refuse_template_drops` is false
    (preview), when those rows are counted as dropped."""
    log = log or _log
    check_dataset_path(section.path_or_dataset_id, f"{key}.path_or_dataset_id")
    choice = choose_template(tokenizer, section.chat_template)
    source = read_message_rows(section, key=key)
    options = MaskOptions(train_on=section.train_on, mask_generation_prompt=section.mask_generation_prompt,
                          multi_turn=section.multi_turn, template_kwargs=dict(section.chat_template_kwargs))
    settings = {
        "data": source.sha256, "split": section.split, "limit": section.num_samples_limit,
        "tokenizer": artifacts.tokenizer_fingerprint(tokenizer), "template": choice.sha256, "template_source": choice.source,
        "tagged": hashlib.sha256(choice.tagged.encode()).hexdigest() if choice.tagged else None,
        "seq_length": section.seq_length, "truncation": section.truncation, "train_on": section.train_on,
        "mask_generation_prompt": section.mask_generation_prompt, "multi_turn": section.multi_turn,
        "chat_template_kwargs": section.chat_template_kwargs,
    }
    entry = cache.cache_key(settings)
    if use_cache and source.sha256 is not None and (cached := cache.load(entry)) is not None:
        if refuse_template_drops:
            _refuse_unrenderable(cached.report, section, key)
        log(f"{key}: {cached.report.rows_used} rows from the tokenization cache ({entry[:12]})")
        if _expansion_worth_a_line(cached.report.expansion):
            log(f"{key}: {expansion_summary(cached.report)}")
        return cached

    started = time.perf_counter()
    state = {"tokenizer": tokenizer, "template": choice.template, "tagged": choice.tagged, "options": options}
    dropped: Counter[str] = Counter(source.dropped)
    examples: dict[str, list[int]] = {reason: rows[:MAX_EXAMPLE_ROWS] for reason, rows in source.examples.items()}
    details: dict[str, str] = {}
    rows: list[TokenizedRow] = []
    truncated = 0
    results = _tokenize_all(source.rows, state, f"tokenizing {key}")
    lengths = [len(item.ids) for result in results for item in result.rows if item.ids is not None]
    expansion = _expansion(results)
    field_drops: Counter[str] = Counter()
    field_examples: dict[str, str] = {}
    for row_number, items, *_ in results:
        for item in items:
            reason = item.reason
            _count_template_drops(field_drops, field_examples, row_number, item.dropped)
            if reason is None:
                if not any(item.mask):
                    reason = "no_supervised_tokens"
                else:
                    cut_ids, cut_mask, reason = _apply_length_policy(item.ids, item.mask, section.seq_length,
                                                                     section.truncation, row_number, key)
                    if reason is None:
                        truncated += len(cut_ids) < len(item.ids)
                        rows.append(TokenizedRow(cut_ids, cut_mask, row_number, item.message))
            if reason is not None:
                dropped[reason] += 1
                examples.setdefault(reason, [])
                if len(examples[reason]) < MAX_EXAMPLE_ROWS and row_number not in examples[reason]:
                    examples[reason].append(row_number)  # per-turn rows share their conversation's number
                if item.detail and reason not in details:
                    details[reason] = f"row {row_number}: {item.detail}"

    report = DataReport(
        path=section.path_or_dataset_id, sha256=source.sha256, rows_in=source.rows_in, rows_used=len(rows),
        dropped_by_reason=dict(sorted(dropped.items())), truncated=truncated,
        supervised_tokens=sum(r.num_supervised for r in rows), total_tokens=sum(len(r) for r in rows),
        examples_by_reason=examples, token_length_quantiles=length_quantiles(lengths),
        over_length=sum(n > section.seq_length for n in lengths), template_source=choice.source, mask_method=choice.method,
        flagged_by_reason=dict(source.flagged),
        flagged_examples_by_reason=source.flagged_examples,
        fields_dropped_by_template=dict(field_drops), template_drop_examples=field_examples,
        drop_details=details, multi_turn=section.multi_turn, expansion=expansion,
    )
    assert report.rows_in + expansion["rows_after"] - expansion["rows_before"] == \
        report.rows_used + sum(dropped.values()), "every training row is used or counted as dropped"
    if refuse_template_drops or not rows:
        _refuse_unrenderable(report, section, key)
    if not rows:
        reasons = ", ".join(f"{n} {r}" for r, n in report.dropped_by_reason.items()) or "the file has no rows"
        raise ChatftError(
            "no_supervised_tokens",
            f"no row of {key} ({section.path_or_dataset_id}) is left to train on: {reasons}",
            "check that rows have assistant messages and fit dataset.seq_length; `chatft preview -c CONFIG` "
            "shows what is trained in each row",
        )
    elapsed = time.perf_counter() - started
    log(f"{key}: tokenized {source.rows_in} rows in {elapsed:.1f}s ({source.rows_in / max(elapsed, 1e-9):.0f} rows/s), "
        f"{report.rows_used} used, masks by {choice.method}")
    if _expansion_worth_a_line(expansion):
        log(f"{key}: {expansion_summary(report)}")
    _warn_about(report, rows, tokenizer, key, log, dict(section.chat_template_kwargs or {}))
    _warn_about_source(source, section.path_or_dataset_id, key, log)
    data = PreparedData(rows, report)
    if use_cache and source.sha256 is not None:
        cache.save(entry, data)
    return data


def _warn_about_source(source: Any, path: str, key: str, log: Callable[[str], None]) -> None:
    """What the rows themselves suggest is wrong with the file: another encoding, unrendered prompt templates."""
    if count := source.dropped.get("not_utf8"):
        first = ", ".join(map(str, source.examples["not_utf8"]))
        log(f"WARNING {key}: {count} rows are not UTF-8 (first rows: {first}) and were dropped: {not_utf8_hint(path)}")
    if count := source.flagged.get("template_placeholder"):
        first = ", ".join(map(str, source.flagged_examples["template_placeholder"]))
        log(f"WARNING {key}: {count} rows contain an unfilled template placeholder such as {source.placeholder} "
            f"(first rows: {first}); they are trained on as they are")


def _warn_about(report: DataReport, rows: list[TokenizedRow], tokenizer: Any, key: str,
                log: Callable[[str], None], template_kwargs: dict[str, Any]) -> None:
    for reason, count in report.dropped_by_reason.items():
        first = ", ".join(map(str, report.examples_by_reason.get(reason, [])))
        log(f"{key}: dropped {count} rows: {reason} (first rows: {first})")
    if report.truncated:
        log(f"{key}: truncated {report.truncated} rows to dataset.seq_length")
    if report.fields_dropped_by_template:
        counts = ", ".join(f"{field} in {n} rows" for field, n in report.fields_dropped_by_template.items())
        log(f"WARNING {key}: the chat template leaves out {counts}; training refuses such rows "
            "(error[template_drops_field])")
    # The template's own end-of-turn token (Llama 3's <|eot_id|> is not its EOS), or the EOS.
    end_ids = {artifacts.end_of_turn_token_id(tokenizer, template_kwargs), tokenizer.eos_token_id} - {None}
    ends_trained = sum(1 for row in rows if any(row.input_ids[i] in end_ids for i, m in enumerate(row.loss_mask) if m))
    if end_ids and ends_trained == 0:
        names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(end_ids)))
        log(f"WARNING {key}: the end-of-turn token ({names}) is never supervised: the model will "
            "not learn to stop. Give a template whose assistant turns end with it (dataset.chat_template=...).")
