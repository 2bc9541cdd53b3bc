"""How a training run ends: the part of `Trainer` that writes `final/` with its manifest, or reports a stop by a
signal, and the `TrainResult` either way.

In (read from the trainer): the run dir, model, tokenizer, precision, the last losses and counters, the estimate,
how the run ran (attention, loss head, strategy, world). Out: `final/` (`final_artifact`), `loss.png`, the
trackers closed, one closing line on the console.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chatft import console
from chatft.train import attention, checkpoints, final_artifact
from chatft.train.memory import MB
from chatft.train.metrics import done_line, plot_losses
from chatft.train.stop_signal import StopFlag

if TYPE_CHECKING:
    from chatft.train.loop import Trainer


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None  # None when the run was stopped by a signal
    steps: int
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    tokens: int
    elapsed_s: float
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT"
    exit_code: int = 0
    checkpoint: Path | None = None
    trainer: Trainer | None = dataclasses.field(default=None, repr=False, compare=False)  # set by `step.train`


class Finishing:
    """Mixed into `Trainer`: `_save_final` (rank 0), `_stopped`, `_print_done`."""

    def _stopped(self, stop: StopFlag, elapsed: float) -> TrainResult:
        latest = checkpoints.latest_checkpoint(self.run_dir) if self.cfg.checkpoint.enabled else None
        if self.is_main:
            plot_losses(self.run_dir)
            if self.trackers:
                self.trackers.close()
            again = f"`{self.resume_command}`" if self.resume_command else "the same command"
            where = f"checkpoint {latest}" if latest else "nothing (checkpoint.enabled=false)"
            console.result(f"stopped by {stop.name} after step {self.step} of {self.total_steps}; saved {where}.\n"
                           f"to resume, run {again} again: checkpoint.resume=auto continues from checkpoints/LATEST")
        return TrainResult(self.run_dir, None, self.step, self.last_train_loss, None, None, self.tokens_seen,
                           elapsed, stopped_by=stop.name, exit_code=stop.exit_code, checkpoint=latest)

    def _save_final(self, elapsed: float, weights: dict[str, torch.Tensor] | None) -> Path:
        final = final_artifact.save_final(self.run_dir, self.model, self.tokenizer, self._manifest(elapsed),
                                          lora=self.lora, saved_dtype=self.precision.saved, pad_id=self.pad_id,
                                          state_dict=weights)
        plot_losses(self.run_dir)
        if self.trackers:
            self.trackers.close()
        return final

    def _manifest(self, elapsed: float) -> dict[str, Any]:
        metrics = {
            "train_loss": self.last_train_loss,
            "val_loss": self.last_val and self.last_val["loss"],
            "val_token_accuracy": self.last_val and self.last_val["token_accuracy"],
            "steps": self.step, "tokens": self.tokens_seen, "elapsed_s": round(elapsed, 3),
            "peak_mem_mb": round(self._peak_memory() / MB, 1),
            "memory_estimate_mb": round(self.estimate.total / MB, 1) if self.estimate else None,
            "device": self.device.type,
            "padding_free": self.padding_free,
            "attention": attention.implementation(self.model),
            "attention_kernels": attention.kernel_use_of(self.model),
            "loss_head": "chunked" if self.loss_head else "logits",
            "precision": self.precision.to_json(),
            "activation_checkpointing": self.recompute or "off",
            **self.world.record(self.strategy),
        }
        if self.world.distributed:  # the peak above is rank 0's; under FSDP2 rank 0 alone held the whole model
            metrics["peak_mem_mb_by_rank"] = [round(peak / MB, 1) for peak in self.peaks_by_rank]
        if self.scaler.is_enabled():
            metrics.update(loss_scaling=True, skipped_steps=self.skipped_steps)
        if self.resumes:
            metrics["resumes"] = self.resumes
        return final_artifact.run_manifest(self.cfg, self.model, self.tokenizer, metrics, self.train_data,
                                           self.val_data, self.resolved_config)

    def _print_done(self, result: TrainResult) -> None:
        if self.is_main:
            console.result(done_line(result, self._peak_memory(), self.estimate.total if self.estimate else None,
                                     self.lora))
