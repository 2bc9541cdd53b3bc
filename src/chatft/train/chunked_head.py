"""The output head and its cross-entropy, a chunk of positions at a time: no (positions x vocab) logits tensor.

In: the decoder's hidden states at the positions that predict a supervised token, the model's output head
(a plain `nn.Linear`), the labels. Out: the summed cross-entropy (float32) and the count of right argmax
predictions, with gradients for the hidden states and, when it trains, the head's weight.

With a 128k-152k vocabulary the logits are the largest tensor of a step: positions x vocab in the model's
dtype, a float32 copy for the loss and a gradient of each. Here the head runs on `CHUNK_ELEMENTS` logits at a
time and each chunk's gradients are taken at once, in the forward, while its logits exist; the backward only
scales them by the incoming gradient. The arithmetic per chunk is what autograd would do (the head's matmul
in the model's dtype, log-softmax in float32, the gradient cast back to the model's dtype), so results match
the full-logits path up to summation order.

This needs the hidden states before the head, so it skips the model's own forward after the decoder. A model
that does more there (Gemma's logit soft-capping, Cohere's and Granite's logit scaling, remote code) would
get a different loss: `matches_model` checks on the loaded model that decoder + head give its logits, and
the caller keeps the full-logits path otherwise. The head's weight is used directly, not through the module's
forward: a wrapper that acts in that forward (FSDP2 gathering a sharded head) has to be handled here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chatft.train import cross_entropy
from chatft.train.model import causal_lm

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MB in float32 (smaller chunks re-read the head more often)
PROBE_LENGTH = 6
PROBE_SEED = 4321


@dataclass(frozen=True)
class ChunkedHead:
    decoder: nn.Module  # the model's body: input ids -> final (normalised) hidden states
    head: nn.Linear

    def hidden_states(self, **inputs) -> torch.Tensor:
        return self.decoder(**inputs, use_cache=False).last_hidden_state

    def cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden` (positions, hidden size), `labels` (positions,), -100 where nothing is counted."""
        weight, bias = self.head.weight, self.head.bias
        wants_grads = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        if not wants_grads:
            loss, correct, _ = _chunked_loss(hidden, weight, bias, labels, grads=(False, False, False))
            return loss, correct
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels)


def find_head(model: nn.Module) -> ChunkedHead | None:
    """The decoder and plain linear head of a transformers causal LM (under PEFT too), if it has them."""
    inner = causal_lm(model)
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or decoder is inner or type(head) is not nn.Linear:  # a LoRA-wrapped head is not plain
        return None
    return ChunkedHead(decoder, head)


@torch.no_grad()
def matches_model(model: nn.Module, head: ChunkedHead, vocab_size: int, device: torch.device,
                  tolerance: float) -> bool:
    """Whether decoder + head give the model's own logits on a short random row (relative to their scale)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(0, min(vocab_size, 1000), (1, PROBE_LENGTH), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        expected = model(input_ids=ids).logits.float()
        got = head.head(head.hidden_states(input_ids=ids)).float()
    finally:
        model.train(was_training)
    if got.shape != expected.shape:
        return False
    scale = expected.abs().max().clamp_min(1e-6)
    return float((got - expected).abs().max() / scale) <= tolerance


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  grads: tuple[bool, bool, bool]):
    """Summed loss, right predictions and, where `grads` asks, the gradients of the summed loss with
    respect to (hidden, weight, bias)."""
    safe_labels, counted = cross_entropy.label_mask(labels)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads[0] else None
    # Accumulated over chunks in the weight's own dtype, as autograd accumulates over micro-batches.
    grad_weight = torch.zeros_like(weight) if grads[1] else None
    grad_bias = torch.zeros_like(bias) if grads[2] else None
    step = rows_per_chunk(weight.size(0))
    for start in range(0, hidden.size(0), step):
        chunk = slice(start, start + step)
        h, take, keep = hidden[chunk], safe_labels[chunk], counted[chunk]
        logits = nn.functional.linear(h, weight, bias).float()
        chunk_loss, log_normaliser = cross_entropy.summed(logits, take, keep)
        loss += chunk_loss
        correct += ((logits.argmax(-1) == take) & keep).sum()
        if not any(grads):
            continue
        grad = cross_entropy.gradient_(logits, log_normaliser, take, keep).to(weight.dtype)
        if grad_hidden is not None:
            grad_hidden[chunk] = grad @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad.t(), h)
        if grad_bias is not None:
            grad_bias += grad.sum(0)
    return loss, correct, (grad_hidden, grad_weight, grad_bias)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and right predictions of `_chunked_loss`; the gradients are computed in the forward and scaled
    by the incoming gradient in the backward (so the function can be differentiated once)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        grads = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        loss, correct, gradients = _chunked_loss(hidden, weight, bias, labels, grads)
        ctx.gradients = gradients
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        gradients, ctx.gradients = ctx.gradients, None
        scaled = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in gradients]
        return (*scaled, None)
