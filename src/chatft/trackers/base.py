"""What every tracker offers the fan-out (`fanout.Trackers`), and which values of a row it records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """One tracker run. Construction only stores settings; everything that touches a disk or a network is in
    the methods, which the fan-out calls under its guard."""

    name: str

    def start(self, config: dict[str, Any]) -> None:
        """Open the run and record the resolved config (secrets already masked)."""

    def where(self) -> str:
        """Where to look at the started run: a folder, a URL, a run id."""

    def log(self, prefix: str, row: dict[str, Any]) -> None:
        """Record a row's numbers at its `step`, named `<prefix>/<key>` (prefix: train, validation, or
        eval/<target> for an eval's results)."""

    def artifact(self, path: Path) -> None:
        """Record where the run's final artifact is."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, KILLED (stopped by a signal, resumable) or FAILED."""

    def identity(self) -> dict[str, Any] | None:
        """What reopens the started run when training resumes (`continuation`); None: nothing to reopen."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a row other than its step (flags count as 0/1; a missing value has no point)."""
    return {key: float(value) for key, value in row.items() if key != "step" and isinstance(value, (int, float))}
