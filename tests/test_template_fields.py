"""A template that cannot say what the assistant said is never trained silently: tool calls, tools and reasoning
that the chat template leaves out refuse training (error[template_drops_field]) and are counted by preview."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_masks import supervised_texts as supervised  # the decoded supervised runs
from clirun import assert_error_block, run_chatft
from transformers import AutoTokenizer

from chatft.config.schema import DatasetSection
from chatft.data.chat_templates import BUNDLED, RENDERS_TOOLS, bundled_template
from chatft.data.formats import convert_row
from chatft.data.masks import MaskOptions, TemplateDropsFields, mask_conversation
from chatft.data.pipeline import prepare_training_data
from chatft.data.template_fields import dropped_fields
from chatft.errors import ChatftError

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call00001", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": "{\"temperature\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tools": TOOLS,
}
PLAIN_ROW = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! Ask away."}]}
REASONING_ROW = {"messages": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two makes four."},
]}

# ChatML that renders tools in a system block, tool calls as JSON and reasoning in <think>, with generation tags
# around what the assistant emits. Chat templates render with trim_blocks: newlines are written as '\n' strings.
TOOL_AWARE_TAGGED = (
    "{%- if tools -%}{{ '<|im_start|>system\\nTools:\\n' }}{%- for tool in tools -%}{{ tool | tojson }}{{ '\\n' }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{%- if m.get('reasoning_content') -%}{{ '<think>' + m['reasoning_content'] + '</think>' }}{%- endif -%}"
    "{{ m['content'] }}"
    "{%- for call in m.get('tool_calls') or [] -%}{{ '<tool_call>' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '</tool_call>' }}{%- endfor -%}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
TOOL_AWARE = TOOL_AWARE_TAGGED.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def mask(tokenizer, template, row, tagged=None, **options):
    return mask_conversation(tokenizer, template, row["messages"], row.get("tools"), MaskOptions(**options), tagged)


# --------------------------------------------------------------------------- the check on real renders


def test_a_content_only_template_refuses_tool_calls_and_tools(tiny_tokenizer):
    with pytest.raises(TemplateDropsFields) as err:
        mask(tiny_tokenizer, tiny_tokenizer.chat_template, TOOL_ROW)
    dropped = {(d.field, d.message) for d in err.value.dropped}
    assert dropped == {("tool_calls", 2), ("tools", None)}
    assert err.value.reason == "template_drops_field"
    assert "get_weather" in str(err.value) and "message 2 (assistant)" in str(err.value)


@pytest.mark.parametrize("tagged", [False, True], ids=["prefix_rendering", "generation_tags"])
def test_a_tool_aware_template_trains_the_call_and_not_the_result(tiny_tokenizer, tagged):
    ids, flags = mask(tiny_tokenizer, TOOL_AWARE, TOOL_ROW, TOOL_AWARE_TAGGED if tagged else None)
    runs = supervised(tiny_tokenizer, ids, flags)
    assert runs == ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
                    '</tool_call><|im_end|>', "It is 21 degrees in Paris.<|im_end|>"]
    text = tiny_tokenizer.decode(ids)
    assert '"name": "get_weather", "description"' in text  # the tools reached the prompt, untrained
    assert "temperature" in text and not any("temperature" in run for run in runs)  # the tool result is not trained


@pytest.mark.parametrize("tagged", [False, True], ids=["prefix_rendering", "generation_tags"])
def test_plain_conversations_are_unaffected(tiny_tokenizer, tagged):
    template = TOOL_AWARE_TAGGED if tagged else tiny_tokenizer.chat_template
    ids, flags = mask(tiny_tokenizer, template, PLAIN_ROW, template if tagged else None)
    assert supervised(tiny_tokenizer, ids, flags) == ["Hello! Ask away.<|im_end|>"]


def test_reasoning_content_is_refused_where_the_template_ignores_it(tiny_tokenizer):
    with pytest.raises(TemplateDropsFields) as err:
        mask(tiny_tokenizer, tiny_tokenizer.chat_template, REASONING_ROW)
    assert [(d.field, d.message) for d in err.value.dropped] == [("reasoning_content", 2)]
    ids, flags = mask(tiny_tokenizer, TOOL_AWARE, REASONING_ROW)
    assert supervised(tiny_tokenizer, ids, flags) == ["<think>Two plus two makes four.</think>4<|im_end|>"]


def test_prep_keeps_reasoning_content():
    message = convert_row(REASONING_ROW, "messages").messages[1]
    assert message["reasoning_content"] == "Two plus two makes four."


def test_a_call_without_its_arguments_is_refused(tiny_tokenizer):
    names_only = TOOL_AWARE.replace(
        "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}",
        "{{ call['function']['name'] }}")
    with pytest.raises(TemplateDropsFields) as err:
        mask(tiny_tokenizer, names_only, TOOL_ROW)
    assert [d.field for d in err.value.dropped] == ["tool_calls"]
    assert "'Paris'" in str(err.value)


def test_untrained_turns_are_not_checked(tiny_tokenizer):
    # The final turn is trained; the earlier tool call is context only (the tools check still applies).
    row = {"messages": TOOL_ROW["messages"]}
    ids, flags = mask(tiny_tokenizer, tiny_tokenizer.chat_template, row, train_on="last_assistant")
    assert supervised(tiny_tokenizer, ids, flags) == ["It is 21 degrees in Paris.<|im_end|>"]


def test_argument_values_are_found_however_the_template_writes_them():
    message = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "say", "arguments": {"text": 'He said "hi"\nthen left', "n": 3, "ok": True, "none": None}}}]}
    for text in ['say {"text": "He said \\"hi\\"\\nthen left", "n": 3, "ok": true, "none": null}',  # JSON
                 "say {'text': 'He said \"hi\"\\nthen left', 'n': 3, 'ok': True, 'none': None}",  # Python
                 'say\n<text>He said "hi"\nthen   left</text><n>3</n><ok>true</ok><none>null</none>']:  # raw
        assert dropped_fields([message], None, {0: text}, None) == [], text


def test_bundled_templates_that_render_tools_pass_and_the_others_refuse(tiny_tokenizer):
    renders = set()
    for name in BUNDLED:
        try:
            mask(tiny_tokenizer, bundled_template(name), TOOL_ROW, bundled_template(name))
        except TemplateDropsFields:
            continue
        except Exception:  # the template refuses the row itself (counted as template_error in training)
            continue
        renders.add(name)
    assert renders == set(RENDERS_TOOLS)


def test_the_pipeline_refuses_and_counts_and_preview_mode_counts(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("CHATFT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [PLAIN_ROW, TOOL_ROW, REASONING_ROW, TOOL_ROW]))
    section = DatasetSection(path_or_dataset_id=str(path))
    counted = prepare_training_data(section, tiny_tokenizer, log=lambda _: None, refuse_template_drops=False)
    report = counted.report
    assert report.rows_used == 1 and report.dropped_by_reason == {"template_drops_field": 3}
    assert report.fields_dropped_by_template == {"tool_calls": 2, "tools": 2, "reasoning_content": 1}
    assert report.examples_by_reason["template_drops_field"] == [2, 3, 4]
    # Training refuses, also when preview has cached the counted rows.
    for use_cache in (True, False):
        with pytest.raises(ChatftError) as err:
            prepare_training_data(section, tiny_tokenizer, log=lambda _: None, use_cache=use_cache)
        assert err.value.id == "template_drops_field"
        assert "3 of 4 rows" in err.value.message and "tool_calls in 2 rows (first: row 2, message 2" in err.value.message
        assert "reasoning_content in 1 rows (first: row 3" in err.value.message
        assert "qwen2_5" in err.value.hint and "reasoning_content" in err.value.hint


# --------------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def tool_data(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tool-data")
    rows = [TOOL_ROW, PLAIN_ROW, TOOL_ROW, REASONING_ROW] * 2
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "tool_aware.jinja").write_text(TOOL_AWARE_TAGGED)
    return work


def train(work: Path, model: Path, *overrides: str):
    return run_chatft("run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model}",
                      "dataset.path_or_dataset_id=train.jsonl", "checkpoint.checkpoint_dir=run",
                      "step_scheduler.global_batch_size=2", "step_scheduler.local_batch_size=2",
                      "step_scheduler.max_steps=1", "step_scheduler.ckpt_every_steps=1",
                      "step_scheduler.val_every_steps=1", "lr_scheduler.lr_warmup_steps=0", *overrides, cwd=work)


def test_preview_counts_and_training_refuses_a_content_only_template(tool_data, tiny_model_dir):
    model = f"model.pretrained_model_name_or_path={tiny_model_dir}"
    result = run_chatft("preview", "-c", "tiny", model, "dataset.path_or_dataset_id=train.jsonl", cwd=tool_data)
    assert result.returncode == 0, result.stderr
    assert "rows: 8 in, 2 used, 6 template_drops_field" in result.stdout
    assert "template drops tool_calls: 4 rows, refused by training with error[template_drops_field] " \
           "(first: row 1, message 2 (assistant): the call get_weather(" in result.stdout
    assert "template drops tools: 4 rows" in result.stdout and "template drops reasoning_content: 2 rows" in result.stdout
    stats = json.loads(run_chatft("preview", "-c", "tiny", model, "dataset.path_or_dataset_id=train.jsonl", "--json",
                                  cwd=tool_data).stdout)["stats"]
    assert stats["fields_dropped_by_template"] == {"tool_calls": 4, "tools": 4, "reasoning_content": 2}

    stderr = assert_error_block(train(tool_data, tiny_model_dir), "template_drops_field")
    assert "in 6 of 8 rows of dataset" in stderr and "tool_calls in 4 rows (first: row 1, message 2 (assistant)" in stderr
    assert "tools in 4 rows (first: row 1, tool get_weather is not in the rendered prompt)" in stderr
    assert "dataset.chat_template" in stderr.split("hint:")[1]
    assert not (tool_data / "run" / "final").exists()


def test_a_tool_aware_template_trains_the_same_rows(tool_data, tiny_model_dir):
    result = train(tool_data, tiny_model_dir, "dataset.chat_template=tool_aware.jinja",
                   "checkpoint.checkpoint_dir=run-tools")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tool_data / "run-tools" / "final" / "chatft_manifest.json").read_text())
    train_data = manifest["data"]["train"]
    assert train_data["rows_in"] == 8 and train_data["rows_used"] == 8, train_data
