"""What the planner learns from `--data`: format, clean row count, length quantiles, Megatron-only inputs.

In: the `--data` path (or None). Out: `DataFacts`. The rows are read with data prep's own reader and format
converters (`open_source`, `detect_format`, `convert_row`), so "clean rows" means exactly the rows data prep
would keep. Lengths are estimated without a tokenizer: characters / 4 plus 4 tokens of chat-template markers
per message, a rough rule for English text (`chatft preview` measures real token counts).

Megatron-Bridge inputs are not refused here but recorded in `megatron_input` (the refusal to raise), so the
plan can state the rule that fires before it stops: packed Parquet (`input_ids` + `loss_mask`) and Megatron
indexed datasets (`.bin` + `.idx`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from chatft.data.formats import RowDropped, convert_row, detect_format
from chatft.data.guards import check_dataset_path
from chatft.data.locations import looks_like_hub_id
from chatft.data.readers import open_source
from chatft.errors import ChatftError

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
SNIFF_ROWS = 50
SMALL_DATA_ROWS = 10_000
QUANTILES = (0.5, 0.9, 0.99, 1.0)
TOKEN_ESTIMATE = f"tokens estimated as characters/{CHARS_PER_TOKEN} + {TOKENS_PER_MESSAGE} per message"


@dataclass
class DataFacts:
    path: str | None  # as given
    kind: str  # none | file | hub
    format: str | None = None  # messages | sharegpt | alpaca | prompt_completion | hh; None when not read
    rows_in: int | None = None
    rows_clean: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    token_quantiles: dict[str, int] = field(default_factory=dict)  # p50, p90, p99, max
    lengths: list[int] = field(default_factory=list)  # estimated tokens per clean row, sorted
    megatron_input: ChatftError | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def needs_prep(self) -> bool:
        return self.kind == "hub" or (self.format is not None and self.format != "messages")

    def over(self, seq_length: int) -> int:
        return sum(1 for n in self.lengths if n > seq_length)

    def summary(self) -> str:
        if self.kind == "none":
            return "no --data: assumed OpenAI `messages` JSONL at data/train.jsonl"
        if self.kind == "hub":
            return f"{self.path}: a Hub dataset id, not read (chatft plan reads local files only)"
        if self.megatron_input is not None:
            return f"{self.path}: Megatron-Bridge input ({self.megatron_input.message})"
        q = self.token_quantiles
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items())
        return (f"{self.path}: {self.format} format, {self.rows_in:,} rows, {self.rows_clean:,} clean"
                + (f" (data prep would drop: {dropped})" if dropped else "")
                + (f"; length p50 {q['p50']:,} / p90 {q['p90']:,} / p99 {q['p99']:,} / max {q['max']:,} tokens "
                   f"({TOKEN_ESTIMATE})" if q else ""))


def _megatron_indexed(path: Path) -> bool:
    """Megatron's indexed dataset: PREFIX.bin + PREFIX.idx (given as either file, the prefix, or their dir)."""
    candidates = [path] if not path.is_dir() else sorted(path.glob("*.idx"))
    for item in candidates:
        stem = item.with_suffix("") if item.suffix in (".bin", ".idx") else item
        if stem.with_suffix(".bin").is_file() and stem.with_suffix(".idx").is_file():
            return True
    return False


def inspect_data(path: str | None) -> DataFacts:
    """Read `--data` once, as data prep would, and describe it."""
    if path is None:
        return DataFacts(None, "none")
    local = Path(path).expanduser()
    if _megatron_indexed(local):
        return DataFacts(path, "file", megatron_input=ChatftError(
            "route_not_supported",
            f"--data {path} is a Megatron indexed dataset (.bin + .idx): Megatron-Bridge's pretokenized input, "
            "which chatft does not train on",
            "train on it with Megatron-Bridge, or give chatft the chat JSONL it was built from",
        ))
    try:
        check_dataset_path(path, key="--data")
    except ChatftError as err:
        if err.id != "packed_parquet_used_with_automodel":
            raise
        return DataFacts(path, "file", megatron_input=err)
    if not local.exists() and looks_like_hub_id(path):
        return DataFacts(path, "hub", notes=["format unknown until read: data_prep/chat_jsonl reads Hub datasets "
                                             "(cached, or fetched with network access) and writes messages JSONL"])
    return _read(path)


def _rendered_chars(message: dict) -> int:
    """The characters a template writes for one message: its content, its reasoning and its tool calls."""
    calls = message.get("tool_calls")
    return (len(str(message.get("content") or "")) + len(str(message.get("reasoning_content") or ""))
            + (len(json.dumps(calls)) if calls else 0))


def _read(path: str) -> DataFacts:
    try:
        source = open_source(path)
        rows = list(source.rows)
    except ChatftError as err:
        if err.id == "packed_parquet_used_with_automodel":
            return DataFacts(path, "file", megatron_input=err)
        raise
    objects = [(r.number, r.value) for r in rows if isinstance(r.value, dict)]
    sample = objects[:SNIFF_ROWS]
    fmt = detect_format([v for _, v in sample], "chosen", path, [n for n, _ in sample])
    facts = DataFacts(path, "file", format=fmt, rows_in=len(rows))
    lengths = []
    for row in rows:
        if row.value is None or not isinstance(row.value, dict):
            reason = row.problem or "not_an_object"
            facts.dropped[reason] = facts.dropped.get(reason, 0) + 1
            continue
        try:
            # as data prep converts: tool-call shapes mapped, inline <think> blocks moved to reasoning_content
            conversation = convert_row(row.value, fmt, inline_think=True, map_tools=True)
        except RowDropped as dropped:
            facts.dropped[dropped.reason] = facts.dropped.get(dropped.reason, 0) + 1
            continue
        chars = sum(_rendered_chars(m) for m in conversation.messages)
        lengths.append(chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(conversation.messages))
    lengths.sort()
    facts.rows_clean, facts.lengths = len(lengths), lengths
    if lengths:
        names = ("p50", "p90", "p99", "max")
        facts.token_quantiles = {n: lengths[min(len(lengths) - 1, int(q * len(lengths)))] for n, q in zip(names, QUANTILES)}
    return facts


def choose_seq_length(data: DataFacts, max_positions: int | None, given: int | None) -> tuple[int, str]:
    """`dataset.seq_length` and why: the user's, else the power of two covering the p99 length, else 2048."""
    if given is not None:
        return given, f"--seq-length {given}"
    if not data.token_quantiles:
        return 2048, "the step default (no row lengths to size it by)"
    p99 = data.token_quantiles["p99"]
    length = 512
    while length < p99 and length < 32768:
        length *= 2
    why = f"the smallest power of two >= 512 covering the p99 row length ({p99:,} estimated tokens)"
    if max_positions and length > max_positions:
        length, why = int(max_positions), f"capped at the model's max_position_embeddings ({max_positions:,})"
    return length, why
