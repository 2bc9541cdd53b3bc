"""The learning-rate schedule: a pure function of the optimizer step.

In: the `lr_scheduler` section, the peak rate (`optimizer.lr`) and the run's total steps. Out: the rate of
step s (0-based). Being a function of s alone, it needs no state beyond the step a checkpoint records.

- warm-up: steps s < W use peak·(s+1)/(W+1), rising linearly from near 0 (no step is wasted at lr 0);
- decay: from s = W to s = D (`lr_decay_steps`, None = the run's total steps) by `cosine`, `linear`
  or `constant`, reaching `min_lr` at D and staying there (with D = total steps, the last step still
  trains at a rate above `min_lr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chatft.config.schema import LRSchedulerSection


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    warmup_steps: int
    decay_steps: int  # the step at which min_lr is reached
    min_lr: float
    style: str

    @classmethod
    def from_config(cls, section: LRSchedulerSection, peak: float, total_steps: int) -> LRSchedule:
        return cls(
            peak=peak,
            warmup_steps=section.lr_warmup_steps,
            decay_steps=section.lr_decay_steps if section.lr_decay_steps is not None else total_steps,
            min_lr=min(section.min_lr, peak),
            style=section.lr_decay_style,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / (self.warmup_steps + 1)
        if self.style == "constant":
            return self.peak
        span = self.decay_steps - self.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        if self.style == "linear":
            factor = 1.0 - progress
        else:  # cosine
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak - self.min_lr) * factor

    def to_json(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "min_lr": self.min_lr, "style": self.style}
