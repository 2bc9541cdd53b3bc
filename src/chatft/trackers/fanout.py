"""Rank 0's trackers, as the one writer the trainer calls for every step and validation.

The trainer writes each row through `trainer.trackers` (`log(prefix, row)`, and `close()` after its last row);
`attached_to` puts a `Trackers` there on rank 0 that passes each call on to every tracker that is on. The runs end when training returns, so the final artifact's
path and how the run ended (finished, stopped by a signal, failed) reach them.

A tracker is an observer: any exception it raises (network, disk, a closed run) is reported once as a warning,
that tracker is left behind for the rest of the run, and training goes on. It is not closed after a failure,
since the close would meet the same fault (an MLflow client retries a dead server for minutes).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chatft.config.schema import TrainingConfig
from chatft.config.secrets import redact
from chatft.run_layout import TENSORBOARD_DIR
from chatft.trackers import choice
from chatft.trackers.base import Tracker
from chatft.trackers.mlflow_run import MlflowRun
from chatft.trackers.tensorboard_writer import TensorBoard
from chatft.trackers.wandb_run import WandbRun


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Trackers:
    """Every call goes to each live tracker; one that raises is reported once and dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.live = list(trackers)
        self.ended = False

    def _each(self, what: str, call: Callable[[Tracker], Any]) -> None:
        for tracker in list(self.live):
            try:
                call(tracker)
            except Exception as exc:  # an observer never stops training
                self.live.remove(tracker)
                print(f"warning: {tracker.name} failed {what} ({first_line(exc)}); it records nothing more of this "
                      "run, training goes on", file=sys.stderr, flush=True)

    def start(self, config: dict[str, Any]) -> None:
        self._each("to start", lambda tracker: tracker.start(config))
        for tracker in self.live:
            print(f"tracking: {tracker.name}, {tracker.where()}", flush=True)

    def log(self, prefix: str, row: dict[str, Any]) -> None:
        self._each(f"at step {row['step']}", lambda tracker: tracker.log(prefix, row))

    def close(self) -> None:
        """The trainer's last row is written; the runs end in `finish`, once the artifact is known."""

    def finish(self, result: Any) -> None:
        """End the runs with a `TrainResult`: its final artifact (an absolute path: the trackers are read
        elsewhere), FINISHED, or KILLED when a signal stopped it."""
        final = Path(result.final_dir).resolve() if result.final_dir is not None else None
        self._end(final, "KILLED" if result.stopped_by else "FINISHED")

    def _end(self, final_dir: Path | None, status: str) -> None:
        if final_dir is not None:
            self._each("to record the final artifact", lambda tracker: tracker.artifact(final_dir))
        self._each("to close its run", lambda tracker: tracker.close(status))
        self.ended = True


def open_trackers(cfg: TrainingConfig, run_dir: Path) -> Trackers:
    """The trackers `cfg` turns on, after one info line for each tracker section that resolves to off."""
    for line in choice.off_lines(cfg):
        print(line, flush=True)
    trackers: list[Tracker] = []
    for name in choice.trackers_on(cfg):
        if name == "tensorboard":
            trackers.append(TensorBoard(run_dir / TENSORBOARD_DIR))
        elif name == "wandb":
            trackers.append(WandbRun(cfg.wandb, choice.wandb_project(cfg), run_dir))
        else:
            trackers.append(MlflowRun(cfg.mlflow, choice.mlflow_tracking_uri(cfg), run_dir))
    return Trackers(trackers)


@contextlib.contextmanager
def attached_to(trainer: Any, cfg: TrainingConfig, run_dir: Path, *, main: bool) -> Iterator[Trackers]:
    """Rank 0's trackers, started with the resolved config (secrets masked) and set as the trainer's writer for
    the duration; other ranks get an empty set. Call `finish` with the result; a run that raises instead ends
    its tracker runs as FAILED."""
    if not main:
        yield Trackers([])
        return
    trackers = open_trackers(cfg, run_dir)
    trackers.start(redact(trainer.resolved_config))
    trainer.trackers = trackers
    try:
        yield trackers
    except BaseException:
        if not trackers.ended:
            trackers._end(None, "FAILED")
        raise
    if not trackers.ended:  # the caller had no result to give
        trackers._end(None, "FINISHED")
