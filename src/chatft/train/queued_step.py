"""An optimizer step whose numbers stay on the device until its log row is written.

On CUDA, Python runs ahead of the GPU: when the trainer's step method returns, the step is queued, not done.
Reading its loss or gradient norm there (`float(tensor)`) would make Python wait for the GPU, and the GPU would then
sit idle while Python collates the next micro-batches and queues their kernels. So the trainer keeps a step's
loss and gradient norm as device tensors and reads them once the next step is queued behind it (`Trainer.train`);
on CPU a step is done when it returns, and it is read at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class QueuedStep:
    loss: torch.Tensor  # 0-dim, on the device: the step's mean loss per supervised token
    grad_norm: torch.Tensor  # 0-dim, on the device: the gradient norm before clipping
    tokens: int  # input tokens of the step (known on the host)
    skipped: bool  # float16 loss scaling skipped the update (read at once: the scaler has already synced)
    loss_scale: float  # float16: the scale after this step's update (the next step's would be wrong); else 1.0
    queued_at: float  # time.perf_counter() when the step began to be queued
    known: dict[str, Any] | None = None  # the row's host-side fields (step, epoch, lr), set by the trainer

    def read(self, previous_read_at: float) -> tuple[float, float | None, float, float]:
        """(loss, grad norm or None when it overflowed, seconds, read_at). Waits for the device to finish
        the step. Its seconds run from when the device could start it: when it was queued, or when the step
        before it was read (the device was busy with that one until then), whichever is later."""
        loss, grad_norm = float(self.loss), float(self.grad_norm)
        read_at = time.perf_counter()
        seconds = read_at - max(self.queued_at, previous_read_at)
        return loss, grad_norm if math.isfinite(grad_norm) else None, seconds, read_at
