"""Fan-out of the event log to Server-Sent Events clients (`GET /api/events`).

Owns the fan-out process (`python -m supervisor.broadcast`, one per supervisor with
HTTP) and the supervisor's handle on it (`Broadcast`). An HTTP thread answers the
request, switches the event log on, works out where the client resumes, and hands the
client's socket over (SCM_RIGHTS); from then on the fan-out process alone writes to it.
That process is single-threaded: it reads new rows of the event log through its own
connection, formats each once, keeps the recent ones in memory, and writes them to every
client whose filter wants them without blocking (a client that leaves 8 MiB unread is
dropped and resumes by its id). It wakes when the loop pokes it after a commit and
polls `PRAGMA data_version` every few ms while it has clients, so commits of other
processes arrive too; it spaces batches by what the last one cost (`WRITE_SHARE`). It
runs in a session of its own, for a CPU share apart from the task processes'. It keeps
the log switched on while it has clients, switches it off once it had none for
`events_retention`, and prunes events older than that.
A process, not a thread: 200 clients written from a thread of the supervisor made the
loop and the writer take turns on the GIL at every send (p50 175 ms); here the loop's
thread never waits for it. It never writes task state.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.errors import StoreError
from supervisor.store.events import Event

log = logging.getLogger("taskvisor.http")
POLL_S = 0.005          # data_version poll while clients are connected
# Writing a batch costs about 10 us of CPU per client (mostly the kernel's TCP send), and
# as much again in the clients to read it. After a batch that took C seconds of CPU the
# next one waits (1 / WRITE_SHARE - 1) * C: with 200 clients ~8 ms, fewer and larger
# batches that leave the CPU to the supervisor and the clients (p99 under load, see
# benchmarks/README.md); with a few clients the wait is microseconds.
WRITE_SHARE = 0.2
HOUSEKEEP_S = 5.0       # keep-alives, refresh subscribed_at, prune, switch the log off
RING = 20000            # recent events kept in memory
READ_BATCH = 5000
KEEPALIVE_S = 15.0
MAX_BACKLOG = 8 << 20   # bytes a client may leave unread before it is dropped
MAX_MESSAGE = 4096      # one hand-over message (JSON) on the control socket


@dataclass(frozen=True)
class Frame:
    id: int
    kind: str
    task_id: str
    type: str
    workflow: str | None
    data: bytes          # the whole SSE frame


def frame(ev: Event) -> Frame:
    text = f"id: {ev.id}\nevent: {ev.kind}\ndata: {ev.data}\n\n"
    return Frame(ev.id, ev.kind, ev.task_id, ev.type, ev.workflow, text.encode("utf-8"))


def gap_frame(after: int, resumed_at: int) -> bytes:
    """The `gap` event: events after `after` up to `resumed_at` are gone (pruned, or the
    log was off); the client refetches what it shows. It has no id: the client's own
    stays where it was."""
    data = json.dumps({"after": after, "resumed_at": resumed_at})
    return f"event: gap\ndata: {data}\n\n".encode()


@dataclass(frozen=True)
class Filter:
    task: str | None = None
    type: str | None = None
    workflow: str | None = None

    def __call__(self, f: Frame) -> bool:
        return ((self.task is None or f.task_id == self.task)
                and (self.type is None or f.type == self.type)
                and (self.workflow is None or f.workflow == self.workflow))


@dataclass
class Subscription:
    """Where a client resumes and what it wants; `first()` is sent before the hand-over."""
    cursor: int
    flt: Filter
    gap: dict | None = None

    def first(self) -> bytes:
        """The retry hint with the id the client resumes after, and a `gap` event when
        some of what the client asked for is gone (pruned, or the log was off).

        The id comes at once, with no data (an EventSource sets its last event id and
        dispatches nothing): a client that connected without one and lost the connection
        before its first event reconnected without Last-Event-ID, from "now", and missed
        whatever happened in between."""
        out = f"retry: 1000\nid: {self.cursor}\n\n".encode()
        if self.gap is not None:
            out += gap_frame(self.gap["after"], self.gap["resumed_at"])
        return out

    @property
    def told(self) -> int:
        """The id the client was told events are complete after (0: told nothing)."""
        return self.gap["resumed_at"] if self.gap is not None else 0


# -- the supervisor's side ---------------------------------------------------------------------

class Broadcast:
    """The supervisor's handle on its fan-out process. `subscribe` and `hand_over` run on
    HTTP threads; `poke` on the loop's thread after each commit."""

    def __init__(self, open_store: Callable[[], object], database: str, retention_s: float,
                 *, clock=time.time):
        self._open_store = open_store
        self.database = database
        self.retention_s = retention_s
        self.clock = clock
        self._store = None
        self._lock = threading.Lock()
        self._ctrl: socket.socket | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        """Start the fan-out process; returns its pid."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A session of its own: where Linux schedules by session (autogroup, most
            # distributions' default), it gets a CPU share of its own instead of a slice
            # of the one the supervisor shares with every task process. It still ends
            # with the supervisor (parent-death signal, and end of file on `ctrl`).
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.broadcast", self.database,
                 repr(self.retention_s), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                start_new_session=True)
        finally:
            theirs.close()
        ours.setblocking(False)
        self._ctrl = ours
        return self.proc.pid

    def stop(self) -> None:
        if self._ctrl is not None:
            self._ctrl.close()  # end of file: the process drops its clients and exits
            self._ctrl = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def poke(self) -> None:
        """Something was committed: read the log now. Never blocks (a full socket means
        a wake-up is already pending)."""
        ctrl = self._ctrl
        if ctrl is not None:
            try:
                ctrl.send(b"!")
            except OSError:
                pass

    def subscribe(self, last_id: int | None, flt: Filter) -> Subscription:
        """Switch the log on and work out where the client starts: after `last_id`, or
        from now. Raises StoreError.

        The gap found here is a first answer: the fan-out process prunes too (so does any
        supervisor on the file), and rows pruned after this read are found where the rows
        are read (`FanOut.catch_up`)."""
        now = self.clock()
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
            state = self._store.subscribe_events(now)
            newest = self._store.newest_event_id()
            oldest = self._store.oldest_event_id()
        if last_id is None or last_id > newest:
            return Subscription(newest, flt)
        gap = None
        if last_id < state.since_id or (oldest and last_id < oldest - 1):
            gap = {"after": last_id, "resumed_at": max(state.since_id, oldest - 1)}
        return Subscription(last_id, flt, gap)

    def hand_over(self, sub: Subscription, sock: socket.socket) -> None:
        """Give the client's socket to the fan-out process (the caller then closes its
        own descriptor without shutting the connection down). Raises OSError."""
        msg = json.dumps({"cursor": sub.cursor, "told": sub.told, "task": sub.flt.task,
                          "type": sub.flt.type, "workflow": sub.flt.workflow}).encode()
        if len(msg) > MAX_MESSAGE:
            raise OSError("the event filter is too long")
        # The control socket stays non-blocking (the loop pokes it and must never wait):
        # a full one is retried here, on the HTTP thread, for up to a second.
        deadline = time.monotonic() + 1.0
        while True:
            with self._lock:
                if self._ctrl is None:
                    raise OSError("the event stream is shutting down")
                try:
                    socket.send_fds(self._ctrl, [msg], [sock.fileno()])
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OSError("the event fan-out process does not keep up") from None
            time.sleep(0.002)


# -- the fan-out process ------------------------------------------------------------------------

class _Client:
    __slots__ = ("sock", "flt", "cursor", "told", "out", "written_mono", "writing")

    def __init__(self, sock: socket.socket, flt: Filter, cursor: int, told: int = 0):
        self.sock, self.flt, self.cursor = sock, flt, cursor
        self.told = told  # the latest gap's resumed_at (0: none): a gap is said once
        self.out = bytearray()
        self.written_mono = time.monotonic()
        self.writing = False  # registered for EVENT_WRITE


class FanOut:
    """The fan-out process's one loop (single-threaded)."""

    def __init__(self, database: str, retention_s: float, ctrl: socket.socket, *,
                 clock=time.time):
        from supervisor.store import Store
        self.store = Store(database, migrate=False, create=False)
        self.retention_s = retention_s
        self.ctrl = ctrl
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.sel.register(ctrl, selectors.EVENT_READ, None)
        self.clients: dict[int, _Client] = {}
        self.ids: list[int] = []
        self.frames: list[Frame] = []
        self.last_id = self.store.newest_event_id()
        self.version = None
        self.subscribed_at = 0.0
        self.watermarks: list[tuple[float, int]] = []
        self.running = True

    def run(self) -> None:
        next_housekeeping = 0.0
        pending, next_batch = False, 0.0  # new events to send, and not before when
        while self.running:
            if pending:
                timeout = max(0.0, next_batch - time.monotonic())
            else:
                timeout = POLL_S if self.clients else HOUSEKEEP_S
            poked = False
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    poked |= self.on_control()
                elif mask & selectors.EVENT_WRITE:
                    self.flush(key.data)
                else:  # readable client: it closed (or sent something we ignore)
                    self.on_client_readable(key.data)
            try:
                if self.clients or poked:
                    latest = self.store.data_version()
                    if latest != self.version:
                        self.version = latest
                        pending = True
                mono = time.monotonic()
                if pending and mono >= next_batch:
                    pending = False
                    cpu = time.thread_time()
                    self.read_new()
                    next_batch = (time.monotonic()
                                  + (time.thread_time() - cpu) * (1 / WRITE_SHARE - 1))
                    mono = time.monotonic()
                if mono >= next_housekeeping:
                    next_housekeeping = mono + HOUSEKEEP_S
                    self.housekeep(self.clock(), mono)
            except StoreError as exc:
                log.warning("events: reading the event log failed: %s", exc)
                time.sleep(0.5)
        for client in list(self.clients.values()):
            self.drop(client)

    def on_control(self) -> bool:
        """Pokes and hand-overs from the supervisor; end of file stops the process."""
        poked = False
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.ctrl, MAX_MESSAGE, 1)
            except BlockingIOError:
                return poked
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:
                self.running = False
                return poked
            if msg == b"!":
                poked = True
                continue
            for fd in fds:
                try:
                    spec = json.loads(msg)
                    self.attach(socket.socket(fileno=fd), Filter(
                        spec.get("task"), spec.get("type"), spec.get("workflow")),
                        int(spec["cursor"]), int(spec.get("told") or 0))
                except (ValueError, KeyError, TypeError, OSError) as exc:
                    log.warning("events: bad hand-over: %s", exc)
                    os.close(fd)

    def attach(self, sock: socket.socket, flt: Filter, cursor: int, told: int = 0) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small frames go out at once: with Nagle's algorithm a frame waits for the
            # ACK of the previous one, which the client delays up to 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _Client(sock, flt, cursor, told)
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, client)
        self.catch_up(client)

    def catch_up(self, client: _Client) -> None:
        """What the client missed: from memory, or from the log when it is older. Rows
        pruned after the client's cursor (by this process, or another supervisor, since
        `subscribe` looked) are a `gap` event: the oldest id kept is read with the rows,
        in one snapshot. (Read apart, in `subscribe` before the hand-over, a prune in
        between let the client skip those events in silence.)"""
        while client.cursor < self.last_id and client.sock is not None:
            if self.ids and self.ids[0] <= client.cursor + 1:
                chosen = self.frames[bisect.bisect_right(self.ids, client.cursor):]
            else:
                oldest, rows = self.store.read_kept_events(client.cursor, READ_BATCH)
                if oldest - 1 > max(client.cursor, client.told):
                    client.told = oldest - 1
                    self.write(client, gap_frame(client.cursor, oldest - 1), time.monotonic())
                    if client.sock is None:
                        return
                chosen = [frame(r) for r in rows]
                if not chosen:  # pruned meanwhile
                    client.cursor = self.ids[0] - 1 if self.ids else self.last_id
                    continue
            self.send(client, chosen)
            if len(client.out) > MAX_BACKLOG // 2:
                return  # the rest once the client read this (flush calls back)

    def read_new(self) -> None:
        while True:
            rows = self.store.read_events(self.last_id, READ_BATCH)
            if not rows:
                return
            if rows[0].id > self.last_id + 1:  # a hole: marks, or rows pruned unread
                oldest, rows = self.store.read_kept_events(self.last_id, READ_BATCH)
                if oldest - 1 > self.last_id:
                    self.lost(oldest - 1)
                if not rows:
                    return
            frames = [frame(r) for r in rows]
            self.ids.extend(f.id for f in frames)
            self.frames.extend(frames)
            self.last_id = frames[-1].id
            if len(self.ids) > 2 * RING:
                del self.ids[:-RING], self.frames[:-RING]
            joined: dict[Filter, bytes] = {}  # clients with the same filter share one join
            mono = time.monotonic()
            for client in list(self.clients.values()):
                if client.cursor < frames[0].id - 1:
                    self.catch_up(client)  # was behind (a large backlog): from its cursor
                elif client.cursor == frames[0].id - 1:
                    data = joined.get(client.flt)
                    if data is None:
                        data = joined[client.flt] = b"".join(
                            f.data for f in frames if client.flt(f))
                    client.cursor = self.last_id
                    if data:
                        self.write(client, data, mono)
                elif client.cursor < self.last_id:
                    self.send(client, [f for f in frames if f.id > client.cursor])
            if len(rows) < READ_BATCH:
                return

    def lost(self, upto: int) -> None:
        """Rows up to `upto` were pruned before this process read them (by another
        supervisor on the file, while this one was behind by more than the retention):
        the clients that were live get a `gap` event, and the ring (now with a hole in
        it) is dropped, so a client behind catches up from the log, whose reads find the
        gap too."""
        mono = time.monotonic()
        for client in list(self.clients.values()):
            if client.cursor == self.last_id and client.told < upto:
                client.told = upto
                self.write(client, gap_frame(client.cursor, upto), mono)
                client.cursor = upto
        self.ids, self.frames = [], []
        self.last_id = upto

    def send(self, client: _Client, frames: list[Frame]) -> None:
        if not frames:
            return
        data = b"".join(f.data for f in frames if client.flt(f))
        client.cursor = frames[-1].id
        if data:
            self.write(client, data, time.monotonic())

    def write(self, client: _Client, data: bytes, mono: float) -> None:
        """Send `data` after what the client has waiting. With nothing waiting (the common
        case) it goes straight to the socket, not through the client's buffer: a batch
        costs one send per client, and the fan-out's CPU is mostly those sends."""
        if client.out or client.sock is None:
            client.out += data
            self.flush(client)
            return
        try:
            n = client.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.drop(client)
            return
        if n < len(data):
            client.out += memoryview(data)[n:]
            self.flush(client)  # the socket is full: wait until it is writable
        else:
            client.written_mono = mono

    def flush(self, client: _Client) -> None:
        if client.sock is None:
            return
        try:
            while client.out:
                n = client.sock.send(client.out)
                del client.out[:n]
            client.written_mono = time.monotonic()
            if client.writing:
                self.sel.modify(client.sock, selectors.EVENT_READ, client)
                client.writing = False
                if client.cursor < self.last_id:
                    self.catch_up(client)
        except BlockingIOError:
            if len(client.out) > MAX_BACKLOG:
                self.drop(client)
            elif not client.writing:
                self.sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                client.writing = True
        except OSError:
            self.drop(client)

    def on_client_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)

    def drop(self, client: _Client) -> None:
        sock, client.sock = client.sock, None
        if sock is None:
            return
        self.clients.pop(sock.fileno(), None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def housekeep(self, now: float, mono: float) -> None:
        for client in list(self.clients.values()):
            if mono - client.written_mono >= KEEPALIVE_S and not client.out:
                client.out += b": keep-alive\n\n"
                self.flush(client)
        if self.clients and now - self.subscribed_at >= min(30.0, self.retention_s / 4):
            self.store.subscribe_events(now)
            self.subscribed_at = now
        self.watermarks.append((now, self.last_id))
        old = [w for w in self.watermarks if w[0] <= now - self.retention_s]
        if old:
            self.store.prune_events(old[-1][1] + 1)
            self.watermarks = [w for w in self.watermarks if w[0] > now - self.retention_s]
        if not self.clients:
            self.store.disable_events_if_idle(now, self.retention_s)


def main(argv: list[str]) -> int:
    """`python -m supervisor.broadcast DATABASE RETENTION_S CONTROL_FD`."""
    from workers.pdeathsig import set_parent_death_signal, set_process_name
    import signal
    database, retention_s, fd = argv[0], float(argv[1]), int(argv[2])
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        return 0
    set_process_name(b"taskvisor-events")
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctrl = socket.socket(fileno=fd)
    ctrl.setblocking(False)
    FanOut(database, retention_s, ctrl).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
