"""The shapes that pass between data preparation and training.

A `TokenizedRow` is one conversation rendered with the chat template: token ids and, per token, whether
the loss is computed on it (the tokens the assistant emits, its end-of-turn token included).
`PreparedData` is a whole dataset of them plus the account of every row that was not used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: list[int]
    loss_mask: list[bool]  # same length as input_ids; True = supervised (predicted) token
    source_row: int  # 1-based row number in the source (the line number in JSONL), as prep reports it
    message: int | None = None  # a per-turn row: the 1-based number of the assistant message it trains

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataReport:
    """What happened to the rows of one dataset; recorded in chatft_manifest.json."""

    path: str
    sha256: str | None
    rows_in: int  # source rows (conversations)
    rows_used: int  # training rows: with per-turn rows (`expansion`), a conversation may give several
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # rows cut to seq_length (truncation: truncate); they are among rows_used
    supervised_tokens: int = 0
    total_tokens: int = 0
    examples_by_reason: dict[str, list[int]] = field(default_factory=dict)  # first row numbers of each drop
    token_length_quantiles: dict[str, int] = field(default_factory=dict)  # rendered rows, before the policy
    over_length: int = 0  # rendered rows longer than seq_length (dropped, truncated or refused per policy)
    template_source: str | None = None  # tokenizer | bundled:<name> | file:<path> | inline
    flagged_by_reason: dict[str, int] = field(default_factory=dict)  # rows used as they are that look wrong
    flagged_examples_by_reason: dict[str, list[int]] = field(default_factory=dict)  # first row numbers of each
    mask_method: str | None = None  # generation_tags | prefix_rendering
    # Rows whose rendering lacks a field of their messages (template_fields.FIELDS), per field (a row may count
    # under several); they are dropped as `template_drops_field`, which training refuses.
    fields_dropped_by_template: dict[str, int] = field(default_factory=dict)
    template_drop_examples: dict[str, str] = field(default_factory=dict)  # per field, the first row's account
    drop_details: dict[str, str] = field(default_factory=dict)  # per drop reason, the first row's account if any
    multi_turn: str | None = None  # the dataset.multi_turn setting the rows were built with
    # Conversations → training rows: rows_before (conversations rendered, one row each) and rows_after (training
    # rows they became, before the length policy), tokens_before/tokens_after likewise, per_turn_conversations
    # (those trained one row per assistant turn) and first_per_turn_row. Dropped rows are counted per training
    # row: rows_in + rows_after - rows_before == rows_used + sum(dropped_by_reason).
    expansion: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PreparedData:
    rows: list[TokenizedRow]
    report: DataReport
