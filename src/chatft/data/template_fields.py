"""What a chat template must carry: a trained turn says everything its message says, and the row's tools
reach the prompt.

In: one conversation (its messages and the row's `tools`), the supervised text of each trained assistant turn
as the template rendered it, and the rendered text that is not supervised (the prompt around the turns).
Out: the fields the template dropped (`DroppedField`s), empty when it dropped none.

A template that renders only `content` (plain ChatML, SmolLM2's, Gemma's, ...) turns an assistant tool call
into an empty turn, and a template that ignores `reasoning_content` trains the answer without its reasoning:
the model would learn to say nothing, or not to think. The checks, per trained assistant message:
  - `tool_calls`: each call's function name and each of its arguments' values (leaves of the object, as
    written raw, JSON-escaped or Python-quoted) appear in the turn's supervised text;
  - `reasoning_content`: the reasoning appears in the turn's supervised text;
  - `content`: the content appears in the turn's supervised text;
and per row, `tools`: each tool's function name appears in the rendered text outside the supervised turns.
Text is compared with runs of whitespace read as one space (templates trim and re-indent). The checks are
substring searches: a few microseconds per row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# The fields a template may drop, in the order they are reported.
FIELDS: dict[str, str] = {
    "tool_calls": "an assistant message's tool calls (function name and arguments)",
    "tools": "the row's tool definitions (`tools`)",
    "reasoning_content": "an assistant message's reasoning (`reasoning_content`)",
    "content": "an assistant message's content",
}


@dataclass(frozen=True)
class DroppedField:
    field: str  # a key of FIELDS
    message: int | None  # 1-based number of the message in the row; None for the row's `tools`
    missing: str  # what the rendered text lacks, shortened

    def describe(self) -> str:
        if self.message is None:
            return f"tool {self.missing} is not in the rendered prompt"
        return f"message {self.message} (assistant): {self.missing} is not in the trained text"


def squash(text: str) -> str:
    """Runs of whitespace as one space, ends trimmed."""
    return " ".join(text.split())


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaves(value: Any) -> Iterator[Any]:
    """The scalar values inside an arguments object (keys are not values)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _forms(value: Any) -> set[str]:
    """How a template may write one argument value: raw, as JSON (escaped), or as Python writes it."""
    if isinstance(value, str):
        return {squash(value), squash(json.dumps(value, ensure_ascii=False)[1:-1]),
                squash(json.dumps(value)[1:-1]), squash(repr(value)[1:-1])}
    if isinstance(value, bool):
        return {"true", "True"}
    if value is None:
        return {"null", "None"}
    return {str(value), json.dumps(value)}


def _carried(value: Any, text: str) -> bool:
    forms = _forms(value)
    return "" in forms or any(form in text for form in forms)


def _arguments(function: Mapping[str, Any]) -> Any:
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _call_missing(call: Mapping[str, Any], text: str) -> str | None:
    """What of one tool call is not in `text` (squashed), or None."""
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        return None
    name = function.get("name")
    arguments = _arguments(function)
    shown = _short(f"{name}({json.dumps(arguments, ensure_ascii=False)})")
    if isinstance(name, str) and name and squash(name) not in text:
        return f"the call {shown}"
    for value in _leaves(arguments):
        if not _carried(value, text):
            return f"the call {shown} (its argument value {_short(repr(value), 40)})"
    return None


def _tool_name(tool: Any) -> str | None:
    if not isinstance(tool, Mapping):
        return None
    function = tool.get("function", tool)
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) and name.strip() else None


def dropped_fields(messages: list[dict[str, Any]], tools: Any, turn_texts: Mapping[int, str],
                   prompt_text: str | None) -> list[DroppedField]:
    """The fields the template dropped. `turn_texts`: 0-based message index → the supervised text rendered for
    that trained assistant turn; `prompt_text`: the rendered text outside the supervised turns (needed only
    when the row has tools)."""
    dropped: list[DroppedField] = []
    for index, text in turn_texts.items():
        message = messages[index]
        text = squash(text)
        for call in message.get("tool_calls") or ():
            if (missing := _call_missing(call, text)) is not None:
                dropped.append(DroppedField("tool_calls", index + 1, missing))
                break
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning.strip() and squash(reasoning) not in text:
            dropped.append(DroppedField("reasoning_content", index + 1, f"the reasoning {_short(reasoning.strip())!r}"))
        content = message.get("content")
        if isinstance(content, str) and content.strip() and squash(content) not in text:
            dropped.append(DroppedField("content", index + 1, f"the content {_short(content.strip())!r}"))
    if tools and isinstance(tools, list):
        prompt = squash(prompt_text or "")
        missing = [name for name in map(_tool_name, tools) if name is not None and squash(name) not in prompt]
        if missing:
            dropped.append(DroppedField("tools", None, ", ".join(missing)))
    return sorted(dropped, key=lambda d: list(FIELDS).index(d.field))
