"""Attempts of `llm.chat` hosted by the model-call relay: one coroutine each on the relay's
loop, instead of one task process each.

Why: an `llm.chat` attempt waits on the network for seconds and does almost nothing else.
As a task process it costs a fork, its set-up, ~1 MiB of copied pages and ~4 ms of CPU
for the relay's frames it forwards (benchmarks/README.md, "In flight"); hosted, it costs
the relay a few KiB and the call itself. What it gives up is a process of its own: the
attempt's `memory_mb` and `cpu_s` do not apply (the relay caps each answer at
MAX_ANSWER_BYTES); its time limit, cancel, lease fence and outcome are the same.

Owns the relay's side of hosting: the supervisor's packets on the control socket (the fork
server's spawn request, workers.wire, with the report socket as a descriptor; "cancel KEY";
"warm", answered {"op": "warmed", "seconds"} once the first call's imports are done),
each attempt's run (a TaskContext whose report lines never block the relay's loop, the
call through RelayServer, read as a task process reads it: llmrelay.Parsed, and the one
outcome line a task process would have written: workers.child), cancelling, and the
execution fence: past it every hosted attempt ends at once with no outcome (its lease may
be another supervisor's by then) and the supervisor is told "fenced COUNT". It never
imports supervisor/, never opens the database, and runs no code but llm.chat's own.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

from workers import wire
from workers.child import Reporter, send_failure, send_result
from workers.context import TaskContext

if TYPE_CHECKING:
    from workers.handlers import llmrelay

FENCE_CHECK_S = 0.1   # how often the fence is read while attempts run (it only moves later)
HIGH_WATER = 1 << 16  # report bytes an attempt may have waiting before its call reads on
_SPAWN_FDS = 2        # the report socket, and a memfd holding a spec too big for a packet


class Host:
    """The attempts this relay runs, by key, and the control socket they come from."""

    def __init__(self, server, ctrl: socket.socket, fence: "wire.Fence | None"):
        self.server = server  # workers.relay.RelayServer
        self.ctrl = ctrl
        ctrl.setblocking(False)
        self.fence = fence
        self.loop = asyncio.get_running_loop()
        self.attempts: dict[bytes, "HostedAttempt"] = {}
        self.outq: collections.deque[bytes] = collections.deque()  # events not sent yet
        self.fence_task: asyncio.Task | None = None

    # -- the supervisor's packets ----------------------------------------------------------

    def on_readable(self) -> bool:
        """Read every waiting packet; False once the supervisor closed its end."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.ctrl, wire.MAX_PACKET, _SPAWN_FDS, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data and not fds:
                return False
            try:
                self._on_packet(data, fds)
            except Exception as exc:  # noqa: BLE001 - one bad packet must not end the relay
                for fd in fds:
                    _close(fd)
                print(f"taskvisor-relay: a packet from the supervisor failed: {exc!r}",
                      file=sys.stderr, flush=True)

    def _on_packet(self, data: bytes, fds: list[int]) -> None:
        head, _, spec = data.partition(b"\n")
        op, _, rest = head.partition(b" ")
        if op == b"cancel":
            attempt = self.attempts.get(rest)
            if attempt is not None:
                attempt.cancel()
            return
        if op == b"warm":
            self.warm()
            return
        if op != b"spawn":
            raise ValueError(f"unknown packet {head[:60]!r}")
        key, _, start_by = rest.partition(b" ")
        if self.fenced() or start_by and time.monotonic() >= float(start_by):
            self._refuse(key, "fenced: the supervisor's lease was not renewed in time", fds)
            return
        if len(fds) != (1 if spec else 2):
            self._refuse(key, "expected a report socket and a spec", fds)
            return
        if not spec:
            spec = _read_all(fds[1])
            _close(fds[1])
        try:
            parsed = json.loads(spec)
            kind = parsed["task"]["type"]
        except (ValueError, KeyError, TypeError) as exc:
            self._refuse(key, f"bad spec: {exc}", fds[:1])
            return
        if kind != "llm.chat":
            self._refuse(key, "the model-call relay hosts llm.chat attempts only", fds[:1])
            return
        attempt = HostedAttempt(self, key, parsed, fds[0])
        self.attempts[key] = attempt
        attempt.task = self.loop.create_task(attempt.run())
        if self.fence is not None and self.fence_task is None:
            self.fence_task = self.loop.create_task(self._watch_fence())

    def warm(self) -> None:
        """The supervisor has been idle a while: import and build now what the first call
        would (httpx, its TLS context, llm: ~0.3 s of CPU, in this loop), and say how long
        it took. Not at the relay's start, where it ran beside the first tasks."""
        started = time.monotonic()
        self.server.warm()
        from workers.handlers import llm, llmrelay  # noqa: F401 - what chat() imports
        self.tell(json.dumps({"op": "warmed",
                              "seconds": round(time.monotonic() - started, 3)}).encode())

    def _refuse(self, key: bytes, error: str, fds: list[int]) -> None:
        """Say why, then close its report socket: the supervisor reads the event before
        the end of file (Children.on_report)."""
        self.tell(b"spawn_failed %s %s" % (key, error.encode()))
        for fd in fds:
            _close(fd)

    def tell(self, packet: bytes) -> None:
        """An event for the supervisor, never blocking: what the socket cannot take now
        is sent when it can."""
        if not self.outq:
            try:
                self.ctrl.send(packet)
                return
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.ctrl.fileno(), self._flush_events)
            except OSError:
                return  # the supervisor is gone; so are we, soon
        self.outq.append(packet)

    def _flush_events(self) -> None:
        while self.outq:
            try:
                self.ctrl.send(self.outq[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.outq.clear()
                break
            self.outq.popleft()
        self.loop.remove_writer(self.ctrl.fileno())

    # -- the execution fence ---------------------------------------------------------------

    def fenced(self) -> bool:
        fence = self.fence.get() if self.fence is not None else None
        return fence is not None and time.monotonic() >= fence

    async def _watch_fence(self) -> None:
        """While attempts run: past the fence, end them all (no outcome) and say so."""
        try:
            while self.attempts:
                fence = self.fence.get()
                now = time.monotonic()
                if fence is not None and now >= fence:
                    ended = [a for a in self.attempts.values() if not a.abandoned]
                    for attempt in ended:
                        attempt.abandon()
                    if ended:
                        self.tell(b"fenced %d" % len(ended))
                    await asyncio.sleep(FENCE_CHECK_S)  # they end meanwhile, or came after
                    continue
                wait = FENCE_CHECK_S if fence is None else min(FENCE_CHECK_S, fence - now)
                await asyncio.sleep(max(0.005, wait))
        finally:
            self.fence_task = None


class HostedAttempt:
    """One hosted attempt: its spec, its report socket, the coroutine that runs it."""

    def __init__(self, host: Host, key: bytes, spec: dict, report_fd: int):
        self.host = host
        self.key = key
        self.spec = spec
        self.reports = Reports(report_fd, host.loop, self.abandon)
        self.task: asyncio.Task | None = None
        self.abandoned = False  # ended with no outcome: fenced, or the supervisor left
        self.cancelled = False

    def cancel(self) -> None:
        """End it (the supervisor asked: a cancel, a time limit, a lost lease, the
        shutdown): its outcome is `cancelled`. Once: a second cancel() of an asyncio task
        would interrupt the first one's clean-up, and leave the model's connection open."""
        if not self.cancelled and self.task is not None:
            self.cancelled = True
            self.task.cancel()

    def abandon(self) -> None:
        """End it without an outcome line (the supervisor decides how it ended)."""
        self.abandoned = True
        self.cancel()

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            pass  # abandoned while its outcome was being sent
        finally:
            self.host.attempts.pop(self.key, None)
            self.reports.close()

    async def _run(self) -> None:
        spec, reports = self.spec, self.reports
        task = spec["task"]
        limit = spec.get("max_result_bytes", 1 << 20)
        # log_settings None: ctx.logger must not set up this shared process's logging.
        ctx = TaskContext(id=task["id"], type=task["type"], attempt=task["attempt"],
                          max_attempts=task["max_attempts"], deadline_at=spec.get("deadline_at"),
                          reporter=reports, config=spec.get("config"),
                          context=spec.get("context"), max_state_bytes=limit,
                          limit_keys=spec.get("limit_keys") or (),
                          type_limits=spec.get("type_limits") or ())
        reports.send(wire.READY, pid=os.getpid())
        try:
            try:
                result = await chat(self.host.server, task["payload"], ctx, reports)
            finally:
                ctx.close_output()
            send_result(reports, result, limit, ctx.spawned)
        except asyncio.CancelledError:
            if self.abandoned:
                return
            reports.send(wire.CANCELLED)  # the supervisor's cancel: time limit, request, stop
        except Exception as exc:  # noqa: BLE001 - every failure becomes the attempt's outcome
            send_failure(reports, exc)
        await reports.drain(0)


async def chat(server, payload, ctx: TaskContext, reports: "Reports") -> dict:
    """`llm.chat` for a hosted attempt: the request built as a task process builds it, the
    exchange made by `server` (RelayServer), its frames read by the same llmrelay.Parsed
    (report lines to `reports`, the result, llm's exceptions).
    llm is imported here, at the first hosted attempt, not with this module: in the relay
    (no relay named in its environment) it imports httpx and its transports, ~0.25 s of
    CPU that every supervisor's start spent beside its first tasks, calls or not."""
    from workers.handlers import llm, llmrelay
    req = llm.build_request(payload, ctx)
    call = llmrelay.Parsed(req, ctx)
    answer = HostedAnswer(call, reports)
    await server.call(answer, req.url, req.body, req.headers, req.stall_timeout_s,
                      req.request_timeout_s, call.parse)
    return answer.outcome()


class HostedAnswer:
    """The frames of a hosted attempt's call (workers.relay.TaskFrames' interface), taken by
    llmrelay.Parsed as they come; the first exception it raises is kept for `outcome`.
    `send` waits while the attempt's reports wait to be read: no upstream read meanwhile."""

    def __init__(self, call: llmrelay.Parsed, reports: "Reports"):
        self.call = call
        self.reports = reports
        self.error: Exception | None = None

    def put(self, kind: bytes, data: bytes = b"") -> None:
        if self.error is None:
            try:
                self.call.on_frame(kind, data)
            except Exception as exc:  # noqa: BLE001 - llm's exception for the call
                self.error = exc

    async def send(self, kind: bytes, data: bytes = b"") -> None:
        self.put(kind, data)
        await self.reports.drain()

    def outcome(self) -> dict:
        if self.error is not None:
            raise self.error
        if self.call.result is None:
            from workers.handlers import llm  # imported by chat() already
            raise llm.MalformedReply(f"the model-call relay ended the call to {self.call.req.url} "
                                     f"without a result")
        return self.call.result


class Reports(Reporter):
    """A hosted attempt's report socket, written from the relay's loop without ever
    blocking it: what the socket cannot take now waits here and goes when it can
    (`drain` waits for that). A socket the supervisor closed calls `on_broken`."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, on_broken):
        super().__init__(fd)
        os.set_blocking(fd, False)
        self.loop = loop
        self.on_broken = on_broken
        self.queued = bytearray()
        self.waiter: asyncio.Future | None = None
        self.waiting_for = 0

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        if not self.queued:
            try:
                n = os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._broken()
                return
            if n == len(data):
                return
            data = data[n:]
            self.loop.add_writer(self.fd, self._writable)
        self.queued += data

    def request(self, kind: str, **fields) -> None:
        raise RuntimeError(f"{kind} is not available in an attempt that the model-call relay "
                           f"hosts ([llm] run_in_relay)")

    def _writable(self) -> None:
        try:
            n = os.write(self.fd, self.queued)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._broken()
            return
        del self.queued[:n]
        if not self.queued:
            self.loop.remove_writer(self.fd)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done() and (
                self.fd < 0 or len(self.queued) <= self.waiting_for):
            waiter.set_result(None)

    async def drain(self, limit: int = HIGH_WATER) -> None:
        """Until at most `limit` bytes wait (0: all sent), or the socket is gone."""
        while self.fd >= 0 and len(self.queued) > limit:
            self.waiting_for = limit
            self.waiter = self.loop.create_future()
            await self.waiter

    def _broken(self) -> None:
        self.close()
        self.on_broken()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            if self.queued:
                self.loop.remove_writer(fd)
                self.queued.clear()
            _close(fd)
        self._wake()


def _read_all(fd: int) -> bytes:
    chunks = []
    while data := os.read(fd, 1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
