"""`ctx.stream(text)` inside a task process: output batched into "stream" messages.

Owns the batching: text is buffered and sent as one message when 4 KiB have gathered or
20 ms after the first unsent piece (a daemon thread, started on the first call, flushes
what a pause would otherwise hold back), so a model streaming 50,000 tokens a second
sends about 50 messages a second per task instead of 50,000. Every message of the task
that goes through here (progress, heartbeat) is written under one lock, so the flusher
thread never interleaves its line with the handler's. It never touches the database.
"""

from __future__ import annotations

import _thread
import time

FLUSH_BYTES = 4096     # send once this much text is waiting
FLUSH_S = 0.02         # or once the oldest waiting piece is this old
MAX_MESSAGE_CHARS = 16384  # one message's text at most (the wire has a line limit)


class OutputStream:
    """Batches ctx.stream() text onto a reporter (anything with `send(kind, **fields)`)."""

    def __init__(self, reporter, kind: str = "stream"):
        self._reporter = reporter
        self._kind = kind
        # _thread's lock, and threading imported only with the flusher thread: a fork
        # server that imports threading makes each task process dirty ~0.25 MiB more (its
        # after-fork hook), and this module is preloaded with workers.handlers.llm.
        self._lock = _thread.allocate_lock()
        self._parts: list[str] = []
        self._size = 0
        self._first_mono = 0.0
        self._wake = None      # threading.Event, with the thread
        self._closed = False
        self._thread = None    # threading.Thread, started by the first write that waits

    def write(self, text: str, flush: bool = False) -> None:
        """Buffer `text`; with `flush`, send it (and what waits) now, and start no thread:
        for a caller that batches itself (llm.chat through the relay: one piece per read).
        The flusher thread costs a task process about 1 MiB (its stack and malloc arena)."""
        if not text:
            return
        with self._lock:
            if self._closed:
                raise ValueError("ctx.stream() after the handler returned")
            if not self._parts:
                self._first_mono = time.monotonic()
            self._parts.append(text)
            self._size += len(text)
            if flush or self._size >= FLUSH_BYTES:
                self._flush_locked()
                return
        if self._thread is None:
            import threading
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._run, name="taskvisor-stream",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def send(self, kind: str, **fields) -> None:
        """Send another message after what is buffered, in order."""
        with self._lock:
            self._flush_locked()
            self._reporter.send(kind, **fields)

    def request(self, kind: str, **fields) -> None:
        """A request (it waits for the supervisor's answer) after what is buffered; the
        flusher thread waits meanwhile."""
        with self._lock:
            self._flush_locked()
            self._reporter.request(kind, **fields)

    def write_lines(self, data: bytes) -> None:
        """Whole report lines made elsewhere (the model-call relay's), after what is
        buffered, in order."""
        with self._lock:
            self._flush_locked()
            self._reporter.write(data)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        """Flush and stop; called once the handler returned, before its outcome is sent."""
        with self._lock:
            self._flush_locked()
            self._closed = True
        if self._wake is not None:
            self._wake.set()

    def _flush_locked(self) -> None:
        if not self._parts:
            return
        text, self._parts, self._size = "".join(self._parts), [], 0
        for i in range(0, len(text), MAX_MESSAGE_CHARS):
            self._reporter.send(self._kind, text=text[i:i + MAX_MESSAGE_CHARS])

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._parts or self._closed:
                        break
                    due = self._first_mono + FLUSH_S - time.monotonic()
                    if due <= 0:
                        self._flush_locked()
                        break
                time.sleep(due)
