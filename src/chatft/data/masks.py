"""One conversation → token ids + a loss mask that marks exactly what the assistant emits.

In: a `messages` list (OpenAI style, optionally `tools`), a tokenizer, the chat template to render with
and the masking options. Out: `(input_ids, loss_mask)`.

Supervised tokens are the assistant's content and its end-of-turn token; the assistant header
(`<|im_start|>assistant\\n`) is not trained unless `mask_generation_prompt` is false. Two methods:

- **generation tags**: the template wraps assistant output in `{% generation %}`; transformers returns
  the span mask. The spans are checked, because a span whose end falls on a token boundary the tokenizer
  cannot map (transformers issue #47325) silently marks the rest of the sequence.
- **prefix rendering**: render the conversation up to each assistant message with and without it; the
  text it adds (trailing whitespace after the end-of-turn token excluded) is supervised. Every partial
  render must be a prefix of the full render, else the template rewrites history and the mask would be
  wrong: `template_not_prefix_stable`.

Either way the rendered turns are then checked against the messages (`template_fields`): a template that
drops an assistant's tool calls, reasoning or content, or the row's tools, fails the row with
`TemplateDropsFields` (drop reason `template_drops_field`), which training turns into a refusal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chatft.data.template_fields import DroppedField, dropped_fields
from chatft.errors import ChatftError


@dataclass(frozen=True)
class MaskOptions:
    train_on: str = "all_assistant"  # all_assistant | last_assistant
    mask_generation_prompt: bool = True


class RowMaskError(ValueError):
    """This row cannot be masked reliably; `reason` is the drop reason it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class TemplateDropsFields(RowMaskError):
    """The chat template rendered this row without some of what its messages say (`dropped`)."""

    def __init__(self, dropped: list[DroppedField]) -> None:
        super().__init__("template_drops_field", "; ".join(f"{d.field}: {d.describe()}" for d in dropped))
        self.dropped = dropped


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as HF chat templates expect them: tool-call arguments as objects (OpenAI rows carry
    them as JSON strings, which templates would encode a second time) and chatft's own per-message keys
    (`train`) removed."""
    rendered = []
    for message in messages:
        message = {k: v for k, v in message.items() if k != "train"}
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function", call))
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        pass  # templates print it as given
                calls.append({**call, "function": function} if "function" in call else function)
            message["tool_calls"] = calls
        rendered.append(message)
    return rendered


def trained_assistant_indices(messages: list[dict[str, Any]], options: MaskOptions) -> list[int]:
    """Which assistant messages are supervised: all (or only the last), minus those marked `train: false`."""
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if options.train_on == "last_assistant":
        assistant = assistant[-1:]
    return [i for i in assistant if messages[i].get("train", True) is not False]


def _render(tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def supervised_char_spans(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> tuple[str, list[tuple[int, int]]]:
    """Prefix rendering: the full text and the [start, end) character ranges to supervise."""
    full, turns = _turn_char_spans(tokenizer, template, messages, tools, options)
    return full, [(start, end) for start, end in turns.values() if end > start]


def _turn_char_spans(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> tuple[str, dict[int, tuple[int, int]]]:
    """Prefix rendering: the full text and, per trained assistant message, its [start, end) character range
    (empty when the template renders nothing for it)."""
    shown = template_messages(messages)
    full = _render(tokenizer, template, shown, tools, False)
    spans = {}
    for index in trained_assistant_indices(messages, options):
        before = _render(tokenizer, template, shown[:index], tools, options.mask_generation_prompt) if index else ""
        through = _render(tokenizer, template, shown[: index + 1], tools, False)
        for partial in (before, through):
            if not full.startswith(partial):
                raise ChatftError(
                    "template_not_prefix_stable",
                    f"the chat template renders message {index} differently once later messages follow it "
                    f"(it rewrites earlier turns), so the assistant tokens cannot be located",
                    "train on the final turn only (dataset.train_on=last_assistant), or give a template that "
                    "keeps history verbatim or has {% generation %} tags (dataset.chat_template=...)",
                )
        if not through.startswith(before):
            raise ChatftError(
                "template_not_prefix_stable",
                f"the generation prompt of message {index} is not a prefix of the rendered assistant turn",
                "give a template whose add_generation_prompt output starts each assistant turn "
                "(dataset.chat_template=...)",
            )
        end = len(through.rstrip())  # whitespace after the end-of-turn token is never generated
        spans[index] = (len(before), max(end, len(before)))
    return full, spans


def _mask_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """A token is supervised when it starts inside a supervised character range."""
    mask = []
    span_index = 0
    for start, end in offsets:
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
        mask.append(inside and end > start)
    return mask


@dataclass
class _Rendered:
    """A masked row and what the check of its fields reads: each trained turn's supervised text, and the
    rendered text outside the supervised turns (built only when asked for)."""

    input_ids: list[int]
    mask: list[bool]
    turn_texts: dict[int, str]
    prompt_text: Any  # a callable returning the text, so rows without tools never build it


def _prefix_rendering(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> _Rendered:
    text, turns = _turn_char_spans(tokenizer, template, messages, tools, options)
    spans = [(start, end) for start, end in turns.values() if end > start]
    # The template writes its own special tokens (BOS included): add none on top.
    # verbose=False: no "Token indices sequence length is longer than ..." from transformers; the length policy
    # counts and reports over-long rows itself.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)

    def prompt_text() -> str:
        edges = [0, *(edge for span in spans for edge in span), len(text)]
        return "\n".join(text[a:b] for a, b in zip(edges[::2], edges[1::2]))

    return _Rendered(list(encoded["input_ids"]), _mask_from_offsets(encoded["offset_mapping"], spans),
                     {index: text[start:end] for index, (start, end) in turns.items()}, prompt_text)


def mask_by_prefix_rendering(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> tuple[list[int], list[bool]]:
    rendered = _prefix_rendering(tokenizer, template, messages, tools, options)
    return rendered.input_ids, rendered.mask


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, flag in enumerate(mask):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def check_generation_spans(mask: list[bool], messages: list[dict[str, Any]]) -> None:
    """Refuse span masks with the shapes of transformers issue #47325: a span that starts at token 0, or
    one that runs to the end of the sequence when the conversation does not end with the assistant,
    or more spans than assistant messages."""
    runs = _runs(mask)
    assistant_count = sum(1 for m in messages if m.get("role") == "assistant")
    if runs and runs[0][0] == 0:
        raise RowMaskError("generation_span_invalid", "a generation span starts at token 0")
    if runs and runs[-1][1] == len(mask) and messages and messages[-1].get("role") != "assistant":
        raise RowMaskError("generation_span_invalid", "a generation span runs past the last assistant turn")
    if len(runs) > assistant_count:
        raise RowMaskError("generation_span_invalid", f"{len(runs)} generation spans for {assistant_count} assistant turns")


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of `ids` as rendered, special tokens included. A fast tokenizer's Rust decoder directly: the
    same text as `tokenizer.decode` without clean-up, at half the cost (it runs once per trained turn)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(ids, skip_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _generation_tags(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> _Rendered:
    encoded = tokenizer.apply_chat_template(
        template_messages(messages), tools=tools, chat_template=template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, add_generation_prompt=False,
        tokenizer_kwargs={"verbose": False},  # chatft reports over-long rows itself: see mask_by_prefix_rendering
    )
    input_ids = list(encoded["input_ids"])
    mask = [bool(flag) for flag in encoded["assistant_masks"]]
    check_generation_spans(mask, messages)
    keep = trained_assistant_indices(messages, options)
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    runs = _runs(mask)
    if len(runs) == len(assistant):
        turn_texts = {i: _decode(tokenizer, input_ids[a:b]) for (a, b), i in zip(runs, assistant) if i in keep}
    else:  # the spans cannot be told apart by turn: each trained turn is checked against all of them
        everything = "\n".join(_decode(tokenizer, input_ids[a:b]) for a, b in runs)
        turn_texts = {i: everything for i in keep}

    def prompt_text() -> str:
        edges = [0, *(edge for run in runs for edge in run), len(input_ids)]
        return "\n".join(_decode(tokenizer, input_ids[a:b]) for a, b in zip(edges[::2], edges[1::2]))

    if keep != assistant:  # drop the spans of assistant turns that are not trained, by their order
        if len(runs) != len(assistant):
            raise RowMaskError("generation_span_invalid",
                                f"{len(runs)} generation spans for {len(assistant)} assistant turns")
        for run, message_index in zip(runs, assistant):
            if message_index not in keep:
                mask[run[0]:run[1]] = [False] * (run[1] - run[0])
    return _Rendered(input_ids, mask, turn_texts, prompt_text)


def mask_by_generation_tags(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> tuple[list[int], list[bool]]:
    rendered = _generation_tags(tokenizer, template, messages, tools, options)
    return rendered.input_ids, rendered.mask


def mask_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any = None,
    options: MaskOptions = MaskOptions(), tagged_template: str | None = None, check_fields: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask for one conversation. `tagged_template`, when given, is a template with
    generation tags that renders identically to `template`; it is used unless the header must be trained
    (generation spans never include it). With `check_fields`, a rendering that lacks an assistant's tool calls,
    reasoning or content, or the row's tools, raises `TemplateDropsFields`."""
    if tagged_template is not None and options.mask_generation_prompt:
        rendered = _generation_tags(tokenizer, tagged_template, messages, tools, options)
    else:
        rendered = _prefix_rendering(tokenizer, template, messages, tools, options)
    if check_fields:
        dropped = dropped_fields(messages, tools, rendered.turn_texts, rendered.prompt_text() if tools else None)
        if dropped:
            raise TemplateDropsFields(dropped)
    return rendered.input_ids, rendered.mask
