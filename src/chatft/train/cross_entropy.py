"""The summed cross-entropy of float32 logits, and its gradient written into the logits' own memory.

The arithmetic both loss heads share (`losses._SummedCrossEntropy` on the model's logits, `chunked_head` a chunk
at a time): labels of -100 count for nothing; the gradient of the summed loss with respect to the logits is
softmax minus one-hot on counted rows and zero elsewhere.
"""

from __future__ import annotations

import torch

from chatft.train.batching import IGNORE_INDEX


def label_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with -100 replaced by 0, so they can index; whether each label counts)."""
    counted = labels != IGNORE_INDEX
    return torch.where(counted, labels, torch.zeros_like(labels)), counted


def summed(logits: torch.Tensor, safe_labels: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed cross-entropy of the counted rows, each row's log normaliser for `gradient_`)."""
    log_normaliser = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe_labels[:, None]).squeeze(1)
    return ((log_normaliser - picked) * counted).sum(), log_normaliser


def gradient_(logits: torch.Tensor, log_normaliser: torch.Tensor, safe_labels: torch.Tensor,
              counted: torch.Tensor) -> torch.Tensor:
    """d(summed loss)/d(logits), computed in place of `logits` (which are gone afterwards)."""
    grad = logits.sub_(log_normaliser[:, None]).exp_()  # softmax
    grad[torch.arange(grad.size(0), device=grad.device), safe_labels] -= 1
    return grad.mul_(counted[:, None])
