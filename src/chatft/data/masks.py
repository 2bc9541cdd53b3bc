"""One conversation → token ids + a loss mask that marks exactly what the assistant emits.

In: a `messages` list (OpenAI style, optionally `tools`), a tokenizer, the chat template to render with
and the masking options (`template_kwargs` reach every render). Out: `(input_ids, loss_mask)` for the
conversation as one row, or (`conversation_rows`) its training rows, one per assistant turn where the template
rewrites history.

Supervised tokens are the assistant's content and its end-of-turn token; the assistant header
(`<|im_start|>assistant\\n`) is not trained unless `mask_generation_prompt` is false. Two methods:

- **generation tags**: the template wraps assistant output in `{% generation %}`; transformers returns
  the span mask. The spans are checked, because a span whose end falls on a token boundary the tokenizer
  cannot map (transformers issue #47325) silently marks the rest of the sequence.
- **prefix rendering**: render the conversation up to each assistant message with and without it; the
  text it adds (trailing whitespace after the end-of-turn token excluded) is supervised. Every partial
  render must be a prefix of the full render, else the template rewrites history (reasoning models drop
  the reasoning of earlier turns) and one row would train turns the model never sees at inference: such a
  conversation becomes one row per trained turn, row i being messages[:i] rendered with the generation
  prompt followed by turn i as the template renders it when it is the turn being generated
  (`dataset.multi_turn`; `as_rendered` refuses instead: `template_not_prefix_stable`). Where the history renders
  differently once the turn follows it (gpt-oss), the turn is found in the template's own render
  (`_turn_start`); where the template cannot render the turn at all (DeepSeek-R1 distills), its per-turn twin
  (`chat_templates.PER_TURN`) renders it; a turn without reasoning that does not follow a thinking-on prompt is
  rendered with thinking off unless `enable_thinking` is pinned (`_may_think_off`). A turn that still does not
  follow its generation prompt cannot be trained as generated (`generation_prompt_mismatch`).

Either way the rendered turns are then checked against the messages (`template_fields`): a template that
drops an assistant's tool calls, reasoning or content, or the row's tools, fails the row with
`TemplateDropsFields` (drop reason `template_drops_field`), which training turns into a refusal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatft.data.chat_templates import is_per_turn_twin
from chatft.data.template_fields import DroppedField, dropped_fields
from chatft.errors import ChatftError


@dataclass(frozen=True)
class MaskOptions:
    train_on: str = "all_assistant"  # all_assistant | last_assistant
    mask_generation_prompt: bool = True
    multi_turn: str = "auto"  # auto | per_turn | as_rendered | last_assistant (see conversation_rows)
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra template variables (enable_thinking)


class RowMaskError(ValueError):
    """This row cannot be masked reliably; `reason` is the drop reason it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class TemplateDropsFields(RowMaskError):
    """The chat template rendered this row without some of what its messages say (`dropped`)."""

    def __init__(self, dropped: list[DroppedField]) -> None:
        super().__init__("template_drops_field", "; ".join(f"{d.field}: {d.describe()}" for d in dropped))
        self.dropped = dropped


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as HF chat templates expect them: tool-call arguments as objects (OpenAI rows carry
    them as JSON strings, which templates would encode a second time) and chatft's own per-message keys
    (`train`) removed."""
    rendered = []
    for message in messages:
        message = {k: v for k, v in message.items() if k != "train"}
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function", call))
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        pass  # templates print it as given
                calls.append({**call, "function": function} if "function" in call else function)
            message["tool_calls"] = calls
        rendered.append(message)
    return rendered


def trained_assistant_indices(messages: list[dict[str, Any]], options: MaskOptions) -> list[int]:
    """Which assistant messages are supervised: all (or only the last), minus those marked `train: false`."""
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if "last_assistant" in (options.train_on, options.multi_turn):
        assistant = assistant[-1:]
    return [i for i in assistant if messages[i].get("train", True) is not False]


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, generation_prompt: bool,
           template_kwargs: Mapping[str, Any]) -> str:
    """The template's text for `messages` (already `template_messages`), with the config's template variables."""
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt,
        **template_kwargs,
    )


@dataclass(frozen=True)
class _Conversation:
    """What every render of one conversation needs. `template` gives the prompts (the template the model is served
    with); `turn_template` renders conversations that end with the turn being generated: `template` itself, or its
    per-turn twin where the template cannot render that turn (`chat_templates.PER_TURN`: DeepSeek-R1 distills)."""

    tokenizer: Any
    template: str
    turn_template: str
    messages: list[dict[str, Any]]  # as the row has them (the field check and `train` flags read them)
    tools: Any
    options: MaskOptions
    shown: list[dict[str, Any]] = field(default_factory=list)  # template_messages(messages)

    def prompt(self, index: int, generation_prompt: bool, kwargs: Mapping[str, Any]) -> str:
        """messages[:index] as the model reads them before generating message `index`."""
        return render(self.tokenizer, self.template, self.shown[:index], self.tools, generation_prompt,
                      kwargs) if index else ""

    def through(self, messages: list[dict[str, Any]], kwargs: Mapping[str, Any]) -> str:
        """A conversation that ends with the turn being generated (already `template_messages`)."""
        return render(self.tokenizer, self.turn_template, messages, self.tools, False, kwargs)


def _conversation(tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions,
                  tagged_template: str | None) -> _Conversation:
    turn_template = tagged_template if is_per_turn_twin(tagged_template) else template
    return _Conversation(tokenizer, template, turn_template or template, messages, tools, options,
                         template_messages(messages))


@dataclass
class _TurnRenders:
    """The renders prefix masking reads, per trained assistant message `index`: `prompt[index]` is
    messages[:index] with the generation prompt (without it when the header is trained) and `through[index]`
    is messages[:index + 1]; `full` is the whole conversation. `kwargs`: the template variables they used."""

    full: str
    prompt: dict[int, str]
    through: dict[int, str]
    kwargs: Mapping[str, Any]


def _turn_renders(conv: _Conversation, kwargs: Mapping[str, Any]) -> _TurnRenders:
    renders = _TurnRenders(conv.through(conv.shown, kwargs), {}, {}, kwargs)
    for index in trained_assistant_indices(conv.messages, conv.options):
        renders.prompt[index] = conv.prompt(index, conv.options.mask_generation_prompt, kwargs)
        renders.through[index] = conv.through(conv.shown[: index + 1], kwargs)
    return renders


def _first_unstable(renders: _TurnRenders) -> ChatftError | None:
    """Why the whole rendering cannot be masked as one row, or None: a prompt or a turn that is not a prefix of
    the full text (the template rewrites history), or a generation prompt that does not start its turn."""
    for index, through in renders.through.items():
        prompt = renders.prompt[index]
        if not (renders.full.startswith(prompt) and renders.full.startswith(through)):
            return ChatftError(
                "template_not_prefix_stable",
                f"the chat template renders message {index + 1} differently once later messages follow it "
                "(it rewrites earlier turns), so the conversation cannot be trained as one rendered row",
                "train each assistant turn as its own row, as the template renders it when that turn is generated "
                "(dataset.multi_turn=per_turn, the default auto does so for such conversations), or supervise only "
                "the final turn (dataset.multi_turn=last_assistant)",
            )
        if not through.startswith(prompt):
            return _generation_prompt_error(index, prompt, through)
    return None


def _generation_prompt_error(index: int, prompt: str, through: str) -> ChatftError:
    common = len(_common_prefix(prompt, through))
    return ChatftError(
        "template_not_prefix_stable",
        f"the chat template's generation prompt does not start assistant message {index + 1} as it renders it: "
        f"after the prompt's {common} shared characters the prompt goes on with {prompt[common:][:60]!r}, "
        f"the turn with {through[common:][:60]!r}",
        "give a template whose add_generation_prompt output starts each assistant turn (dataset.chat_template=...)",
    )


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _mask_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """A token is supervised when it starts inside a supervised character range."""
    mask = []
    span_index = 0
    for start, end in offsets:
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
        mask.append(inside and end > start)
    return mask


@dataclass
class _Rendered:
    """A masked row and what the check of its fields reads: each trained turn's supervised text, and the
    rendered text outside the supervised turns (built only when asked for)."""

    input_ids: list[int]
    mask: list[bool]
    turn_texts: dict[int, str]
    prompt_text: Any  # a callable returning the text, so rows without tools never build it


def _encode(tokenizer: Any, text: str, turns: dict[int, tuple[int, int]]) -> _Rendered:
    """Tokenize `text` and supervise the tokens that start in each turn's [start, end) character range."""
    spans = [(start, end) for start, end in turns.values() if end > start]
    # The template writes its own special tokens (BOS included): add none on top.
    # verbose=False: no "Token indices sequence length is longer than ..." from transformers; the length policy
    # counts and reports over-long rows itself.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)

    def prompt_text() -> str:
        edges = [0, *(edge for span in spans for edge in span), len(text)]
        return "\n".join(text[a:b] for a, b in zip(edges[::2], edges[1::2]))

    return _Rendered(list(encoded["input_ids"]), _mask_from_offsets(encoded["offset_mapping"], spans),
                     {index: text[start:end] for index, (start, end) in turns.items()}, prompt_text)


def _as_one_row(tokenizer: Any, renders: _TurnRenders) -> _Rendered:
    """Prefix rendering of a conversation the template renders stably: every trained turn is the text its
    render adds to the one before (trailing whitespace after the end-of-turn token excluded: never generated)."""
    turns = {index: (len(renders.prompt[index]), max(len(through.rstrip()), len(renders.prompt[index])))
             for index, through in renders.through.items()}
    return _encode(tokenizer, renders.full, turns)


def _row(tokenizer: Any, index: int, prompt: str, output: str) -> _Rendered:
    """A per-turn row: `prompt`, then the turn's `output` supervised (its trailing whitespace dropped)."""
    output = output.rstrip()
    return _encode(tokenizer, prompt + output, {index: (len(prompt), len(prompt) + len(output))})


_THINKING_OFF = {"enable_thinking": False}


def _turn_row(conv: _Conversation, renders: _TurnRenders, index: int) -> tuple[_Rendered, bool]:
    """One per-turn row: messages[:index] rendered with the generation prompt (the prompt the model reads at
    inference), then assistant message `index` as the template renders it when it is the turn being generated,
    through its end-of-turn token. Only that turn is supervised (with the header where it is trained). Returns the
    row and whether the turn was rendered with thinking off: a turn without reasoning that does not follow the
    thinking-on prompt, when the config leaves `enable_thinking` to the template (`_may_think_off`).
    Raises `RowMaskError("generation_prompt_mismatch")` when the template renders no such turn."""
    prompt, through = renders.prompt[index], renders.through[index]
    if through.startswith(prompt):
        return _row(conv.tokenizer, index, prompt, through[len(prompt):]), False
    if (found := _generated_turn(conv, index, renders.kwargs)) is not None:
        return _row(conv.tokenizer, index, *found), False
    if _may_think_off(conv, [index]):
        if (found := _generated_turn(conv, index, {**renders.kwargs, **_THINKING_OFF})) is not None:
            return _row(conv.tokenizer, index, *found), True
    raise RowMaskError("generation_prompt_mismatch", str(_generation_prompt_error(index, prompt, through)))


def _generated_turn(conv: _Conversation, index: int, kwargs: Mapping[str, Any]) -> tuple[str, str] | None:
    """(prompt, output) for turn `index`: the prompt as the model reads it (without the generation prompt when the
    header is trained, which then leads the output) and what the template renders after the generation prompt
    when the turn is the one being generated. None when its render does not open with the generation prompt."""
    history, opened = conv.prompt(index, False, kwargs), conv.prompt(index, True, kwargs)
    if not index or not opened.startswith(history):
        return None
    opening = opened[len(history):]
    through = conv.through(conv.shown[: index + 1], kwargs)
    if through.startswith(opened):
        output = through[len(opened):]
    elif (start := _turn_start(conv, index, kwargs, through, opening)) is not None:
        output = through[start + len(opening):]
    else:
        return None
    return (opened, output) if conv.options.mask_generation_prompt else (history, opening + output)


_MARK = "\u2042"  # appended to a message to find where it ends in a render (any non-space character would do)


def _turn_start(conv: _Conversation, index: int, kwargs: Mapping[str, Any], through: str, opening: str) -> int | None:
    """Where the turn being generated starts in `through` (messages[:index + 1]) when the history before it renders
    differently there than in its prompt: gpt-oss keeps a tool call's analysis in the prompt of the answer that
    follows, and drops it once that answer is rendered. Found from the template's own renders, whatever its
    format: rendered again with the message before the turn lengthened at its end, the conversation differs from
    `through` at that point and is the same after it; the turn is the first generation prompt (`opening`) there.
    None when that message has no text to lengthen, the template does not show it, or no `opening` follows."""
    before = conv.shown[index - 1]
    content = before.get("content")
    if not opening or not isinstance(content, str) or not content:
        return None
    changed = [*conv.shown[: index - 1], {**before, "content": content + _MARK}, conv.shown[index]]
    shared = _shared_suffix(through, conv.through(changed, kwargs))
    if shared == len(through):
        return None
    start = through.find(opening, len(through) - shared)
    return start if start >= 0 else None


def _shared_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _has_reasoning(message: dict[str, Any]) -> bool:
    reasoning, content = message.get("reasoning_content"), message.get("content")
    return (isinstance(reasoning, str) and bool(reasoning.strip())) or (isinstance(content, str) and
                                                                         "</think>" in content)


def _may_think_off(conv: _Conversation, indices: list[int]) -> bool:
    """Whether turns `indices` may be rendered with thinking off: they carry no reasoning and the config leaves
    `enable_thinking` to the template. Hybrid reasoning models (Qwen3, Nemotron 3) are trained on answers without
    reasoning that way: their thinking-on prompt opens a reasoning block such a turn cannot follow (Nemotron), and
    thinking off is the prompt the model is then served with. A pinned `enable_thinking` is kept for every row."""
    if "enable_thinking" in conv.options.template_kwargs:
        return False
    return not any(_has_reasoning(conv.messages[index]) for index in indices)


def _thinking_off_renders(conv: _Conversation, renders: _TurnRenders) -> _TurnRenders | None:
    """The conversation rendered with thinking off, when it then renders stably as one row and with thinking on
    some turn does not follow its generation prompt; only for a conversation without reasoning (`_may_think_off`).
    One row instead of one per turn: the same turns, trained without repeating the history."""
    assistant = [i for i, m in enumerate(conv.messages) if m.get("role") == "assistant"]
    if not _may_think_off(conv, assistant):
        return None
    if all(renders.through[i].startswith(renders.prompt[i]) for i in renders.through):
        return None  # every turn follows the thinking-on prompt (Qwen3's empty think block): nothing to change
    off = _turn_renders(conv, {**renders.kwargs, **_THINKING_OFF})
    return off if _first_unstable(off) is None else None


def _one_row(conv: _Conversation, tagged_template: str | None) -> _Rendered:
    """The whole conversation as one row; a template that rewrites history is refused."""
    if _uses_tags(tagged_template, conv.options):
        return _generation_tags(conv.tokenizer, tagged_template, conv.messages, conv.tools, conv.options)
    renders = _turn_renders(conv, conv.options.template_kwargs)
    if (unstable := _first_unstable(renders)) is not None:
        raise unstable
    return _as_one_row(conv.tokenizer, renders)


def mask_by_prefix_rendering(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> tuple[list[int], list[bool]]:
    """One row for the whole conversation by prefix rendering; a template that rewrites history is refused."""
    rendered = _one_row(_conversation(tokenizer, template, messages, tools, options, None), None)
    return rendered.input_ids, rendered.mask


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, flag in enumerate(mask):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def check_generation_spans(mask: list[bool], messages: list[dict[str, Any]]) -> None:
    """Refuse span masks with the shapes of transformers issue #47325: a span that starts at token 0, or
    one that runs to the end of the sequence when the conversation does not end with the assistant,
    or more spans than assistant messages."""
    runs = _runs(mask)
    assistant_count = sum(1 for m in messages if m.get("role") == "assistant")
    if runs and runs[0][0] == 0:
        raise RowMaskError("generation_span_invalid", "a generation span starts at token 0")
    if runs and runs[-1][1] == len(mask) and messages and messages[-1].get("role") != "assistant":
        raise RowMaskError("generation_span_invalid", "a generation span runs past the last assistant turn")
    if len(runs) > assistant_count:
        raise RowMaskError("generation_span_invalid", f"{len(runs)} generation spans for {assistant_count} assistant turns")


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of `ids` as rendered, special tokens included. A fast tokenizer's Rust decoder directly: the
    same text as `tokenizer.decode` without clean-up, at half the cost (it runs once per trained turn)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(ids, skip_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _generation_tags(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> _Rendered:
    encoded = tokenizer.apply_chat_template(
        template_messages(messages), tools=tools, chat_template=template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, add_generation_prompt=False,
        tokenizer_kwargs={"verbose": False},  # chatft reports over-long rows itself: see _encode
        **options.template_kwargs,
    )
    input_ids = list(encoded["input_ids"])
    mask = [bool(flag) for flag in encoded["assistant_masks"]]
    check_generation_spans(mask, messages)
    keep = trained_assistant_indices(messages, options)
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    runs = _runs(mask)
    if len(runs) == len(assistant):
        turn_texts = {i: _decode(tokenizer, input_ids[a:b]) for (a, b), i in zip(runs, assistant) if i in keep}
    else:  # the spans cannot be told apart by turn: each trained turn is checked against all of them
        everything = "\n".join(_decode(tokenizer, input_ids[a:b]) for a, b in runs)
        turn_texts = {i: everything for i in keep}

    def prompt_text() -> str:
        edges = [0, *(edge for run in runs for edge in run), len(input_ids)]
        return "\n".join(_decode(tokenizer, input_ids[a:b]) for a, b in zip(edges[::2], edges[1::2]))

    if keep != assistant:  # drop the spans of assistant turns that are not trained, by their order
        if len(runs) != len(assistant):
            raise RowMaskError("generation_span_invalid",
                                f"{len(runs)} generation spans for {len(assistant)} assistant turns")
        for run, message_index in zip(runs, assistant):
            if message_index not in keep:
                mask[run[0]:run[1]] = [False] * (run[1] - run[0])
    return _Rendered(input_ids, mask, turn_texts, prompt_text)


def mask_by_generation_tags(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, options: MaskOptions
) -> tuple[list[int], list[bool]]:
    rendered = _generation_tags(tokenizer, template, messages, tools, options)
    return rendered.input_ids, rendered.mask


def _check_fields(messages: list[dict[str, Any]], tools: Any, rendered: _Rendered) -> None:
    dropped = dropped_fields(messages, tools, rendered.turn_texts, rendered.prompt_text() if tools else None)
    if dropped:
        raise TemplateDropsFields(dropped)


def _uses_tags(tagged_template: str | None, options: MaskOptions) -> bool:
    """Generation tags mask the whole rendering at once; they are used unless the header must be trained
    (generation spans never include it), each turn is to be its own row, or the tagged template is a per-turn twin
    (it renders the turns of a template that rewrites history: its tags never mask a whole conversation)."""
    return (tagged_template is not None and options.mask_generation_prompt and options.multi_turn != "per_turn"
            and not is_per_turn_twin(tagged_template))


def mask_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any = None,
    options: MaskOptions = MaskOptions(), tagged_template: str | None = None,
) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask for one conversation as one row. `tagged_template`, when given, is a template
    with generation tags that renders identically to `template`. A template that rewrites history is refused
    (`template_not_prefix_stable`; `conversation_rows` trains such conversations one row per turn), and a
    rendering that lacks an assistant's tool calls, reasoning or content, or the row's tools, raises
    `TemplateDropsFields`."""
    rendered = _one_row(_conversation(tokenizer, template, messages, tools, options, tagged_template), tagged_template)
    _check_fields(messages, tools, rendered)
    return rendered.input_ids, rendered.mask


# (input_ids, loss_mask, message) with `message` the 1-based number of the turn a per-turn row trains (None for
# a whole conversation), or a RowMaskError saying why this row cannot be trained.
RowOutcome = Any


@dataclass
class ConversationRows:
    """What one conversation becomes: one row, or (per turn) one row per trained assistant turn, each built or
    failed on its own. `whole_tokens` is the conversation's length rendered as one row (what the expansion is
    measured against). `thinking_off_turns`: the trained turns of built rows that were rendered with thinking off
    although the config leaves `enable_thinking` to the template (turns without reasoning on a hybrid reasoning
    model whose thinking-on prompt they do not follow: `_may_think_off`)."""

    outcomes: list[RowOutcome]
    per_turn: bool
    whole_tokens: int
    thinking_off_turns: int = 0


def conversation_rows(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any = None,
    options: MaskOptions = MaskOptions(), tagged_template: str | None = None,
) -> ConversationRows:
    """The training rows of one conversation, per `options.multi_turn`:

    - `as_rendered`: one row, the whole conversation as the template renders it; a template that rewrites
      history is refused (`template_not_prefix_stable`);
    - `per_turn`: one row per trained assistant turn (`_turn_row`): the history as the template renders it at
      that turn, then the turn as generated;
    - `auto` (and `last_assistant`, which trains only the final turn): one row when the template renders the
      conversation stably (the row then equals its per-turn rows put together), per-turn rows when it rewrites
      history. A conversation without reasoning whose turns do not follow the thinking-on prompt is one row
      rendered with thinking off where that renders stably (`_thinking_off_renders`).
    With a per-turn twin as `tagged_template` (`chat_templates.PER_TURN`), the turns being generated are rendered
    with it and the prompts with `template`. Every row is checked for the fields its template drops
    (`TemplateDropsFields` as its outcome). Errors that concern the template as a whole (`ChatftError`) and the
    template's own exceptions propagate."""
    conv = _conversation(tokenizer, template, messages, tools, options, tagged_template)
    if _uses_tags(tagged_template, options) or options.multi_turn == "as_rendered":
        return ConversationRows(*_one_row_outcome(messages, tools, lambda: _one_row(conv, tagged_template)))
    renders = _turn_renders(conv, options.template_kwargs)
    if options.multi_turn != "per_turn":
        if _first_unstable(renders) is None:
            return ConversationRows(*_one_row_outcome(messages, tools, lambda: _as_one_row(tokenizer, renders)))
        if (off := _thinking_off_renders(conv, renders)) is not None:
            built = ConversationRows(*_one_row_outcome(messages, tools, lambda: _as_one_row(tokenizer, off)))
            built.thinking_off_turns = len(off.through) if not isinstance(built.outcomes[0], RowMaskError) else 0
            return built
    outcomes: list[RowOutcome] = []
    thinking_off = 0
    for index in renders.through:
        try:
            rendered, off_turn = _turn_row(conv, renders, index)
            _check_fields(messages, tools, rendered)
        except RowMaskError as err:
            outcomes.append(err)
            continue
        outcomes.append((rendered.input_ids, rendered.mask, index + 1))
        thinking_off += off_turn
    whole = tokenizer(renders.full, add_special_tokens=False, verbose=False)["input_ids"]
    return ConversationRows(outcomes, True, len(whole), thinking_off)


def _one_row_outcome(messages: list[dict[str, Any]], tools: Any, build: Any) -> tuple[list[RowOutcome], bool, int]:
    try:
        rendered = build()
        _check_fields(messages, tools, rendered)
    except RowMaskError as err:
        return [err], False, 0
    return [(rendered.input_ids, rendered.mask, None)], False, len(rendered.input_ids)
