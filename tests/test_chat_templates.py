"""chatft's bundled generation-tagged chat templates and dataset.chat_template resolution.

Every bundled template must render byte-identically to its family's original (shipped in the TRL
wheel, located without importing trl) and mark exactly what the assistant emits: content (or tool
calls) plus the end-of-turn token, never the header. Mistral has no original in TRL; it is
checked against strings derived from Mistral's documented v3 format.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest

from chatft.data import chat_templates as ct
from chatft.errors import ChatftError
from original_templates import SKIP_REASON, TRL_DIR, original


needs_trl = pytest.mark.skipif(TRL_DIR is None, reason=SKIP_REASON)


# SmolLM2-Instruct's own template (chatft's demo model), written out as the reference to compare with.
SMOLLM2_ORIGINAL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Control tokens of every family, added as special tokens so they tokenize atomically, as in the real
# tokenizers (this makes span boundaries next to them behave like the real thing).
CONTROL_TOKENS = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
    "<bos>", "<start_of_turn>", "<end_of_turn>",
    "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
]  # fmt: skip

# The bos/eos each family's tokenizer supplies to its template.
SPECIAL = {
    "chatml": {"eos_token": "<|im_end|>"},
    "qwen2_5": {"eos_token": "<|im_end|>"},
    "smollm2": {"eos_token": "<|im_end|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3_2": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3_0": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "phi3": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "phi3_5": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "qwen3_instruct_2507": {"eos_token": "<|im_end|>"},
    "deepseek_r1_distill": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
}


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(CONTROL_TOKENS, special_tokens=True)
    return tokenizer


# --------------------------------------------------------------------------- conversations

def U(text: str) -> dict[str, Any]:  # noqa: N802 - reads like a role tag in the tables below
    return {"role": "user", "content": text}


def A(text: str | None) -> dict[str, Any]:  # noqa: N802
    return {"role": "assistant", "content": text}


def S(text: str) -> dict[str, Any]:  # noqa: N802
    return {"role": "system", "content": text}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time.", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]


def call(name: str = "get_weather", arguments: Any = None, call_id: str = "call00001") -> dict[str, Any]:
    args = {"city": "Paris"} if arguments is None else arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def tool_msg(content: Any, call_id: str = "call00001") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# Plain conversations every family renders (Gemma refuses the ones with a system message, and
# must refuse them exactly like its original).
PLAIN = {
    "single_user": [U("What is the capital of France?")],
    "single_turn": [U("What is the capital of France?"), A("The capital of France is Paris.")],
    "with_system": [S("You are a helpful assistant."), U("Hi!"), A("Hello! How can I help you today?")],
    "multi_turn": [U("Hi"), A("Hello!"), U("Count to three."), A("one, two, three")],
    "system_multi_turn_ends_user": [
        S("Answer briefly."), U("Capital of Italy?"), A("Rome."), U("And Spain?"), A("Madrid."), U("Germany?"),
    ],
    "whitespace_unicode": [
        U("  Ünïcödé — {\"json\": 1} 'quotes' {{ not jinja }}  \n"),
        A("\n  Sure: <b>bold</b> & {% raw %} ✓  \n"),
        U("\tthanks\n"),
        A(" you're welcome "),
    ],
    "empty_system": [S(""), U("Hi"), A("Hello")],
    "empty_assistant": [U("Say nothing."), A("")],
}
GEN = (False, True)


def render(tokenizer, template: str, messages, family: str, add_generation_prompt: bool, tools=None, **kwargs):
    """(rendered text, None) or (None, "refused"): a refusal is an outcome to compare too (its exception
    class and wording may differ: the original may fail on a concatenation where ours raises by name)."""
    try:
        text = tokenizer.apply_chat_template(
            copy.deepcopy(messages), tools=copy.deepcopy(tools), chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **{**SPECIAL[family], **kwargs},
        )
    except Exception:  # noqa: BLE001 - the refusal itself is compared
        return None, "refused"
    return text, None


def assert_identical(tokenizer, family: str, reference: str, messages, tools=None, expect_render=True, **kwargs):
    ours_template = ct.bundled_template(family)
    for gen in GEN:
        expected = render(tokenizer, reference, messages, family, gen, tools, **kwargs)
        got = render(tokenizer, ours_template, messages, family, gen, tools, **kwargs)
        assert got == expected, f"{family} add_generation_prompt={gen}:\n{got[0]!r}\n!=\n{expected[0]!r}"
        if expect_render:
            assert expected[0] is not None, f"the original refused: {expected[1]}"
        else:
            assert expected[0] is None and got[0] is None, "both should refuse"


ORIGINAL_OF = {  # bundled name -> TRL original file stem
    "qwen2_5": "qwen2_5",
    "llama3": "llama3_1",
    "llama3_2": "llama3_2",
    "llama3_0": "llama3",
    "gemma": "gemma",
    "phi3": "phi3",
    "phi3_5": "phi3_5",
    "qwen3_instruct_2507": "qwen3_instruct_2507",
}


# --------------------------------------------------------------------------- byte identity


@needs_trl
@pytest.mark.parametrize("family", sorted(ORIGINAL_OF))
@pytest.mark.parametrize("case", sorted(PLAIN))
def test_plain_conversations_render_like_the_original(tok, family, case):
    messages = PLAIN[case]
    refuses = family == "gemma" and messages[0]["role"] == "system"
    assert_identical(tok, family, original(ORIGINAL_OF[family]), messages, expect_render=not refuses)


@needs_trl
@pytest.mark.parametrize("family", sorted(ORIGINAL_OF))
def test_tools_are_ignored_or_rendered_like_the_original(tok, family):
    # Gemma and Phi-3 ignore tools; Qwen2.5 and Llama render them. Either way: the same bytes.
    for messages in (PLAIN["single_user"], PLAIN["multi_turn"], PLAIN["system_multi_turn_ends_user"]):
        refuses = family == "gemma" and messages[0]["role"] == "system"
        assert_identical(tok, family, original(ORIGINAL_OF[family]), messages, tools=TOOLS, expect_render=not refuses)


def test_chatml_renders_like_plain_chatml(tok, tiny_models_module):
    reference = tiny_models_module.CHATML_TEMPLATE
    for messages in [*PLAIN.values(), [U("x"), {"role": "tool", "content": "42"}, A("y")]]:
        assert_identical(tok, "chatml", reference, messages)


@needs_trl
def test_chatml_renders_like_qwen2_5_when_the_system_message_is_given(tok):
    ours = ct.bundled_template("chatml")
    for messages in PLAIN.values():
        if messages[0]["role"] != "system":
            messages = [S("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), *messages]
        for gen in GEN:
            assert render(tok, ours, messages, "chatml", gen) == render(tok, original("qwen2_5"), messages, "qwen2_5", gen)


def test_smollm2_renders_like_the_original(tok):
    for messages in PLAIN.values():
        assert_identical(tok, "smollm2", SMOLLM2_ORIGINAL, messages)


@needs_trl
def test_gemma_refuses_what_the_original_refuses(tok):
    for messages in ([S("sys"), U("hi")], [A("first")], [U("a"), U("b")], [U("a"), A("b"), A("c")]):
        assert_identical(tok, "gemma", original("gemma"), messages, expect_render=False)


QWEN_TOOL_CASES = {
    "call_then_answer": [S("You can call tools."), U("Weather in Paris?"), A(None) | {"tool_calls": [call()]},
                         tool_msg('{"temp": 21}'), A("It is 21 degrees in Paris.")],
    "content_and_two_calls_two_results": [
        U("Weather and time in Rome?"),
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call(arguments={"city": "Rome"}), call("get_time", {}, "call00002")]},
        tool_msg('{"temp": 25}'), tool_msg('"14:00"', "call00002"), A("25 degrees, 2 pm."), U("Thanks"),
    ],
    "flat_call_and_string_arguments": [
        U("Weather?"), {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
        tool_msg("cold"),
    ],
    "system_in_the_middle": [U("Hi"), A("Hello"), S("Now be terse."), U("Weather?")],
}
QWEN_REFUSED = [  # the original concatenates '\n' + content, which fails on non-text content
    [U("Weather?"), {"role": "assistant", "content": [{"type": "text", "text": "x"}], "tool_calls": [call()]}],
]


def _strip_none(messages):
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


@needs_trl
@pytest.mark.parametrize("case", sorted(QWEN_TOOL_CASES))
@pytest.mark.parametrize("with_tools", [True, False])
def test_qwen2_5_tool_calls_render_like_the_original(tok, case, with_tools):
    messages = _strip_none(QWEN_TOOL_CASES[case])
    assert_identical(tok, "qwen2_5", original("qwen2_5"), messages, tools=TOOLS if with_tools else None)


REASONING_CASES = {  # reasoning, tool calls and tool results, as today's chat models' rows carry them
    "reasoning_then_call_then_answer": [
        S("Think, then answer."), U("Weather in Paris?"),
        {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [call()]},
        tool_msg("21 degrees"), {"role": "assistant", "content": "21 degrees.", "reasoning_content": "Read it."},
    ],
    "reasoning_turns": [U("2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "Add."}, U("3+3?"),
                        {"role": "assistant", "content": "6", "reasoning_content": "Add again."}],
    "string_arguments": [U("Weather?"), {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}, tool_msg("cold"),
        A("Cold.")],
}


@needs_trl
@pytest.mark.parametrize("case", sorted([*QWEN_TOOL_CASES, *REASONING_CASES]))
@pytest.mark.parametrize("with_tools", [True, False])
def test_qwen3_instruct_2507_renders_like_the_original(tok, case, with_tools):
    messages = {**QWEN_TOOL_CASES, **REASONING_CASES}[case]
    assert_identical(tok, "qwen3_instruct_2507", original("qwen3_instruct_2507"), _strip_none(messages),
                     tools=TOOLS if with_tools else None)


R1_GENERATED = "<｜Assistant｜><think>\n{reasoning}\n</think>\n\n{answer}<｜end▁of▁sentence｜>"


def r1_conversations():
    yield from PLAIN.values()
    yield from REASONING_CASES.values()
    yield [S("first"), U("a"), S("second"), U("b"), {"role": "assistant", "content": "<think>\nx\n</think>\n\ny"}]
    yield [U("a"), {"role": "assistant", "content": "b"}, tool_msg("out1"), tool_msg("out2"), A("c"), tool_msg("x")]


@needs_trl
def test_deepseek_r1_distill_prompts_and_history_render_like_the_original(tok):
    # Prompts (add_generation_prompt) and every turn once it is history: the same bytes, or both refusing.
    twin, reference = ct.bundled_template("deepseek_r1_distill"), original("deepseek_r1_distill")
    rendered = 0
    for messages in r1_conversations():
        for history in (messages, [*messages, U("next")]):
            expected = render(tok, reference, history, "deepseek_r1_distill", True, TOOLS)
            assert render(tok, twin, history, "deepseek_r1_distill", True, TOOLS) == expected, history
            rendered += expected[0] is not None
        if messages[-1]["role"] != "assistant":
            for gen in GEN:
                assert render(tok, twin, messages, "deepseek_r1_distill", gen) == \
                    render(tok, reference, messages, "deepseek_r1_distill", gen)
    assert rendered >= 15


@needs_trl
def test_deepseek_r1_distill_renders_the_turn_being_generated_after_the_original_prompt(tok):
    twin, reference = ct.bundled_template("deepseek_r1_distill"), original("deepseek_r1_distill")
    cases = [  # the last turn, and what the model emits for it after the prompt's '<｜Assistant｜>'
        (A("Paris."), R1_GENERATED.format(reasoning="", answer="Paris.")),
        ({"role": "assistant", "content": "Paris.", "reasoning_content": "\nIt is Paris.\n"},
         R1_GENERATED.format(reasoning="It is Paris.", answer="Paris.")),
        (A("<think>\nInline.\n</think>\n\nParis."), R1_GENERATED.format(reasoning="Inline.", answer="Paris.")),
    ]
    for history in ([U("Capital of France?")], [S("Be brief."), U("Hi"), A("Hello"), U("Capital of France?")]):
        prompt = render(tok, reference, history, "deepseek_r1_distill", True)[0]
        assert prompt.endswith("<｜Assistant｜><think>\n")
        for turn, generated in cases:
            text = render(tok, twin, [*history, turn], "deepseek_r1_distill", False)[0]
            assert text == prompt.removesuffix("<｜Assistant｜><think>\n") + generated
    # After tool results the original opens no think block: the answer is written as it renders it.
    history = REASONING_CASES["string_arguments"][:3]
    for gen in GEN:
        assert render(tok, twin, [*history, A("Cold.")], "deepseek_r1_distill", gen) == \
            render(tok, reference, [*history, A("Cold.")], "deepseek_r1_distill", gen)


@needs_trl
def test_qwen2_5_refuses_what_the_original_refuses(tok):
    for messages in QWEN_REFUSED:
        assert_identical(tok, "qwen2_5", original("qwen2_5"), messages, tools=TOOLS, expect_render=False)


LLAMA_TOOL_CASES = {
    "call_then_answer": [S("You can call tools."), U("Weather in Paris?"), {"role": "assistant", "tool_calls": [call()]},
                         tool_msg({"temp": 21}), A("It is 21 degrees.")],
    "ipython_string_result": [U("Weather?"), {"role": "assistant", "tool_calls": [call()]},
                              {"role": "ipython", "content": "21 degrees"}, A("21.")],
    "no_system": [U("  Time? "), {"role": "assistant", "tool_calls": [call("get_time", {})]}, tool_msg("14:00")],
}
LLAMA_KWARGS = {
    "defaults": {},
    "tools_in_system": {"tools_in_user_message": False},
    "date": {"date_string": "03 Mar 2025"},
}


@needs_trl
@pytest.mark.parametrize("family", ["llama3", "llama3_2"])
@pytest.mark.parametrize("case", sorted(LLAMA_TOOL_CASES))
@pytest.mark.parametrize("kwargs", sorted(LLAMA_KWARGS))
def test_llama_tool_calls_render_like_the_original(tok, family, case, kwargs):
    messages = LLAMA_TOOL_CASES[case]
    assert_identical(tok, family, original(ORIGINAL_OF[family]), messages, tools=TOOLS, **LLAMA_KWARGS[kwargs])
    assert_identical(tok, family, original(ORIGINAL_OF[family]), messages, **LLAMA_KWARGS[kwargs])


@needs_trl
def test_llama3_1_builtin_and_custom_tools_render_like_the_original(tok):
    builtin = ["brave_search", "wolfram_alpha", "code_interpreter"]
    search = {"role": "assistant", "tool_calls": [call("brave_search", {"query": "weather Paris"})]}
    messages = [U("Search the weather."), search, tool_msg("sunny"), A("Sunny.")]
    reference = original("llama3_1")
    assert_identical(tok, "llama3", reference, messages, builtin_tools=builtin)
    assert_identical(tok, "llama3", reference, messages, tools=TOOLS, builtin_tools=builtin, date_string="1 Jan 2025")
    assert_identical(tok, "llama3", reference, LLAMA_TOOL_CASES["call_then_answer"], custom_tools=TOOLS)


@needs_trl
@pytest.mark.parametrize("family", ["llama3", "llama3_2"])
def test_llama_refuses_what_the_original_refuses(tok, family):
    two_calls = [U("Both?"), {"role": "assistant", "tool_calls": [call(), call("get_time", {}, "call00002")]}]
    reference = original(ORIGINAL_OF[family])
    assert_identical(tok, family, reference, two_calls, expect_render=False)
    assert_identical(tok, family, reference, [S("only a system message")], tools=TOOLS, expect_render=False)


# --------------------------------------------------------------------------- Mistral (no original in TRL)

MISTRAL_TOOL_JSON = (
    '[{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}, '
    '"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}, '
    '{"type": "function", "function": {"name": "get_time", "description": "Local time.", '
    '"parameters": {"type": "object", "properties": {}}}}]'
)
MISTRAL_CASES = [
    # (messages, tools, expected): derived from the documented v3 format
    # "<s>[INST] user[/INST] assistant</s>[INST] user[/INST]", system prepended to the last user message.
    (PLAIN["single_user"], None, "<s>[INST] What is the capital of France?[/INST]"),
    (PLAIN["single_turn"], None, "<s>[INST] What is the capital of France?[/INST] The capital of France is Paris.</s>"),
    (PLAIN["multi_turn"], None, "<s>[INST] Hi[/INST] Hello!</s>[INST] Count to three.[/INST] one, two, three</s>"),
    (PLAIN["with_system"], None,
     "<s>[INST] You are a helpful assistant.\n\nHi![/INST] Hello! How can I help you today?</s>"),
    (PLAIN["system_multi_turn_ends_user"], None,
     "<s>[INST] Capital of Italy?[/INST] Rome.</s>[INST] And Spain?[/INST] Madrid.</s>"
     "[INST] Answer briefly.\n\nGermany?[/INST]"),
    ([S("Be nice."), U("a"), A("b"), U("c"), A("d")], None, "<s>[INST] a[/INST] b</s>[INST] Be nice.\n\nc[/INST] d</s>"),
    ([U("x"), A("  padded answer \n")], None, "<s>[INST] x[/INST] padded answer</s>"),
    ([U("Hi"), A("Hello"), U("Weather in Paris?")], TOOLS,
     f"<s>[INST] Hi[/INST] Hello</s>[AVAILABLE_TOOLS] {MISTRAL_TOOL_JSON}[/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST]"),
    ([S("Use tools."), U("Weather in Paris?"), {"role": "assistant", "tool_calls": [call()]},
      tool_msg('{"temp": 21}'), A("21 degrees.")], TOOLS,
     f"<s>[AVAILABLE_TOOLS] {MISTRAL_TOOL_JSON}[/AVAILABLE_TOOLS][INST] Use tools.\n\nWeather in Paris?[/INST]"
     '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>'
     '[TOOL_RESULTS] {"content": {"temp": 21}, "call_id": "call00001"}[/TOOL_RESULTS] 21 degrees.</s>'),
    ([U("Both?"), {"role": "assistant", "tool_calls": [call(), call("get_time", {}, "call00002")]},
      tool_msg({"temp": 21}), tool_msg("14:00", "call00002"), A("21 degrees at 14:00.")], None,
     '<s>[INST] Both?[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}, '
     '{"name": "get_time", "arguments": {}, "id": "call00002"}]</s>'
     '[TOOL_RESULTS] {"content": {"temp": 21}, "call_id": "call00001"}[/TOOL_RESULTS]'
     '[TOOL_RESULTS] {"content": 14:00, "call_id": "call00002"}[/TOOL_RESULTS] 21 degrees at 14:00.</s>'),
]


@pytest.mark.parametrize("index", range(len(MISTRAL_CASES)))
def test_mistral_renders_the_documented_v3_format(tok, index):
    messages, tools, expected = MISTRAL_CASES[index]
    for gen in GEN:  # the prompt already ends with [/INST]: no generation prompt is added
        text, error = render(tok, ct.bundled_template("mistral"), messages, "mistral", gen, tools)
        assert error is None
        assert text == expected


def test_mistral_refuses_non_alternating_turns_and_unknown_roles(tok):
    for messages in ([U("a"), U("b")], [A("first")], [U("a"), A("b"), A("c")], [U("a"), S("late system")]):
        assert render(tok, ct.bundled_template("mistral"), messages, "mistral", False) == (None, "refused")


# --------------------------------------------------------------------------- assistant masks

MASK_CONVERSATION = [S("Be brief."), U("Hi there"), A("Hello! How can I help?"), U("Capital of France?"),
                     A("  Paris.\n"), U("Thanks")]
MASK_CONVERSATION_NO_SYSTEM = MASK_CONVERSATION[1:]
# What each family's assistant emits for the two answers above: content (trimmed where the original
# trims) and the end-of-turn token; never the header, never the newline after the end of turn.
EXPECTED_SPANS = {
    "chatml": ["Hello! How can I help?<|im_end|>", "  Paris.\n<|im_end|>"],
    "qwen2_5": ["Hello! How can I help?<|im_end|>", "  Paris.\n<|im_end|>"],
    "smollm2": ["Hello! How can I help?<|im_end|>", "  Paris.\n<|im_end|>"],
    "llama3": ["Hello! How can I help?<|eot_id|>", "Paris.<|eot_id|>"],
    "llama3_2": ["Hello! How can I help?<|eot_id|>", "Paris.<|eot_id|>"],
    "llama3_0": ["Hello! How can I help?<|eot_id|>", "Paris.<|eot_id|>"],
    "gemma": ["Hello! How can I help?<end_of_turn>", "Paris.<end_of_turn>"],
    "mistral": [" Hello! How can I help?</s>", " Paris.</s>"],
    "phi3": ["Hello! How can I help?<|end|>", "  Paris.\n<|end|>"],
    "phi3_5": ["Hello! How can I help?<|end|>", "  Paris.\n<|end|>"],
    "qwen3_instruct_2507": ["Hello! How can I help?<|im_end|>", "  Paris.\n<|im_end|>"],
    "deepseek_r1_distill": ["Hello! How can I help?<｜end▁of▁sentence｜>", "  Paris.\n<｜end▁of▁sentence｜>"],
}
TOOL_MASK_CONVERSATIONS = {
    "qwen2_5": (
        [U("Weather in Paris?"), {"role": "assistant", "content": "Checking.", "tool_calls": [call(), call("get_time", {}, "c2")]},
         tool_msg("21"), tool_msg("14:00", "c2"), {"role": "assistant", "tool_calls": [call(arguments={"city": "Oslo"})]},
         tool_msg("5"), A("Paris 21, Oslo 5.")],
        ['Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>',
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
         "Paris 21, Oslo 5.<|im_end|>"],
        {},
    ),
    "qwen3_instruct_2507": (
        [U("Weather in Paris?"), {"role": "assistant", "content": "Checking.", "tool_calls": [call()]},
         tool_msg("21"), A("Paris 21.")],
        ['Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
         "Paris 21.<|im_end|>"],
        {},
    ),
    "llama3": (
        [U("Weather in Paris?"), {"role": "assistant", "tool_calls": [call()]}, tool_msg("21"), A("21 degrees.")],
        ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "21 degrees.<|eot_id|>"],
        {},
    ),
    "llama3_2": (
        [U("Weather in Paris?"), {"role": "assistant", "tool_calls": [call()]}, tool_msg("21"), A("21 degrees.")],
        ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "21 degrees.<|eot_id|>"],
        {},
    ),
    "mistral": (
        [U("Weather in Paris?"), {"role": "assistant", "tool_calls": [call()]}, tool_msg("21"), A("21 degrees.")],
        ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>', " 21 degrees.</s>"],
        {},
    ),
}
BUILTIN_MASK = (
    [U("Search it."), {"role": "assistant", "tool_calls": [call("brave_search", {"query": "x"})]}, tool_msg("y"), A("Done.")],
    ['<|python_tag|>brave_search.call(query="x")<|eom_id|>', "Done.<|eot_id|>"],
    {"builtin_tools": ["brave_search"]},
)


def masked_runs(tokenizer, family: str, messages, tools=None, **kwargs) -> tuple[str, list[str]]:
    out = tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=ct.bundled_template(family), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, add_generation_prompt=False, **{**SPECIAL[family], **kwargs},
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert len(mask) == len(ids)
    runs, start = [], None
    for i, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(tokenizer.decode(ids[start:i], skip_special_tokens=False))
            start = None
    return tokenizer.decode(ids, skip_special_tokens=False), runs


@pytest.mark.parametrize("family", sorted(ct.BUNDLED))
def test_generation_mask_is_each_assistant_output_plus_end_of_turn(tok, family):
    messages = MASK_CONVERSATION_NO_SYSTEM if family == "gemma" else MASK_CONVERSATION
    text, runs = masked_runs(tok, family, messages)
    assert text == render(tok, ct.bundled_template(family), messages, family, False)[0]  # lossless round trip
    assert runs == EXPECTED_SPANS[family]
    if family != "gemma":
        assert masked_runs(tok, family, MASK_CONVERSATION_NO_SYSTEM)[1] == EXPECTED_SPANS[family]


@pytest.mark.parametrize("family", sorted(TOOL_MASK_CONVERSATIONS))
def test_generation_mask_covers_tool_calls_not_tool_results(tok, family):
    messages, expected, kwargs = TOOL_MASK_CONVERSATIONS[family]
    assert masked_runs(tok, family, messages, tools=TOOLS, **kwargs)[1] == expected
    assert masked_runs(tok, family, messages, **kwargs)[1] == expected


def test_llama3_1_builtin_tool_call_mask_ends_with_eom(tok):
    messages, expected, kwargs = BUILTIN_MASK
    assert masked_runs(tok, "llama3", messages, **kwargs)[1] == expected


def test_every_bundled_template_has_generation_tags():
    for name in ct.BUNDLED:
        text = ct.bundled_template(name)
        assert ct.has_generation_tags(text), name
        assert "#47325" in text, f"{name} should say why its spans end where they do"


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("family", sorted(ct.BUNDLED))
def test_strip_generation_tags_renders_the_same_bytes(tok, family):
    tagged = ct.bundled_template(family)
    plain = ct.strip_generation_tags(tagged)
    assert not ct.has_generation_tags(plain) and "endgeneration" not in plain
    for messages in [*PLAIN.values(), *QWEN_TOOL_CASES.values(), *LLAMA_TOOL_CASES.values()]:
        messages = _strip_none(messages)
        for gen in GEN:
            assert render(tok, plain, messages, family, gen, TOOLS) == render(tok, tagged, messages, family, gen, TOOLS)
    assert ct.strip_generation_tags("{% generation %}\nx{%+ endgeneration -%}") == "{% if true %}\nx{%+ endif -%}"


@needs_trl
def test_has_generation_tags():
    assert not ct.has_generation_tags(original("qwen2_5"))
    assert ct.has_generation_tags("{%- generation -%}x{%- endgeneration -%}")
    assert ct.has_generation_tags("{% generation %}x{% endgeneration %}")
    assert not ct.has_generation_tags("{% generation %}x")  # unclosed
    assert not ct.has_generation_tags("{{ generation }}")


def test_template_sha256():
    assert ct.template_sha256("{{ x }}") == hashlib.sha256(b"{{ x }}").hexdigest()
    assert ct.template_sha256(ct.bundled_template("chatml")) != ct.template_sha256(ct.bundled_template("qwen2_5"))


# --------------------------------------------------------------------------- resolve_chat_template


def test_resolve_bundled_names_and_aliases():
    assert ct.resolve_chat_template("qwen2_5") == (ct.bundled_template("qwen2_5"), "bundled:qwen2_5")
    assert ct.resolve_chat_template(" Qwen2.5 ")[1] == "bundled:qwen2_5"
    assert ct.resolve_chat_template("llama3.1")[1] == "bundled:llama3"
    assert ct.resolve_chat_template("bundled:gemma")[1] == "bundled:gemma"
    for name, filename in ct.BUNDLED.items():
        text, source = ct.resolve_chat_template(name)
        assert source == f"bundled:{name}" and text == (ct.TEMPLATES_DIR / filename).read_text(encoding="utf-8")


def test_resolve_file(tmp_path, monkeypatch):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}\n"
    for suffix in (".jinja", ".txt"):
        path = tmp_path / f"tpl{suffix}"
        path.write_text(template, encoding="utf-8")
        assert ct.resolve_chat_template(str(path)) == (template, f"file:{path.resolve()}")
        assert ct.resolve_chat_template(f"file:{path}") == (template, f"file:{path.resolve()}")
    assert ct.resolve_chat_template("tpl.jinja", base_dir=tmp_path)[1] == f"file:{(tmp_path / 'tpl.jinja').resolve()}"
    monkeypatch.chdir(tmp_path)
    assert ct.resolve_chat_template("tpl.txt")[0] == template


def test_resolve_inline_keeps_the_text_verbatim():
    inline = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %} "
    assert ct.resolve_chat_template(inline) == (inline, "inline")
    assert ct.resolve_chat_template("{{ messages[0].content }}")[1] == "inline"


def test_resolve_errors(tmp_path):
    with pytest.raises(ChatftError) as info:
        ct.resolve_chat_template("qwen25")
    assert info.value.id == "chat_template_missing"
    assert "did you mean qwen2_5" in info.value.message and "qwen2_5" in info.value.hint
    with pytest.raises(ChatftError, match="llama3"):
        ct.resolve_chat_template("lama3")
    with pytest.raises(ChatftError) as info:
        ct.resolve_chat_template("no-such-template-at-all")
    assert info.value.id == "chat_template_missing" and "did you mean" not in info.value.message
    with pytest.raises(ChatftError, match="does not exist"):
        ct.resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatftError, match="does not exist"):
        ct.resolve_chat_template("templates/missing")
    (tmp_path / "plain.txt").write_text("no template here", encoding="utf-8")
    with pytest.raises(ChatftError, match="no Jinja"):
        ct.resolve_chat_template(str(tmp_path / "plain.txt"))
    with pytest.raises(ChatftError, match="directory"):
        ct.resolve_chat_template(str(tmp_path))
    with pytest.raises(ChatftError, match="empty"):
        ct.resolve_chat_template("  ")
    with pytest.raises(ChatftError) as info:
        ct.resolve_chat_template("bundled:gemm")
    assert "did you mean gemma" in info.value.message


# --------------------------------------------------------------------------- training_template_for


@needs_trl
def test_the_r1_distill_twin_is_recognised_by_its_prompts():
    assert ct.PER_TURN == ("deepseek_r1_distill",)
    assert ct.template_family(original("deepseek_r1_distill")) == "deepseek_r1_distill"
    assert ct.training_template_for(original("deepseek_r1_distill")) == ct.bundled_template("deepseek_r1_distill")
    assert ct.is_per_turn_twin(ct.bundled_template("deepseek_r1_distill"))
    assert not ct.is_per_turn_twin(ct.bundled_template("qwen3_instruct_2507")) and not ct.is_per_turn_twin(None)
    # A template with the same prompts but other turns is not a twin's family unless its prompts match too.
    changed = original("deepseek_r1_distill").replace("<｜Assistant｜><think>\\n", "<｜Assistant｜>")
    assert changed != original("deepseek_r1_distill") and ct.template_family(changed) is None
    assert ct.template_family(original("deepseekv3")) is None  # same prompts on plain chats, other system prompts
    assert ct.resolve_chat_template("deepseek-r1")[1] == "bundled:deepseek_r1_distill"
    assert ct.resolve_chat_template("qwen3-2507")[1] == "bundled:qwen3_instruct_2507"


@needs_trl
@pytest.mark.parametrize("family", sorted(ORIGINAL_OF))
def test_training_template_for_recognises_each_original(family):
    twin = ct.training_template_for(original(ORIGINAL_OF[family]))
    assert twin == ct.bundled_template(family)
    assert ct.template_family(original(ORIGINAL_OF[family])) == family


def test_training_template_for_chatml_smollm2_and_the_bundled_templates(tiny_models_module):
    assert ct.training_template_for(tiny_models_module.CHATML_TEMPLATE) == ct.bundled_template("chatml")
    assert ct.training_template_for(SMOLLM2_ORIGINAL) == ct.bundled_template("smollm2")
    for name in ct.BUNDLED:
        assert ct.template_family(ct.bundled_template(name)) == name


@needs_trl
def test_training_template_for_unknown_templates_is_none():
    assert ct.training_template_for("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}") is None
    assert ct.training_template_for("{% for m in messages %}") is None  # does not compile
    assert ct.training_template_for("{{ raise_exception('no') }}") is None  # refuses everything
    assert ct.training_template_for("") is None
    # Close relatives of bundled families are not mistaken for them; reasoning families whose originals render the
    # turn being generated themselves have no twin (their rows are rendered per turn from the original).
    for name in ("qwen3", "qwen3_5_think", "gptoss", "nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra",
                 "glm4moe", "gemma4", "deepseekv3"):
        assert ct.training_template_for(original(name)) is None, name
    assert ct.training_template_for(original("gemma3")) is None
    assert ct.training_template_for(SMOLLM2_ORIGINAL.replace("SmolLM", "TinyLM")) is None
