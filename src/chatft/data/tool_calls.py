"""Tool calls in the one shape chatft writes: OpenAI's, the shape Hugging Face chat templates read.

An assistant message carries `tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}]`, each
result is a `tool` message with the `tool_call_id` of the call it answers, and the row's `tools` are
`[{"type": "function", "function": {"name", "description", "parameters"}}]`.

Reading (training and data prep): `parse_calls`, `parse_call`, `parse_tools` and `function_call_turn` check what
a row says and keep it as given (arguments as a JSON string or an object).

Mapping (data prep only), from the shapes public tool-calling datasets come in:
  - `legacy_functions`: OpenAI's legacy `function_call` on assistant messages, role `function` results and a
    row-level `functions` list (before the row is read);
  - `from_tags`: Hermes/Qwen-style text: `<tool_call>{...}</tool_call>` blocks in an assistant's content (JSON,
    or Python dict literals as NousResearch's hermes-function-calling-v1 writes them), tool messages made of
    `<tool_response>` blocks (several results in one turn become several messages), and a `<tools>[...]</tools>`
    block in the system message, which becomes the row's tools when the row has none (before the row's guards);
  - `python_calls`: a content that is a Python-style call list, `[get_weather(city="Paris")]`, parsed with `ast`
    (keyword arguments with literal values only, never run); it is how format `toolace` reads its rows
    (tool_formats.toolace_calls), so, like reading xlam or glaive rows, it is the format, not a counted change;
  - `merge_text_into_calls`: an assistant text turn followed at once by an assistant tool-call turn becomes one
    message with both (before the guards, which would see two assistant turns in a row);
  - `finish`: pairs every result with its call, splits a single result that holds a JSON list of one result
    per call, writes arguments as objects and tools in the OpenAI form (after the guards).
Every mapping is a named change (drops.CHANGES); what cannot be mapped drops the row under a named reason.

Pairing: a result with a `tool_call_id` answers the call with that id; one without answers the first unanswered
call of its `name` if it has one, else the first unanswered call (results come in the calls' order, as
ShareGPT `observation` turns and `<tool_response>` blocks do). Calls without an id get `call00001`,
`call00002`, ... in the row's order (skipping ids the row already uses): stable from run to run, and nine
letters and digits, the only ids Mistral's templates accept.
Arguments are written as objects because a template writes `arguments | tojson`: a JSON string would reach the
model as a quoted string, `"{\\"city\\": ...}"`, not as the call.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from collections.abc import Iterator
from typing import Any

from chatft.data.drops import RowDropped, short

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_RESPONSE_BLOCK = re.compile(r"<tool_response>\s*(.*?)\s*</tool_response>", re.DOTALL)
TOOLS_BLOCK = re.compile(r"\s*<tools>\s*(.*?)\s*</tools>\s*", re.DOTALL)
# LLaMA-Factory joins the results of parallel calls into one observation this way.
JOINED_RESPONSES = "</tool_response>"
ID_FORMAT = "call{:05d}"
# A content that opens with `[name(` is a Python-style call list (and one that then does not parse is a malformed
# call, not text). The name starts with a letter and has no space right before its `(`, so prose such as
# "[Note (see above)]" stays text.
CALL_LIST = re.compile(r"\A\[\s*[^\W\d](?:[^()\[\]\"'=,\n]*[^\s()\[\]\"'=,])?\(")
CALL_NAME = re.compile(r"\A[^\W\d][\w.\- ]*\Z")
OPENING, CLOSING = ("(", "[", "{"), (")", "]", "}")


# --------------------------------------------------------------------------- reading what a row says


def parse_arguments(value: Any, where: str) -> Any:
    """Kept as given: an object, or a string that decodes to one."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        decoded = json_or_none(value)
        if decoded is None and value.strip() != "null":
            raise RowDropped("malformed_tool_call", f"{where} arguments are not valid JSON: {short(value)}")
        if isinstance(decoded, dict):
            return value
    if value is None:
        raise RowDropped("malformed_tool_call", f"{where} has no arguments")
    raise RowDropped("malformed_tool_call", f"{where} arguments are not a JSON object: {short(value)}")


def parse_call(call: Any, where: str) -> dict[str, Any]:
    """An OpenAI tool call `{id?, type: function, function: {name, arguments}}`; the flat `{name, arguments}`
    form (ShareGPT function_call values, xLAM answers, <tool_call> blocks) is accepted and written in the
    OpenAI form."""
    if not isinstance(call, dict):
        raise RowDropped("malformed_tool_call", f"{where} is not an object: {short(call)}")
    function = call.get("function")
    if function is None and "name" in call:
        function = call
    if not isinstance(function, dict):
        raise RowDropped("malformed_tool_call", f"{where} has no function: {short(call)}")
    if call.get("type") not in (None, "function"):
        raise RowDropped("malformed_tool_call", f"{where} has type {call['type']!r}, not 'function'")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RowDropped("malformed_tool_call", f"{where} has no function name: {short(call)}")
    normalised: dict[str, Any] = {}
    if isinstance(call.get("id"), str):
        normalised["id"] = call["id"]
    normalised["type"] = "function"
    normalised["function"] = {"name": name, "arguments": parse_arguments(function.get("arguments"), where)}
    return normalised


def parse_calls(value: Any, where: str) -> list[dict[str, Any]] | None:
    """A message's `tool_calls`: None when it has none."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RowDropped("malformed_tool_call", f"{where} tool_calls is a {type(value).__name__}, not a list")
    return [parse_call(call, f"{where} tool call {n}") for n, call in enumerate(value, start=1)]


def function_call_turn(value: Any, where: str) -> list[dict[str, Any]]:
    """A ShareGPT `function_call` turn's value: one call `{name, arguments}` or a list of them, as JSON text
    or decoded."""
    if isinstance(value, str):
        decoded = json_or_none(value)
        if decoded is None:
            raise RowDropped("malformed_tool_call", f"{where} function_call is not JSON: {short(value)}")
        value = decoded
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowDropped("malformed_tool_call", f"{where} function_call holds no call")
    return [parse_call(call, f"{where} call {n}") for n, call in enumerate(calls, start=1)]


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """The row's tool definitions: a list of objects, or a JSON string holding one (→ the list)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        decoded = json_or_none(value)
        if decoded is None:
            raise RowDropped("malformed_tools", f"tools is a string that is not JSON: {short(value)}")
        value = decoded
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise RowDropped("malformed_tools", f"tools is not a list of objects: {short(value)}")
    return value or None


def json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def literal_or_none(text: str) -> Any:
    """JSON, or a Python literal (single quotes, True/None) as some datasets write their calls; None when it is
    neither. A Python value JSON cannot hold (a set, a tuple key) is refused too."""
    value = json_or_none(text)
    if value is not None:
        return value
    try:
        return as_json(ast.literal_eval(text.strip()))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def as_json(value: Any) -> Any:
    """A decoded Python literal as the JSON value it stands for (tuples become lists); ValueError or TypeError for
    one JSON cannot hold (a set, a tuple key, a complex number, inf/nan)."""
    return json.loads(json.dumps(value, allow_nan=False))


# --------------------------------------------------------------------------- data prep: before the row is read


def legacy_functions(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """OpenAI's legacy function calling in `messages` (or prompt/completion lists) → tool calls: an assistant's
    `function_call` object becomes its one tool call, role `function` becomes `tool`, a row-level `functions`
    list (when the row has no `tools`) becomes `tools`. Out: the row and the change, if any."""
    row = dict(row)
    changed = False
    if row.get("tools") is None and isinstance(row.get("functions"), list):
        row["tools"] = row.pop("functions")
        changed = True
    for key in ("messages", "prompt", "completion"):
        messages = row.get(key)
        if not isinstance(messages, list):
            continue
        mapped = [_legacy_message(message) for message in messages]
        if any(new is not old for new, old in zip(mapped, messages)):
            row[key] = mapped
            changed = True
    return row, ["legacy_function_call"] if changed else []


def _legacy_message(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    call = raw.get("function_call")
    if isinstance(call, dict) and not raw.get("tool_calls"):
        message = {key: value for key, value in raw.items() if key != "function_call"}
        message["tool_calls"] = [{"type": "function", "function": call}]
        return message
    if raw.get("role") == "function":
        return {**raw, "role": "tool"}
    return raw


# --------------------------------------------------------------------------- data prep: text tags → structure


def from_tags(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[str]]:
    """Hermes/Qwen-style tool text → structure (see the module docstring). Out: messages, tools, changes."""
    changes: set[str] = set()
    mapped: list[dict[str, Any]] = []
    for number, message in enumerate(messages, start=1):
        role, content = message["role"], message["content"]
        if role == "assistant" and not message.get("tool_calls") and "<tool_call>" in content:
            mapped.append(_calls_from_tags(message, f"message {number}"))
            changes.add("tool_calls_from_tags")
        elif role == "tool" and JOINED_RESPONSES in content and (results := _results_from_tags(message)):
            mapped.extend(results)
            changes.add("tool_results_from_tags")
        elif role == "system" and number == 1 and not tools and "<tools>" in content:
            system, found = _tools_from_system(content)
            if found:
                tools = found
                changes.add("tools_from_system_prompt")
                if system:
                    mapped.append({**message, "content": system})
            else:
                mapped.append(message)
        else:
            mapped.append(message)
    return mapped, tools, sorted(changes)


def _calls_from_tags(message: dict[str, Any], where: str) -> dict[str, Any]:
    """The <tool_call> blocks of an assistant's content → its tool_calls; the text around them stays content."""
    content = message["content"]
    calls, texts, start = [], [], 0
    for number, block in enumerate(TOOL_CALL_BLOCK.finditer(content), start=1):
        label = f"{where} <tool_call> block {number}"
        value = literal_or_none(block.group(1))
        if not isinstance(value, dict):
            raise RowDropped("malformed_tool_call", f"{label} is not a JSON object: {short(block.group(1))}")
        if "arguments" not in value and "parameters" in value:  # Llama's way of writing a call
            value = {**value, "arguments": value["parameters"]}
        calls.append(parse_call(value, label))
        texts.append(content[start:block.start()])
        start = block.end()
    texts.append(content[start:])
    if not calls or any("<tool_call>" in text for text in texts):
        raise RowDropped("malformed_tool_call", f"{where} has a <tool_call> without its </tool_call>: "
                                                f"{short(content)}")
    text = "\n\n".join(piece.strip() for piece in texts if piece.strip())
    return {**message, "content": text, "tool_calls": calls}


def _results_from_tags(message: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A tool message made only of <tool_response> blocks → one tool message per block (None: leave it as is).
    The joined form `a</tool_response><tool_response>b` without the outer tags is read the same way."""
    content = message["content"].strip()
    if not content.startswith("<tool_response>"):
        content = f"<tool_response>{content}</tool_response>"
    bodies = TOOL_RESPONSE_BLOCK.findall(content)
    if not bodies or TOOL_RESPONSE_BLOCK.sub("", content).strip():
        return None  # text outside the blocks: not a result list
    if len(bodies) == 1:
        return [{**message, "content": bodies[0]}]
    return [{"role": "tool", "content": body} for body in bodies]


def _tools_from_system(content: str) -> tuple[str, list[dict[str, Any]] | None]:
    """The first non-empty <tools> block of a system message: (the text without it, its tools), or the text
    and None when there is no such block (e.g. only a mention such as 'within <tools></tools> tags')."""
    for block in TOOLS_BLOCK.finditer(content):
        if not block.group(1):
            continue
        tools = _tool_list(block.group(1))
        if tools is None:
            raise RowDropped("malformed_tools", f"the system message's <tools> block is not a list of tool objects: "
                                                f"{short(block.group(1))}")
        if not tools:
            return content, None
        return cut_out(content, block.start(), block.end()), tools
    return content, None


def cut_out(text: str, start: int, end: int) -> str:
    """`text` without `text[start:end]`: what stood before and after it, stripped, on two lines."""
    before, after = text[:start].strip(), text[end:].strip()
    return "\n".join(part for part in (before, after) if part)


def _tool_list(text: str) -> list[dict[str, Any]] | None:
    """A list of tool objects written as one JSON (or Python) list, one object, or one object per line."""
    value = literal_or_none(text)
    if isinstance(value, dict):
        value = [value]
    if value is None:
        value = [literal_or_none(line) for line in text.splitlines() if line.strip()]
    if isinstance(value, list) and all(isinstance(tool, dict) for tool in value):
        return value
    return None


# --------------------------------------------------------------------------- data prep: Python call syntax


def python_calls(text: str, where: str) -> list[dict[str, Any]] | None:
    """A content that is a list of Python-style calls, `[get_weather(city="Paris"), get_time(tz='UTC')]` (ToolACE,
    Gorilla/BFCL) → its calls `{name, arguments}`; None when the content is not shaped like one (it is text).
    Arguments must be keywords with literal values (strings, numbers, True/False/None, lists, dicts): they are
    read with `ast.literal_eval`, never run, and anything else (a variable, an expression, a positional argument)
    drops the row as `malformed_tool_call`. Names may hold spaces, dots and hyphens (`Market Trends API(...)`)."""
    text = text.strip()
    if not CALL_LIST.match(text):
        return None
    return [_python_call(name, arguments, f"{where} call {number}")
            for number, (name, arguments) in enumerate(_call_pieces(text, where), start=1)]


def _call_pieces(text: str, where: str) -> list[tuple[str, str]]:
    """`[a(x=1), b c(y="z")]` → `[("a", "x=1"), ("b c", 'y="z"')]`, split where Python's tokenizer puts the
    brackets and commas, so that one inside a string argument (`q="a, b(c)"`) does not split."""
    pieces: list[tuple[str, str]] = []
    depth, head, name, arguments_start, expecting_call = 0, None, "", 0, True
    for token, start, end in _tokens(text, where):
        if token.type == tokenize.OP and token.string in OPENING:
            depth += 1
            if depth == 2:  # the call's own parenthesis: what came before it is the function's name
                name = text[head:start].strip() if head is not None else ""
                if token.string != "(" or not CALL_NAME.match(name):
                    raise RowDropped("malformed_tool_call", f"{where} has no call name before {short(text[start:])}")
                arguments_start = end
        elif token.type == tokenize.OP and token.string in CLOSING:
            depth -= 1
            if depth == 1:
                pieces.append((name, text[arguments_start:start]))
                head, expecting_call = None, False
            elif depth == 0 and (head is not None or end != len(text)):
                raise RowDropped("malformed_tool_call", f"{where} has something other than calls in its list: "
                                                        f"{short(text)}")
        elif depth == 1 and head is None:
            if token.string == "," and not expecting_call:
                expecting_call = True
            elif expecting_call:
                head = start  # the first token of a name, which may be several (`Market Trends API`)
            else:
                raise RowDropped("malformed_tool_call", f"{where} has no comma between its calls: "
                                                        f"{short(text[start:])}")
    if depth != 0:
        raise RowDropped("malformed_tool_call", f"{where} leaves a bracket open: {short(text)}")
    return pieces


def _tokens(text: str, where: str) -> Iterator[tuple[tokenize.TokenInfo, int, int]]:
    """Python's tokens of `text` with their start and end offsets; a string left open (an ERRORTOKEN before
    Python 3.12, an error since) drops the row."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.ERRORTOKEN and token.string.strip():
                raise SyntaxError(f"unexpected {token.string!r}")
            if token.type in (tokenize.OP, tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
                yield (token, line_starts[token.start[0] - 1] + token.start[1],
                       line_starts[token.end[0] - 1] + token.end[1])
    except (tokenize.TokenError, SyntaxError) as error:
        raise RowDropped("malformed_tool_call", f"{where} is not a Python call list ({error}): {short(text)}") from None


def _python_call(name: str, arguments: str, where: str) -> dict[str, Any]:
    """`name` and the text between its parentheses → `{name, arguments}` (see python_calls)."""
    try:
        call = ast.parse(f"f({arguments})", mode="eval").body
    except SyntaxError:
        raise RowDropped("malformed_tool_call", f"{where} ({name}) has arguments that are not Python's: "
                                                f"{short(arguments)}") from None
    if not isinstance(call, ast.Call) or call.args or any(keyword.arg is None for keyword in call.keywords):
        raise RowDropped("malformed_tool_call", f"{where} ({name}) has an argument without a name: {short(arguments)}")
    values: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg in values:
            raise RowDropped("malformed_tool_call", f"{where} ({name}) gives {keyword.arg} twice")
        try:
            values[keyword.arg] = as_json(ast.literal_eval(keyword.value))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise RowDropped("malformed_tool_call", f"{where} ({name}) argument {keyword.arg} is not a literal "
                                                    f"JSON can hold: {short(ast.unparse(keyword.value))}") from None
    return parse_call({"name": name, "arguments": values}, where)


# --------------------------------------------------------------------------- data prep: text beside a call


def merge_text_into_calls(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """An assistant text turn followed at once by an assistant turn of tool calls (ShareGPT `gpt: "Let me check."`
    then `function_call`) → one assistant message with the content and the calls, the shape OpenAI rows carry
    them in; left apart, the guards would drop the row for two assistant turns in a row. Out: the messages and
    the change, if any."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and _text_then_calls(merged[-1], message):
            merged[-1] = _text_with_calls(merged[-1], message)
        else:
            merged.append(message)
    return merged, ["assistant_text_merged_with_calls"] if len(merged) < len(messages) else []


def _text_then_calls(first: dict[str, Any], second: dict[str, Any]) -> bool:
    # A turn kept out of the loss (`train: false`) cannot share a message with a trained one.
    return (first["role"] == second["role"] == "assistant" and not first.get("tool_calls")
            and bool(second.get("tool_calls")) and first.get("train", True) == second.get("train", True))


def _text_with_calls(text: dict[str, Any], calls: dict[str, Any]) -> dict[str, Any]:
    message = {**text, **calls, "content": _joined(text["content"], calls["content"])}
    reasoning = _joined(text.get("reasoning_content", ""), calls.get("reasoning_content", ""))
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def _joined(*texts: str) -> str:
    return "\n\n".join(text.strip() for text in texts if text.strip())


# --------------------------------------------------------------------------- data prep: after the guards


def finish(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[str]]:
    """Calls with ids and object arguments, every result paired with its call, tools in the OpenAI form. Runs on
    checked messages (a call is followed by results, results by the assistant). Out: messages, tools, changes."""
    changes: set[str] = set()
    used = {call["id"] for message in messages for call in message.get("tool_calls") or () if "id" in call}
    used |= {message["tool_call_id"] for message in messages if message.get("tool_call_id")}
    ids = _fresh_ids(used)
    finished: list[dict[str, Any]] = []
    index = 0
    while index < len(messages):
        message, number = messages[index], index + 1
        index += 1
        if not message.get("tool_calls"):
            finished.append(message)
            continue
        calls = [_finished_call(call, ids, changes) for call in message["tool_calls"]]
        finished.append({**message, "tool_calls": calls})
        end = index
        while end < len(messages) and messages[end]["role"] == "tool":
            end += 1
        if end > index:  # the last message's calls have no results to pair (they are the trained answer)
            results = _split(messages[index:end], calls, changes)
            finished.extend(_pair(results, calls, number, changes))
        index = end
    tools, tools_changed = normalise_tools(tools)
    if tools_changed:
        changes.add("tools_normalised")
    return finished, tools, sorted(changes)


def _fresh_ids(used: set[str]) -> Iterator[str]:
    number = 0
    while True:
        number += 1
        if (candidate := ID_FORMAT.format(number)) not in used:
            yield candidate


def _finished_call(call: dict[str, Any], ids: Iterator[str], changes: set[str]) -> dict[str, Any]:
    function = dict(call["function"])
    if isinstance(function["arguments"], str):
        function["arguments"] = json.loads(function["arguments"])  # parse_arguments has checked it is an object
        changes.add("tool_arguments_decoded")
    if "id" not in call:
        changes.add("tool_call_ids_added")
    return {"id": call.get("id") or next(ids), "type": "function", "function": function}


def _split(results: list[dict[str, Any]], calls: list[dict[str, Any]], changes: set[str]) -> list[dict[str, Any]]:
    """One result without an id after several calls, holding a JSON list with one item per call → one result
    per call; anything else as it is."""
    if len(results) != 1 or len(calls) < 2 or results[0].get("tool_call_id"):
        return results
    items = json_or_none(results[0]["content"])
    if not isinstance(items, list) or len(items) != len(calls):
        return results
    changes.add("tool_results_split")
    return [{"role": "tool", "content": item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)}
            for item in items]


def _pair(results: list[dict[str, Any]], calls: list[dict[str, Any]], number: int,
          changes: set[str]) -> list[dict[str, Any]]:
    """Each result with the `tool_call_id` of the call it answers (see the module docstring)."""
    pending = list(calls)
    names = ", ".join(f"{call['function']['name']} ({call['id']})" for call in calls)
    paired = []
    for offset, result in enumerate(results, start=1):
        where = f"message {number + offset} (tool)"
        if not pending:
            raise RowDropped("tool_results_unpaired", f"{where}: {len(results)} results follow the {len(calls)} "
                                                      f"calls of message {number}: {names}")
        wanted = result.get("tool_call_id")
        if wanted:
            call = next((call for call in pending if call["id"] == wanted), None)
            if call is None:
                raise RowDropped("tool_results_unpaired", f"{where} has tool_call_id {wanted!r}, which names none "
                                                          f"of the unanswered calls of message {number}: {names}")
        else:
            call = next((call for call in pending if call["function"]["name"] == result.get("name")), pending[0])
            result = {**result, "tool_call_id": call["id"]}
            changes.add("tool_call_ids_added")
        pending.remove(call)
        paired.append(result)
    if pending:
        missing = ", ".join(f"{call['function']['name']} ({call['id']})" for call in pending)
        raise RowDropped("tool_results_unpaired", f"message {number}: the call {missing} has no result "
                                                  f"({len(calls)} calls, {len(results)} results)")
    return paired


def normalise_tools(tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]] | None, bool]:
    """Tools in the OpenAI form; a tool of another type (a built-in such as code_interpreter) is kept as given.
    Out: the tools and whether any changed."""
    if not tools:
        return tools, False
    normalised = [_openai_tool(tool, number) for number, tool in enumerate(tools, start=1)]
    return normalised, normalised != tools


def _openai_tool(tool: dict[str, Any], number: int) -> dict[str, Any]:
    kind = tool.get("type", "function")
    if kind != "function":
        return tool
    function = tool.get("function")
    if function is None:  # bare {name, description, parameters}, with or without type: function
        function = {key: value for key, value in tool.items() if key != "type"}
        tool = {"type": "function", "function": function}
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise RowDropped("malformed_tools", f"tool {number} has no function name: {short(tool)}")
    return {"type": "function", **{key: value for key, value in tool.items() if key not in ("type", "function")},
            "function": _schema_parameters(function)}


def _schema_parameters(function: dict[str, Any]) -> dict[str, Any]:
    """Parameters as a JSON-schema object. xLAM writes them as `{param: {type, description, default}}`: those
    become the schema's properties (their types kept as written; nothing is claimed to be required)."""
    parameters = function.get("parameters")
    if (isinstance(parameters, dict) and parameters and "type" not in parameters and "properties" not in parameters
            and all(isinstance(value, dict) for value in parameters.values())):
        return {**function, "parameters": {"type": "object", "properties": parameters}}
    return function
