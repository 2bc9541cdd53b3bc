"""TensorBoard: `train/*` and `validation/*` scalars at each optimizer step (an eval's `eval/<target>/*`), the
resolved config and the final artifact's path as text, in `<run>/tensorboard` (`tensorboard --logdir
RUN/tensorboard`).

A training run resumed at step N writes to the same folder with the writer's `purge_step` N + 1: TensorBoard's
reader then drops what the interrupted attempt logged after the checkpoint, so each step has the values of the
attempt that went on from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatft.trackers.base import scalars
from chatft.config.loader import to_yaml


def as_code_block(text: str) -> str:
    """TensorBoard renders text as Markdown: indented lines keep the YAML's layout."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoard:
    """A SummaryWriter opened on `log_dir` (the writer is imported only when TensorBoard is asked for)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, resumed_at: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.resumed_at = resumed_at
        purge_step = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.last_step = resumed_at or 0

    def start(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", as_code_block(to_yaml(config)), self.last_step)
        self.writer.flush()

    def where(self) -> str:
        return str(self.log_dir) + ("" if self.resumed_at is None else f", continued after step {self.resumed_at}")

    def log(self, prefix: str, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])
        self.last_step = row["step"]
        self.writer.flush()

    def artifact(self, path: Path) -> None:
        self.writer.add_text("final_artifact", str(path), self.last_step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()

    def identity(self) -> None:
        return None  # the folder is the run
