"""Source rows → checked OpenAI-style conversations.

In: one decoded source row (a dict) and the shape it is in: `messages`, `sharegpt`, `alpaca`,
`prompt_completion`, `hh`, or the tool-calling sets' own `xlam`, `glaive` and `toolace` (tool_formats.py)
(`detect_format` names it from the first rows when the config says `auto`).
Out: a `Conversation` (messages, the row's tools if any, and the changes made on the way), or
`RowDropped(reason, detail)` when the row cannot become a training conversation. `DROP_REASONS` (drops.py) lists
every reason; data prep counts each dropped row under exactly one of them.

Every format first becomes a list of messages, each `{"role", "content": str}` plus `tool_calls` and `reasoning_content`
(assistant; also read from `reasoning`/`thinking`, and in data prep from a `<think>` block opening the content) or
`tool_call_id`/`name` (tool); then the same guards run on all of them (`check_conversation`):
  - a conversation needs an assistant message;
  - turns after the last assistant message (an unanswered user turn, a trailing tool result) are cut, since
    nothing after the last reply is trained on; the row is kept and the cut is counted as a change;
  - system only first; then user and assistant alternate, starting with user; tool results only right after
    an assistant tool call (or another tool result), and a tool call must be followed by its results;
  - two user turns in a row are joined with a blank line (`consecutive_user: merge`) or drop the row (`drop`).
Tool-call `arguments` are kept as given (a JSON string or an object); a string must decode to a JSON object.
Data prep (`map_tools`) also maps the tool-call shapes of public datasets into OpenAI's, with paired ids and object
arguments, and joins an assistant's text turn with the tool-call turn right after it (tool_calls.py); training
reads a `messages` file as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from chatft.data import tool_calls
from chatft.data.drops import CHANGES, DROP_REASONS, RowDropped
from chatft.data.drops import short as _short
from chatft.data.tool_calls import function_call_turn, json_or_none, parse_calls, parse_tools
from chatft.data.tool_formats import from_glaive, from_xlam, is_glaive, is_toolace, is_xlam, toolace_calls
from chatft.errors import ChatftError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "hh", "xlam", "glaive", "toolace")
__all__ = ["CHANGES", "DROP_REASONS", "FORMATS", "Conversation", "RowDropped", "convert_row", "detect_format"]

# Where assistant reasoning arrives besides `reasoning_content`: other exports' field names, and inline in the
# content as reasoning models write it (`<think>...</think>` first, then the answer).
REASONING_FIELDS = ("reasoning", "thinking")
INLINE_THINK = re.compile(r"\A\s*<think>(.*?)</think>\s*", re.DOTALL)

# Rows that are kept as they are but look wrong; counted (with the first row numbers) and warned about.
FLAGS: dict[str, str] = {
    "template_placeholder": "a message holds an unfilled template placeholder such as {{ name }}",
}
# `{{ name }}` / `{{user.name}}`: a Jinja/Mustache/Handlebars variable left in the text when a prompt template
# was not rendered. Only a bare identifier counts, so code and expressions (`{{ 1 + 2 }}`, `{x}`) do not.
PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")

MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "system": "system",
    "function_call": "assistant",  # its value is the call as JSON: {name, arguments} or a list of them
    "observation": "tool", "tool": "tool", "function": "tool",
}
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# A turn marker at the very start (leading whitespace allowed) or after a blank line.
HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    changes: list[str] = field(default_factory=list)

    def to_row(self) -> dict[str, Any]:
        """The output JSONL row."""
        row: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            row["tools"] = self.tools
        return row


def convert_row(row: dict[str, Any], fmt: str, *, text_field: str = "chosen", consecutive_user: str = "merge",
                inline_think: bool = False, map_tools: bool = False) -> Conversation:
    """One source row in format `fmt` → a checked Conversation, or RowDropped. `inline_think` (data prep) also
    moves a `<think>` block that opens an assistant's content into its reasoning_content; training leaves the
    content as it is, for the model's own template to read. `map_tools` (data prep) maps the tool-call shapes
    of public datasets into OpenAI's (tool_calls.py: legacy function calls, <tool_call>/<tool_response>/<tools>
    text, ids pairing each result with its call, object arguments, tools in the OpenAI form)."""
    changes: list[str] = []
    if map_tools:
        row, changes = tool_calls.legacy_functions(row)
    messages, tools = BUILDERS[fmt](row, text_field)
    messages, reasoning_changes = take_reasoning(messages, inline_think)
    changes += reasoning_changes
    if map_tools:  # before the guards: a <tool_call> turn followed by its results is only in order once parsed
        messages, tools, tag_changes = tool_calls.from_tags(messages, tools)
        messages, merge_changes = tool_calls.merge_text_into_calls(messages)
        changes += tag_changes + merge_changes
    messages, guard_changes = check_conversation(messages, consecutive_user)
    changes += guard_changes
    if map_tools:
        messages, tools, finish_changes = tool_calls.finish(messages, tools)
        changes += finish_changes
    return Conversation(messages, tools, changes)


def take_reasoning(messages: list[dict[str, Any]], inline_think: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Assistant reasoning in its one shape, `reasoning_content`: from a `reasoning`/`thinking` field, or (with
    `inline_think`) from a `<think>...</think>` block at the start of the content. A message that already has
    reasoning_content keeps it and its content as they are. Out: the messages and the changes made."""
    changes: list[str] = []
    taken = []
    for message in messages:
        message = dict(message)
        fields = {key: message.pop(key) for key in REASONING_FIELDS if key in message}
        if message["role"] == "assistant" and "reasoning_content" not in message:
            reasoning = next((value for value in fields.values() if value.strip()), None)
            match = INLINE_THINK.match(message["content"]) if inline_think else None
            if reasoning is not None:
                message["reasoning_content"] = reasoning
                changes.append("reasoning_from_field")
            elif match is not None:
                if match.group(1).strip():  # an empty block is how some templates mark "no reasoning"
                    message["reasoning_content"] = match.group(1).strip()
                message["content"] = message["content"][match.end():]
                changes.append("reasoning_from_think_tags")
        taken.append(message)
    return taken, sorted(set(changes))


def unfilled_placeholder(messages: list[dict[str, Any]]) -> str | None:
    """The first `{{ name }}` placeholder in the messages' content, or None."""
    for message in messages:
        found = PLACEHOLDER.search(message["content"])
        if found:
            return found.group()
    return None


# --------------------------------------------------------------------------- format detection


def formats_of(row: dict[str, Any], text_field: str) -> set[str]:
    """The formats whose fields `row` has."""
    found = set()
    if isinstance(row.get("messages"), list):
        found.add("messages")
    if isinstance(row.get("conversations"), list) or isinstance(row.get("conversation"), list):
        found.add("sharegpt")
    if "instruction" in row and "output" in row:
        found.add("alpaca")
    if "prompt" in row and "completion" in row:
        found.add("prompt_completion")
    text = row.get(text_field)
    if isinstance(text, str) and "Human:" in text and "Assistant:" in text:
        found.add("hh")
    if is_xlam(row):
        found.add("xlam")
    if is_glaive(row):
        found.add("glaive")
    if is_toolace(row):  # ShareGPT or messages turns, but written for Python-style calls: read as ToolACE
        found -= {"sharegpt", "messages"}
        found.add("toolace")
    return found


def detect_format(rows: list[dict[str, Any]], text_field: str, input: str,
                  numbers: list[int] | None = None) -> str:
    """The one format the first rows agree on; otherwise an error naming the keys seen and the choices.
    `numbers` are the rows' numbers in the source, for the message (default: 1, 2, ...)."""
    choices = "--format " + "|".join(FORMATS) + " (format=... in a config)"
    if not rows:
        raise ChatftError("messages_missing", f"{input}: found no JSON object rows to tell the format from",
                          "check the file: rows are JSON objects, one per line (JSONL) or in a JSON array")
    numbers = numbers or list(range(1, len(rows) + 1))
    seen: dict[str, list[int]] = {}
    for number, row in zip(numbers, rows):
        for name in formats_of(row, text_field):
            seen.setdefault(name, []).append(number)
    if len(seen) == 1:
        return next(iter(seen))
    keys = sorted({key for row in rows for key in row})
    shown = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "")
    if not seen and (misshapen := _misshapen_list(rows, numbers, input)) is not None:
        raise misshapen
    if not seen:
        raise ChatftError(
            "messages_missing",
            f"cannot tell the format of {input}: its first {len(rows)} rows have keys {shown}, and none of "
            f"messages, conversations, instruction+output, prompt+completion, hh text in `{text_field}`, "
            "xLAM query+answers+tools, glaive system+chat or ToolACE turns with a [func1(...)] system prompt",
            f"name it with {choices}; for hh text in another field add text_field=FIELD; "
            'or reshape rows to {"messages": [{"role": ..., "content": ...}]}',
        )
    found = "; ".join(f"{name} (rows {', '.join(map(str, idx[:5]))})" for name, idx in seen.items())
    raise ChatftError(
        "config_invalid",
        f"the format of {input} is ambiguous: its first {len(rows)} rows (keys {shown}) fit {found}",
        f"name the one to use with {choices}",
    )


# The list fields that name a format, and the objects their items are.
LIST_FIELDS = {"messages": ("{role, content}", '{"role": "user", "content": "..."}'),
               "conversations": ("{from, value}", '{"from": "human", "value": "..."}'),
               "conversation": ("{from, value}", '{"from": "human", "value": "..."}')}


def _misshapen_list(rows: list[dict[str, Any]], numbers: list[int], input: str) -> ChatftError | None:
    """A row whose `messages` (or ShareGPT `conversations`) is there but not a list: say that, not that the
    format's keys are missing."""
    for number, row in zip(numbers, rows):
        for key, (shape, example) in LIST_FIELDS.items():
            value = row.get(key)
            if key not in row or isinstance(value, list):
                continue
            what = f"a {type(value).__name__}: {_short(value)}"
            hint = f'write each row as {{"{key}": [{example}, ...]}}'
            if isinstance(value, str) and isinstance(json_or_none(value), list):
                what = f"JSON text holding the list (it was serialised twice): {_short(value)}"
                hint = f"decode it into the list itself, e.g. jq -c '.{key} |= fromjson' {input} > fixed.jsonl"
            return ChatftError("messages_missing",
                               f"{input}: `{key}` must be a list of {shape} objects, but in row {number} it is {what}",
                               hint)
    return None


# --------------------------------------------------------------------------- pieces shared by the formats


def _required(row: dict[str, Any], key: str, kind: type | None = None) -> Any:
    value = row.get(key)
    if value is None:
        raise RowDropped("missing_fields", f"no {key!r} field (keys: {', '.join(row) or 'none'})")
    if kind is not None and not isinstance(value, kind):
        raise RowDropped("missing_fields",
                         f"{key!r} is a {type(value).__name__}, not a {kind.__name__}: {_short(value)}")
    return value


def _string(value: Any, where: str) -> str:
    """A plain text field (alpaca, hh): None reads as empty, anything else but a string is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowDropped("non_string_content", f"{where} is a {type(value).__name__}: {_short(value)}")
    return value


def _text(content: Any, where: str) -> str:
    """Message content → text. A list of parts is joined with newlines; only text parts are accepted."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise RowDropped("non_string_content", f"{where} content is a {type(content).__name__}: {_short(content)}")
    texts = []
    for number, part in enumerate(content, start=1):
        if not (isinstance(part, dict) and isinstance(part.get("type"), str)):
            raise RowDropped("non_string_content", f"{where} content part {number} is not a typed part: {_short(part)}")
        if part["type"] != "text":
            raise RowDropped("non_text_content", f"{where} content part {number} is {part['type']!r}")
        if not isinstance(part.get("text"), str):
            raise RowDropped("non_string_content", f"{where} text part {number} has no string text: {_short(part)}")
        texts.append(part["text"])
    return "\n".join(texts)


def _message(role: str, content: Any, where: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    text = _text(content, where)
    if not text.strip() and not tool_calls:
        raise RowDropped("empty_content", f"{where} ({role}) has empty content")
    message: dict[str, Any] = {"role": role, "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _role(value: Any, where: str, table: dict[str, str]) -> str:
    if value is None or value == "":
        raise RowDropped("missing_role", f"{where} has no role")
    mapped = table.get(value.strip().lower()) if isinstance(value, str) else None
    if mapped is None:
        raise RowDropped("unknown_role", f"{where} has role {_short(value)}; known: {', '.join(table)}")
    return mapped


def _openai_message(raw: Any, where: str) -> dict[str, Any]:
    """An OpenAI-style message (messages rows, prompt/completion lists)."""
    if not isinstance(raw, dict):
        raise RowDropped("not_an_object", f"{where} is a {type(raw).__name__}, not an object: {_short(raw)}")
    role = _role(raw.get("role"), where, MESSAGE_ROLES)
    calls = parse_calls(raw.get("tool_calls"), where)
    if calls and role != "assistant":
        raise RowDropped("malformed_tool_call", f"{where} ({role}) carries tool_calls; only assistant messages may")
    message = _message(role, raw.get("content"), where, calls)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(raw.get(key), str):
                message[key] = raw[key]
    if role == "assistant":  # reasoning is kept for templates that render it (`take_reasoning` picks one)
        for key in ("reasoning_content", *REASONING_FIELDS):
            if isinstance(raw.get(key), str) and raw[key].strip():
                message[key] = raw[key]
    if role == "assistant" and raw.get("train") is False:  # chatft's per-message opt-out of the loss
        message["train"] = False
    return message


# --------------------------------------------------------------------------- the formats

Built = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]


def from_messages(row: dict[str, Any], text_field: str) -> Built:
    """`{"messages": [...], "tools"?: [...] | "<json>"}`."""
    messages = _required(row, "messages", list)
    built = [_openai_message(raw, f"message {n}") for n, raw in enumerate(messages, start=1)]
    return built, parse_tools(row.get("tools"))


def from_sharegpt(row: dict[str, Any], text_field: str) -> Built:
    """`{"conversations" | "conversation": [{"from", "value"}, ...], "system"?, "tools"?}`."""
    key = "conversation" if "conversations" not in row and "conversation" in row else "conversations"
    turns = _required(row, key, list)
    messages = []
    system = _string(row.get("system"), "system")
    if system.strip():
        messages.append({"role": "system", "content": system})
    for number, turn in enumerate(turns, start=1):
        where = f"turn {number}"
        if not isinstance(turn, dict):
            raise RowDropped("not_an_object", f"{where} is a {type(turn).__name__}, not an object: {_short(turn)}")
        # Some exports write role/content inside `conversations`; read them the same way.
        source_role = _either(turn, "from", "role")
        role = _role(source_role, where, SHAREGPT_ROLES)
        value = _either(turn, "value", "content")
        if source_role.strip().lower() == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": function_call_turn(value, where)})
        else:
            messages.append(_message(role, value, where))
    return messages, parse_tools(row.get("tools"))


def _either(turn: dict[str, Any], key: str, fallback: str) -> Any:
    # A null is absent: Arrow-backed datasets fill the keys a row lacks with None.
    return turn[key] if turn.get(key) is not None else turn.get(fallback)


def from_alpaca(row: dict[str, Any], text_field: str) -> Built:
    """`{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}`.
    The user turn is the instruction, then a blank line and the input when there is one."""
    instruction = _string(_required(row, "instruction"), "instruction")
    output = _string(_required(row, "output"), "output")
    extra = _string(row.get("input"), "input")
    messages = []
    system = _string(row.get("system"), "system")
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RowDropped("malformed_history", f"history is a {type(history).__name__}, not a list of pairs")
        for number, pair in enumerate(history, start=1):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise RowDropped("malformed_history",
                                 f"history item {number} is not a [user, assistant] pair: {_short(pair)}")
            messages.append(_message("user", _string(pair[0], f"history {number} user"), f"history {number} user"))
            messages.append(_message("assistant", _string(pair[1], f"history {number} assistant"),
                                     f"history {number} assistant"))
    if not instruction.strip():
        raise RowDropped("empty_content", "instruction is empty")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append(_message("user", prompt, "instruction"))
    messages.append(_message("assistant", output, "output"))
    return messages, None


def from_prompt_completion(row: dict[str, Any], text_field: str) -> Built:
    """`{"prompt", "completion"}`: strings (one user and one assistant turn) or message lists (joined)."""
    prompt = _required(row, "prompt")
    completion = _required(row, "completion")
    messages = _side(prompt, "user", "prompt") + _side(completion, "assistant", "completion")
    return messages, parse_tools(row.get("tools"))


def _side(value: Any, role: str, label: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [_message(role, value, label)]
    if isinstance(value, list):
        return [_openai_message(raw, f"{label} message {n}") for n, raw in enumerate(value, start=1)]
    raise RowDropped("non_string_content", f"{label} is a {type(value).__name__}: {_short(value)}")


def from_hh(row: dict[str, Any], text_field: str) -> Built:
    """Anthropic hh-rlhf text `\\n\\nHuman: ...\\n\\nAssistant: ...` in `row[text_field]`; turns are stripped."""
    text = _required(row, text_field)
    if not isinstance(text, str):
        raise RowDropped("non_string_content", f"{text_field!r} is a {type(text).__name__}: {_short(text)}")
    pieces = HH_MARKER.split(text)
    if len(pieces) == 1:
        raise RowDropped("unparsable_text", f"{text_field!r} has no Human:/Assistant: turns: {_short(text)}")
    if pieces[0].strip():
        raise RowDropped("unparsable_text", f"{text_field!r} has text before its first turn: {_short(pieces[0])}")
    messages = []
    for number, (speaker, body) in enumerate(zip(pieces[1::2], pieces[2::2]), start=1):
        messages.append(_message(HH_ROLES[speaker], body.strip(), f"turn {number}"))
    return messages, None


def from_toolace(row: dict[str, Any], text_field: str) -> Built:
    """ToolACE: ShareGPT turns (or `messages`) whose assistant turns write calls as `[f(a=1), g(b="x")]` and whose
    system prompt holds the tools as JSON (tool_formats.toolace_calls)."""
    sharegpt = "conversations" in row or "conversation" in row
    return toolace_calls(*(from_sharegpt if sharegpt else from_messages)(row, text_field))


BUILDERS: dict[str, Callable[[dict[str, Any], str], Built]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "hh": from_hh,
    "xlam": from_xlam,
    "glaive": from_glaive,
    "toolace": from_toolace,
}


# --------------------------------------------------------------------------- the guards


def check_conversation(messages: list[dict[str, Any]], consecutive_user: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The guards every format shares (see the module docstring). Out: the messages to write and the changes."""
    assistants = [n for n, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistants:
        raise RowDropped("no_assistant", f"no assistant message (roles: {_roles(messages)})")
    changes = []
    if assistants[-1] < len(messages) - 1:
        messages = messages[: assistants[-1] + 1]
        changes.append("trailing_turns_trimmed")
    for number, message in enumerate(messages[1:], start=2):
        if message["role"] == "system":
            raise RowDropped("roles_out_of_order", f"message {number} is a system message; only the first may be "
                                                   f"(roles: {_roles(messages)})")
    messages, merged = _merge_users(messages, consecutive_user)
    if merged:
        changes.append("consecutive_user_merged")
    _check_order(messages)
    return messages, changes


def _roles(messages: list[dict[str, Any]]) -> str:
    roles = [m["role"] + ("(call)" if m.get("tool_calls") else "") for m in messages]
    return ", ".join(roles if len(roles) <= 12 else roles[:12] + ["..."])


def _merge_users(messages: list[dict[str, Any]], policy: str) -> tuple[list[dict[str, Any]], bool]:
    kept: list[dict[str, Any]] = []
    merged = False
    for number, message in enumerate(messages, start=1):
        if message["role"] == "user" and kept and kept[-1]["role"] == "user":
            if policy == "drop":
                raise RowDropped("consecutive_user", f"messages {number - 1} and {number} are both user turns")
            kept[-1] = {**kept[-1], "content": kept[-1]["content"] + "\n\n" + message["content"]}
            merged = True
        else:
            kept.append(message)
    return kept, merged


# The turn each role may follow: start, user, assistant, call (an assistant tool call) or tool.
MAY_FOLLOW = {"user": ("start", "assistant"), "assistant": ("user", "tool")}
OUT_OF_ORDER = {
    "start": "the conversation starts with {role}",
    "call": "a tool call has no result",
    "tool": "a tool result is not answered by the assistant",
}


def _check_order(messages: list[dict[str, Any]]) -> None:
    """user → assistant → user ...; an assistant tool call → one or more tool results → assistant."""
    previous = "start"
    for number, message in enumerate(messages, start=1):
        role = message["role"]
        if role == "system":  # only first, checked before
            continue
        if role == "tool":
            if previous not in ("call", "tool"):
                raise RowDropped("malformed_tool_call", f"message {number} is a tool result with no assistant tool "
                                                        f"call before it (roles: {_roles(messages)})")
        elif previous not in MAY_FOLLOW[role]:
            problem = OUT_OF_ORDER.get(previous, "{role} follows {previous}").format(role=role, previous=previous)
            raise RowDropped("roles_out_of_order", f"message {number}: {problem} (roles: {_roles(messages)})")
        previous = "call" if role == "assistant" and message.get("tool_calls") else role
