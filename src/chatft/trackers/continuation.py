"""Continuing a training run's tracker runs when it resumes from one of its own checkpoints.

`<run>/trackers.json` keeps what reopens each tracker run (the W&B run id and project, the MLflow run id and
tracking URI), written on rank 0 once the runs have started. A run that resumes from a checkpoint inside its own
`checkpoints/` reopens them, where the project or tracking URI is still the same (and, for MLflow,
`mlflow.resume` is true, AutoModel's default). TensorBoard needs no id: it writes to the same folder, and the
points the interrupted attempt logged after the checkpoint's step are dropped by TensorBoard's reader (the
writer's `purge_step`). A fresh start, or a resume from another run dir's checkpoint (a fork), starts new tracker
runs and rewrites the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatft.run_layout import TRACKERS_FILE, checkpoints_dir


def resumed_step(trainer: Any, run_dir: Path) -> int | None:
    """The step a trainer resumed at, when it resumed from a checkpoint of `run_dir` itself; else None."""
    resumed_from = getattr(trainer, "resumed_from", None)
    if resumed_from is None:
        return None
    if checkpoints_dir(run_dir).resolve() not in Path(resumed_from).resolve().parents:
        return None  # a fork of another run: its tracker runs are that run's
    return int(trainer.step)


def stored(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The identities kept by the run's earlier attempt ({} when there are none or the file is unreadable)."""
    try:
        kept = json.loads((run_dir / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def remember(run_dir: Path, trackers: list[Any], *, resumed: bool) -> None:
    """Keep the started runs' identities. A resumed attempt keeps what it did not reopen (a tracker switched off
    for this attempt can still be continued by the next); a fresh start keeps only its own."""
    kept = stored(run_dir) if resumed else {}
    for tracker in trackers:
        identity = tracker.identity()
        if identity is not None:
            kept[tracker.name] = identity
    path = run_dir / TRACKERS_FILE
    if kept:
        path.write_text(json.dumps(kept, indent=2) + "\n", encoding="utf-8")
    else:
        path.unlink(missing_ok=True)
