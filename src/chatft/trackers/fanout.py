"""Rank 0's trackers, as the one writer the trainer calls for every step and validation; and the same trackers
for a run that is not a training loop (an eval), which records its results once.

The trainer writes each row through `trainer.trackers` (`log(prefix, row)`, and `close()` after its last row);
`attached_to` puts a `Trackers` there on rank 0 that passes each call on to every tracker that is on. The runs end
when training returns, so the final artifact's path and how the run ended (finished, stopped by a signal, failed)
reach them. A training run resumed from one of its own checkpoints continues its tracker runs (`continuation`).

A tracker is an observer: any exception it raises (network, disk, a closed run) is reported once as a warning,
that tracker is left behind for the rest of the run, and training goes on. It is not closed after a failure,
since the close would meet the same fault (an MLflow client retries a dead server for minutes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chatft import console
from chatft.config.secrets import redact
from chatft.run_layout import TENSORBOARD_DIR
from chatft.trackers import choice, continuation
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
                console.warning(f"{tracker.name} failed {what} ({first_line(exc)}); it records nothing more of this "
                                "run, training goes on")

    def start(self, config: dict[str, Any]) -> None:
        self._each("to start", lambda tracker: tracker.start(config))
        for tracker in self.live:
            console.info(f"tracking: {tracker.name}, {tracker.where()}")

    def log(self, prefix: str, row: dict[str, Any]) -> None:
        self._each(f"at step {row['step']}", lambda tracker: tracker.log(prefix, row))

    def close(self) -> None:
        """The trainer's last row is written; the runs end in `finish`, once the artifact is known."""

    def finish(self, result: Any) -> None:
        """End the runs with a `TrainResult`: its final artifact (an absolute path: the trackers are read
        elsewhere), FINISHED, or KILLED when a signal stopped it."""
        final = Path(result.final_dir).resolve() if result.final_dir is not None else None
        self.end(final, "KILLED" if result.stopped_by else "FINISHED")

    def end(self, artifact: Path | None, status: str) -> None:
        if artifact is not None:
            self._each("to record the final artifact", lambda tracker: tracker.artifact(artifact))
        self._each("to close its run", lambda tracker: tracker.close(status))
        self.ended = True


def open_trackers(cfg: choice.TrackedConfig, run_dir: Path, resumed_at: int | None = None) -> Trackers:
    """The trackers `cfg` turns on, after one info line for each tracker section that resolves to off. With
    `resumed_at` (training resumed from its own checkpoint at that step) they continue the earlier attempt's
    runs where `continuation` kept them."""
    for line in choice.off_lines(cfg):
        console.info(line)
    kept = continuation.stored(run_dir) if resumed_at is not None else {}
    trackers: list[Tracker] = []
    for name in choice.trackers_on(cfg):
        if name == "tensorboard":
            trackers.append(TensorBoard(run_dir / TENSORBOARD_DIR, resumed_at))
        elif name == "wandb":
            project = choice.wandb_project(cfg)
            earlier = kept.get("wandb") or {}
            reopen = earlier.get("id") if earlier.get("project") == project else None
            trackers.append(WandbRun(cfg.wandb, project, run_dir, reopen))
        else:
            uri = choice.mlflow_tracking_uri(cfg)
            earlier = kept.get("mlflow") or {}
            wanted = getattr(cfg.mlflow, "resume", False) and earlier.get("tracking_uri") == uri
            trackers.append(MlflowRun(cfg.mlflow, uri, run_dir, earlier.get("run_id") if wanted else None, resumed_at))
    return Trackers(trackers)


@contextlib.contextmanager
def attached_to(trainer: Any, cfg: choice.TrackedConfig, run_dir: Path, *, main: bool) -> Iterator[Trackers]:
    """Rank 0's trackers, started with the resolved config (secrets masked) and set as the trainer's writer for
    the duration; other ranks get an empty set. A trainer set up from a checkpoint of `run_dir` continues the
    tracker runs of the attempt that saved it. Call `finish` with the result; a run that raises instead ends
    its tracker runs as FAILED."""
    if not main:
        yield Trackers([])
        return
    resumed_at = continuation.resumed_step(trainer, run_dir)
    trackers = open_trackers(cfg, run_dir, resumed_at)
    trackers.start(redact(trainer.resolved_config))
    continuation.remember(run_dir, trackers.live, resumed=resumed_at is not None)
    trainer.trackers = trackers
    try:
        yield trackers
    except BaseException:
        if not trackers.ended:
            trackers.end(None, "FAILED")
        raise
    if not trackers.ended:  # the caller had no result to give
        trackers.end(None, "FINISHED")


def record_once(cfg: choice.TrackedConfig, run_dir: Path, config: dict[str, Any],
                rows: list[tuple[str, dict[str, Any]]], artifact: Path, status: str = "FINISHED") -> None:
    """A run that is not a training loop (an eval): one tracker run each, holding the config (secrets already
    masked), `rows` (each `(prefix, row)`, logged at the row's step) and `artifact`, ended with `status`.
    Nothing is remembered for a later resume."""
    trackers = open_trackers(cfg, run_dir)
    trackers.start(config)
    for prefix, row in rows:
        trackers._each(f"to record {prefix}", lambda tracker, prefix=prefix, row=row: tracker.log(prefix, row))
    trackers.end(artifact, status)
