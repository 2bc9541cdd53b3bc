"""Every kind of unusable row is counted under its own reason (or, with strict, stops the run naming it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatft.config.schema import DataPrepConfig
from chatft.data.formats import DROP_REASONS
from chatft.data.prep import prepare
from chatft.errors import ChatftError

GOOD = {
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "alpaca": {"instruction": "say hi", "input": "", "output": "hi"},
    "prompt_completion": {"prompt": "hi", "completion": "hello"},
    "hh": {"chosen": "\n\nHuman: hi\n\nAssistant: hello"},
}


class Raw(str):
    """A JSONL line written as is (for lines that are not JSON)."""


class Latin1(Raw):
    """A JSONL line written in latin-1, not UTF-8."""


def u(content="hi"):
    return {"role": "user", "content": content}


def a(content="ok", **extra):
    return {"role": "assistant", "content": content, **extra}


def msgs(*messages, **row):
    return {"messages": list(messages), **row}


def fn(name="f", arguments="{}", **extra):
    return {**extra, "type": "function", "function": {"name": name, "arguments": arguments}}


def sg(*turns, **row):
    return {"conversations": [{"from": role, "value": value} for role, value in turns], **row}


# (id, format, the bad row, expected reason); each runs as [good row, bad row] and must drop exactly line 2.
CASES = [
    ("truncated_line", "messages", Raw('{"messages": [{"role": "user"'), "invalid_json"),
    ("plain_text_line", "messages", Raw("hello there"), "invalid_json"),
    ("latin1_line", "messages", Latin1(json.dumps(msgs(u("café"), a()), ensure_ascii=False)), "not_utf8"),
    ("array_row", "messages", [u(), a()], "not_an_object"),
    ("string_row", "messages", "just a string", "not_an_object"),
    ("message_not_object", "messages", msgs("hi", a()), "not_an_object"),
    ("no_messages_key", "messages", {"msgs": [u(), a()]}, "missing_fields"),
    ("messages_not_list", "messages", {"messages": "hi"}, "missing_fields"),
    ("role_missing", "messages", msgs({"content": "hi"}, a()), "missing_role"),
    ("role_unknown", "messages", msgs({"role": "narrator", "content": "hi"}, a()), "unknown_role"),
    ("role_not_string", "messages", msgs({"role": 5, "content": "hi"}, a()), "unknown_role"),
    ("content_number", "messages", msgs(u(42), a()), "non_string_content"),
    ("content_dict", "messages", msgs(u({"text": "hi"}), a()), "non_string_content"),
    ("content_bare_string_part", "messages", msgs(u(["hi"]), a()), "non_string_content"),
    ("content_image_part", "messages",
     msgs(u([{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x.png"}}]), a()),
     "non_text_content"),
    ("user_whitespace", "messages", msgs(u("   \n"), a()), "empty_content"),
    ("assistant_empty_no_calls", "messages", msgs(u(), a("")), "empty_content"),
    ("only_user", "messages", msgs(u()), "no_assistant"),
    ("empty_list", "messages", msgs(), "no_assistant"),
    ("system_in_middle", "messages", msgs(u(), {"role": "system", "content": "s"}, a()), "roles_out_of_order"),
    ("starts_with_assistant", "messages", msgs(a(), u(), a()), "roles_out_of_order"),
    ("two_assistants", "messages", msgs(u(), a(), a()), "roles_out_of_order"),
    ("call_unanswered", "messages", msgs(u(), a("", tool_calls=[fn()]), u(), a()), "roles_out_of_order"),
    ("call_no_name", "messages", msgs(u(), a("", tool_calls=[{"type": "function", "function": {"arguments": "{}"}}])),
     "malformed_tool_call"),
    ("call_args_not_json", "messages", msgs(u(), a("", tool_calls=[fn(arguments="{city: Paris")])),
     "malformed_tool_call"),
    ("call_args_missing", "messages", msgs(u(), a("", tool_calls=[{"type": "function", "function": {"name": "f"}}])),
     "malformed_tool_call"),
    ("tool_calls_not_list", "messages", msgs(u(), a("", tool_calls=fn())), "malformed_tool_call"),
    ("tool_calls_on_user", "messages", msgs({"role": "user", "content": "x", "tool_calls": [fn()]}, a()),
     "malformed_tool_call"),
    ("tool_without_call", "messages", msgs(u(), a(), {"role": "tool", "content": "r"}, a()), "malformed_tool_call"),
    ("tool_call_tag_not_json", "messages", msgs(u(), a("<tool_call>\nlookup(x)\n</tool_call>")),
     "malformed_tool_call"),
    ("tool_call_tag_unclosed", "messages", msgs(u(), a('<tool_call>{"name": "f", "arguments": {}}')),
     "malformed_tool_call"),
    ("result_id_names_no_call", "messages",
     msgs(u(), a("", tool_calls=[fn(id="c1")]), {"role": "tool", "tool_call_id": "c9", "content": "r"}, a()),
     "tool_results_unpaired"),
    ("call_left_without_result", "messages",
     msgs(u(), a("", tool_calls=[fn("f"), fn("g")]), {"role": "tool", "content": "r"}, a()), "tool_results_unpaired"),
    ("sharegpt_more_results_than_calls", "sharegpt",
     sg(("human", "hi"), ("function_call", '{"name": "f", "arguments": {}}'), ("observation", "1"),
        ("observation", "2"), ("gpt", "x")), "tool_results_unpaired"),
    ("tools_not_json", "messages", msgs(u(), a(), tools="[{oops"), "malformed_tools"),
    ("system_tools_block_not_json", "messages",
     msgs({"role": "system", "content": "Use these: <tools>[{oops</tools>"}, u(), a()), "malformed_tools"),
    ("tool_without_name", "messages", msgs(u(), a(), tools=[{"description": "no name"}]), "malformed_tools"),
    ("tools_not_list", "messages", msgs(u(), a(), tools={"name": "f"}), "malformed_tools"),
    ("second_user_with_drop", "messages", msgs(u("a"), u("b"), a()), "consecutive_user"),
    ("sharegpt_unknown_role", "sharegpt", sg(("human", "hi"), ("narrator", "once")), "unknown_role"),
    ("sharegpt_no_from", "sharegpt", {"conversations": [{"value": "hi"}, {"from": "gpt", "value": "x"}]},
     "missing_role"),
    ("sharegpt_turn_not_object", "sharegpt", {"conversations": [["human", "hi"]]}, "not_an_object"),
    ("sharegpt_call_not_json", "sharegpt", sg(("human", "hi"), ("function_call", "lookup(x)")), "malformed_tool_call"),
    ("sharegpt_call_no_name", "sharegpt", sg(("human", "hi"), ("function_call", '{"arguments": {}}')),
     "malformed_tool_call"),
    ("sharegpt_observation_first", "sharegpt", sg(("human", "hi"), ("observation", "r"), ("gpt", "x")),
     "malformed_tool_call"),
    ("sharegpt_two_gpt", "sharegpt", sg(("human", "hi"), ("gpt", "a"), ("gpt", "b")), "roles_out_of_order"),
    ("sharegpt_no_conversations", "sharegpt", {"id": "x", "dialog": []}, "missing_fields"),
    ("sharegpt_value_number", "sharegpt", sg(("human", 3), ("gpt", "x")), "non_string_content"),
    ("alpaca_no_output", "alpaca", {"instruction": "do it", "input": ""}, "missing_fields"),
    ("alpaca_output_list", "alpaca", {"instruction": "do it", "output": ["a", "b"]}, "non_string_content"),
    ("alpaca_output_empty", "alpaca", {"instruction": "do it", "output": ""}, "empty_content"),
    ("alpaca_instruction_empty", "alpaca", {"instruction": " ", "input": "text", "output": "x"}, "empty_content"),
    ("alpaca_history_not_pairs", "alpaca", {"instruction": "i", "output": "o", "history": [["only one"]]},
     "malformed_history"),
    ("pc_no_completion", "prompt_completion", {"prompt": "hi"}, "missing_fields"),
    ("pc_prompt_number", "prompt_completion", {"prompt": 5, "completion": "x"}, "non_string_content"),
    ("pc_completion_blank", "prompt_completion", {"prompt": "hi", "completion": "  "}, "empty_content"),
    ("pc_completion_is_user", "prompt_completion", {"prompt": [u()], "completion": [u("more")]}, "no_assistant"),
    ("hh_no_markers", "hh", {"chosen": "just some text"}, "unparsable_text"),
    ("hh_text_before_turns", "hh", {"chosen": "Intro\n\nHuman: a\n\nAssistant: b"}, "unparsable_text"),
    ("hh_empty_answer", "hh", {"chosen": "\n\nHuman: hi\n\nAssistant: "}, "empty_content"),
    ("hh_not_text", "hh", {"chosen": [u(), a()]}, "non_string_content"),
    ("hh_no_field", "hh", {"rejected": "\n\nHuman: a\n\nAssistant: b"}, "missing_fields"),
    ("hh_human_only", "hh", {"chosen": "\n\nHuman: anyone?"}, "no_assistant"),
]


def line(row) -> str:
    return row if isinstance(row, Raw) else json.dumps(row)


def prep(tmp_path: Path, fmt: str, bad_row, **settings):
    source = tmp_path / "rows.jsonl"
    source.write_bytes((line(GOOD[fmt]) + "\n").encode() + line(bad_row).encode(
        "latin-1" if isinstance(bad_row, Latin1) else "utf-8") + b"\n")
    config = DataPrepConfig(input=str(source), output=str(tmp_path / "out" / "train.jsonl"), format=fmt, **settings)
    return prepare(config)


def settings_for(case_id: str) -> dict:
    return {"consecutive_user": "drop"} if case_id == "second_user_with_drop" else {}


@pytest.mark.parametrize(("case_id", "fmt", "bad_row", "reason"), CASES, ids=[case[0] for case in CASES])
def test_malformed_row_is_counted_under_its_reason(tmp_path, case_id, fmt, bad_row, reason):
    result = prep(tmp_path, fmt, bad_row, **settings_for(case_id))
    assert result.dropped == {reason: 1}
    assert result.dropped_first_rows == {reason: [2]}
    assert (result.rows_in, result.rows_out) == (2, 1)
    written = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(written) == 1


def test_the_cases_cover_every_drop_reason():
    assert len(CASES) >= 30
    assert {case[3] for case in CASES} == set(DROP_REASONS)


@pytest.mark.parametrize(("case_id", "fmt", "bad_row", "reason"),
                         [case for case in CASES if case[0] in ("plain_text_line", "role_unknown", "call_args_not_json",
                                                                "sharegpt_unknown_role", "alpaca_no_output")])
def test_strict_stops_at_the_bad_row_naming_row_reason_and_snippet(tmp_path, case_id, fmt, bad_row, reason):
    with pytest.raises(ChatftError) as caught:
        prep(tmp_path, fmt, bad_row, strict=True)
    error = caught.value
    assert error.id == "bad_row"
    assert error.message.startswith(f"line 2 of {tmp_path / 'rows.jsonl'}: {reason}: ")
    snippet = line(bad_row)[:40]
    assert f"row: {snippet}" in error.message
    assert "strict" in error.hint
    assert not (tmp_path / "out" / "train.jsonl").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "train.jsonl"]  # no temp file left behind
