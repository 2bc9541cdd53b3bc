"""Loss and token accuracy on supervised tokens: the one definition training and evaluation share.

In: a causal LM and micro-batches from `batching.collate` (`input_ids`, `attention_mask`, `labels` with -100
where nothing is supervised). Out: the summed cross-entropy and the count of correctly predicted tokens of a
batch (`loss_sum`), or, over many batches, the mean loss per supervised token and the token accuracy
(`score_batches`). Token i is predicted from the tokens before it: logits at i-1 against the label at i.
The cross-entropy is taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatft.train.batching import IGNORE_INDEX, supervised_tokens


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the supervised tokens of `batch` (float32, differentiable), and the number of
    those tokens whose argmax prediction is right."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    return total, correct


@dataclass(frozen=True)
class LossScore:
    loss_sum: float
    correct: int
    tokens: int  # supervised tokens scored

    @property
    def loss(self) -> float:
        """Mean cross-entropy per supervised token."""
        return self.loss_sum / max(1, self.tokens)

    @property
    def token_accuracy(self) -> float:
        return self.correct / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows a float past ~709


@torch.no_grad()
def score_batches(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                  device: torch.device) -> LossScore:
    """Loss and token accuracy over every supervised token of `batches`, each batch moved to `device`.
    The sums are what several processes would all-reduce before dividing."""
    total, correct, tokens = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        batch_loss, batch_correct = loss_sum(model, batch)
        total += float(batch_loss)
        correct += int(batch_correct)
        tokens += supervised_tokens(batch)
    return LossScore(total, correct, tokens)
