"""From tokenized rows to the micro-batches of each optimizer step.

In: `TokenizedRow`s (ids + loss mask), the batch sizes, a seed. Out: for each optimizer step, a list of
micro-batches, each a dict of `input_ids`, `attention_mask`, `labels` padded to its own longest row.

- The order of an epoch is a pure function of (seed, epoch): resuming recomputes it and skips the steps
  already taken, so the data position is just (epoch, steps done in that epoch).
- One optimizer step takes `global_batch_size` consecutive rows of that order; the last step of an epoch
  may take fewer (nothing is dropped). Rank r of R takes every R-th row of each global batch
  (`rank`/`world_size`), so a later multi-process issue only passes its rank.
- `group_by_length`: rows are ordered by length inside windows of 8 global batches, then the batches are
  shuffled, so a micro-batch pads little while the steps stay in random order.
- Labels: `labels[i] = input_ids[i]` where `loss_mask[i]`, else -100; the model's shift (token i predicted
  from tokens < i) happens in the loss. Padding never becomes a label, whatever the pad id (SmolLM2 pads
  with its EOS token, whose real occurrences stay supervised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from chatft.data.types import TokenizedRow

IGNORE_INDEX = -100
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
    order: list[int], step_in_epoch: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1
) -> list[int]:
    """The row indices this rank trains on in one optimizer step."""
    batch = order[step_in_epoch * global_batch_size:(step_in_epoch + 1) * global_batch_size]
    return batch[rank::world_size]


def collate(rows: Sequence[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this micro-batch (right padding)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.tensor(row.input_ids, dtype=torch.long)
        mask = torch.tensor(row.loss_mask, dtype=torch.bool)
        input_ids[i, :len(row)] = ids
        attention_mask[i, :len(row)] = 1
        labels[i, :len(row)] = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def micro_batches(rows: Sequence[TokenizedRow], local_batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(rows[i:i + local_batch_size], pad_id) for i in range(0, len(rows), local_batch_size)]


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labelled positions after the shift (position 0 is never predicted)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())
