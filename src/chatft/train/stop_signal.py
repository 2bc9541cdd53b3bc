"""SIGTERM and SIGINT during training: finish the step, save a checkpoint, exit with the signal's status.

In: the training loop's `while` (it checks `StopFlag.signum`). Out: the flag set by the first signal (a second gets
the default behaviour) and `exit_code`, 128 + the signal's number, as a shell reports a killed process.
"""

from __future__ import annotations

import contextlib
import signal
import threading

# Exit status of a run stopped by a signal: 128 + signal number (130 SIGINT, 143 SIGTERM), as a shell
# reports a killed process, so wrappers never mistake a stopped run for a finished one.
SIGNAL_EXIT_BASE = 128


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes its step, saves a checkpoint and returns.
    A second signal gets the default behaviour (the atomic save keeps LATEST sound even then)."""

    def __init__(self, *, repeat_is_default: bool = True) -> None:
        self.signum: int | None = None
        # Under a launcher a signal may arrive twice (the terminal's Ctrl-C reaches every process, and the
        # launcher forwards its own): there the second one is ignored too, so the checkpoint is still saved.
        self.repeat_is_default = repeat_is_default

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, signum: int) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self, note):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, _frame):
            first = self.signum is None
            self.request(signum)
            if self.repeat_is_default:
                signal.signal(signum, previous[signum])
            elif not first:
                return
            note(f"received {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint")

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT_BASE + (self.signum or 0)
