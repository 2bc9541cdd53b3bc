"""Why a source row is dropped or changed: the named reasons, and the exception that carries a drop.

Data prep counts each dropped row under exactly one key of `DROP_REASONS`, and each kept row once under every key
of `CHANGES` that applies to it (prep_report.json's `dropped` and `changed`). Training's reader uses the same
names. This module has no other job, so the format readers (formats.py) and the tool-call readers
(tool_calls.py, tool_formats.py) can all raise `RowDropped` without importing each other.
"""

from __future__ import annotations

import json
from typing import Any

DROP_REASONS: dict[str, str] = {
    "invalid_json": "the JSONL line is not valid JSON",
    "not_utf8": "the JSONL line is not UTF-8 text (the file is in another encoding, e.g. latin-1)",
    "not_an_object": "the row (or one of its messages/turns) is not a JSON object",
    "missing_fields": "the row lacks the format's fields (or one has the wrong type)",
    "missing_role": "a message has no role",
    "unknown_role": "a role the format does not define",
    "non_string_content": "content that is not text: a number, a list of non-parts, a dict",
    "non_text_content": "a content part that is not text (image, audio, ...)",
    "empty_content": "an empty or whitespace-only message (assistant tool calls may have empty content)",
    "malformed_tool_call": "a tool call without a name or with arguments that are not a JSON object (also a "
                           "<tool_call> block, glaive <functioncall> or ToolACE [func(a=1)] call list that does "
                           "not parse, or whose arguments are not named literals), or a tool result without a "
                           "call",
    "tool_results_unpaired": "the tool results after an assistant's tool calls do not pair up with the calls: "
                             "a call left without a result, more results than calls, or a tool_call_id that "
                             "names none of the calls (data prep only)",
    "malformed_tools": "the row's tools are not a list of tool objects (or a JSON string of one), or a <tools> "
                       "block or ToolACE tool list in the system message does not parse",
    "malformed_history": "alpaca history is not a list of [user, assistant] pairs",
    "unparsable_text": "hh or glaive text that is not made of its role-marked turns",
    "no_assistant": "no assistant message to learn from",
    "roles_out_of_order": "system not first, user/assistant not alternating, or a tool call left unanswered",
    "consecutive_user": "two user turns in a row with consecutive_user=drop",
}

# Rows that are kept but changed; counted in prep_report.json like drops (a row once per change).
CHANGES: dict[str, str] = {
    "trailing_turns_trimmed": "turns after the last assistant message were cut",
    "consecutive_user_merged": "consecutive user turns were joined with a blank line",
    "reasoning_from_field": "an assistant's `reasoning` or `thinking` field became its reasoning_content",
    "reasoning_from_think_tags": "a <think>...</think> block opening an assistant's content became its "
                                 "reasoning_content (data prep only)",
    # Tool calls (data prep only; tool_calls.py)
    "legacy_function_call": "OpenAI's legacy `function_call` / role `function` / row `functions` became "
                            "tool_calls / role `tool` / `tools`",
    "tool_calls_from_tags": "<tool_call> blocks in an assistant's content became its tool_calls",
    "tool_results_from_tags": "a tool message of <tool_response> blocks became one tool message per block",
    "tools_from_system_prompt": "a <tools> block in the system message became the row's tools (the block was cut "
                                "from the system text)",
    "assistant_text_merged_with_calls": "an assistant text turn followed at once by an assistant tool-call turn "
                                        "(ShareGPT gpt then function_call) became one assistant message with the "
                                        "content and the tool_calls",
    "tool_results_split": "one tool result holding a JSON list of as many results as there were calls became "
                          "one result per call",
    "tool_call_ids_added": "a tool call without an id got one (call00001, call00002, ... in the row's order), and "
                           "a tool result without a tool_call_id got the id of the call it answers",
    "tool_arguments_decoded": "tool-call arguments given as a JSON string were written as the object",
    "tools_normalised": "tools given as bare {name, description, parameters} were written in the OpenAI form "
                        "{type: function, function: {...}}, parameters as a JSON-schema object",
}


class RowDropped(Exception):
    """A row that cannot be used: `reason` is a key of DROP_REASONS, `detail` says where and why."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def short(value: Any, limit: int = 60) -> str:
    """`value` as JSON, cut to `limit` characters: for the detail of a drop."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
