"""A task process's side of the model-call relay's protocol (workers.relay documents it):
connect to the relay that TASKVISOR_LLM_RELAY_SOCKET names, send the request, read frames.

Owns the socket, the framing and the two drivers (blocking, and asyncio for async
handlers) for both kinds of call: the relay sends the answer's lines, or (with "parse")
report lines and the result. It touches a socket, `json` and `int.from_bytes` only: no
httpx object, so a task process forked from the fork server copies few pages for a call
(the reason the relay exists); it imports neither asyncio (but for an async caller) nor
workers.relay. What the frames mean for the call (the outcome, progress, the exceptions)
is `workers.handlers.llmrelay`'s. It never imports `supervisor/`.
"""

from __future__ import annotations

import _socket
import json
import os
import time
from collections.abc import Callable

RELAY_ENV = "TASKVISOR_LLM_RELAY_SOCKET"  # not TASKVISOR_LLM_RELAY: that reads as a
# misspelt TASKVISOR_LLM__RELAY ([llm] relay) to supervisor.config
CONNECT_TIMEOUT_S = 5.0   # an AF_UNIX connect blocks only while the relay's backlog is full
READ_SIZE = 1 << 16
fallbacks = 0             # calls in this process that found no relay and went direct


class RelayBroken(Exception):
    """The relay closed the connection (or it broke) before its end frame."""


class RelaySilent(Exception):
    """Nothing from the relay within the time the caller allowed."""


def connect(env=None) -> _socket.socket | None:
    """A connected socket to the relay, or None when there is none to use: no relay named
    (a handler run outside a supervisor, or `[llm] relay = false`), or it cannot be reached
    (it died and is being restarted): the caller then makes the call itself. The first such
    failure in a process is logged."""
    global fallbacks
    path = (os.environ if env is None else env).get(RELAY_ENV)
    if not path:
        return None
    # _socket's own class: the socket module (and selectors, enum) stays out of the task
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        _connect(sock, path)
    except OSError as exc:
        sock.close()
        fallbacks += 1
        if fallbacks == 1:
            import logging  # here: a task that reaches its relay never loads it
            logging.getLogger("taskvisor.llm").warning(
                "the model-call relay at %s cannot be reached (%s); calling the model "
                "server directly from this task process", path, exc.strerror or type(exc).__name__)
        return None
    return sock


def _connect(sock: _socket.socket, path: str) -> None:
    """Connect, waiting up to CONNECT_TIMEOUT_S while the relay's backlog is full (a
    non-blocking AF_UNIX connect says EAGAIN then; a refused or missing socket raises)."""
    deadline = None
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            now = time.monotonic()
            deadline = deadline or now + CONNECT_TIMEOUT_S
            if now > deadline:
                raise
            time.sleep(0.005)


def request_line(url: str, headers: dict, body: dict, stall_timeout_s: float,
                 request_timeout_s: float, parse: dict | None = None) -> bytes:
    req = {"url": url, "headers": headers, "body": body, "stall_timeout_s": stall_timeout_s,
           "request_timeout_s": request_timeout_s}
    if parse is not None:
        req["parse"] = parse
    return json.dumps(req).encode() + b"\n"


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame: its kind byte, the payload's length (4 bytes, big-endian), the payload."""
    return kind + len(payload).to_bytes(4, "big") + payload


class Frames:
    """Splits what the relay sends into (kind, payload) frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buf = self.buf
        buf += data
        out, i, n = [], 0, len(buf)
        while n - i >= 5:
            size = int.from_bytes(buf[i + 1:i + 5], "big")
            if n - i - 5 < size:
                break
            out.append((bytes(buf[i:i + 1]), bytes(buf[i + 5:i + 5 + size])))
            i += 5 + size
        if i:
            del buf[:i]
        return out


def exchange(sock: _socket.socket, line: bytes, on_frame: Callable[[bytes, bytes], bool],
             timeout_s: Callable[[], float]) -> None:
    """Blocking: send the request, hand each frame to `on_frame` until it returns True (the
    end). Raises RelaySilent when a read waits past `timeout_s()`, RelayBroken when the
    connection ends or breaks first. Closes the socket."""
    frames = Frames()
    try:
        sock.settimeout(timeout_s())
        sock.sendall(line)
        while True:
            sock.settimeout(timeout_s())
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                raise RelaySilent() from None
            except OSError as exc:
                raise RelayBroken(exc.strerror or type(exc).__name__) from None
            if not data:
                raise RelayBroken("the relay closed the connection")
            for kind, payload in frames.feed(data):
                if on_frame(kind, payload):
                    return
    finally:
        sock.close()


async def exchange_async(sock: _socket.socket, line: bytes,
                         on_frame: Callable[[bytes, bytes], bool],
                         timeout_s: Callable[[], float]) -> None:
    """The same for async handlers, on the running event loop."""
    import asyncio
    loop = asyncio.get_running_loop()
    frames = Frames()
    sock.setblocking(False)
    try:
        try:
            async with asyncio.timeout(timeout_s()):
                await loop.sock_sendall(sock, line)
            while True:
                try:
                    async with asyncio.timeout(timeout_s()):
                        data = await loop.sock_recv(sock, READ_SIZE)
                except TimeoutError:
                    raise RelaySilent() from None
                if not data:
                    raise RelayBroken("the relay closed the connection")
                for kind, payload in frames.feed(data):
                    if on_frame(kind, payload):
                        return
        except OSError as exc:
            raise RelayBroken(exc.strerror or type(exc).__name__) from None
    finally:
        sock.close()


class Answer:
    """The status line, headers and body the relay forwarded, with the attributes of an
    httpx.Response that `llm.status_error` and `llm.server_message` read."""

    def __init__(self, head: dict):
        self.status_code = int(head["status"])
        self.reason_phrase = str(head.get("reason") or "")
        self.headers = {str(k).lower(): str(v) for k, v in head.get("headers") or ()}
        self.content = b""

    @property
    def text(self) -> str:
        ctype = self.headers.get("content-type", "")
        charset = "utf-8"
        for part in ctype.split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip("\"'")
        try:
            return self.content.decode(charset, "replace")
        except LookupError:
            return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)
