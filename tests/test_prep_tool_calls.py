"""`chatft prep` maps the shapes public tool-calling datasets come in into OpenAI's: assistant `tool_calls` with
ids and object arguments, `tool` results with the `tool_call_id` of their call, row-level `tools` as
{type: function, function}; every mapping is counted in prep_report.json, and what cannot be mapped is dropped
under a named reason. Then a prepped file trains its tool calls through a template that renders them."""

from __future__ import annotations

import json
from pathlib import Path

from clirun import run_chatft as chatft
from test_masks import supervised_texts
from transformers import AutoTokenizer


def prep(tmp_path: Path, rows: list, *args: str) -> tuple[list[dict], dict]:
    """`chatft prep` on `rows` (a JSONL file); the rows it wrote and its prep_report.json."""
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    result = chatft("prep", "raw.jsonl", "-o", "out/train.jsonl", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    return written, json.loads((tmp_path / "out" / "prep_report.json").read_text())


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def result(call_id: str, content: str) -> dict:
    return {"role": "tool", "content": content, "tool_call_id": call_id}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, *calls: dict, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra, **({"tool_calls": list(calls)} if calls else {})}


def tool(name: str, parameters: dict, description: str | None = None) -> dict:
    function = {"name": name, **({"description": description} if description else {}), "parameters": parameters}
    return {"type": "function", "function": function}


PLANT_PARAMETERS = {"type": "object", "properties": {"plant": {"type": "string"}}, "required": ["plant"]}
PLANT_TOOL = tool("water_needs", PLANT_PARAMETERS, "How often a plant needs water.")


# --------------------------------------------------------------------------- ShareGPT function_call / observation


def test_sharegpt_calls_and_observations_are_paired_by_generated_ids(tmp_path):
    bare_tool = {"name": "water_needs", "description": "How often a plant needs water.", "parameters": PLANT_PARAMETERS}
    rows = [
        {"conversations": [  # LLaMA-Factory's shape: tools as a JSON string of bare tools, arguments as an object
            {"from": "human", "value": "How often should I water a fern?"},
            {"from": "function_call", "value": json.dumps({"name": "water_needs", "arguments": {"plant": "fern"}})},
            {"from": "observation", "value": '{"days": 3}'},
            {"from": "gpt", "value": "Every three days."}],
         "tools": json.dumps([bare_tool])},
        {"conversations": [  # two calls in one turn, arguments as a JSON string, one observation holding both results
            {"from": "human", "value": "Fern and cactus?"},
            {"from": "function_call", "value": json.dumps([
                {"name": "water_needs", "arguments": '{"plant": "fern"}'},
                {"name": "water_needs", "arguments": {"plant": "cactus"}}])},
            {"from": "observation", "value": json.dumps([{"days": 3}, {"days": 20}])},
            {"from": "gpt", "value": "Fern: 3 days. Cactus: 20."}],
         "tools": [PLANT_TOOL]},
        {"conversations": [  # two calls, one result: cannot say which call it answers
            {"from": "human", "value": "Fern and cactus?"},
            {"from": "function_call", "value": json.dumps([{"name": "water_needs", "arguments": {"plant": "fern"}},
                                                            {"name": "water_needs", "arguments": {"plant": "cactus"}}])},
            {"from": "observation", "value": '{"days": 3}'},
            {"from": "gpt", "value": "Fern: 3 days."}]},
    ]
    written, report = prep(tmp_path, rows)
    assert written == [
        {"messages": [user("How often should I water a fern?"),
                      assistant("", call("call00001", "water_needs", {"plant": "fern"})),
                      result("call00001", '{"days": 3}'),
                      assistant("Every three days.")],
         "tools": [PLANT_TOOL]},
        {"messages": [user("Fern and cactus?"),
                      assistant("", call("call00001", "water_needs", {"plant": "fern"}),
                                call("call00002", "water_needs", {"plant": "cactus"})),
                      result("call00001", '{"days": 3}'), result("call00002", '{"days": 20}'),
                      assistant("Fern: 3 days. Cactus: 20.")],
         "tools": [PLANT_TOOL]},
    ]
    assert report["format"] == "sharegpt" and (report["rows_in"], report["rows_out"]) == (3, 2)
    assert report["dropped"] == {"tool_results_unpaired": 1} and report["dropped_first_rows"] == {
        "tool_results_unpaired": [3]}
    assert report["changed"] == {"tool_call_ids_added": 2, "tools_normalised": 1, "tool_results_split": 1,
                                 "tool_arguments_decoded": 1}
    assert report["changed_first_rows"]["tools_normalised"] == [1]


# --------------------------------------------------------------------------- Hermes / Qwen tag text


def test_hermes_tags_become_tool_calls_results_and_tools(tmp_path):
    system = ("You are a function calling AI model. Function signatures are within <tools> </tools> XML tags.\n"
              "<tools>\n[{'type': 'function', 'function': {'name': 'water_needs', 'description': "
              "'How often a plant needs water.', 'parameters': {'type': 'object', 'properties': {'plant': "
              "{'type': 'string'}}, 'required': ['plant']}}}]\n</tools>\n"
              "Return each call within <tool_call> </tool_call> tags.")
    rows = [
        {"conversations": [
            {"from": "system", "value": system},
            {"from": "human", "value": "Fern and cactus, and is it sunny?"},
            # a Python dict literal (True, single quotes) and a JSON call, with reasoning and text around them
            {"from": "gpt", "value": "<think>Two plants.</think>Checking both.\n<tool_call>\n{'arguments': "
                                     "{'plant': 'fern', 'indoor': True}, 'name': 'water_needs'}\n</tool_call>\n"
                                     '<tool_call>\n{"name": "water_needs", "arguments": {"plant": "cactus"}}\n'
                                     "</tool_call>\n"},
            {"from": "tool", "value": '<tool_response>\n{"name": "water_needs", "content": {"days": 3}}\n'
                                      '</tool_response>\n<tool_response>\n{"name": "water_needs", "content": '
                                      '{"days": 20}}\n</tool_response>\n'},
            {"from": "gpt", "value": "Fern: 3 days. Cactus: 20."}]},
        {"conversations": [  # a call that is neither JSON nor a Python literal
            {"from": "human", "value": "Fern?"},
            {"from": "gpt", "value": "<tool_call>\nwater_needs(plant=fern)\n</tool_call>"},
            {"from": "tool", "value": "<tool_response>3</tool_response>"},
            {"from": "gpt", "value": "Three days."}]},
    ]
    written, report = prep(tmp_path, rows)
    assert written == [{
        "messages": [
            {"role": "system", "content": "You are a function calling AI model. Function signatures are within "
                                          "<tools> </tools> XML tags.\nReturn each call within <tool_call> "
                                          "</tool_call> tags."},
            user("Fern and cactus, and is it sunny?"),
            assistant("Checking both.", call("call00001", "water_needs", {"plant": "fern", "indoor": True}),
                      call("call00002", "water_needs", {"plant": "cactus"}), reasoning_content="Two plants."),
            result("call00001", '{"name": "water_needs", "content": {"days": 3}}'),
            result("call00002", '{"name": "water_needs", "content": {"days": 20}}'),
            assistant("Fern: 3 days. Cactus: 20.")],
        "tools": [PLANT_TOOL]}]
    assert report["dropped"] == {"malformed_tool_call": 1} and report["dropped_first_rows"] == {
        "malformed_tool_call": [2]}
    assert report["changed"] == {"reasoning_from_think_tags": 1, "tool_calls_from_tags": 1,
                                 "tool_results_from_tags": 1, "tools_from_system_prompt": 1, "tool_call_ids_added": 1}


# --------------------------------------------------------------------------- OpenAI messages, legacy and current


def test_openai_legacy_function_call_and_messages_with_ids(tmp_path):
    rows = [
        {"messages": [user("Water a fern?"),
                      {"role": "assistant", "content": None,
                       "function_call": {"name": "water_needs", "arguments": '{"plant": "fern"}'}},
                      {"role": "function", "name": "water_needs", "content": '{"days": 3}'},
                      assistant("Every three days.")],
         "functions": [{"name": "water_needs", "description": "How often a plant needs water.",
                        "parameters": PLANT_PARAMETERS}]},
        {"messages": [user("Fern and cactus?"),  # ids given; the results in the other order, one without an id
                      {"role": "assistant", "content": "", "tool_calls": [
                          call("w1", "water_needs", {"plant": "fern"}), call("w2", "water_needs", {"plant": "cactus"})]},
                      {"role": "tool", "tool_call_id": "w2", "content": "20"},
                      {"role": "tool", "content": "3"},
                      assistant("Fern 3, cactus 20.")],
         "tools": [PLANT_TOOL]},
        {"messages": [user("Fern?"),  # a result naming a call that is not there
                      assistant("", call("w1", "water_needs", {"plant": "fern"})),
                      {"role": "tool", "tool_call_id": "w7", "content": "3"},
                      assistant("Three.")]},
    ]
    written, report = prep(tmp_path, rows)
    assert written == [
        {"messages": [user("Water a fern?"), assistant("", call("call00001", "water_needs", {"plant": "fern"})),
                      {"role": "tool", "content": '{"days": 3}', "name": "water_needs", "tool_call_id": "call00001"},
                      assistant("Every three days.")],
         "tools": [PLANT_TOOL]},
        {"messages": [user("Fern and cactus?"),
                      assistant("", call("w1", "water_needs", {"plant": "fern"}),
                                call("w2", "water_needs", {"plant": "cactus"})),
                      {"role": "tool", "content": "20", "tool_call_id": "w2"}, result("w1", "3"),
                      assistant("Fern 3, cactus 20.")],
         "tools": [PLANT_TOOL]},
    ]
    assert report["format"] == "messages"
    assert report["dropped"] == {"tool_results_unpaired": 1} and report["dropped_first_rows"] == {
        "tool_results_unpaired": [3]}
    assert report["changed"] == {"legacy_function_call": 1, "tool_arguments_decoded": 1, "tool_call_ids_added": 2,
                                 "tools_normalised": 1}


# --------------------------------------------------------------------------- xLAM and glaive rows


def test_xlam_rows_are_detected_and_become_one_call_turn(tmp_path):
    xlam_tools = [{"name": "water_needs", "description": "How often a plant needs water.",
                   "parameters": {"plant": {"type": "str", "description": "The plant."},
                                  "indoor": {"type": "bool, optional", "description": "Kept inside.", "default": True}}}]
    rows = [
        {"id": 1, "query": "Water needs of a fern and a cactus?", "tools": json.dumps(xlam_tools),
         "answers": json.dumps([{"name": "water_needs", "arguments": {"plant": "fern"}},
                                {"name": "water_needs", "arguments": {"plant": "cactus", "indoor": False}}])},
        {"id": 2, "query": "Book me a flight.", "tools": json.dumps(xlam_tools), "answers": "[]"},
    ]
    written, report = prep(tmp_path, rows)
    schema = {"type": "object", "properties": xlam_tools[0]["parameters"]}
    assert written == [{
        "messages": [user("Water needs of a fern and a cactus?"),
                     assistant("", call("call00001", "water_needs", {"plant": "fern"}),
                               call("call00002", "water_needs", {"plant": "cactus", "indoor": False}))],
        "tools": [tool("water_needs", schema, "How often a plant needs water.")]}]
    assert (report["format"], report["format_detected"]) == ("xlam", True)
    assert report["dropped"] == {"no_assistant": 1} and report["dropped_first_rows"] == {"no_assistant": [2]}
    assert report["changed"] == {"tool_call_ids_added": 1, "tools_normalised": 1}


def test_glaive_text_is_parsed_into_turns_calls_and_tools(tmp_path):
    system = ("SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
              + json.dumps({"name": "water_needs", "description": "How often a plant needs water.",
                            "parameters": PLANT_PARAMETERS}, indent=4) + "\n")
    chat = ("USER: How often for my friend's fern?\n\n\n"
            "ASSISTANT: <functioncall> {\"name\": \"water_needs\", \"arguments\": '{\"plant\": \"friend's fern\"}'} "
            "<|endoftext|>\n\n\nFUNCTION RESPONSE: {\"days\": 3}\n\n\n"
            "ASSISTANT: Every three days. <|endoftext|>\n\n\nUSER: Thanks!\n")
    rows = [{"system": system, "chat": chat},
            {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.\n",
             "chat": "USER: Hello\n\n\nASSISTANT: Hi! How can I help? <|endoftext|>\n"},
            {"system": system, "chat": "USER: Fern?\n\n\nASSISTANT: <functioncall> water_needs(fern) <|endoftext|>"}]
    written, report = prep(tmp_path, rows)
    assert written == [
        {"messages": [
            {"role": "system", "content": "You are a helpful assistant with access to the following functions. "
                                          "Use them if required -"},
            user("How often for my friend's fern?"),
            assistant("", call("call00001", "water_needs", {"plant": "friend's fern"})),
            result("call00001", '{"days": 3}'),
            assistant("Every three days.")],
         "tools": [PLANT_TOOL]},
        {"messages": [{"role": "system", "content": "You are a helpful assistant, with no access to external "
                                                    "functions."},
                      user("Hello"), assistant("Hi! How can I help?")]},
    ]
    assert report["format"] == "glaive"
    assert report["dropped"] == {"malformed_tool_call": 1} and report["dropped_first_rows"] == {
        "malformed_tool_call": [3]}
    assert report["changed"] == {"trailing_turns_trimmed": 1, "tool_arguments_decoded": 1, "tool_call_ids_added": 1,
                                 "tools_normalised": 1}


# --------------------------------------------------------------------------- prepped, then trained


def test_a_prepped_hermes_file_trains_its_calls_through_qwen2_5(tmp_path, tiny_model_dir):
    rows = [{"conversations": [
        {"from": "system", "value": "<tools>\n" + json.dumps([PLANT_TOOL]) + "\n</tools>"},
        {"from": "human", "value": "Fern?"},
        {"from": "gpt", "value": "<tool_call>\n{'arguments': {'plant': 'fern'}, 'name': 'water_needs'}\n</tool_call>"},
        {"from": "tool", "value": '<tool_response>\n{"days": 3}\n</tool_response>'},
        {"from": "gpt", "value": "Every three days."}]}]
    written, _ = prep(tmp_path, rows)
    assert written[0]["tools"] == [PLANT_TOOL] and written[0]["messages"][0]["role"] == "user"  # the system was all tools
    result = chatft("preview", "-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                    "dataset.path_or_dataset_id=out/train.jsonl", "dataset.chat_template=qwen2_5",
                    "dataset.seq_length=1024", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    stats = preview["stats"]
    assert (stats["rows_used"], stats["fields_dropped_by_template"]) == (1, {}), stats
    row = preview["rows"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # the call is trained as Qwen writes it, arguments as an object (not a quoted JSON string)
    assert supervised_texts(tokenizer, row["input_ids"], row["labels_mask"]) == [
        '<tool_call>\n{"name": "water_needs", "arguments": {"plant": "fern"}}\n</tool_call><|im_end|>',
        "Every three days.<|im_end|>"]
    text = tokenizer.decode(row["input_ids"])
    assert '<tools>\n{"type": "function", "function": {"name": "water_needs"' in text  # the tools reached the prompt
    assert '<tool_response>\n{"days": 3}\n</tool_response>' in text  # the result is context, not trained

