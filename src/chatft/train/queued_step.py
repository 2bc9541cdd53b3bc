"""An optimizer step whose numbers stay on the device until its log row is written, and the clock it is timed by.

On CUDA, Python runs ahead of the GPU: when the trainer's step method returns, the step is queued, not done.
Reading its loss or gradient norm there (`float(tensor)`) would make Python wait for the GPU, and the GPU would then
sit idle while Python collates the next micro-batches and queues their kernels. So the trainer keeps a step's
loss and gradient norm as device tensors and reads them once the next step is queued behind it (`Trainer.train`);
on CPU a step is done when it returns, and it is read at once.

A step read late must not be timed late: the read waits for everything queued so far, the next step included.
So a step's start and end are marks on the device's own timeline (`StepClock`): CUDA events recorded on the
stream, which fire when the GPU gets there; on CPU, the host clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class StepClock:
    """Points of the training loop as the device reaches them, and the seconds between two of them."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"

    def mark(self) -> Any:
        """Now, on the device's timeline: a recorded CUDA event (it fires once the work queued before it is
        done), or the host clock where work is done when the call that queued it returns."""
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from mark `start` to mark `end`; waits for the device to reach `end`."""
        if self.events:
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return end - start


@dataclass
class QueuedStep:
    loss: torch.Tensor  # 0-dim, on the device: the step's mean loss per supervised token
    grad_norm: torch.Tensor  # 0-dim, on the device: the gradient norm before clipping
    tokens: int  # input tokens of the step (known on the host)
    skipped: bool  # float16 loss scaling skipped the update (read at once: the scaler has already synced)
    loss_scale: float  # float16: the scale after this step's update (the next step's would be wrong); else 1.0
    began: Any  # StepClock mark taken before the step's micro-batches were collated
    done: Any  # StepClock mark taken after its optimizer update was queued
    known: dict[str, Any] | None = None  # the row's host-side fields (step, epoch, lr), set by the trainer

    def read(self, clock: StepClock, origin: Any) -> tuple[float, float | None, float, float]:
        """(loss, grad norm or None when it overflowed, the step's seconds, seconds from `origin` to its end).
        Waits for the device to finish the step, and only for that."""
        seconds, since_origin = clock.seconds(self.began, self.done), clock.seconds(origin, self.done)
        loss, grad_norm = float(self.loss), float(self.grad_norm)
        return loss, grad_norm if math.isfinite(grad_norm) else None, seconds, since_origin


class PendingRow:
    """The one step whose log row is not written yet, because its numbers may still be on the device.

    `hold` takes each new step and writes the row of the one before it (done by now, or finishing behind the new
    one); the new row waits unless reads are not deferred (CPU) or the caller needs it now. `flush` writes the row
    held, if any: before validation or a checkpoint, at the end, and when the loop fails."""

    def __init__(self, write: Callable[[QueuedStep], None], *, defer: bool) -> None:
        self.write, self.defer = write, defer
        self.step: QueuedStep | None = None

    def hold(self, step: QueuedStep, *, read_now: bool = False) -> None:
        self.flush()
        self.step = step
        if read_now or not self.defer:
            self.flush()

    def flush(self) -> None:
        if self.step is not None:
            step, self.step = self.step, None
            self.write(step)
