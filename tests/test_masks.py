"""Assistant-only loss masks on real tokenizers: what is supervised is exactly what the assistant emits."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from chatft.data.masks import (
    MaskOptions,
    RowMaskError,
    check_generation_spans,
    mask_by_generation_tags,
    mask_conversation,
    template_messages,
)
from chatft.errors import ChatftError

MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def supervised_texts(tokenizer, ids, mask) -> list[str]:
    """The decoded supervised runs, in order."""
    texts, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            texts.append(tokenizer.decode(current))
            current = []
    if current:
        texts.append(tokenizer.decode(current))
    return texts


@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "tiny_tokenizer"])
def test_multi_turn_supervises_each_assistant_turn_and_its_end_of_turn(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    ids, mask = mask_conversation(tokenizer, tokenizer.chat_template, MULTI_TURN)
    assert ids == tokenizer.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=False)
    assert supervised_texts(tokenizer, ids, mask) == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]


def test_default_system_prompt_and_user_text_are_never_supervised(smollm2_tokenizer):
    conversation = MULTI_TURN[1:]  # SmolLM2's template adds its own system prompt
    ids, mask = mask_conversation(smollm2_tokenizer, smollm2_tokenizer.chat_template, conversation)
    assert "SmolLM" in smollm2_tokenizer.decode(ids)
    supervised = "".join(supervised_texts(smollm2_tokenizer, ids, mask))
    assert "SmolLM" not in supervised and "Hi there" not in supervised and "assistant" not in supervised


def test_last_assistant_only(smollm2_tokenizer):
    ids, mask = mask_conversation(smollm2_tokenizer, smollm2_tokenizer.chat_template, MULTI_TURN,
                                  options=MaskOptions(train_on="last_assistant"))
    assert supervised_texts(smollm2_tokenizer, ids, mask) == ["4<|im_end|>"]


def test_train_false_on_a_message_is_honoured(smollm2_tokenizer):
    conversation = [dict(m) for m in MULTI_TURN]
    conversation[4]["train"] = False
    ids, mask = mask_conversation(smollm2_tokenizer, smollm2_tokenizer.chat_template, conversation)
    assert supervised_texts(smollm2_tokenizer, ids, mask) == ["Hello! How can I help?<|im_end|>"]
    assert "train" not in smollm2_tokenizer.decode(ids)


def test_unmasked_generation_prompt_trains_the_header(smollm2_tokenizer):
    ids, mask = mask_conversation(smollm2_tokenizer, smollm2_tokenizer.chat_template, MULTI_TURN,
                                  options=MaskOptions(mask_generation_prompt=False))
    assert supervised_texts(smollm2_tokenizer, ids, mask) == [
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>", "<|im_start|>assistant\n4<|im_end|>"]


TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for call in m.get('tool_calls', []) %}<tool_call>{{ call['function']['name'] }} "
    "{{ call['function']['arguments'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_calls_are_supervised_and_tool_results_are_not(smollm2_tokenizer):
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C and sunny"},
        {"role": "assistant", "content": "It is 18C and sunny in Paris."},
    ]
    ids, mask = mask_conversation(smollm2_tokenizer, TOOL_TEMPLATE, conversation)
    # Arguments given as a JSON string are rendered once, not double-encoded.
    assert supervised_texts(smollm2_tokenizer, ids, mask) == [
        '<tool_call>weather {"city": "Paris"}</tool_call><|im_end|>', "It is 18C and sunny in Paris.<|im_end|>"]
    assert template_messages(conversation)[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


HISTORY_REWRITING = (
    # Like reasoning-model templates: earlier assistant turns lose their <think> block.
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_history_rewriting_template_is_refused(smollm2_tokenizer):
    conversation = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add them</think>4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>add</think>6"},
    ]
    with pytest.raises(ChatftError) as err:
        mask_conversation(smollm2_tokenizer, HISTORY_REWRITING, conversation)
    assert err.value.id == "template_not_prefix_stable"
    assert "last_assistant" in err.value.hint
    # Training on the last turn only is stable: nothing after it is rewritten.
    ids, mask = mask_conversation(smollm2_tokenizer, HISTORY_REWRITING, conversation,
                                  options=MaskOptions(train_on="last_assistant"))
    assert supervised_texts(smollm2_tokenizer, ids, mask) == ["<think>add</think>6<|im_end|>"]


TAGGED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    # chat templates render with trim_blocks: a newline right after a block tag would vanish
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_generation_tags_and_prefix_rendering_agree(smollm2_tokenizer):
    untagged = TAGGED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for options in (MaskOptions(), MaskOptions(train_on="last_assistant")):
        tagged = mask_by_generation_tags(smollm2_tokenizer, TAGGED, MULTI_TURN, None, options)
        prefix = mask_conversation(smollm2_tokenizer, untagged, MULTI_TURN, options=options)
        assert tagged == prefix


@pytest.mark.parametrize(
    ("mask", "messages"),
    [
        ([True, True, False, False], MULTI_TURN),  # starts at token 0
        ([False, True, True, True], MULTI_TURN[:4]),  # runs to the end though the user spoke last
        ([False, True, False, True, False, True, False], MULTI_TURN),  # three spans, two assistant turns
    ],
)
def test_issue_47325_shaped_spans_are_refused(mask, messages):
    with pytest.raises(RowMaskError) as err:
        check_generation_spans(mask, messages)
    assert err.value.reason == "generation_span_invalid"


def test_a_span_running_to_the_end_is_refused_through_the_real_call(smollm2_tokenizer, monkeypatch):
    real = smollm2_tokenizer.apply_chat_template

    def buggy(*args, **kwargs):  # what transformers returned for #47325: the rest of the row is marked
        encoded = real(*args, **kwargs)
        first = encoded["assistant_masks"].index(1)
        encoded["assistant_masks"] = [0] * first + [1] * (len(encoded["assistant_masks"]) - first)
        return encoded

    monkeypatch.setattr(smollm2_tokenizer, "apply_chat_template", buggy)
    with pytest.raises(RowMaskError):
        mask_by_generation_tags(smollm2_tokenizer, TAGGED, MULTI_TURN[:4], None, MaskOptions())
