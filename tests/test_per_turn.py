"""Per-turn training rows on history-rewriting chat templates (reasoning models), on the families' original
templates as TRL's wheel ships them: each trained assistant turn is its own row, the history as the template
renders it at that turn followed by the turn as the template renders it when it is the one being generated.
Also `dataset.chat_template_kwargs` (enable_thinking) and prep's reasoning shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from chatft.config.schema import DatasetSection
from chatft.data.chat_templates import bundled_template, is_per_turn_twin, training_template_for
from chatft.data.formats import convert_row
from chatft.data.masks import MaskOptions, RowMaskError, conversation_rows, mask_conversation, render, \
    template_messages, trained_assistant_indices
from chatft.data.pipeline import expansion_summary, prepare_training_data
from chatft.errors import ChatftError
from original_templates import SKIP_REASON, TRL_DIR, original


pytestmark = pytest.mark.skipif(TRL_DIR is None, reason=SKIP_REASON)


WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
REASONING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "21 degrees, sunny"},
    {"role": "assistant", "content": "It is 21 degrees and sunny.", "reasoning_content": "Read the result."},
]
NO_REASONING = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in REASONING]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def decode_row(tokenizer, row) -> tuple[str, str]:
    """(the row's text, its supervised text)."""
    ids, mask, _ = row
    return tokenizer.decode(ids), tokenizer.decode([t for t, m in zip(ids, mask) if m])


def assert_rows_are_inference_renders(tokenizer, template, messages, options=MaskOptions(),
                                      thinking_off=()) -> list[tuple[str, str]]:
    """Each per-turn row is the template's own generation-time render of its prefix (add_generation_prompt=True)
    followed by the turn, only the turn is supervised, and the turn is how the template (for a per-turn family its
    bundled twin) ends its render of the conversation when that turn is the last message. Turns numbered in
    `thinking_off` (1-based) are expected rendered with enable_thinking=false, the others with the options'."""
    twin = training_template_for(template)
    built = conversation_rows(tokenizer, template, messages, None, options, twin)
    turns = trained_assistant_indices(messages, options)
    assert (built.per_turn or len(turns) == 1) and len(built.outcomes) == len(turns)  # one turn: one row either way
    assert built.thinking_off_turns == len(thinking_off)
    shown = template_messages(messages)
    texts = []
    for index, row in zip(turns, built.outcomes):
        kwargs = {**options.template_kwargs, **({"enable_thinking": False} if index + 1 in thinking_off else {})}
        text, supervised = decode_row(tokenizer, row)
        prompt = render(tokenizer, template, shown[:index], None, True, kwargs)
        through = render(tokenizer, twin if is_per_turn_twin(twin) else template, shown[: index + 1], None, False,
                         kwargs)
        assert text == prompt + supervised, index
        assert supervised and through.rstrip().endswith(supervised), index
        texts.append((text, supervised))
    return texts


def test_qwen3_rows_with_reasoning_tool_calls_and_tool_results(tokenizer):
    rows = assert_rows_are_inference_renders(tokenizer, original("qwen3"), REASONING)
    (first, first_sup), (second, second_sup), (third, third_sup) = rows
    assert first == ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
                     "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>")
    assert first_sup == "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"
    # At turn 2 the earlier turn's reasoning is gone from the history, as the model sees it at inference.
    assert second.startswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert second_sup == ('<think>\nI should call the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                          '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    # The tool result is in the prompt of the last row, never supervised.
    assert "<tool_response>\n21 degrees, sunny\n</tool_response>" in third and "21 degrees, sunny" not in third_sup
    assert third_sup == "<think>\nRead the result.\n</think>\n\nIt is 21 degrees and sunny.<|im_end|>"


def test_qwen3_rows_without_reasoning(tokenizer):
    rows = assert_rows_are_inference_renders(tokenizer, original("qwen3"), NO_REASONING)
    # The turn being generated opens with Qwen3's empty reasoning block; history turns are plain.
    assert rows[0][1] == "<think>\n\n</think>\n\n4<|im_end|>"
    assert "<|im_start|>assistant\n4<|im_end|>" in rows[1][0]
    # mask_generation_prompt=false: the same rows, with the assistant header trained too.
    header = conversation_rows(tokenizer, original("qwen3"), NO_REASONING, None,
                               MaskOptions(mask_generation_prompt=False)).outcomes
    assert [decode_row(tokenizer, row) for row in header] == [
        (text, "<|im_start|>assistant\n" + supervised) for text, supervised in rows]


def test_enable_thinking_reaches_the_template(tokenizer):
    off = MaskOptions(template_kwargs={"enable_thinking": False})
    rows = assert_rows_are_inference_renders(tokenizer, original("qwen3"), NO_REASONING, off)
    # Thinking off: the generation prompt itself closes an empty reasoning block; the answer alone is trained.
    assert rows[0][0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>")
    assert rows[0][1] == "4<|im_end|>"
    # A turn with reasoning cannot follow that prompt: counted per row, never trained as something else.
    outcomes = conversation_rows(tokenizer, original("qwen3"), REASONING, None, off).outcomes
    assert [o.reason for o in outcomes] == ["generation_prompt_mismatch"] * 3
    assert all(isinstance(o, RowMaskError) for o in outcomes)


def test_gpt_oss_rows(tokenizer):
    template = original("gptoss")
    tool_call_without_reasoning = [dict(m) for m in REASONING]
    del tool_call_without_reasoning[3]["reasoning_content"]
    rows = assert_rows_are_inference_renders(tokenizer, template, tool_call_without_reasoning)
    assert rows[0][1] == "<|channel|>analysis<|message|>Two and two make four.<|end|><|start|>assistant" \
                         "<|channel|>final<|message|>4<|return|>"
    assert "get_weather" in rows[1][1] and "21 degrees, sunny" in rows[2][0] and "21 degrees, sunny" not in rows[2][1]
    assert_rows_are_inference_renders(tokenizer, template, NO_REASONING)


def test_gpt_oss_answer_after_a_tool_call_with_analysis(tokenizer):
    # gpt-oss renders a tool call's analysis while the answer is still to come (the prompt the model answers from),
    # and drops it from the conversation once an answer follows: the row is that prompt, then the answer as the
    # template renders it at the end of the conversation.
    template = original("gptoss")
    rows = assert_rows_are_inference_renders(tokenizer, template, REASONING)
    text, supervised = rows[2]
    assert "<|channel|>analysis<|message|>I should call the tool.<|end|>" in text[: len(text) - len(supervised)]
    assert supervised == "<|channel|>analysis<|message|>Read the result.<|end|><|start|>assistant" \
                         "<|channel|>final<|message|>It is 21 degrees and sunny.<|return|>"
    whole = render(tokenizer, template, template_messages(REASONING), None, False, {})
    assert "I should call the tool." not in whole and whole.endswith(supervised)
    # The turn is found after the message before it; a tool result with no text cannot be told apart: refused.
    empty_result = [*REASONING[:4], {**REASONING[4], "content": ""}, REASONING[5]]
    outcomes = conversation_rows(tokenizer, template, empty_result, None, MaskOptions()).outcomes
    assert [getattr(o, "reason", None) for o in outcomes] == [None, None, "generation_prompt_mismatch"]


@pytest.mark.parametrize("name", ["nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra"])
def test_nemotron_3_rows(tokenizer, name):
    template = original(name)
    rows = assert_rows_are_inference_renders(tokenizer, template, REASONING)
    # The prompt opens the reasoning block (Ultra closes it without a newline).
    assert rows[0][1].startswith("Two and two make four.") and "</think>" in rows[0][1]
    assert "get_weather" in rows[1][1] and "21 degrees, sunny" not in rows[2][1]
    # Thinking pinned on: Nemotron's turns without reasoning follow its thinking-off prompt only, and are refused.
    on = MaskOptions(template_kwargs={"enable_thinking": True})
    assert {o.reason for o in conversation_rows(tokenizer, template, NO_REASONING, None, on).outcomes} == \
        {"generation_prompt_mismatch"}
    off = MaskOptions(multi_turn="per_turn", template_kwargs={"enable_thinking": False})
    rows = assert_rows_are_inference_renders(tokenizer, template, NO_REASONING, off)
    assert rows[0][0].endswith("<think></think>4<|im_end|>") and rows[0][1] == "4<|im_end|>"
    # Thinking off, nothing is rewritten: auto keeps one row per conversation.
    pinned = conversation_rows(tokenizer, template, NO_REASONING, None, MaskOptions(template_kwargs=off.template_kwargs))
    assert not pinned.per_turn and len(pinned.outcomes) == 1 and pinned.thinking_off_turns == 0
    # Left to the template, a conversation without reasoning is that same row, counted as rendered thinking off.
    auto = conversation_rows(tokenizer, template, NO_REASONING)
    assert auto.outcomes == pinned.outcomes and auto.thinking_off_turns == 3


MIXED = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "21 degrees, sunny"},
    {"role": "assistant", "content": "It is 21 degrees and sunny.", "reasoning_content": "Read the result."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.mark.parametrize("name", ["nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra"])
def test_nemotron_3_mixes_turns_with_and_without_reasoning(tokenizer, name):
    # The turns without reasoning (the tool call, the last answer) cannot follow the thinking-on prompt: each is
    # rendered with thinking off, the prompt such a model is then served with; the others keep thinking on.
    rows = assert_rows_are_inference_renders(tokenizer, original(name), MIXED, thinking_off=(4, 8))
    assert rows[1][0].rstrip().endswith("<think></think>" + rows[1][1]) and "get_weather" in rows[1][1]
    assert rows[3][1] == "You're welcome.<|im_end|>" and rows[2][1].startswith("Read the result.")
    # Pinned either way, enable_thinking is kept for every row and what does not fit is refused by name.
    for thinking, refused in ((True, [4, 8]), (False, [2, 6])):
        options = MaskOptions(template_kwargs={"enable_thinking": thinking})
        built = conversation_rows(tokenizer, original(name), MIXED, None, options)
        assert built.thinking_off_turns == 0
        assert [i + 1 for i, o in zip([1, 3, 5, 7], built.outcomes) if isinstance(o, RowMaskError)] == refused
        assert {o.reason for o in built.outcomes if isinstance(o, RowMaskError)} == {"generation_prompt_mismatch"}


def test_qwen3_mixes_turns_without_changing_the_prompt(tokenizer):
    # Qwen3's thinking-on prompt is followed by an empty think block in a turn without reasoning: nothing to change.
    rows = assert_rows_are_inference_renders(tokenizer, original("qwen3"), MIXED)
    assert rows[1][1].startswith("<think>\n\n</think>\n\n<tool_call>") and rows[3][1] == \
        "<think>\n\n</think>\n\nYou're welcome.<|im_end|>"
    assert rows[0][1] == "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"


def test_deepseek_r1_distill_is_trained_through_its_twin(tokenizer):
    template = original("deepseek_r1_distill")
    assert training_template_for(template) == bundled_template("deepseek_r1_distill")
    plain = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add."},
             {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    rows = assert_rows_are_inference_renders(tokenizer, template, plain)
    # The generated turn follows the prefilled '<think>\n': the reasoning, then the answer.
    assert rows[0] == ("<｜User｜>2+2?<｜Assistant｜><think>\nAdd.\n</think>\n\n4<｜end▁of▁sentence｜>",
                       "Add.\n</think>\n\n4<｜end▁of▁sentence｜>")
    # Without reasoning, an empty think block (what R1 distills emit when they skip thinking); the history keeps
    # the original's reasoning-free turns.
    assert rows[1] == ("<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜><｜User｜>3+3?<｜Assistant｜><think>\n"
                       "\n</think>\n\n6<｜end▁of▁sentence｜>", "\n</think>\n\n6<｜end▁of▁sentence｜>")
    # as_rendered: the original rewrites history, refused as before.
    with pytest.raises(ChatftError) as err:
        conversation_rows(tokenizer, template, plain, None, MaskOptions(multi_turn="as_rendered"),
                          training_template_for(template))
    assert err.value.id == "template_not_prefix_stable"


def test_deepseek_r1_distill_twin_spans_are_the_rows(tokenizer):
    # The twin's generation span of the turn that ends a conversation is what its per-turn row supervises.
    template, twin = original("deepseek_r1_distill"), bundled_template("deepseek_r1_distill")
    for messages in (REASONING[:2], NO_REASONING[:2], [*REASONING[:2], {"role": "user", "content": "More?"},
                                                       {"role": "assistant", "content": "5", "reasoning_content": "hm"}]):
        (*_, row) = conversation_rows(tokenizer, template, messages, None, MaskOptions(), twin).outcomes
        encoded = tokenizer.apply_chat_template(template_messages(messages), chat_template=twin, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        last = max(i for i, m in enumerate(mask) if m)
        first = last
        while first > 0 and mask[first - 1]:
            first -= 1
        assert decode_row(tokenizer, row)[1] == tokenizer.decode(ids[first:last + 1])


def test_deepseek_r1_distill_refuses_what_its_template_cannot_render(tokenizer):
    # The template drops tool calls (it renders them only without content, and then fails on object arguments)
    # and writes an answer after tool results without a think block: counted by name, never trained otherwise.
    outcomes = conversation_rows(tokenizer, original("deepseek_r1_distill"), REASONING, None, MaskOptions(),
                                 bundled_template("deepseek_r1_distill")).outcomes
    assert [getattr(o, "reason", None) for o in outcomes] == [None, "template_drops_field", "template_drops_field"]
    assert [d.field for d in outcomes[1].dropped] == ["tool_calls"]
    assert [d.field for d in outcomes[2].dropped] == ["reasoning_content"]
    # Without reasoning the answer after tool results is trained as the template renders it there.
    outcomes = conversation_rows(tokenizer, original("deepseek_r1_distill"), NO_REASONING, None, MaskOptions(),
                                 bundled_template("deepseek_r1_distill")).outcomes
    assert [getattr(o, "reason", None) for o in outcomes] == [None, "template_drops_field", None]
    assert decode_row(tokenizer, outcomes[2])[1] == "It is 21 degrees and sunny.<｜end▁of▁sentence｜>"


def test_reasoning_families_without_a_twin_take_the_per_turn_path(tokenizer):
    # Their originals render the turn being generated themselves: no twin; rows come from the original.
    for name in ("qwen3", "gptoss", "nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra", "glm4moe"):
        assert training_template_for(original(name)) is None, name
    rows = assert_rows_are_inference_renders(tokenizer, original("glm4moe"), REASONING)
    assert rows[0][1] == "\n<think>Two and two make four.</think>\n4"


def test_gemma_4_rows(tokenizer):
    # The later Gemma 4 template renders the reasoning of the turn being generated only (a thought channel) and
    # writes tool results into the model's turn, named by the call their tool_call_id points to (so the call here
    # carries that id, as data prep writes it): per-turn rows, each the inference render plus the turn.
    paired = [{**m, "tool_calls": [{**WEATHER_CALL, "id": "c1"}]} if m.get("tool_calls") else m for m in REASONING]
    rows = assert_rows_are_inference_renders(tokenizer, original("gemma4_v5"), paired)
    assert rows[0][1] == "<|channel>thought\nTwo and two make four.\n<channel|>4<turn|>"
    assert "get_weather" in rows[1][1] and "21 degrees, sunny" in rows[2][0] and "21 degrees, sunny" not in rows[2][1]
    # Without reasoning nothing is rewritten: one row, the tool result inside it but not supervised.
    without = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in paired]
    (row,) = conversation_rows(tokenizer, original("gemma4_v5"), without).outcomes
    text, supervised = decode_row(tokenizer, row)
    assert "21 degrees, sunny" in text and "21 degrees, sunny" not in supervised and "get_weather" in supervised
    # The first Gemma 4 template renders no reasoning at all: such turns are refused by field, never trained empty.
    (refused,) = conversation_rows(tokenizer, original("gemma4"), paired).outcomes
    assert refused.reason == "template_drops_field" and {d.field for d in refused.dropped} == {"reasoning_content"}


def test_a_history_preserving_template_gives_one_row(tokenizer):
    template = tokenizer.chat_template  # the tiny model's ChatML: every turn renders the same whatever follows
    messages = NO_REASONING[:3] + [{"role": "assistant", "content": "Sunny."}]
    built = conversation_rows(tokenizer, template, messages)
    assert not built.per_turn and built.outcomes == [(*mask_conversation(tokenizer, template, messages), None)]
    assert decode_row(tokenizer, built.outcomes[0])[1] == "4<|im_end|>Sunny.<|im_end|>"
    # per_turn asked for on such a template: the same turns supervised, one row each.
    rows = assert_rows_are_inference_renders(tokenizer, template, messages, MaskOptions(multi_turn="per_turn"))
    assert [supervised for _, supervised in rows] == ["4<|im_end|>", "Sunny.<|im_end|>"]


def test_as_rendered_refuses_and_last_assistant_trains_the_final_turn(tokenizer):
    with pytest.raises(ChatftError) as err:
        conversation_rows(tokenizer, original("qwen3"), REASONING, None, MaskOptions(multi_turn="as_rendered"))
    assert err.value.id == "template_not_prefix_stable" and "multi_turn=per_turn" in err.value.hint
    built = conversation_rows(tokenizer, original("qwen3"), REASONING, None, MaskOptions(multi_turn="last_assistant"))
    (row,) = built.outcomes
    assert decode_row(tokenizer, row)[1] == "<think>\nRead the result.\n</think>\n\nIt is 21 degrees and sunny.<|im_end|>"


def test_each_per_turn_row_is_checked_for_what_its_template_drops(tokenizer):
    # Qwen3-2507 Instruct renders no reasoning: every turn that has some is refused, per row.
    outcomes = conversation_rows(tokenizer, original("qwen3_instruct_2507"), REASONING, None,
                                 MaskOptions(multi_turn="per_turn")).outcomes
    assert [o.reason for o in outcomes] == ["template_drops_field"] * 3
    assert [d.field for o in outcomes for d in o.dropped] == ["reasoning_content"] * 3


# --------------------------------------------------------------------------- the dataset


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def section(path: Path, tmp_path: Path, **settings) -> DatasetSection:
    template = tmp_path / "qwen3.jinja"
    template.write_text(original("qwen3"))
    return DatasetSection(path_or_dataset_id=str(path), chat_template=str(template), **settings)


def test_the_expansion_is_counted_and_the_length_policy_applies_per_row(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CHATFT_CACHE_DIR", str(tmp_path / "cache"))
    data = write_rows(tmp_path / "train.jsonl", [{"messages": REASONING}, {"messages": NO_REASONING[:2]},
                                                 {"messages": NO_REASONING}])
    lines: list[str] = []
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = prepare_training_data(section(data, tmp_path), tokenizer, log=lines.append)
    report = prepared.report
    expansion = report.expansion
    assert (report.rows_in, report.rows_used, report.multi_turn) == (3, 7, "auto")
    assert expansion["per_turn_conversations"] == 2 and expansion["first_per_turn_row"] == 1
    assert (expansion["rows_before"], expansion["rows_after"]) == (3, 7)
    assert expansion["tokens_after"] == report.total_tokens > expansion["tokens_before"]
    assert [(row.source_row, row.message) for row in prepared.rows] == [(1, 2), (1, 4), (1, 6), (2, None),
                                                                        (3, 2), (3, 4), (3, 6)]
    summary = [line for line in lines if "multi-turn:" in line]
    assert summary == [f"dataset: multi-turn: 2 of 3 conversations trained one row per assistant turn "
                       f"(dataset.multi_turn=auto, chosen where the chat template rewrites earlier turns, first at "
                       f"row 1): 3 -> 7 rows, {expansion['tokens_before']:,} -> {expansion['tokens_after']:,} tokens"]

    cached = prepare_training_data(section(data, tmp_path), tokenizer, log=lines.append)
    assert cached.rows == prepared.rows and cached.report == report and any("tokenization cache" in x for x in lines)

    # The length policy sees each per-turn row: the short first turns fit, the long last ones are counted.
    limit = sorted(len(row) for row in prepared.rows)[3]
    short = prepare_training_data(section(data, tmp_path, seq_length=limit), tokenizer, log=lines.append).report
    assert short.rows_used == 4 and short.dropped_by_reason == {"too_long": 3}
    assert short.rows_in + short.expansion["rows_after"] - short.expansion["rows_before"] == 7


def test_training_refuses_reasoning_rows_when_thinking_is_off(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CHATFT_CACHE_DIR", str(tmp_path / "cache"))
    data = write_rows(tmp_path / "train.jsonl", [{"messages": NO_REASONING}, {"messages": REASONING}])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    off = section(data, tmp_path, chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(ChatftError) as err:
        prepare_training_data(off, tokenizer, log=lambda line: None)
    assert err.value.id == "template_not_prefix_stable"
    assert "in 3 training rows" in err.value.message and "row 2:" in err.value.message
    assert "enable_thinking" in err.value.hint
    counted = prepare_training_data(off, tokenizer, log=lambda line: None, refuse_template_drops=False).report
    assert counted.rows_used == 3 and counted.dropped_by_reason == {"generation_prompt_mismatch": 3}
    # Thinking on (the template's default): both kinds of rows train.
    assert prepare_training_data(section(data, tmp_path), tokenizer, log=lambda line: None).report.rows_used == 6


# --------------------------------------------------------------------------- prep


def test_reasoning_arrives_as_reasoning_content_from_every_shape():
    def assistant(**fields):
        row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", **fields}]}
        return convert_row(row, "messages", inline_think=True)

    for field in ("reasoning", "thinking", "reasoning_content"):
        conversation = assistant(content="4", **{field: "add"})
        assert conversation.messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "add"}
        assert conversation.changes == ([] if field == "reasoning_content" else ["reasoning_from_field"])
    inline = assistant(content="<think>\nadd them\n</think>\n\n4")
    assert inline.messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "add them"}
    assert inline.changes == ["reasoning_from_think_tags"]
    # Training reads the content as it is: the model's own template decides what a <think> block means.
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>y"}]}
    assert convert_row(row, "messages").messages[1]["content"] == "<think>x</think>y"


# --------------------------------------------------------------------------- eval


def test_eval_prompts_render_with_the_template_variables(tmp_path, tiny_model_dir, monkeypatch):
    from chatft.config.schema import validate_config
    from chatft.data.pipeline import choose_template
    from chatft.eval.loading import TemplateUse
    from chatft.eval.prompts import generation_prompts

    monkeypatch.setenv("CHATFT_CACHE_DIR", str(tmp_path / "cache"))
    data = write_rows(tmp_path / "eval.jsonl", [{"messages": NO_REASONING}])
    prompts = {}
    for thinking in (True, False):
        cfg = validate_config("eval", {"targets": ["merged"], "merged": str(tiny_model_dir), "dataset": {
            "path_or_dataset_id": str(data), "chat_template": str(section(data, tmp_path).chat_template),
            "chat_template_kwargs": {"enable_thinking": thinking}}, "generation": {"num_prompts": 1}}, "test")
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        use = TemplateUse(tokenizer, choose_template(tokenizer, cfg.dataset.chat_template), "dataset.chat_template", [])
        scored = prepare_training_data(cfg.dataset, tokenizer, log=lambda line: None)
        (prompt,) = generation_prompts(cfg, scored, use)
        prompts[thinking] = tokenizer.decode(prompt.input_ids)
    assert prompts[True].endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert prompts[False] == prompts[True] + "<think>\n\n</think>\n\n"


# --------------------------------------------------------------------------- mixed rows and R1 through the pipeline


def test_a_nemotron_dataset_mixing_reasoning_and_none_trains(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CHATFT_CACHE_DIR", str(tmp_path / "cache"))
    data = write_rows(tmp_path / "train.jsonl", [{"messages": MIXED}, {"messages": NO_REASONING}])
    template = tmp_path / "nemotron.jinja"
    template.write_text(original("nemotron_3_nano"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    report = prepare_training_data(DatasetSection(path_or_dataset_id=str(data), chat_template=str(template)),
                                   tokenizer, log=lambda line: None).report
    # MIXED: one row per turn (its history is rewritten); NO_REASONING: one row, rendered with thinking off.
    assert (report.rows_used, report.dropped_by_reason) == (5, {})
    off = sum(1 for m in MIXED + NO_REASONING if m["role"] == "assistant" and not m.get("reasoning_content"))
    assert report.expansion["thinking_off_turns"] == off
    assert f"{off} turns without reasoning rendered with enable_thinking=false" in expansion_summary(report)
    pinned = DatasetSection(path_or_dataset_id=str(data), chat_template=str(template),
                            chat_template_kwargs={"enable_thinking": True})
    with pytest.raises(ChatftError) as err:
        prepare_training_data(pinned, tokenizer, log=lambda line: None)
    assert err.value.id == "template_not_prefix_stable" and "in 5 training rows" in err.value.message


def test_preview_of_r1_distill_rows_with_its_original_template(tmp_path, tiny_model_dir):
    from clirun import run_chatft

    plain = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add."},
             {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    write_rows(tmp_path / "train.jsonl", [{"messages": plain}, {"messages": plain[:2]}])
    (tmp_path / "r1.jinja").write_text(original("deepseek_r1_distill"))
    result = run_chatft("preview", "-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                        "dataset.path_or_dataset_id=train.jsonl", "dataset.chat_template=r1.jinja", "--json",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["stats"]["rows_used"] == 3 and payload["stats"]["dropped_by_reason"] == {}
    rows = payload["rows"]
    assert [(row["source_row"], row["message"]) for row in rows] == [(1, 2), (1, 4), (2, None)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    supervised = [tokenizer.decode([t for t, m in zip(row["input_ids"], row["labels_mask"]) if m]) for row in rows]
    assert supervised == ["Add.\n</think>\n\n4<｜end▁of▁sentence｜>", "\n</think>\n\n6<｜end▁of▁sentence｜>",
                          "Add.\n</think>\n\n4<｜end▁of▁sentence｜>"]
    assert rows[1]["text"].startswith("<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜><｜User｜>3+3?<｜Assistant｜><think>\n")
