"""Loss and token accuracy on supervised tokens: the one definition training and evaluation share.

In: a causal LM and micro-batches from `batching` (padded or padding-free, `labels` -100 where nothing is
supervised). Out: the summed cross-entropy and the count of correctly predicted tokens of a batch
(`loss_sum`), or, over many batches, the mean loss per supervised token and the token accuracy
(`score_batches`). Token i is predicted from the tokens before it: logits at i-1 against the label at i.

The output head runs only where a label follows, in one of two ways:
- chunked (when `head_for` finds that the model's decoder and plain linear head give its logits): the
  decoder's hidden states at those positions go through the head and the cross-entropy a chunk at a time
  (`chunked_head`), so no positions x vocab tensor exists beyond one chunk;
- otherwise the model is asked for the logits of those positions (`logits_to_keep` with the position
  indices; for a model whose forward does not take it, the full logits and a selection), and the summed
  cross-entropy keeps only those logits and writes its gradient into them.
The cross-entropy is taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from chatft.train import attention, chunked_head, cross_entropy
from chatft.train.batching import IGNORE_INDEX, supervised_tokens
from chatft.train.chunked_head import ChunkedHead
from chatft.train.model import causal_lm

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# decoder + head against the model's own logits: the same operations, so only a model that does something
# else after its head (soft-capping, scaling) differs, and then by far more than this.
HEAD_TOLERANCE = 1e-3


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device | None = None,
             head: ChunkedHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the supervised tokens of `batch` (float32, differentiable), and the number of
    those tokens whose argmax prediction is right. `batch` stays where collate made it (CPU): the positions
    and conversation bounds are read there, and only the tensors the model needs go to `device`, so the step
    never waits on the GPU to learn a shape. With `head` (see `head_for`), the loss comes from the decoder's
    hidden states a chunk at a time (`chunked_head`), without the logits of all positions at once."""
    targets = batch["labels"][:, 1:]
    # Positions whose next token is supervised in any row (rows of a padded batch share the index).
    positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    labels = targets[:, positions].reshape(-1)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "position_ids" in batch and attention.uses_segment_sdpa(model):
        inputs[attention.SEGMENTS_KWARG] = attention.segments_for(batch["position_ids"], device)
    if device is not None:
        inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        positions, labels = positions.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if head is not None:
        hidden = head.hidden_states(**inputs)[:, positions]
        return head.cross_entropy(hidden.reshape(-1, hidden.size(-1)), labels)
    if accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=positions).logits
    else:
        logits = model(**inputs).logits[:, positions]
    logits = logits.float().reshape(-1, logits.size(-1))
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    return _SummedCrossEntropy.apply(logits, labels), correct


class _SummedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (positions, vocab) float32 logits against labels (-100: not counted).

    Same value and gradient as `F.cross_entropy(..., reduction="sum")`, with less memory: that keeps the
    log-softmax (another positions x vocab tensor) for backward and allocates the gradient beside it; here
    only the logits are kept, and the backward turns them into the gradient in place (softmax minus one-hot).
    The logits must not be used after backward, which holds for `loss_sum`'s own float32 logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        safe_labels, counted = cross_entropy.label_mask(labels)
        loss, log_normaliser = cross_entropy.summed(logits, safe_labels, counted)
        ctx.save_for_backward(logits, log_normaliser, safe_labels, counted)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = cross_entropy.gradient_(*ctx.saved_tensors)
        return grad.mul_(grad_output), None


def head_for(model: torch.nn.Module, vocab_size: int, device: torch.device) -> ChunkedHead | None:
    """The chunked loss head for `model` when decoder + head reproduce its logits (`chunked_head`), else None:
    `loss_sum` then asks the model itself for the logits."""
    head = chunked_head.find_head(model)
    if head is None or not chunked_head.matches_model(model, head, vocab_size, device, HEAD_TOLERANCE):
        return None
    return head


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under any wrapper (PEFT) takes `logits_to_keep` in its forward."""
    inner = causal_lm(model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


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
                  device: torch.device, head: ChunkedHead | None = None) -> LossScore:
    """Loss and token accuracy over every supervised token of `batches`, computed on `device`.
    The sums are what several processes would all-reduce before dividing. They stay on the device (float64,
    as Python's float would add them) and are read once at the end, so the GPU never waits between batches."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    tokens = 0
    for batch in batches:
        batch_loss, batch_correct = loss_sum(model, batch, device, head)
        total += batch_loss.double()
        correct += batch_correct
        tokens += supervised_tokens(batch)
    return LossScore(float(total), int(correct), tokens)
