"""TensorBoard: `train/*` and `validation/*` scalars at each optimizer step, the resolved config and the final
artifact's path as text, in `<run>/tensorboard` (`tensorboard --logdir RUN/tensorboard`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatft.trackers.base import scalars


def as_code_block(text: str) -> str:
    """TensorBoard renders text as Markdown: indented lines keep the YAML's layout."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoard:
    """A SummaryWriter opened on `log_dir` (the writer is imported only when TensorBoard is asked for)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.last_step = 0

    def start(self, config: dict[str, Any]) -> None:
        from chatft.run import to_yaml

        self.writer.add_text("config", as_code_block(to_yaml(config)), 0)
        self.writer.flush()

    def where(self) -> str:
        return str(self.log_dir)

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
