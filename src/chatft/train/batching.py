"""From tokenized rows to the micro-batches of each optimizer step.

In: `TokenizedRow`s (ids + loss mask), the batch sizes, a seed. Out: for each optimizer step, a list of
micro-batches in one of two layouts:
- padding-free (the default): the micro-batch's conversations concatenated into ONE row, `input_ids`,
  `position_ids` (restarting at 0 for every conversation) and `labels`, no attention mask. transformers reads
  the restarting position ids as packed sequences: eager gets a block-diagonal causal mask, flash
  attention its varlen kernel, sdpa chatft's per-conversation attention (`attention.py`), so no conversation
  attends to another and nothing is computed on padding;
- padded: `input_ids`, `attention_mask`, `labels`, one row per conversation, padded to the longest.
A micro-batch holds `local_batch_size` conversations, or, with a token budget (`packed_sequence_size`), as
many consecutive conversations of the step as fit in the budget.

- The order of an epoch is a pure function of (seed, epoch): resuming recomputes it and skips the steps
  already taken, so the data position is just (epoch, steps done in that epoch).
- One optimizer step takes `global_batch_size` consecutive rows of that order; the last step of an epoch
  may take fewer (nothing is dropped). With R processes the step's rows are shared out by tokens
  (`balanced_shares`): every process gets about the same number of rows and of tokens.
- `group_by_length`: rows are ordered by length inside windows of 8 global batches, then the batches are
  shuffled, so a micro-batch pads little while the steps stay in random order.
- Labels: `labels[i] = input_ids[i]` where `loss_mask[i]`, else -100; the model's shift (token i predicted
  from tokens < i) happens in the loss. Padding never becomes a label, whatever the pad id (SmolLM2 pads
  with its EOS token, whose real occurrences stay supervised). In a packed row the first token of every
  conversation is -100 as well, so no conversation is ever the target of the one before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from chatft.data.types import TokenizedRow

IGNORE_INDEX = -100
T = TypeVar("T")
LENGTH_GROUP_WINDOW = 8  # global batches per window that are sorted by length together


def steps_per_epoch(num_rows: int, global_batch_size: int) -> int:
    return math.ceil(num_rows / global_batch_size)


def epoch_order(
    lengths: Sequence[int], epoch: int, *, seed: int, shuffle: bool, group_by_length: bool, global_batch_size: int
) -> list[int]:
    """Row indices in the order epoch `epoch` visits them."""
    n = len(lengths)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    if not group_by_length:
        return order
    window = global_batch_size * LENGTH_GROUP_WINDOW
    batches: list[list[int]] = []
    for start in range(0, n, window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + global_batch_size] for i in range(0, len(chunk), global_batch_size)]
    # Keep a partial batch (if any) last, so every other step has a full global batch.
    full = [b for b in batches if len(b) == global_batch_size]
    partial = [b for b in batches if len(b) != global_batch_size]
    if shuffle:
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in full + partial for i in batch]


def step_rows(
    order: list[int], step_in_epoch: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1,
    lengths: Sequence[int] = (),
) -> list[int]:
    """The row indices this rank trains on in one optimizer step: all of the step's rows for one process, else
    this rank's share by tokens (`lengths`: every row's length, needed then)."""
    batch = order[step_in_epoch * global_batch_size:(step_in_epoch + 1) * global_batch_size]
    return batch if world_size == 1 else balanced_shares(batch, lengths, world_size)[rank]


def balanced_shares(batch: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split one step's rows among `world_size` processes so that their tokens are as even as a greedy pass makes
    them: longest row first, each to the process with the fewest tokens so far among those holding fewer than
    their even share of rows (so every process forms the same number of `local_batch_size` micro-batches, give or
    take one). Each share keeps the step's order. Which process trains a row does not change the step's loss or
    gradient (both are sums over the whole step); it only decides who waits for whom."""
    room = math.ceil(len(batch) / world_size)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    position = {row: i for i, row in enumerate(batch)}
    for row in sorted(batch, key=lambda r: (-lengths[r], position[r])):
        rank = min((r for r in range(world_size) if len(shares[r]) < room), key=lambda r: (tokens[r], r))
        shares[rank].append(row)
        tokens[rank] += lengths[row]
    return [sorted(share, key=position.__getitem__) for share in shares]


def collate(rows: Sequence[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this micro-batch (right padding)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.tensor(row.input_ids, dtype=torch.long)
        input_ids[i, :len(row)] = ids
        attention_mask[i, :len(row)] = 1
        labels[i, :len(row)] = _labels(ids, row.loss_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(rows: Sequence[TokenizedRow]) -> dict[str, torch.Tensor]:
    """Concatenate the rows into one padding-free row; position ids restart at 0 for every row."""
    ids = torch.tensor([token for row in rows for token in row.input_ids], dtype=torch.long)
    positions = torch.cat([torch.arange(len(row), dtype=torch.long) for row in rows])
    labels = torch.cat([_labels(torch.tensor(row.input_ids, dtype=torch.long), row.loss_mask) for row in rows])
    labels[positions == 0] = IGNORE_INDEX  # never predict a conversation from the end of the previous one
    return {"input_ids": ids[None], "position_ids": positions[None], "labels": labels[None]}


def _labels(ids: torch.Tensor, loss_mask: Sequence[bool]) -> torch.Tensor:
    return torch.where(torch.tensor(loss_mask, dtype=torch.bool), ids, torch.full_like(ids, IGNORE_INDEX))


def group_rows(rows: Sequence[T], local_batch_size: int, token_budget: int = 0,
               length: Callable[[T], int] = len) -> list[list[T]]:
    """Consecutive rows per micro-batch: `local_batch_size` at a time, or, with a token budget, as many as fit
    in `token_budget` tokens (a row longer than the budget goes alone)."""
    if token_budget <= 0:
        return [list(rows[i:i + local_batch_size]) for i in range(0, len(rows), local_batch_size)]
    groups: list[list[T]] = []
    used = 0
    for row in rows:
        if groups and used + length(row) <= token_budget:
            groups[-1].append(row)
            used += length(row)
        else:
            groups.append([row])
            used = length(row)
    return groups


def micro_batches(
    rows: Sequence[TokenizedRow], local_batch_size: int, pad_id: int, *, padding_free: bool = False,
    token_budget: int = 0,
) -> list[dict[str, torch.Tensor]]:
    groups = group_rows(rows, local_batch_size, token_budget)
    if padding_free or token_budget > 0:
        return [collate_packed(group) for group in groups]
    return [collate(group, pad_id) for group in groups]


def layout_stats(lengths: Sequence[int], order: Sequence[int], global_batch_size: int, local_batch_size: int,
                 token_budget: int = 0) -> dict[str, float | int]:
    """How the rows of one epoch (visited in `order`) fill micro-batches: the share of positions a padded
    layout would spend on padding, and, with a token budget, how full the packs are."""
    real = padded = packs = 0
    for start in range(0, len(order), global_batch_size):
        step = [lengths[i] for i in order[start:start + global_batch_size]]
        real += sum(step)
        padded += sum(len(chunk) * max(chunk) for chunk in group_rows(step, local_batch_size))
        if token_budget > 0:
            packs += len(group_rows(step, local_batch_size, token_budget, length=lambda n: n))
    stats: dict[str, float | int] = {"tokens": real, "padded_positions": padded,
                                     "padding_fraction": 1 - real / padded if padded else 0.0}
    if token_budget > 0:
        stats.update(packs=packs, pack_fill=real / (packs * token_budget) if packs else 0.0)
    return stats


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labelled positions after the shift (position 0 is never predicted)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a micro-batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def describe_layout(cfg: Any, padding_free: bool, attention: str) -> str:
    """How a step is split, for the start-up summary: 'N micro-batches of M, padding-free (sdpa attention)'."""
    sched, budget = cfg.step_scheduler, cfg.packed_sequence.packed_sequence_size
    layout = f"padding-free ({attention} attention)" if padding_free else "padded to the longest row"
    if budget > 0:
        return f"micro-batches: up to {budget} tokens of consecutive rows, {layout}"
    return f"{cfg.grad_accumulation_steps()} micro-batches of {sched.local_batch_size}, {layout}"
