"""Batching, the learning-rate schedule and run-dir decisions: no model involved."""

from __future__ import annotations

import math

import pytest
import torch

from chatft.config.schema import LRSchedulerSection
from chatft.data.types import TokenizedRow
from chatft.train import batching
from chatft.train.schedule import LRSchedule


def row(ids, mask):
    return TokenizedRow(input_ids=list(ids), loss_mask=[bool(m) for m in mask], source_row=0)


def test_collate_pads_to_the_longest_row_and_labels_only_masked_tokens():
    batch = batching.collate([row([5, 6, 7, 8], [0, 0, 1, 1]), row([9, 10], [0, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batching.supervised_tokens(batch) == 3
    assert batching.input_tokens(batch) == 6


def test_pad_equal_to_eos_keeps_eos_labels():
    # SmolLM2 pads with its EOS (2 here): the real EOS ending an answer must stay a label.
    eos = 2
    batch = batching.collate([row([5, 6, eos], [0, 1, 1]), row([7, 8, 9, 10, eos], [0, 0, 1, 1, 1])], pad_id=eos)
    assert batch["labels"][0].tolist() == [-100, 6, eos, -100, -100]
    assert batch["labels"][1].tolist() == [-100, -100, 9, 10, eos]
    assert batching.supervised_tokens(batch) == 5


def test_epoch_order_is_a_function_of_seed_and_epoch():
    lengths = list(range(20))
    kwargs = dict(seed=3, shuffle=True, group_by_length=False, global_batch_size=4)
    first = batching.epoch_order(lengths, 0, **kwargs)
    assert first == batching.epoch_order(lengths, 0, **kwargs)
    assert sorted(first) == list(range(20))
    assert first != batching.epoch_order(lengths, 1, **kwargs)
    in_order = batching.epoch_order(lengths, 0, seed=3, shuffle=False, group_by_length=False, global_batch_size=4)
    assert in_order == list(range(20))


def test_group_by_length_puts_similar_lengths_together_and_keeps_every_row():
    lengths = [(i * 37) % 101 for i in range(64)]
    order = batching.epoch_order(lengths, 0, seed=1, shuffle=True, group_by_length=True, global_batch_size=8)
    assert sorted(order) == list(range(64))
    spread = [max(lengths[i] for i in order[s:s + 8]) - min(lengths[i] for i in order[s:s + 8]) for s in range(0, 64, 8)]
    random_order = batching.epoch_order(lengths, 0, seed=1, shuffle=True, group_by_length=False, global_batch_size=8)
    random_spread = [max(lengths[i] for i in random_order[s:s + 8]) - min(lengths[i] for i in random_order[s:s + 8])
                     for s in range(0, 64, 8)]
    assert sum(spread) < sum(random_spread) / 2


def test_steps_keep_the_last_partial_batch_and_ranks_split_each_batch():
    order = list(range(10))
    assert batching.steps_per_epoch(10, 4) == 3
    assert batching.step_rows(order, 2, 4) == [8, 9]
    per_rank = [batching.step_rows(order, 1, 4, rank=r, world_size=2, lengths=[5] * 10) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == [4, 5, 6, 7]


def test_a_steps_rows_are_shared_out_by_tokens():
    lengths = [900, 850, 100, 90, 80, 60, 50, 40]  # every other row: 1,130 tokens against 1,040
    shares = batching.balanced_shares(range(8), lengths, 2)
    assert sorted(shares[0] + shares[1]) == list(range(8)) and [len(s) for s in shares] == [4, 4]
    totals = [sum(lengths[i] for i in share) for share in shares]
    assert totals == [1090, 1080], totals
    assert all(share == sorted(share) for share in shares)  # each share keeps the step's order
    skewed = [1000, 900, 20, 10, 10, 10]  # every other row: 1,030 against 920; shared out: 1,020 and 930
    assert [sum(skewed[i] for i in s) for s in batching.balanced_shares(range(6), skewed, 2)] == [1020, 930]
    # one row for two processes: the second trains nothing this step (its gradient counts as zeros)
    assert batching.balanced_shares([7], [5] * 8, 2) == [[7], []]


def test_micro_batches_split_a_step():
    rows = [row([1, 2, 3], [0, 1, 1])] * 5
    sizes = [b["input_ids"].shape[0] for b in batching.micro_batches(rows, 2, pad_id=0)]
    assert sizes == [2, 2, 1]


def schedule(style, warmup=2, total=10, min_lr=0.0, decay=None):
    section = LRSchedulerSection(lr_decay_style=style, lr_warmup_steps=warmup, min_lr=min_lr, lr_decay_steps=decay)
    return LRSchedule.from_config(section, 1.0, total)


def test_warmup_rises_linearly_without_a_zero_step():
    lr = schedule("constant", warmup=3)
    assert [lr(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_and_linear_decay_to_min_lr():
    cosine, linear = schedule("cosine", min_lr=0.1), schedule("linear", min_lr=0.1)
    assert cosine(2) == pytest.approx(1.0) and linear(2) == pytest.approx(1.0)
    assert cosine(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert linear(6) == pytest.approx(0.55)
    assert cosine(9) > 0.1  # the last step still learns
    assert cosine(10) == pytest.approx(0.1) and linear(50) == pytest.approx(0.1)
    values = [cosine(s) for s in range(2, 11)]
    assert values == sorted(values, reverse=True)


def test_lr_decay_steps_ends_decay_early():
    lr = schedule("linear", warmup=0, total=100, decay=10)
    assert lr(5) == pytest.approx(0.5)
    assert lr(10) == lr(99) == 0.0


def test_label_shift_matches_the_models_own_loss(tiny_model_dir):
    # Our loss (labels where the mask is set, shifted inside) equals transformers' own causal-LM loss.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = batching.collate([row([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), row([9, 10, 11], [0, 1, 1])], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        theirs = model(**batch).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
