"""Chat templates: chatft's bundled generation-tagged templates, and resolving `dataset.chat_template`.

In: a config value (a bundled template name, a path to a Jinja file, or an inline Jinja string), or
a tokenizer's own template text. Out: template text and where it came from; whether a template
carries `{% generation %}` tags; its sha256; and, for a tokenizer template of a known family, the
bundled twin that renders the same bytes but marks what the assistant emits.

The bundled templates live in `templates/*.jinja`. Each renders byte-identically to its model
family's original for any conversation the original renders, and wraps every assistant turn's
output (content, tool calls and the end-of-turn token; never the assistant header) in
`{% generation %}...{% endgeneration %}`, which is what
`tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)` reads.
The exception is a per-turn twin (`PER_TURN`, DeepSeek-R1 distills): its original cannot render the turn it
asks the model to generate, so the twin renders the original's prompts and history byte for byte and the
assistant message that ends a conversation as the model emits it; masks use it one turn at a time.

Import cost: standard library only; transformers' Jinja renderer is imported when a template is
rendered (`template_family`, `training_template_for`).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from chatft.errors import ChatftError, did_you_mean

__all__ = [
    "ALIASES",
    "BUNDLED",
    "RENDERS_TOOLS",
    "TEMPLATES_DIR",
    "PER_TURN",
    "bundled_template",
    "has_generation_tags",
    "is_per_turn_twin",
    "resolve_chat_template",
    "strip_generation_tags",
    "template_family",
    "template_sha256",
    "training_template_for",
]

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

# Bundled name -> file in TEMPLATES_DIR. The name is what `dataset.chat_template` accepts.
BUNDLED: dict[str, str] = {
    "chatml": "chatml.jinja",  # plain ChatML, no default system prompt
    "qwen2_5": "qwen2_5.jinja",  # Qwen2.5 Instruct: default system prompt, Hermes-style tools
    "smollm2": "smollm2.jinja",  # SmolLM2 Instruct (chatft's demo model): ChatML + default system prompt
    "llama3": "llama3.jinja",  # Llama 3.1 / 3.3 Instruct: date line, builtin and JSON tools
    "llama3_2": "llama3_2.jinja",  # Llama 3.2 Instruct: today's date, JSON tools
    "llama3_0": "llama3_0.jinja",  # Meta-Llama-3 Instruct (3.0): no system block, no tools
    "gemma": "gemma.jinja",  # Gemma and Gemma 2
    "mistral": "mistral.jinja",  # Mistral Instruct, v3 tokenizer ([INST], v0.3 tool format)
    "phi3": "phi3.jinja",  # Phi-3 Instruct
    "phi3_5": "phi3_5.jinja",  # Phi-3.5 Instruct
    "qwen3_instruct_2507": "qwen3_instruct_2507.jinja",  # Qwen3 Instruct 2507: no reasoning, Hermes-style tools
    # DeepSeek-R1 distills: the original's prompts and history, the turn being generated with its reasoning
    "deepseek_r1_distill": "deepseek_r1_distill.jinja",
}

# Twins of templates that rewrite history and render a turn differently once it is history: they render every
# prompt (add_generation_prompt=true) like the original, and the assistant message that ends a conversation as the
# turn being generated. They are never used to mask a whole conversation at once: masks render each trained turn
# with them (one row per turn, `masks.conversation_rows`), and they are recognised by their prompts only.
PER_TURN: tuple[str, ...] = ("deepseek_r1_distill",)

# The bundled templates that render assistant tool calls and the row's `tools` (the others render only `content`).
# Only deepseek_r1_distill renders `reasoning_content` (in the turn being generated).
RENDERS_TOOLS: tuple[str, ...] = ("qwen2_5", "llama3", "llama3_2", "mistral", "qwen3_instruct_2507")

# Other spellings users reach for; keys are compared after `_normalize_name`.
ALIASES: dict[str, str] = {
    "qwen2": "qwen2_5",
    "qwen": "qwen2_5",
    "smollm": "smollm2",
    "llama3_1": "llama3",
    "llama3_3": "llama3",
    "llama_3": "llama3",
    "llama_3_1": "llama3",
    "llama_3_2": "llama3_2",
    "gemma2": "gemma",
    "mistral_v3": "mistral",
    "mistral_v0_3": "mistral",
    "phi_3": "phi3",
    "phi_3_5": "phi3_5",
    "qwen3_2507": "qwen3_instruct_2507",
    "qwen3_instruct": "qwen3_instruct_2507",
    "deepseek_r1": "deepseek_r1_distill",
    "r1_distill": "deepseek_r1_distill",
}

_GENERATION_OPEN = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
_GENERATION_CLOSE = re.compile(r"\{%[-+]?\s*endgeneration\s*[-+]?%\}")
_GENERATION_OPEN_MARKED = re.compile(r"\{%([-+]?)\s*generation\s*([-+]?)%\}")
_GENERATION_CLOSE_MARKED = re.compile(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}")
_JINJA_MARKERS = ("{%", "{{")
_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt")


# --------------------------------------------------------------------------- small helpers


def has_generation_tags(template: str) -> bool:
    """True when the template has both `{% generation %}` and `{% endgeneration %}` tags
    (any whitespace control), i.e. it can produce an assistant-token mask."""
    return bool(_GENERATION_OPEN.search(template)) and bool(_GENERATION_CLOSE.search(template))


def strip_generation_tags(template: str) -> str:
    """The same template without its generation tags, for runtimes other than transformers (the
    `generation` tag is a transformers Jinja extension). Each tag becomes an always-true `if` with the
    same whitespace control, so the template renders the same bytes."""
    template = _GENERATION_OPEN_MARKED.sub(r"{%\1 if true \2%}", template)
    return _GENERATION_CLOSE_MARKED.sub(r"{%\1 endif \2%}", template)


def template_sha256(template: str) -> str:
    """Hex sha256 of the template's UTF-8 text: the identity recorded with a run."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _normalize_name(value: str) -> str:
    return value.strip().lower().replace("-", "_").replace(".", "_")


def _bundled_name(value: str) -> str | None:
    name = _normalize_name(value)
    if name in BUNDLED:
        return name
    return ALIASES.get(name)


@lru_cache(maxsize=None)
def bundled_template(name: str) -> str:
    """The text of a bundled template, by its name in `BUNDLED` (or an alias)."""
    resolved = _bundled_name(name)
    if resolved is None:
        raise KeyError(name)
    return (TEMPLATES_DIR / BUNDLED[resolved]).read_text(encoding="utf-8")


def _looks_like_jinja(text: str) -> bool:
    return any(marker in text for marker in _JINJA_MARKERS)


def _bundled_list() -> str:
    return ", ".join(BUNDLED)


# --------------------------------------------------------------------------- resolving config values


def resolve_chat_template(value: str, *, base_dir: str | Path | None = None) -> tuple[str, str]:
    """Turn a `dataset.chat_template` value into (template text, where it came from).

    The value is, in this order of precedence:
    - the name of a bundled template (`qwen2_5`, case-insensitive, `.`/`-` read as `_`, aliases
      such as `qwen2.5` or `llama3.1`; `bundled:<name>` also works) -> "bundled:<name>";
    - an inline Jinja string, recognised by containing `{%` or `{{` -> "inline";
    - a path to a template file (.jinja, .txt, ...; `file:<path>` also works; relative paths are
      taken from `base_dir`, default the working directory) -> "file:<absolute path>".
    Anything else is a `ChatftError("chat_template_missing")` naming the close bundled names.
    """
    if not isinstance(value, str) or not value.strip():
        raise ChatftError(
            "chat_template_missing",
            f"dataset.chat_template is empty ({value!r})",
            f"name a bundled template ({_bundled_list()}), a .jinja/.txt file, or give the Jinja text inline",
        )
    raw = value.strip()

    if raw.lower().startswith("bundled:"):
        name = _bundled_name(raw.split(":", 1)[1])
        if name is None:
            raise _unknown_name(raw.split(":", 1)[1].strip())
        return bundled_template(name), f"bundled:{name}"
    name = _bundled_name(raw)
    if name is not None:
        return bundled_template(name), f"bundled:{name}"

    if _looks_like_jinja(value):
        return value, "inline"  # unchanged: whitespace outside tags is rendered

    explicit_file = raw.lower().startswith("file:")
    path_text = raw[len("file:") :].strip() if explicit_file else raw
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir).expanduser() / path
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatftError(
                "chat_template_missing",
                f"cannot read the chat template file {str(path)!r}: {exc}",
                "give a readable UTF-8 .jinja or .txt file",
            ) from exc
        if not _looks_like_jinja(text):
            raise ChatftError(
                "chat_template_missing",
                f"the chat template file {str(path)!r} contains no Jinja ({{% ... %}} or {{{{ ... }}}})",
                "point dataset.chat_template at the template itself (e.g. a model's chat_template.jinja), "
                "not at a config or data file",
            )
        return text, f"file:{path.resolve()}"
    if path.is_dir():
        raise ChatftError(
            "chat_template_missing",
            f"dataset.chat_template={raw!r} is a directory, not a template file",
            f"point it at the template file inside, e.g. {str(path / 'chat_template.jinja')!r}",
        )
    if explicit_file or _looks_like_path(raw):
        raise ChatftError(
            "chat_template_missing",
            f"the chat template file {str(path)!r} does not exist",
            "check the path (relative paths are read from the working directory), "
            f"or use a bundled template: {_bundled_list()}",
        )
    raise _unknown_name(raw)


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith("~") or value.lower().endswith(_TEMPLATE_SUFFIXES)


def _unknown_name(value: str) -> ChatftError:
    close = did_you_mean(_normalize_name(value), [*BUNDLED, *ALIASES])
    close = list(dict.fromkeys(ALIASES.get(c, c) for c in close))  # aliases point at their template
    suggestion = f" (did you mean {', '.join(close)}?)" if close else ""
    return ChatftError(
        "chat_template_missing",
        f"dataset.chat_template={value!r} is not a bundled template, an existing file or a Jinja string{suggestion}",
        f"bundled templates: {_bundled_list()}; or give a path to a .jinja/.txt file, "
        "or the template inline (it must contain {% ... %} or {{ ... }})",
    )


# --------------------------------------------------------------------------- family recognition

# Probe conversations: together they tell the bundled families apart (default system prompts,
# trimming, date lines, tool formats, empty system messages). A template that raises on a probe
# matches only a template that raises on it too.
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
_PROBE_CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
_PROBES: tuple[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool], ...] = (
    ([{"role": "user", "content": "Hi!"}], None, True),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
        None,
        False,
    ),
    (
        [
            {"role": "user", "content": "  Hello there \n"},
            {"role": "assistant", "content": " Hi! How can I help?\n "},
            {"role": "user", "content": "Tell me a joke."},
        ],
        None,
        True,
    ),
    (
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
        None,
        False,
    ),
    (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [_PROBE_CALL]},
            {"role": "tool", "tool_call_id": "call00001", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
        [_PROBE_TOOL],
        False,
    ),
    (
        [{"role": "system", "content": "You answer with tools."}, {"role": "user", "content": "Weather in Rome?"}],
        [_PROBE_TOOL],
        True,
    ),
    # Two system messages, and a call with its arguments as a JSON string and no content: DeepSeek-R1's template
    # and DeepSeek-V3's render these differently (and every other probe alike).
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
         {"role": "tool", "content": "cold"}],
        None,
        True,
    ),
)
# Placeholders for the special tokens templates read from the tokenizer; both renders see the same.
_PROBE_TOKENS = {"bos_token": "<probe-bos>", "eos_token": "<probe-eos>", "pad_token": "<probe-pad>", "unk_token": "<probe-unk>"}


def _render_probe(template: str, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str | None:
    """The probe rendered with transformers' own sandboxed Jinja environment; None if it raises."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **_PROBE_TOKENS,
        )
    except Exception:  # any failure is an outcome to compare, not an error to report
        return None
    return rendered[0]


def _fingerprint(template: str, prompts_only: bool = False) -> tuple[str | None, ...]:
    """The template's renders of the probes; `prompts_only`: every probe with the generation prompt (what the model
    reads at inference), which is all a per-turn twin shares with its original."""
    return tuple(_render_probe(template, messages, tools, prompts_only or generation_prompt)
                 for messages, tools, generation_prompt in _PROBES)


def _bundled_fingerprints(prompts_only: bool) -> dict[str, tuple[str | None, ...]]:
    # Not cached: Llama 3.2 renders today's date, so both sides must be rendered on the same day.
    # Sixty small renders of compiled (transformers caches compilation) templates: milliseconds.
    return {name: _fingerprint(bundled_template(name), prompts_only) for name in BUNDLED
            if (name in PER_TURN) == prompts_only}


def is_per_turn_twin(template: str | None) -> bool:
    """Whether `template` is one of the bundled per-turn twins (`PER_TURN`)."""
    return template is not None and any(template == bundled_template(name) for name in PER_TURN)


def template_family(template: str) -> str | None:
    """The bundled name whose template renders every probe conversation exactly like `template` (same bytes, or both
    refusing), or, for a per-turn twin, every probe's prompt; None when no bundled family does, or `template`
    renders none."""
    if not isinstance(template, str) or not template.strip():
        return None
    for name in BUNDLED:
        if template == bundled_template(name):
            return name
    for prompts_only in (False, True):
        fingerprint = _fingerprint(template, prompts_only)
        if all(render is None for render in fingerprint):
            return None
        for name, bundled in _bundled_fingerprints(prompts_only).items():
            if fingerprint == bundled:
                return name
    return None


def training_template_for(template: str) -> str | None:
    """For a tokenizer's own template, the bundled generation-tagged twin of its family (the same
    renders, plus `{% generation %}` spans around assistant output; for a `PER_TURN` family the same prompts and
    the turn being generated as the model emits it); None if not recognised."""
    name = template_family(template)
    return None if name is None else bundled_template(name)
