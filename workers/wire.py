"""The wire format between taskvisor's processes: every message declared once, checked once.

Owns both channels. The report channel: one Unix stream socketpair per attempt, on which
the task process writes newline-delimited JSON objects, each with a "kind" declared in
REPORT below, and the supervisor writes back one line per request ({"ack": seq} or
{"ack": seq, "error": text}). The fork server channel: one SOCK_SEQPACKET socket on which
the per-task messages are short text lines (see workers.zygote). The receiving side parses
with `parse_report` / `parse_server_event`, which raise ProtocolError for anything not
declared here, so a task that writes garbage, a wrong type or an unknown outcome on its
pipe ends its own attempt and nothing else. Standard library only, no logging: the fork
server imports it.
"""

from __future__ import annotations

import json
import sys
from _socket import SCM_RIGHTS, SOL_SOCKET

# The largest packet on the fork server's sockets (supervisor <-> fork server <-> spare);
# a spawn whose spec does not fit inline sends it in a memfd.
MAX_PACKET = 65536
# A report line longer than this (without its newline) is a protocol violation; a result
# may be up to max_result_bytes of JSON text, escaped once more inside the line.
REPORT_LINE_SLACK = 65536

# Report kinds, task process -> supervisor.
READY = "ready"          # set-up done, about to run user code
PROGRESS = "progress"    # fraction in [0, 1] and/or a short message
HEARTBEAT = "heartbeat"  # still alive; nothing else to say
RESULT = "result"        # the handler's return value as JSON text
ERROR = "error"          # the handler raised (type, message, traceback, retryable, outcome)
RETRY = "retry"          # reschedule after delay_s without spending an attempt
CANCELLED = "cancelled"  # the handler stopped after a cancel request
CHECKPOINT = "checkpoint"  # a request: store this JSON text as the task's state (ctx.checkpoint)
MAX_SPAWNS = 10_000      # tasks one attempt may spawn (a "spawn" list on its result)
SPEND = "spend"          # model tokens the attempt used (ctx.spend), fire-and-forget
STREAM = "stream"        # text for ctx.stream (batched by workers.stream; fire-and-forget)
FINAL = frozenset((RESULT, ERROR, RETRY, CANCELLED))  # exactly one of these ends an attempt

# The outcomes a task process may claim in an ERROR message (a Fail, a MemoryError, or a
# limit that could not be applied): never "succeeded", "lost" or the supervisor's own.
ERROR_OUTCOMES = frozenset(("error", "timeout", "memory_limit", "crashed"))

NoneType = type(None)
_NUM = (int, float)


class ProtocolError(ValueError):
    """A message that is not what this module declares: the sender broke the protocol."""


class Field:
    """One field of a message: its accepted types, whether it must be present, and bounds."""

    __slots__ = ("types", "required", "max_len", "low", "high", "choices")

    def __init__(self, types, *, required: bool = True, max_len: int | None = None,
                 low: float | None = None, high: float | None = None, choices=None):
        self.types = types
        self.required = required
        self.max_len = max_len
        self.low = low
        self.high = high
        self.choices = choices

    def check(self, kind: str, name: str, value) -> None:
        if not isinstance(value, self.types) or isinstance(value, bool) and bool not in _tuple(self.types):
            raise ProtocolError(f"{kind}.{name} is {type(value).__name__}, expected "
                                f"{' or '.join(t.__name__ for t in _tuple(self.types))}")
        if value is None:
            return
        if self.max_len is not None and len(value) > self.max_len:
            raise ProtocolError(f"{kind}.{name} is {len(value)} long, over {self.max_len}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ProtocolError(f"{kind}.{name} = {value!r} is outside [{self.low}, {self.high}]")
        if self.choices is not None and value not in self.choices:
            raise ProtocolError(f"{kind}.{name} = {value!r} is not one of {sorted(self.choices)}")


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


# Every report kind and its fields. To add a kind: a constant above and one entry here.
# "seq" (an int) is accepted on the kinds in REQUESTS: the supervisor answers those.
REPORT: dict[str, dict[str, Field]] = {
    READY: {"pid": Field(int, low=1)},
    PROGRESS: {"fraction": Field((float, int, NoneType), required=False, low=0.0, high=1.0),
               "message": Field((str, NoneType), required=False, max_len=500)},
    HEARTBEAT: {},
    RESULT: {"result": Field(str),
             # ctx.spawn: one object per task, checked field by field by supervisor.spawning
             "spawn": Field(list, required=False, max_len=MAX_SPAWNS)},
    ERROR: {"type": Field(str, max_len=300), "message": Field(str, max_len=8000),
            "traceback": Field(str, max_len=65536), "retryable": Field(bool),
            "outcome": Field(str, choices=ERROR_OUTCOMES)},
    RETRY: {"delay_s": Field(_NUM, low=0.0, high=10 * 365 * 86400.0),
            "reason": Field((str, NoneType), required=False, max_len=2000),
            # a limit key or a list of them (at most 16; each item checked by the receiver)
            "pause_limit": Field((str, list, NoneType), required=False, max_len=200)},
    SPEND: {"tokens": Field(int, low=0, high=10 ** 12)},
    CANCELLED: {},
    CHECKPOINT: {"state": Field(str)},  # within max_result_bytes: the supervisor checks
    STREAM: {"text": Field(str, max_len=16384)},
}
REQUESTS: set[str] = {CHECKPOINT}  # kinds that carry a "seq" and get an ack line back


def parse_report(line: bytes | str) -> dict:
    """One line from a task process as a checked dict; raises ProtocolError."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON line ({exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a {type(msg).__name__}, not a JSON object")
    kind = msg.get("kind")
    fields = REPORT.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    for name, value in msg.items():
        if name == "kind":
            continue
        field = fields.get(name)
        if field is None:
            if name == "seq" and kind in REQUESTS and isinstance(value, int) and not isinstance(value, bool):
                continue
            raise ProtocolError(f"{kind} has an unknown field {name!r}")
        field.check(kind, name, value)
    for name, field in fields.items():
        if field.required and name not in msg:
            raise ProtocolError(f"{kind} lacks its field {name!r}")
    if kind in REQUESTS and not isinstance(msg.get("seq"), int):
        raise ProtocolError(f"{kind} is a request and needs an integer seq")
    return msg


def encode_report(kind: str, fields: dict) -> bytes:
    """One report line (the task side); `default=str` keeps a stray object from raising."""
    return (json.dumps({"kind": kind, **fields}, separators=(",", ":"), ensure_ascii=False,
                       default=str) + "\n").encode()


def encode_ack(seq: int, error: str | None = None) -> bytes:
    """The supervisor's answer to a request: {"ack": seq} or with an error text."""
    msg = {"ack": seq} if error is None else {"ack": seq, "error": error}
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def parse_ack(line: bytes) -> tuple[int, str | None]:
    msg = json.loads(line)
    return msg["ack"], msg.get("error")


# -- the fork server channel (supervisor <-> fork server), one message per packet ----------

def received_fds(ancillary) -> list[int]:
    """The descriptors that came with a packet (the ancillary data recvmsg returns).
    Here rather than socket.recv_fds: the fork server and its task processes use `_socket`
    alone, not socket.py (its enums, selectors and math are ~0.35 MiB that every fork
    copies the page tables of)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            fds.extend(memoryview(data)[:len(data) - len(data) % 4].cast("i"))
    return fds


def passing_fds(fds) -> list[tuple]:
    """sendmsg's ancillary data that passes `fds` (socket.send_fds without socket.py)."""
    return [(SOL_SOCKET, SCM_RIGHTS,
             b"".join([fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds]))]


def encode_spawn(key: str, spec: bytes | None, start_by: float | None = None) -> bytes:
    """"spawn KEY [START_BY]" with the spec inline after a newline, or alone (spec in a
    memfd). START_BY (CLOCK_MONOTONIC seconds) is the fence of the claim that leased this
    attempt: past it the fork server refuses the spawn, whatever the shared fence says by
    then (a later renewal may not cover this task: another supervisor may have rescued it
    while the request waited)."""
    head = b"spawn " + key.encode()
    if start_by is not None:
        head += b" %r" % start_by
    return head if spec is None else head + b"\n" + spec


class Fence:
    """The execution fence: one float64 of CLOCK_MONOTONIC seconds in a small shared file
    (a memfd) that the supervisor writes and its fork server reads; 0.0 means none yet.
    Shared memory, not a message: a renewal must reach the fork server at once, never
    queued behind hundreds of spawn requests. Aligned 8-byte stores and loads are whole
    on every platform taskvisor runs on."""

    SIZE = 8

    def __init__(self, fd: int):
        import mmap
        import struct
        self._map = mmap.mmap(fd, self.SIZE)
        self._pack = struct.Struct("d").pack_into
        self._unpack = struct.Struct("d").unpack_from

    @classmethod
    def create(cls) -> tuple["Fence", int]:
        """A new fence and its descriptor (close-on-exec; hand it on, then close it)."""
        import os
        fd = os.memfd_create("taskvisor-fence", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls.SIZE)
        return cls(fd), fd

    def get(self) -> float | None:
        value = self._unpack(self._map, 0)[0]
        return value if value > 0 else None

    def set(self, deadline_mono: float) -> None:
        self._pack(self._map, 0, deadline_mono)

    def close(self) -> None:
        self._map.close()


def parse_server_event(data: bytes) -> dict:
    """One message of the fork server as a checked dict with its "op"; raises ProtocolError.

    Text lines: "spawned KEY PID", "spawn_failed KEY text", "exited PID STATUS UTIME STIME
    MAXRSS_KB", "fenced COUNT"; JSON objects for start-up ("ready", "boot_error") and the
    model-call relay's answer to "warm" ("warmed", with the seconds it took)."""
    op, _, rest = data.partition(b" ")
    try:
        if op == b"exited":
            pid, status, utime, stime, maxrss = rest.split()
            return {"op": "exited", "pid": _pid(pid), "status": int(status),
                    "utime": float(utime), "stime": float(stime), "maxrss_kb": int(maxrss)}
        if op == b"spawned":
            key, pid = rest.split()
            return {"op": "spawned", "key": key.decode(), "pid": _pid(pid)}
        if op == b"spawn_failed":
            key, _, error = rest.partition(b" ")
            return {"op": "spawn_failed", "key": key.decode(),
                    "error": error.decode(errors="replace")[:2000]}
        if op == b"fenced":
            return {"op": "fenced", "count": int(rest)}
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad fork server message {data[:80]!r}: {exc}") from None
    if not isinstance(msg, dict) or msg.get("op") not in ("ready", "boot_error", "warmed"):
        raise ProtocolError(f"unknown fork server message {data[:80]!r}")
    return msg


def _pid(text: bytes) -> int:
    pid = int(text)
    if pid <= 0:
        raise ValueError(f"pid {pid}")
    return pid
