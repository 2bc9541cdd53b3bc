"""The prompts every target answers: `generation.num_prompts` conversations up to their last assistant turn.

In: an `EvalConfig`, the rows that were scored (`PreparedData`) and the chat template in use. Out: `Prompt`s,
chosen with the seed among the scored rows, in row order, rendered with the generation prompt (and
`dataset.chat_template_kwargs`, as the scored rows are) and tokenized once,
so every target answers the same token ids; the last assistant turn is the reference answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatft.config.schema import EvalConfig
from chatft.data.masks import render, template_messages
from chatft.data.sources import read_message_rows
from chatft.data.types import PreparedData

if TYPE_CHECKING:  # the type only: loading imports torch, choosing prompts does not need it
    from chatft.eval.loading import TemplateUse


@dataclass
class Prompt:
    row: int  # 1-based source row number
    messages: list[dict[str, Any]]  # the conversation before the last assistant turn
    reference: str  # the last assistant turn's content
    input_ids: list[int]


def generation_prompts(cfg: EvalConfig, data: PreparedData, use: TemplateUse) -> list[Prompt]:
    """`generation.num_prompts` rows chosen with the seed among the rows that were scored, in row order:
    each conversation up to its last assistant turn, rendered with the generation prompt."""
    wanted = cfg.generation.num_prompts
    if wanted == 0:
        return []
    scored = {row.source_row for row in data.rows}
    candidates = []
    for number, row in read_message_rows(cfg.dataset).rows:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if number not in scored or not last:
            continue
        reference = messages[last].get("content")
        if isinstance(reference, str) and reference.strip():
            candidates.append((number, messages[:last], reference, row.get("tools")))
    chosen = sorted(random.Random(cfg.seed).sample(candidates, min(wanted, len(candidates))), key=lambda c: c[0])
    prompts = []
    for number, messages, reference, tools in chosen:
        text = render(use.tokenizer, use.choice.template, template_messages(messages), tools, True,
                      cfg.dataset.chat_template_kwargs)
        ids = use.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own specials
        prompts.append(Prompt(number, messages, reference, list(ids)))
    return prompts
