"""Fan-out of the event log to Server-Sent Events clients (`GET /api/events`).

Owns the pump thread, which reads new rows of the event log through its own connection
(never the loop's) and keeps the recent ones, formatted once, in memory; the
subscriptions of SSE clients, each on its HTTP thread, which take from that memory (or
read the log for a Last-Event-ID older than it) and filter by task, type and workflow;
switching the event triggers on while anyone subscribes and off once nobody did for
`events_retention`; and pruning the log after that retention. The pump wakes on `poke()`
(the loop calls it after each commit) and polls `PRAGMA data_version` every few
milliseconds while clients are connected, so commits of other processes arrive too.
It never writes task state and never touches live loop objects.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.errors import StoreError
from supervisor.store import events

log = logging.getLogger("taskvisor.http")
POLL_S = 0.005          # data_version poll while clients are connected
HOUSEKEEP_S = 5.0       # prune, refresh subscribed_at, switch the log off
RING = 20000            # recent events kept in memory
READ_BATCH = 5000
KEEPALIVE_S = 15.0
MAX_BACKLOG = 8 << 20   # bytes a client may leave unread before it is dropped


@dataclass(frozen=True)
class Frame:
    id: int
    kind: str
    task_id: str
    type: str
    workflow: str | None
    data: bytes          # the whole SSE frame


def frame(ev: events.Event) -> Frame:
    text = f"id: {ev.id}\nevent: {ev.kind}\ndata: {ev.data}\n\n"
    return Frame(ev.id, ev.kind, ev.task_id, ev.type, ev.workflow, text.encode("utf-8"))


@dataclass(frozen=True)
class Filter:
    task: str | None = None
    type: str | None = None
    workflow: str | None = None

    def __call__(self, f: Frame) -> bool:
        return ((self.task is None or f.task_id == self.task)
                and (self.type is None or f.type == self.type)
                and (self.workflow is None or f.workflow == self.workflow))


class Broadcast:
    """One per supervisor process. `open_store()` opens a Store for the pump's own use."""

    def __init__(self, open_store: Callable[[], object], retention_s: float, *,
                 clock=time.time, poll_s: float = POLL_S):
        self._open_store = open_store
        self.retention_s = retention_s
        self.clock = clock
        self.poll_s = poll_s
        self._store = None
        self._db_lock = threading.Lock()     # the pump's connection, one thread at a time
        self._cond = threading.Condition()
        self._ids: list[int] = []
        self._frames: list[Frame] = []
        self.last_id = 0                     # newest event read into memory
        self._poke = threading.Event()
        self._stopping = False
        self._subscribers = 0
        self._subscribed_at = 0.0            # last write of event_log.subscribed_at
        self._watermarks: list[tuple[float, int]] = []  # (time, newest id then)
        self._thread: threading.Thread | None = None
        self._live: set[Subscription] = set()     # attached clients, fed by the pump
        self._backlog: set[Subscription] = set()  # clients whose socket was full
        self.delivered = 0                   # frames written to clients (for benchmarks)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._pump, name="taskvisor-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._poke.set()
        with self._cond:
            for sub in list(self._live):
                self._drop(sub)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._db_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def poke(self) -> None:
        """Something was committed: read the log now (called from the loop's thread)."""
        if self._subscribers:
            self._poke.set()

    def _db(self):
        if self._store is None:
            self._store = self._open_store()
        return self._store

    # -- the pump ---------------------------------------------------------------------------

    def _pump(self) -> None:
        version = None
        next_housekeeping = 0.0
        while not self._stopping:
            self._poke.wait(self.poll_s if self._subscribers else HOUSEKEEP_S)
            self._poke.clear()
            if self._stopping:
                break
            try:
                if self._subscribers:
                    with self._db_lock:
                        latest = self._db().data_version()
                    if latest != version:
                        version = latest
                        self._read_new()
                if self._backlog:
                    with self._cond:
                        for sub in list(self._backlog):
                            self._flush(sub)
                mono = time.monotonic()
                if mono >= next_housekeeping:
                    next_housekeeping = mono + HOUSEKEEP_S
                    with self._cond:
                        self._keepalive()
                    self._housekeep(self.clock())
            except StoreError as exc:
                log.warning("events: reading the event log failed: %s", exc)
                time.sleep(0.5)
            except Exception:
                log.exception("events: the pump failed")
                time.sleep(0.5)

    def _read_new(self) -> None:
        while True:
            with self._db_lock:
                rows = events.read(self._db().conn, self.last_id, READ_BATCH)
            if not rows:
                return
            frames = [frame(r) for r in rows]
            with self._cond:
                self._ids.extend(f.id for f in frames)
                self._frames.extend(frames)
                self.last_id = frames[-1].id
                if len(self._ids) > 2 * RING:
                    del self._ids[:-RING], self._frames[:-RING]
                self._fan_out(frames)
            if len(rows) < READ_BATCH:
                return

    def _housekeep(self, now: float) -> None:
        with self._db_lock:
            conn = self._db().conn
            if self._subscribers and now - self._subscribed_at >= min(30.0, self.retention_s / 4):
                events.subscribe(conn, now)
                self._subscribed_at = now
            newest = events.newest_id(conn)
            self._watermarks.append((now, newest))
            cut = [w for w in self._watermarks if w[0] <= now - self.retention_s]
            if cut:
                events.prune(conn, cut[-1][1] + 1)
                self._watermarks = [w for w in self._watermarks if w[0] > now - self.retention_s]
            if not self._subscribers:
                events.disable_if_idle(conn, now, self.retention_s)

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(self, last_id: int | None, flt: Filter) -> "Subscription":
        """Start a client (on its HTTP thread): switch the log on, and start after
        `last_id` (None: from now)."""
        now = self.clock()
        with self._db_lock:
            conn = self._db().conn
            state = events.subscribe(conn, now)
            newest = events.newest_id(conn)
            oldest = events.oldest_id(conn)
        with self._cond:
            self._subscribers += 1
            self._subscribed_at = now
            if not self._ids:
                self.last_id = max(self.last_id, newest)
        self._poke.set()
        gap = None
        if last_id is None or last_id > newest:
            cursor = newest
        else:
            cursor = last_id
            if last_id < state.since_id or (oldest and last_id < oldest - 1):
                gap = {"after": last_id, "resumed_at": max(state.since_id, oldest - 1)}
        return Subscription(self, cursor, flt, gap)

    def attach(self, sub: "Subscription", sock) -> None:
        """Send what the client missed (on its HTTP thread, blocking), then hand its
        socket to the pump, which writes every later frame itself without blocking: one
        thread feeds every client, rather than one woken thread per client and event."""
        while not sub.closed:
            with self._cond:
                if self._stopping:
                    sub.close()
                    return
                if sub.cursor >= self.last_id:  # up to date: from now on the pump sends
                    sock.setblocking(False)
                    sub.sock = sock
                    self._live.add(sub)
                    return
                in_memory = bool(self._ids) and self._ids[0] <= sub.cursor + 1
                if in_memory:
                    i = bisect.bisect_right(self._ids, sub.cursor)
                    chosen = self._frames[i:]
            if not in_memory:  # older than what memory holds: read the log itself
                with self._db_lock:
                    chosen = [frame(r) for r in events.read(self._db().conn, sub.cursor,
                                                            READ_BATCH)]
                if not chosen:  # pruned meanwhile: nothing of it is left to send
                    with self._cond:
                        sub.cursor = max(sub.cursor, self._ids[0] - 1 if self._ids else self.last_id)
                    continue
            data = b"".join(f.data for f in chosen if sub.flt(f))
            if data:
                sock.sendall(data)
                self.delivered += data.count(b"\nid: ") + data.startswith(b"id: ")
            sub.cursor = chosen[-1].id

    def detach(self, sub: "Subscription") -> None:
        """The client's HTTP thread is done with it (any thread)."""
        with self._cond:
            self._drop(sub)

    def _fan_out(self, frames: list[Frame]) -> None:
        """New frames to every attached client (the pump's thread, lock held)."""
        for sub in list(self._live):
            data = b"".join(f.data for f in frames if sub.flt(f))
            sub.cursor = frames[-1].id
            if data:
                sub.out += data
                self._flush(sub)

    def _flush(self, sub: "Subscription") -> None:
        try:
            while sub.out:
                n = sub.sock.send(sub.out)
                self.delivered += sub.out.count(b"\nid: ", 0, n) + sub.out.startswith(b"id: ")
                del sub.out[:n]
            sub.written_mono = time.monotonic()
            self._backlog.discard(sub)
        except BlockingIOError:
            self._backlog.add(sub)
            if len(sub.out) > MAX_BACKLOG:  # not reading: drop it; it resumes by its id
                self._drop(sub)
        except OSError:
            self._drop(sub)

    def _drop(self, sub: "Subscription") -> None:
        self._live.discard(sub)
        self._backlog.discard(sub)
        sub.close()

    def _keepalive(self) -> None:
        """A comment to clients idle for KEEPALIVE_S: proxies keep the connection, and a
        client that went away is noticed (lock held)."""
        now = time.monotonic()
        for sub in list(self._live):
            if now - sub.written_mono >= KEEPALIVE_S and not sub.out:
                sub.out += b": keep-alive\n\n"
                self._flush(sub)

    def _release(self) -> None:
        with self._cond:
            self._subscribers -= 1


class Subscription:
    """One SSE client: its cursor, filter, and, once attached, its socket and the bytes
    not yet sent. `wait()` returns when the client is dropped or the server stops."""

    def __init__(self, hub: Broadcast, cursor: int, flt: Filter, gap: dict | None):
        self.hub = hub
        self.cursor = cursor
        self.flt = flt
        self.gap = gap
        self.sock = None
        self.out = bytearray()
        self.written_mono = time.monotonic()
        self.closed = False
        self._done = threading.Event()

    def first(self) -> bytes:
        """What to send right after the headers: the retry hint, and a `gap` event when
        some of what the client asked for is gone (pruned, or the log was off)."""
        out = b"retry: 1000\n\n"
        if self.gap is not None:
            out += f"event: gap\ndata: {json.dumps(self.gap)}\n\n".encode()
        return out

    def wait(self) -> None:
        self._done.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._done.set()
            self.hub._release()
