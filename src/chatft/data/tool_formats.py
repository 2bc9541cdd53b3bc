"""Tool-calling dataset shapes of their own, read into OpenAI-style messages.

- `xlam` (Salesforce xLAM / APIGen function-calling sets): `{"query": str, "tools": [...], "answers": [{name,
  arguments}, ...]}`, tools and answers as JSON text or decoded. One user turn and one assistant turn that makes
  the answers' calls (there are no results: the calls are the answer). An empty `answers` list has no reply to
  learn from (`no_assistant`).
- `glaive` (glaiveai/glaive-function-calling-v2): `{"system": "SYSTEM: <prompt> -\\n{tool}\\n\\n{tool}...",
  "chat": "USER: ...\\n\\n\\nASSISTANT: <functioncall> {\"name\": ..., \"arguments\": '{...}'} <|endoftext|>\\n\\n\\n
  FUNCTION RESPONSE: {...}\\n\\n\\nASSISTANT: ... <|endoftext|>"}`. The JSON objects after the system prompt are
  the tools (the prompt before them stays the system message); turns start at `USER:`, `ASSISTANT:` or
  `FUNCTION RESPONSE:` at the start of a line; `<|endoftext|>` closes an assistant turn and is dropped (the
  model's own template writes its end of turn); a call's arguments are JSON, often wrapped in single quotes.
- `toolace` (Team-ACE/ToolACE, and Gorilla/BFCL-style rows): ShareGPT turns or OpenAI messages (read by
  formats.py as those formats are) in which an assistant turn that is a Python-style call list,
  `[get_weather(city="Paris"), get_time(tz='UTC')]`, is that turn's tool calls (tool_calls.python_calls), and the
  system prompt holds the tools as a JSON list (`...you can invoke:\n[{"name": ..., "parameters": ...}].\n...`):
  the first such list becomes the row's tools and is cut from the prompt, unless the row has `tools` already.
  Results are the `tool`/`observation` turns after a call; ToolACE writes the results of several calls as one
  JSON list, which data prep's tool mapping splits, one result per call.

Out: `(messages, tools)` as formats.BUILDERS return them; the row's guards and data prep's tool mapping
(ids, pairing, tool forms) run after, as for every format.
"""

from __future__ import annotations

import json
import re
from typing import Any

from chatft.data.drops import RowDropped, short
from chatft.data.tool_calls import cut_out, json_or_none, parse_call, parse_tools, python_calls

Built = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]

GLAIVE_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
GLAIVE_MARKER = re.compile(r"(?:\A|\n)[ \t]*(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?")
GLAIVE_CALL = "<functioncall>"
GLAIVE_END = "<|endoftext|>"
# `{"name": "f", "arguments": '{...}'}`: the arguments are JSON text inside single quotes, unescaped.
GLAIVE_QUOTED_CALL = re.compile(r"\A\{\s*\"name\"\s*:\s*\"(?P<name>[^\"]+)\"\s*,\s*\"arguments\"\s*:\s*'(?P<arguments>.*)'"
                                r"\s*\}\Z", re.DOTALL)

# The call-format instruction of ToolACE's system prompt ("Put it in the format of [func1(params_name=params_value,
# ...") and of Gorilla/BFCL's ("[func_name1(params_name1=params_value1, ..."), which ask for Python-style calls.
TOOLACE_INSTRUCTION = re.compile(r"\[func(?:_name)?1\(params_name1?=params_value1?")
# Where a JSON list of objects may start in a system prompt (`[{"name": ...`).
JSON_OBJECT_LIST = re.compile(r"\[\s*\{")


def is_xlam(row: dict[str, Any]) -> bool:
    return "query" in row and "answers" in row and "tools" in row


def is_glaive(row: dict[str, Any]) -> bool:
    chat = row.get("chat")
    return isinstance(chat, str) and "USER:" in chat and "ASSISTANT:" in chat


def is_toolace(row: dict[str, Any]) -> bool:
    """Turns (ShareGPT or messages) and a system prompt asking for Python-style calls."""
    turns = next((row[key] for key in ("conversations", "conversation", "messages") if isinstance(row.get(key), list)),
                 None)
    if turns is None:
        return False
    system = row.get("system")
    if not isinstance(system, str) and turns and isinstance(turns[0], dict):
        first = turns[0]  # a null is absent: Arrow-backed datasets fill the keys a row lacks with None
        if (first.get("from") or first.get("role")) == "system":
            system = first.get("value") or first.get("content")
    return isinstance(system, str) and TOOLACE_INSTRUCTION.search(system) is not None


def from_xlam(row: dict[str, Any], text_field: str) -> Built:
    """`{"query", "tools", "answers"}` (see the module docstring)."""
    query = row.get("query")
    if not isinstance(query, str):
        raise RowDropped("missing_fields" if query is None else "non_string_content",
                         f"query is {short(query)}, not text")
    if not query.strip():
        raise RowDropped("empty_content", "query is empty")
    answers = row.get("answers")
    if isinstance(answers, str):
        decoded = json_or_none(answers)
        if decoded is None:
            raise RowDropped("malformed_tool_call", f"answers is a string that is not JSON: {short(answers)}")
        answers = decoded
    if not isinstance(answers, list):
        raise RowDropped("malformed_tool_call", f"answers is not a list of calls: {short(answers)}")
    if not answers:
        raise RowDropped("no_assistant", "answers is empty: no call to learn")
    calls = [parse_call(answer, f"answer {number}") for number, answer in enumerate(answers, start=1)]
    messages = [{"role": "user", "content": query}, {"role": "assistant", "content": "", "tool_calls": calls}]
    return messages, parse_tools(row.get("tools"))


def from_glaive(row: dict[str, Any], text_field: str) -> Built:
    """`{"system", "chat"}` (see the module docstring)."""
    chat = row.get("chat")
    if not isinstance(chat, str):
        raise RowDropped("missing_fields" if chat is None else "non_string_content", f"chat is {short(chat)}, not text")
    system = row.get("system") or ""
    if not isinstance(system, str):
        raise RowDropped("non_string_content", f"system is {short(system)}, not text")
    prompt, tools = _glaive_system(system)
    messages = [{"role": "system", "content": prompt}] if prompt else []
    pieces = GLAIVE_MARKER.split(chat)
    if pieces[0].strip() or len(pieces) == 1:
        raise RowDropped("unparsable_text", f"chat does not start with a USER:/ASSISTANT: turn: {short(chat)}")
    for number, (marker, body) in enumerate(zip(pieces[1::2], pieces[2::2]), start=1):
        messages.append(_glaive_turn(GLAIVE_ROLES[marker], body, f"turn {number}"))
    return messages, tools


def _glaive_system(system: str) -> tuple[str, list[dict[str, Any]] | None]:
    """The system prompt without its `SYSTEM:` label, and the tool objects written after it."""
    text = system.strip().removeprefix("SYSTEM:").strip()
    start = text.find("{")
    if start < 0:
        return text, None
    decoder, tools, position = json.JSONDecoder(), [], start
    while position < len(text):
        try:
            tool, position = decoder.raw_decode(text, position)
        except ValueError:
            raise RowDropped("malformed_tools", f"the system's tools are not JSON objects: {short(text[position:])}") from None
        if not isinstance(tool, dict):
            raise RowDropped("malformed_tools", f"a tool in the system text is not an object: {short(tool)}")
        tools.append(tool)
        while position < len(text) and text[position].isspace():
            position += 1
    return text[:start].strip(), tools or None


def _glaive_turn(role: str, body: str, where: str) -> dict[str, Any]:
    text = body.replace(GLAIVE_END, "").strip() if role == "assistant" else body.strip()
    if role == "assistant" and GLAIVE_CALL in text:
        before, _, call = text.partition(GLAIVE_CALL)
        return {"role": "assistant", "content": before.strip(), "tool_calls": [_glaive_call(call.strip(), where)]}
    if not text:
        raise RowDropped("empty_content", f"{where} ({role}) has empty content")
    return {"role": role, "content": text}


def _glaive_call(text: str, where: str) -> dict[str, Any]:
    call = json_or_none(text)
    if call is None and (quoted := GLAIVE_QUOTED_CALL.match(text)) is not None:
        call = {"name": quoted["name"], "arguments": quoted["arguments"].strip()}
    if not isinstance(call, dict):
        raise RowDropped("malformed_tool_call", f"{where} <functioncall> is not a call: {short(text)}")
    return parse_call(call, f"{where} <functioncall>")


def toolace_calls(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Built:
    """Messages read from a ToolACE row → its calls and tools (see the module docstring)."""
    mapped = []
    for number, message in enumerate(messages, start=1):
        role, content = message["role"], message["content"]
        if (role == "assistant" and not message.get("tool_calls")
                and (calls := python_calls(content, f"message {number}")) is not None):
            mapped.append({**message, "content": "", "tool_calls": calls})
        elif role == "system" and number == 1 and not tools:
            prompt, tools = _toolace_system(content)
            if prompt:
                mapped.append({**message, "content": prompt})
        else:
            mapped.append(message)
    return mapped, tools


def _toolace_system(text: str) -> tuple[str, list[dict[str, Any]] | None]:
    """The system prompt without its JSON list of tools, and the tools (the prompt as it is and None when it
    has no such list). A list of objects that is not JSON drops the row: its tools cannot be read."""
    found = JSON_OBJECT_LIST.search(text)
    if found is None:
        return text, None
    try:
        tools, end = json.JSONDecoder().raw_decode(text, found.start())
    except ValueError:
        raise RowDropped("malformed_tools", f"the system prompt's tool list is not JSON: "
                                            f"{short(text[found.start():])}") from None
    tools = parse_tools(tools)
    if text[end:end + 1] == ".":  # ToolACE closes the list with a full stop, which would be left on its own
        end += 1
    return cut_out(text, found.start(), end), tools
