"""Signal handling for the supervisor: handlers only record, the loop acts.

Owns installing the handlers, the self-pipe given to `signal.set_wakeup_fd` (so a signal
wakes the loop's selector at once), and `drain()`, which hands the loop the signals
received since the last call. A handler here must never log, raise, reap or touch the
database (gunicorn #3198).
"""

from __future__ import annotations

import os
import signal

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)


class Signals:
    """Installed once, in the main thread, by the supervisor loop."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._previous = {}
        # The loop's selector said the pipe is readable (set_readable): `drain` reads it
        # only then, so a pass with no signal makes no read (whose EAGAIN raised and
        # caught an exception in every pass). True at first: one read before the loop's
        # first wait catches a signal received during start-up.
        self.readable = True

    def install(self) -> None:
        self._previous_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, _record)

    def fileno(self) -> int:
        return self.read_fd

    def set_readable(self) -> None:
        self.readable = True

    def drain(self) -> list[int]:
        """Signal numbers received since the last drain, in order (duplicates kept); []
        without a read unless the selector reported the pipe readable since then."""
        if not self.readable:
            return []
        self.readable = False
        out = []
        while True:
            try:
                data = os.read(self.read_fd, 512)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            out.extend(data)
        return out

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.close(self.read_fd)
        os.close(self.write_fd)


def _record(signum, frame) -> None:
    """Nothing: the C-level handler already wrote the signal number to the wakeup fd."""
