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



# --------------------------------------------------------------------------- ToolACE: Python-style calls


def toolace_system(tools_json: str) -> str:
    """ToolACE's system prompt (Team-ACE/ToolACE data.json), with its JSON tool list."""
    return ("You are an expert in composing functions. You are given a question and a set of possible functions. \n"
            "Based on the question, you will need to make one or more function/tool calls to achieve the purpose. \n"
            "If none of the function can be used, point it out. If the given question lacks the parameters required "
            "by the function,\nalso point it out. You should only return the function call in tools call sections.\n"
            f"Here is a list of functions in JSON format that you can invoke:\n{tools_json}.\n"
            "Should you decide to return the function call(s), Put it in the format of [func1(params_name=params_value,"
            " params_name2=params_value2...), func2(params)]\n\nNO other text MUST be included.")


# The prompt as written after its tool list is cut out (the list's closing full stop goes with it).
TOOLACE_PROMPT = toolace_system("[]").replace("invoke:\n[].\n", "invoke:\n")
# ToolACE writes tools bare, parameters typed "dict" as Gorilla/BFCL do; names may hold spaces.
TOOLACE_TOOLS = [{"name": "water_needs", "description": "How often a plant needs water.",
                  "parameters": {"type": "dict", "properties": {"plant": {"type": "string"},
                                                                 "indoor": {"type": "boolean"}},
                                 "required": ["plant"]}},
                 {"name": "Plant Facts API", "description": "Facts about a plant.",
                  "parameters": {"type": "dict", "properties": {"plant": {"type": "string"}}, "required": []}}]
TOOLACE_SYSTEM = toolace_system(json.dumps(TOOLACE_TOOLS))


def test_toolace_python_calls_become_tool_calls_with_the_system_prompts_tools(tmp_path):
    rows = [
        {"system": TOOLACE_SYSTEM, "conversations": [  # two calls (a string holding `,` and `(`), one result list
            {"from": "user", "value": "Fern and cactus?"},
            {"from": "assistant", "value": "[water_needs(plant=\"fern (Boston)\"), water_needs(plant='cactus', "
                                           "indoor=True)]"},
            {"from": "tool", "value": json.dumps([{"name": "water_needs", "results": {"days": 3}},
                                                  {"name": "water_needs", "results": {"days": 20}}])},
            {"from": "assistant", "value": "Fern: every 3 days. Cactus: every 20."}]},
        {"messages": [  # the OpenAI-messages variant: the prompt is the system message; a name with spaces
            {"role": "system", "content": TOOLACE_SYSTEM}, user("Tell me about ferns."),
            {"role": "assistant", "content": '[Plant Facts API(plant="fern")]'},
            {"role": "tool", "content": '[{"name": "Plant Facts API", "results": {"family": "Polypodiaceae"}}]'},
            assistant("Ferns belong to the Polypodiaceae.")]},
        {"system": TOOLACE_SYSTEM, "conversations": [  # role/content turns, the result as `observation`; plain text
            {"role": "user", "content": "Water needs?"}, {"role": "assistant", "content": "Of which plant?"},
            {"role": "user", "content": "A fern."}, {"role": "assistant", "content": "[water_needs(plant='fern')]"},
            {"role": "observation", "content": '{"days": 3}'}, {"role": "assistant", "content": "Every 3 days."}]},
        {"system": TOOLACE_SYSTEM, "conversations": [  # a variable, not a literal: never evaluated, the row dropped
            {"from": "user", "value": "Fern?"}, {"from": "assistant", "value": "[water_needs(plant=fern)]"},
            {"from": "tool", "value": "3"}, {"from": "assistant", "value": "3 days."}]},
        {"system": TOOLACE_SYSTEM, "conversations": [  # a positional argument: which parameter is it?
            {"from": "user", "value": "Fern?"}, {"from": "assistant", "value": "[water_needs('fern')]"}]},
        {"system": TOOLACE_SYSTEM, "conversations": [  # a string left open
            {"from": "user", "value": "Fern?"}, {"from": "assistant", "value": "[water_needs(plant='fern)]"}]},
        {"system": toolace_system('[{"name": "water_needs", "parameters": }]'), "conversations": [
            {"from": "user", "value": "Fern?"}, {"from": "assistant", "value": "[water_needs(plant='fern')]"}]},
    ]
    written, report = prep(tmp_path, rows)
    system = {"role": "system", "content": TOOLACE_PROMPT}
    tools = [tool(t["name"], t["parameters"], t["description"]) for t in TOOLACE_TOOLS]
    assert written == [
        {"messages": [system, user("Fern and cactus?"),
                      assistant("", call("call00001", "water_needs", {"plant": "fern (Boston)"}),
                                call("call00002", "water_needs", {"plant": "cactus", "indoor": True})),
                      result("call00001", '{"name": "water_needs", "results": {"days": 3}}'),
                      result("call00002", '{"name": "water_needs", "results": {"days": 20}}'),
                      assistant("Fern: every 3 days. Cactus: every 20.")],
         "tools": tools},
        {"messages": [system, user("Tell me about ferns."),
                      assistant("", call("call00001", "Plant Facts API", {"plant": "fern"})),
                      result("call00001", '[{"name": "Plant Facts API", "results": {"family": "Polypodiaceae"}}]'),
                      assistant("Ferns belong to the Polypodiaceae.")],
         "tools": tools},
        {"messages": [system, user("Water needs?"), assistant("Of which plant?"), user("A fern."),
                      assistant("", call("call00001", "water_needs", {"plant": "fern"})),
                      result("call00001", '{"days": 3}'), assistant("Every 3 days.")],
         "tools": tools},
    ]
    assert (report["format"], report["format_detected"]) == ("toolace", True)
    assert report["dropped"] == {"malformed_tool_call": 3, "malformed_tools": 1}
    assert report["dropped_first_rows"] == {"malformed_tool_call": [4, 5, 6], "malformed_tools": [7]}
    assert report["changed"] == {"tool_call_ids_added": 3, "tool_results_split": 1, "tools_normalised": 3}


def test_format_toolace_reads_python_calls_without_toolaces_prompt(tmp_path):
    # Without ToolACE's prompt the rows are plain ShareGPT to detection, and a call would be trained as text;
    # naming the format reads it. The row's own `tools` are kept and the system prompt left whole.
    rows = [{"system": "Use the tools.", "tools": [PLANT_TOOL], "conversations": [
        {"from": "human", "value": "Fern?"}, {"from": "gpt", "value": "[water_needs(plant='fern')]"},
        {"from": "observation", "value": '{"days": 3}'}, {"from": "gpt", "value": "Every 3 days."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "[waves] Hello!"}]}]
    detected, report = prep(tmp_path, rows)
    assert report["format"] == "sharegpt" and report["dropped"] == {"malformed_tool_call": 1}  # a result, no call
    written, report = prep(tmp_path, rows, "--format", "toolace")
    assert written == [{"messages": [{"role": "system", "content": "Use the tools."}, user("Fern?"),
                                     assistant("", call("call00001", "water_needs", {"plant": "fern"})),
                                     result("call00001", '{"days": 3}'), assistant("Every 3 days.")],
                        "tools": [PLANT_TOOL]},
                       {"messages": [user("Hi"), assistant("[waves] Hello!")]}]  # a bracket, not a call: text
    assert (report["format"], report["format_detected"], report["dropped"]) == ("toolace", False, {})


# --------------------------------------------------------------------------- text beside a call


def test_an_assistant_text_turn_and_the_call_turn_after_it_become_one_message(tmp_path):
    fern_call = {"name": "water_needs", "arguments": {"plant": "fern"}}
    rows = [
        {"conversations": [
            {"from": "human", "value": "Fern?"}, {"from": "gpt", "value": "Let me check."},
            {"from": "function_call", "value": json.dumps(fern_call)},
            {"from": "observation", "value": '{"days": 3}'}, {"from": "gpt", "value": "Every 3 days."}]},
        {"messages": [  # the same in OpenAI messages, the text's reasoning kept
            user("Fern?"), assistant("Let me check.", reasoning_content="A lookup."),
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": fern_call}]},
            {"role": "tool", "content": '{"days": 3}'}, assistant("Every 3 days.")]},
        {"conversations": [  # two text turns before the call: still two assistant turns in a row
            {"from": "human", "value": "Fern?"}, {"from": "gpt", "value": "Hmm."}, {"from": "gpt", "value": "Let me check."},
            {"from": "function_call", "value": json.dumps(fern_call)},
            {"from": "observation", "value": '{"days": 3}'}, {"from": "gpt", "value": "Every 3 days."}]},
    ]
    written, report = prep(tmp_path, rows, "--format", "sharegpt")
    assert written == [{"messages": [user("Fern?"),
                                     assistant("Let me check.", call("call00001", "water_needs", {"plant": "fern"})),
                                     result("call00001", '{"days": 3}'), assistant("Every 3 days.")]}]
    assert report["changed"] == {"assistant_text_merged_with_calls": 1, "tool_call_ids_added": 1}
    assert report["dropped"] == {"missing_fields": 1, "roles_out_of_order": 1}  # the messages row is not ShareGPT
    assert report["dropped_first_rows"]["roles_out_of_order"] == [3]

    messages_row, report = prep(tmp_path, rows[1:2])
    assert messages_row == [{"messages": [
        user("Fern?"), assistant("Let me check.", call("call00001", "water_needs", {"plant": "fern"}),
                                 reasoning_content="A lookup."),
        result("call00001", '{"days": 3}'), assistant("Every 3 days.")]}]
    assert report["changed"] == {"assistant_text_merged_with_calls": 1, "tool_call_ids_added": 1}


def test_prepped_toolace_calls_and_text_beside_a_call_train_through_qwen2_5(tmp_path, tiny_model_dir):
    rows = [{"system": TOOLACE_SYSTEM, "conversations": [
        {"from": "user", "value": "Fern?"},
        {"from": "assistant", "value": "Let me check."},  # ToolACE-style text turn, then the call turn
        {"from": "assistant", "value": "[water_needs(plant='fern', indoor=True)]"},
        {"from": "tool", "value": '[{"name": "water_needs", "results": {"days": 3}}]'},
        {"from": "assistant", "value": "Every three days."}]}]
    written, report = prep(tmp_path, rows)
    assert report["changed"]["assistant_text_merged_with_calls"] == 1 and written[0]["messages"][2]["tool_calls"]
    result = chatft("preview", "-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                    "dataset.path_or_dataset_id=out/train.jsonl", "dataset.chat_template=qwen2_5",
                    "dataset.seq_length=2048", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    assert (preview["stats"]["rows_used"], preview["stats"]["fields_dropped_by_template"]) == (1, {}), preview["stats"]
    row = preview["rows"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # the text and the call are one trained turn, the call as Qwen writes it, not ToolACE's Python syntax
    assert supervised_texts(tokenizer, row["input_ids"], row["labels_mask"]) == [
        'Let me check.\n<tool_call>\n{"name": "water_needs", "arguments": {"plant": "fern", "indoor": true}}\n'
        "</tool_call><|im_end|>",
        "Every three days.<|im_end|>"]
    text = tokenizer.decode(row["input_ids"])
    assert '{"type": "function", "function": {"name": "Plant Facts API"' in text  # the tools reached the prompt
    assert "water_needs(" not in text
