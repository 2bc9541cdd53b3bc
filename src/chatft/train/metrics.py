"""What a run records and shows while it trains.

In: one dict per optimizer step and per validation. Out: `metrics.jsonl` and `validation.jsonl` (one JSON
object per line), `loss.png` (training and validation loss), and the progress display: a rich progress bar on a
terminal, plain lines otherwise. Only rank 0 does any of this. TensorBoard, W&B and MLflow are `chatft.trackers`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from chatft import console
from chatft.console import format_duration
from chatft.run_layout import METRICS_FILE, PLOT_FILE, VALIDATION_FILE

MB = 1024 * 1024


class JsonlLog:
    """An append-only JSON-lines file of rows keyed by `step`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run repeats them from its checkpoint)."""
        if self.path.is_file():
            kept = [row for row in self.rows() if row.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def plot_losses(run_dir: Path) -> Path | None:
    """`loss.png`: training loss per step and, when present, validation loss."""
    train = JsonlLog(run_dir / METRICS_FILE).rows()
    val = JsonlLog(run_dir / VALIDATION_FILE).rows()
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1)
    if val:
        axes.plot([r["step"] for r in val], [r["loss"] for r in val], label="validation", marker="o")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean per supervised token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = run_dir / PLOT_FILE
    figure.savefig(path)
    plt.close(figure)
    return path


class ProgressDisplay:
    """Training's progress in the form the command line asked for (`chatft.console`): a rich bar (step, loss, lr,
    tokens/s, ETA) on a terminal, plain lines otherwise, each row as a `step` event in JSON lines, nothing with
    --quiet."""

    def __init__(self, total_steps: int, start_step: int, *, stream=None) -> None:
        self.total, self.start = total_steps, start_step
        self.stream = stream or sys.stdout
        self.began = time.monotonic()
        self.every = max(1, total_steps // 20)
        self.bar = None
        if console.shows_bars(self.stream):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                TextColumn("{task.fields[info]}"), TextColumn("eta"), TimeRemainingColumn(),
                                transient=False)
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def eta(self, step: int) -> float:
        done = step - self.start
        return (time.monotonic() - self.began) / done * (self.total - step) if done > 0 else 0.0

    def update(self, row: dict[str, Any]) -> None:
        console.event("step", **row)
        info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], info=info)
            return
        step = row["step"]
        if console.json_lines() or console.quiet():
            return
        if step == self.start + 1 or step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {info}  eta {format_duration(self.eta(step))}", file=self.stream,
                  flush=True)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            console.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def done_line(result: Any, peak_bytes: int, estimate_bytes: int | None, lora: bool) -> str:
    """The end of a run in two lines: steps, time, tokens, losses, peak memory against the estimate, the artifact."""
    rate = result.tokens / result.elapsed_s if result.elapsed_s > 0 else 0.0
    estimate = f" (estimate {estimate_bytes / MB:,.0f} MB)" if estimate_bytes else ""
    losses = f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "no steps"
    if result.val_loss is not None:
        losses += f", validation loss {result.val_loss:.4f}"
    kind = "checkpoint_lora (PEFT adapter)" if lora else "checkpoint_hf (save_pretrained dir)"
    return (f"done: {result.steps} steps in {format_duration(result.elapsed_s)}, {result.tokens:,} tokens "
            f"({rate:,.0f} tokens/s), {losses}, peak memory {peak_bytes / MB:,.0f} MB{estimate}\n"
            f"artifact: {result.final_dir} [{kind}]")
