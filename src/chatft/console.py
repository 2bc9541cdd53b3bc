"""What chatft prints for the person or the script that runs it, in the form the command line asked for.

- text (the default): information and results on stdout, warnings on stderr; work that takes time (preparing and
  tokenizing rows, training, validation, eval, merge) shows a progress bar with its rate and ETA on a terminal
  (rich), and a plain line at every tenth of the work (at most one a second) when stdout is not a terminal, so CI
  logs stay readable: for work of many items, or once work of a few slow items (validation batches, model
  forwards) has run a second;
- `--quiet`: warnings, errors and results only (where the artifact is, the final numbers), no progress;
- `--log-format json`: one JSON object per line, `{"event": ..., ...}`, on the stream the text would take:
  `info`, `result` (stdout) and `warning` (stderr), each with its `message`; `progress` (`task`, `done`,
  `total`, `unit`, `rate`, `eta_s`) at the plain lines' cadence, and one at the end of every piece of work
  whatever its size, so a script sees each stage with its size and rate; `step` (a metrics.jsonl row) and
  `validation` (a validation.jsonl row) on stdout; an error is one `{"event": "error", "id", "message", "hint"}`
  line on stderr, exit status 2 as always.

The CLI chooses once (`configure`); the choice travels in the environment (`CHATFT_LOG_FORMAT`, `CHATFT_QUIET`),
so the training processes torchrun starts answer in the same form. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

FORMAT_ENV = "CHATFT_LOG_FORMAT"
QUIET_ENV = "CHATFT_QUIET"
FORMATS = ("text", "json")
PLAIN_EVERY_S = 1.0  # plain progress lines: at most one a second, at each tenth of the work
PLAIN_MIN_ITEMS = 200  # below this, plain lines only once the work has run PLAIN_EVERY_S (its items are slow)
PLAIN_UNKNOWN_EVERY_S = 5.0  # work of unknown size (rows streamed from a file): a line every 5 seconds
T = TypeVar("T")


def configure(log_format: str = "text", quiet: bool = False) -> None:
    os.environ[FORMAT_ENV] = log_format
    os.environ[QUIET_ENV] = "1" if quiet else "0"


def json_lines() -> bool:
    return os.environ.get(FORMAT_ENV) == "json"


def quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def shows_bars(stream: Any = None) -> bool:
    """Whether progress is drawn as bars that redraw in place (rich, or a library's own): on a terminal only, and
    neither with --quiet nor in JSON lines. Elsewhere a redrawn bar is a run of carriage returns in a log."""
    return (stream or sys.stdout).isatty() and not quiet() and not json_lines()


def _emit(event: str, fields: dict[str, Any], stream: Any = None) -> None:
    print(json.dumps({"event": event, **fields}, default=str), file=stream or sys.stdout, flush=True)


def info(line: str, stream: Any = None) -> None:
    """A line of information: what is loaded, how the run is set up, what happened along the way. `stream`:
    stderr where stdout carries the command's own output (data loading under `preview --json`)."""
    if json_lines():
        _emit("info", {"message": line}, stream)
    elif not quiet():
        print(line, file=stream or sys.stdout, flush=True)


def warning(line: str) -> None:
    """Something the user should know and may act on; shown even with --quiet."""
    if json_lines():
        _emit("warning", {"message": line}, sys.stderr)
    else:
        print(f"warning: {line}", file=sys.stderr, flush=True)


def result(line: str) -> None:
    """What a command produced: where the artifact is, its final numbers; shown even with --quiet."""
    if json_lines():
        _emit("result", {"message": line})
    else:
        print(line, flush=True)


def event(name: str, **fields: Any) -> None:
    """A record for scripts (a training step, a validation): printed only as JSON lines."""
    if json_lines():
        _emit(name, fields)


def error(err: Any) -> None:
    """A `ChatftError` as its error block, or as its JSON line; on stderr."""
    if json_lines():
        _emit("error", {"id": err.id, "message": err.message, "hint": err.hint}, sys.stderr)
    else:
        print(err.render(), file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A unit of work of `total` items (`unit`): `advance(n)` as items are done, or `each(items)`. Used as a
    context manager. `stream`: where its lines go (stderr where stdout carries a command's output, e.g.
    `preview --json`). `show=False`: count, show nothing (a step's own `show_progress=false`). `pausing`: a rich
    live display already drawn on this terminal (the training bar), stopped while this bar is drawn and drawn again
    at `close`: rich draws one live display at a time (older versions raise LiveError for a second one)."""

    def __init__(self, task: str, total: int | None, unit: str = "rows", *, stream: Any = None, show: bool = True,
                 pausing: Any = None) -> None:
        self.task, self.total, self.unit = task, total, unit
        self.done, self.began = 0, time.monotonic()
        self._next_tenth, self._last_line = 1, 0.0
        self._lines = show and not quiet()  # plain lines or JSON events, where no bar is drawn
        self.bar: Any = None
        self._paused: Any = None
        drawn = show and shows_bars(stream)
        if drawn and pausing is not None and pausing.live.is_started:
            pausing.stop()  # first: a live display stands in for sys.stdout until it stops
            self._paused = pausing
        self.stream = stream or sys.stdout
        if drawn:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn)

            # On its own stream: rich's default console is stdout, which may be a pipe (`preview --json | jq`).
            self.bar = RichProgress(TextColumn(task), MofNCompleteColumn(), BarColumn(), TextColumn(unit),
                                    TextColumn("{task.fields[rate]}"), TextColumn("eta"), TimeRemainingColumn(),
                                    transient=True, console=Console(file=self.stream))
            self._bar_task = self.bar.add_task(task, total=total, rate="")
            self.bar.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(finished=kind is None)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.began
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.total or not self.done:
            return None
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """The items, each counted once the caller is done with it (asks for the next one, or stops)."""
        for item in items:
            yield item
            self.advance()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(self._bar_task, completed=self.done, rate=f"{self.rate:,.0f}/s")
            return
        if not self._lines:
            return
        now = time.monotonic()
        if self.total is None:
            if now - max(self._last_line, self.began) >= PLAIN_UNKNOWN_EVERY_S:
                self._last_line = now
                self._line()
            return
        if not self._worth_lines(now):
            return
        tenth = math.floor(10 * self.done / self.total)
        if tenth >= self._next_tenth and (now - self._last_line >= PLAIN_EVERY_S or self.done >= self.total):
            self._next_tenth, self._last_line = tenth + 1, now
            self._line()

    def _worth_lines(self, now: float) -> bool:
        """Many items, or items slow enough that the work has run a second: a few validation batches of a large
        model take minutes. Small fast work is done before a line would say anything."""
        return self.total is not None and (self.total >= PLAIN_MIN_ITEMS or now - self.began >= PLAIN_EVERY_S)

    def _line(self) -> None:
        eta = self.eta_s
        if json_lines():
            _emit("progress", {"task": self.task, "done": self.done, "total": self.total, "unit": self.unit,
                               "rate": round(self.rate, 3), "eta_s": None if eta is None else round(eta, 1)},
                  self.stream)
            return
        of = f"/{self.total:,}" if self.total else ""
        print(f"{self.task}: {self.done:,}{of} {self.unit} ({self.rate:,.0f}/s"
              + (f", eta {format_duration(eta)}" if eta is not None and self.done < (self.total or 0) else "")
              + ")", file=self.stream, flush=True)

    def close(self, finished: bool = True) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
            if self._paused is not None:
                self._paused.start()
                self._paused = None
        elif (finished and self._lines and self.done and self._next_tenth <= 10
              and (json_lines() or self._worth_lines(time.monotonic()))):
            self._line()  # the last line, when the tenths above did not reach it (a fast finish); in JSON always
