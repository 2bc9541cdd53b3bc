"""The shapes that pass between data preparation and training.

A `TokenizedRow` is one conversation rendered with the chat template: token ids and, per token, whether
the loss is computed on it (the tokens the assistant emits, its end-of-turn token included).
`PreparedData` is a whole dataset of them plus the account of every row that was not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: list[int]
    loss_mask: list[bool]  # same length as input_ids; True = supervised (predicted) token
    source_row: int  # 0-based row number in the source file, for messages that name a row

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
    rows_in: int
    rows_used: int
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # rows cut to seq_length (truncation: truncate); they are among rows_used
    supervised_tokens: int = 0
    total_tokens: int = 0

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "rows_in": self.rows_in,
            "rows_used": self.rows_used,
            "dropped_by_reason": dict(self.dropped_by_reason),
            "truncated": self.truncated,
            "supervised_tokens": self.supervised_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class PreparedData:
    rows: list[TokenizedRow]
    report: DataReport
