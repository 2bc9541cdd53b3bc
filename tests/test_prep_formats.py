"""Source formats → OpenAI messages: each format's mapping, detection, and the guards every format shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatft.data.formats import (
    RowDropped,
    check_conversation,
    convert_row,
    detect_format,
)
from chatft.errors import ChatftError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def fixture_rows(name: str) -> list:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    if name.endswith(".json"):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


def call(name: str, arguments, **extra) -> dict:
    return {**extra, "type": "function", "function": {"name": name, "arguments": arguments}}


# --------------------------------------------------------------------------- each format


def test_messages_with_tools_tool_calls_and_content_parts():
    rows = fixture_rows("messages_tools.jsonl")
    first = convert_row(rows[0], "messages")
    assert first.messages == [
        {"role": "system", "content": "You are a weather bot."},
        user("Weather in Paris?"),
        # null content with tool calls becomes "", arguments stay the JSON string they were given as
        assistant("", tool_calls=[call("get_weather", '{"city": "Paris"}', id="call_1")]),
        {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call_1"},
        assistant("It is 18 °C in Paris."),
    ]
    assert first.tools == rows[0]["tools"] and first.changes == []
    assert first.to_row() == {"messages": first.messages, "tools": rows[0]["tools"]}

    second = convert_row(rows[1], "messages")
    assert second.messages[1] == assistant("Calling the adder.", tool_calls=[call("add", {"a": 2, "b": 3})])
    assert second.tools == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]

    parts = convert_row(rows[2], "messages")
    assert parts.messages == [{"role": "system", "content": "Answer briefly."},  # developer is OpenAI's system
                              user("Name a prime.\nJust one."), assistant("7")]
    assert "tools" not in parts.to_row()

    trailing = convert_row(rows[3], "messages")
    assert trailing.messages == [user("Hi"), assistant("Hello! How can I help?")]
    assert trailing.changes == ["trailing_turns_trimmed"]


def test_sharegpt_maps_every_role_value_and_function_calls():
    rows = fixture_rows("sharegpt_roles.json")
    tools = convert_row(rows[0], "sharegpt")
    assert tools.messages == [
        {"role": "system", "content": "You can call tools."},
        user("What does 'ephemeral' mean?"),
        assistant("", tool_calls=[call("lookup", {"word": "ephemeral"})]),
        {"role": "tool", "content": "lasting a very short time"},
        assistant("It means lasting a very short time."),
    ]
    assert tools.tools[0]["name"] == "lookup"  # the JSON string became a list

    roles = convert_row(rows[1], "sharegpt")
    assert [m["role"] for m in roles.messages] == [
        "system", "user", "assistant", "user", "assistant", "user", "assistant", "tool", "assistant",
        "user", "assistant", "tool", "assistant"]
    assert roles.messages[6]["tool_calls"] == [call("search", '{"q": "x"}')]
    assert roles.messages[10]["tool_calls"] == [call("search", {})]

    assert convert_row(rows[2], "sharegpt").messages == [user("Say yes."), assistant("Yes.")]
    with pytest.raises(RowDropped) as dropped:
        convert_row(rows[3], "sharegpt")
    assert dropped.value.reason == "unknown_role" and "narrator" in dropped.value.detail


def test_alpaca_joins_instruction_and_input_and_reads_system_and_history():
    rows = fixture_rows("alpaca_history.jsonl")
    assert convert_row(rows[0], "alpaca").messages == [
        user("Summarise the text.\n\nCats sleep most of the day and hunt at night."),
        assistant("Cats are nocturnal sleepers."),
    ]
    assert convert_row(rows[1], "alpaca").messages == [
        {"role": "system", "content": "You are a zoologist."},
        user("Do cats sleep a lot?"), assistant("Yes, 12-16 hours a day."),
        user("And dogs?"), assistant("Dogs sleep at night, mostly."),
    ]


def test_prompt_completion_strings_and_message_lists():
    rows = fixture_rows("prompt_completion.jsonl")
    assert convert_row(rows[0], "prompt_completion").messages == [user("The capital of France is"),
                                                                  assistant(" Paris.")]
    assert convert_row(rows[2], "prompt_completion").messages == [
        {"role": "system", "content": "Be terse."}, user("2+2?"), assistant("4")]


def test_hh_text_in_the_named_field():
    rows = fixture_rows("hh.jsonl")
    assert convert_row(rows[1], "hh").messages == [
        user("How do I boil an egg?"), assistant("Put it in boiling water for about nine minutes."),
        user("And soft-boiled?"), assistant("About six minutes."),
    ]
    merged = convert_row(rows[2], "hh")
    assert merged.messages == [user("Hello\n\nAnyone there?"), assistant("Yes, I am here.")]
    assert merged.changes == ["consecutive_user_merged"]
    assert convert_row({"text": "Human: hi\n\nAssistant: hello"}, "hh", text_field="text").messages == [
        user("hi"), assistant("hello")]


def test_real_sharegpt_and_alpaca_rows():
    sharegpt = json.loads((SHARED_DATA / "dummy_conversation.json").read_text())
    first = convert_row(sharegpt[0], "sharegpt")
    assert first.messages[0] == user("Who are you?") and first.messages[1]["role"] == "assistant"
    alpaca = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())
    assert convert_row(alpaca[0], "alpaca").messages[0] == user("Describe a process of making crepes.")


# --------------------------------------------------------------------------- the shared guards


def test_consecutive_user_turns_are_merged_or_drop_the_row():
    messages = [user("a"), user("b"), assistant("c")]
    kept, changes = check_conversation(messages, "merge")
    assert kept == [user("a\n\nb"), assistant("c")] and changes == ["consecutive_user_merged"]
    with pytest.raises(RowDropped) as dropped:
        check_conversation(messages, "drop")
    assert dropped.value.reason == "consecutive_user"


def test_trailing_turns_are_cut_before_the_order_is_checked():
    # An unanswered tool result and user turn after the last reply carry no training signal: cut, not dropped.
    messages = [user("q"), assistant("", tool_calls=[call("f", "{}")]), {"role": "tool", "content": "r"}, user("?")]
    kept, changes = check_conversation(messages, "drop")
    assert kept == messages[:2] and changes == ["trailing_turns_trimmed"]


def test_tool_results_must_follow_a_call_and_calls_must_be_answered():
    ok = [user("q"), assistant("", tool_calls=[call("f", "{}")]), {"role": "tool", "content": "1"},
          {"role": "tool", "content": "2"}, assistant("done")]
    assert check_conversation(ok, "merge") == (ok, [])
    unanswered = [user("q"), assistant("", tool_calls=[call("f", "{}")]), user("again"), assistant("x")]
    with pytest.raises(RowDropped) as dropped:
        check_conversation(unanswered, "merge")
    assert dropped.value.reason == "roles_out_of_order" and "tool call has no result" in dropped.value.detail


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(("rows", "expected"), [
    (lambda: fixture_rows("messages_tools.jsonl"), "messages"),
    (lambda: fixture_rows("sharegpt_roles.json"), "sharegpt"),
    (lambda: fixture_rows("alpaca_history.jsonl"), "alpaca"),
    (lambda: fixture_rows("prompt_completion.jsonl"), "prompt_completion"),
    (lambda: fixture_rows("hh.jsonl"), "hh"),
    (lambda: json.loads((SHARED_DATA / "dummy_conversation.json").read_text())[:20], "sharegpt"),
    (lambda: json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())[:20], "alpaca"),
])
def test_detects_each_format(rows, expected):
    assert detect_format(rows(), "chosen", "data") == expected


def test_unknown_and_ambiguous_shapes_name_the_keys_and_the_choices():
    with pytest.raises(ChatftError) as unknown:
        detect_format([{"question": "q", "answer": "a"}], "chosen", "qa.jsonl")
    assert unknown.value.id == "messages_missing"
    assert "answer, question" in unknown.value.message and "qa.jsonl" in unknown.value.message
    assert "--format messages|sharegpt|alpaca|prompt_completion|hh" in unknown.value.hint
    mixed = [{"messages": []}, {"instruction": "i", "output": "o"}]
    with pytest.raises(ChatftError) as ambiguous:
        detect_format(mixed, "chosen", "mixed.jsonl")
    assert ambiguous.value.id == "config_invalid"
    assert "messages (rows 1)" in ambiguous.value.message and "alpaca (rows 2)" in ambiguous.value.message
    assert "--format" in ambiguous.value.hint


def test_messages_of_the_wrong_type_is_named_not_listed_as_missing():
    with pytest.raises(ChatftError) as caught:
        detect_format([{"messages": "hello"}], "chosen", "rows.jsonl", numbers=[3])
    message = caught.value.message
    assert caught.value.id == "messages_missing"
    assert "`messages` must be a list of {role, content} objects" in message
    assert 'row 3 it is a str: "hello"' in message and "none of messages" not in message
    assert '{"messages": [{"role": "user", "content": ' in caught.value.hint
    with pytest.raises(ChatftError) as caught:  # a list serialised as a JSON string: say how to decode it
        detect_format([{"messages": json.dumps([{"role": "user", "content": "hi"}])}], "chosen", "rows.jsonl")
    assert "JSON text" in caught.value.message and "fromjson" in caught.value.hint


# --------------------------------------------------------------------------- ToolACE: Python-style calls

TOOLACE_PROMPT = ("Here is a list of functions in JSON format that you can invoke:\n[]\nShould you decide to return the "
                  "function call(s), Put it in the format of [func1(params_name=params_value, params_name2="
                  "params_value2...), func2(params)]")
BFCL_PROMPT = ("If you decide to invoke any of the function(s), you MUST put it in the format of "
               "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]")


def toolace_row(reply: str, system: str = TOOLACE_PROMPT) -> dict:
    return {"system": system, "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": reply}]}


def test_toolace_is_detected_by_its_call_format_prompt_and_is_ambiguous_beside_plain_sharegpt():
    assert detect_format([toolace_row("[f(a=1)]"), toolace_row("[f(a=1)]", BFCL_PROMPT)], "chosen", "t") == "toolace"
    as_messages = {"messages": [{"role": "system", "content": TOOLACE_PROMPT}, user("q"), assistant("[f(a=1)]")]}
    assert detect_format([as_messages], "chosen", "t") == "toolace"
    system_turn = {"conversations": [{"from": "system", "value": TOOLACE_PROMPT}, {"from": "human", "value": "q"}]}
    assert detect_format([system_turn], "chosen", "t") == "toolace"
    asked_by_user = {"conversations": [{"from": "human", "value": TOOLACE_PROMPT}, {"from": "gpt", "value": "ok"}]}
    assert detect_format([asked_by_user], "chosen", "t") == "sharegpt"  # only a system prompt says how to call
    plain = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "[f(a=1)]"}]}
    assert detect_format([plain], "chosen", "t") == "sharegpt"
    with pytest.raises(ChatftError) as ambiguous:
        detect_format([toolace_row("[f(a=1)]"), plain], "chosen", "t")
    assert "toolace (rows 1)" in ambiguous.value.message and "sharegpt (rows 2)" in ambiguous.value.message


@pytest.mark.parametrize(("reply", "arguments"), [
    ("[f()]", [{}]),
    ("[f(a=1, b=-2.5, c=None, d=False)]", [{"a": 1, "b": -2.5, "c": None, "d": False}]),
    ("[f(q='a, b(c)] d', xs=[1, (2, 3)], m={'k': {'n': 'v'}})]", [{"q": "a, b(c)] d", "xs": [1, [2, 3]],
                                                                     "m": {"k": {"n": "v"}}}]),
    ('[f(a="""x\ny"""),\n g(b=1),]', [{"a": "x\ny"}, {"b": 1}]),  # a trailing comma, as Python allows
])
def test_toolace_call_arguments_are_read_as_literals(reply, arguments):
    calls = convert_row(toolace_row(reply), "toolace").messages[-1]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == arguments


@pytest.mark.parametrize(("reply", "detail"), [
    ("[f(a=x)]", "argument a is not a literal"),
    ("[f(a=__import__('os').getcwd())]", "argument a is not a literal"),  # a call is never made
    ("[f(a={1, 2})]", "argument a is not a literal JSON can hold"),  # a set
    ("[f(a=1e999)]", "argument a is not a literal JSON can hold"),  # inf
    ("[f(1)]", "has an argument without a name"),
    ("[f(**kw)]", "has an argument without a name"),
    ("[f(a=1, a=2)]", "gives a twice"),
    ("[f(a=1) g(b=2)]", "no comma between its calls"),
    ("[f(a=1), 3]", "something other than calls"),
    ("[f(a=1)] then text", "something other than calls"),
    ("[f(a=1), [g(b=2)]]", "no call name"),
    ("[f(a=1)(b=2)]", "no call name"),
    ("[f(a='x)]", "is not a Python call list"),
    ("[f(a=1]", "is not a Python call list"),
    ("[f(a=1 +)]", "arguments that are not Python's"),
])
def test_a_call_list_that_cannot_be_read_drops_the_row(reply, detail):
    with pytest.raises(RowDropped) as dropped:
        convert_row(toolace_row(reply), "toolace")
    assert dropped.value.reason == "malformed_tool_call" and detail in dropped.value.detail


@pytest.mark.parametrize("reply", ["[Note (see above)] Yes.", "[1] A footnote.", "Sure: [f(a=1)]", "[waves]"])
def test_text_that_is_not_a_call_list_stays_text(reply):
    assert convert_row(toolace_row(reply), "toolace").messages[-1] == assistant(reply)


def test_toolace_tools_come_from_the_system_prompts_json_list():
    tools = [{"name": "f", "parameters": {"type": "dict", "properties": {}}}]
    system = TOOLACE_PROMPT.replace("[]", json.dumps(tools) + ".")
    converted = convert_row(toolace_row("[f()]", system), "toolace")
    assert converted.tools == tools
    assert converted.messages[0]["content"] == TOOLACE_PROMPT.replace("\n[]\n", "\n")
    given = convert_row({**toolace_row("[f()]", system), "tools": [{"name": "g"}]}, "toolace")
    assert given.tools == [{"name": "g"}] and given.messages[0]["content"] == system  # the row's own tools win
    with pytest.raises(RowDropped) as dropped:
        convert_row(toolace_row("[f()]", TOOLACE_PROMPT.replace("[]", '[{"name": "f", }]')), "toolace")
    assert dropped.value.reason == "malformed_tools"
