"""Saving and restoring a run's position: the part of `Trainer` that writes a resumable checkpoint and takes a
run up again from one.

In (read from the trainer): the config, model, optimizer, world and strategy, the data position (step, epoch,
step in epoch), the counters (tokens seen, elapsed, skipped steps), the schedule and the loss scaler. Out:
`checkpoints/step_N/` (`checkpoints`: its layouts and crash safety), and on resume the same attributes set
back, with each safe setting change recorded (`resume_check`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from chatft.train import checkpoints, resume_check


class Resumable:
    """Mixed into `Trainer`: `_save_checkpoint` (a collective: every process takes part) and `_resume`."""

    def _save_checkpoint(self, started: float) -> Path | None:
        """Every process calls this: under FSDP2 each writes its own shards; otherwise rank 0 writes the state
        (replicated on every process) and the others wait until it is complete."""
        if not self.cfg.checkpoint.enabled:
            return None
        return checkpoints.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                                           self._checkpoint_state(started), self.cfg.checkpoint.keep_last,
                                           world=self.world, sharded=self.sharded is not None)

    def _checkpoint_state(self, started: float) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_before + time.monotonic() - started, "train_loss": self.last_train_loss,
            "global_batch_size": self.cfg.step_scheduler.global_batch_size, "seed": self.cfg.seed,
            "train_rows": len(self.lengths), "kind": "lora" if self.lora else "full",
            "strategy": self.strategy,
            "schedule": self.schedule.to_json(),
            "grad_scaler": self.scaler.state_dict(),  # {} unless float16
            "skipped_steps": self.skipped_steps,
            # what `resume_check` compares a later resume against, and the safe changes made so far
            "config": self.cfg.model_dump(mode="json"), "data_sha256": self.train_data.report.sha256,
            "resumes": self.resumes,
        }

    def _resume(self, path: Path | None) -> None:
        self.resumed_from = path
        self.resumes: list[dict[str, Any]] = []  # each resume: its step, checkpoint and safe setting changes
        if path is None:
            if self.is_main:  # a fresh start: logs of an earlier attempt that never checkpointed are stale
                self.metrics.truncate_after(0)
                self.validation_log.truncate_after(0)
            return
        state = checkpoints.load_checkpoint(path, self.model, self.optimizer, self.device, rank=self.rank,
                                            sharded=self.sharded is not None)
        resume_check.check_data_position(state, str(path), global_batch_size=self.cfg.step_scheduler.global_batch_size,
                                         seed=self.cfg.seed, train_rows=len(self.lengths),
                                         kind="lora" if self.lora else "full")
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.tokens_seen, self.elapsed_before = state["tokens_seen"], state["elapsed_s"]
        self.last_train_loss = state.get("train_loss")
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
            self._loss_scale = self.scaler.get_scale()
        self.skipped_steps = state.get("skipped_steps", 0)
        changes = resume_check.check_resume(self.cfg, state, str(path), self.train_data.report.sha256)
        self.resumes = [*state.get("resumes", []), {
            "step": self.step, "from": str(path), "world_size": self.world_size,
            "changed": {key: [old, new] for key, (old, new) in changes.items()}}]
        if changes:
            listing = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
            self.notes.append(f"resumed with changed settings (recorded in the manifest): {listing}")
        if state.get("world_size", 1) != self.world_size:
            self.notes.append(f"resumed on {self.world_size} processes from a checkpoint written by "
                              f"{state.get('world_size', 1)} ({state.get('strategy', 'single')})")
        if self.is_main:  # rows logged after the checkpoint are repeated now
            self.metrics.truncate_after(self.step)
            self.validation_log.truncate_after(self.step)
