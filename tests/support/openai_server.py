"""A small OpenAI-compatible chat-completions server for tests, on 127.0.0.1 in a thread.

It speaks the wire format the real servers use (`POST /v1/chat/completions`, server-sent
events `data: {chunk}\\n\\n` ending in `data: [DONE]`, usage in a last chunk when
`stream_options.include_usage` is set) and is scripted per test: each request takes the
next queued behaviour, or `default` when the queue is empty. Behaviours: `Stream` (normal
streaming, optional delays and keep-alive comments), `Status` (429 with Retry-After, 500,
a 400 with an error JSON), `Stall` (some tokens, then silence), `Silent` (no answer at all), `Malformed` (a body that
is not the wire format, optionally held open), `Json` (a non-streaming answer) and `Flood` (an endless stream as
fast as the client reads). `Stream` and `Json` may also answer with tool calls (function
calling): streamed as OpenAI streams them, the arguments in pieces, the calls interleaved. Every request is recorded, and so are the connections accepted
(`Stream(keep_alive=True)` keeps one for the next request) and the clients that left
mid-answer (`disconnects`).
The real services cannot be reached from here; this is what the tests talk to.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Stream:
    text: str = "Hello from the fake model."
    delay_s: float = 0.0          # between chunks
    usage: bool = True            # send the usage chunk when the client asked for it
    prompt_tokens: int = 12
    finish_reason: str = "stop"
    ping_every: int = 0           # a `: keep-alive` comment after every N chunks
    model: str = "fake-model"
    keep_alive: bool = False      # chunked, and the connection kept for the next request
    tool_calls: list = field(default_factory=list)  # [{"id", "name", "arguments"}], after the text
    argument_chars: int = 6       # each call's arguments in pieces this long, the calls interleaved


@dataclass
class Status:
    code: int
    body: str | dict = ""
    headers: dict = field(default_factory=dict)


@dataclass
class Stall:
    tokens: int = 2               # chunks sent before going silent
    hold_s: float = 30.0          # how long the connection stays open and silent
    ping_every_s: float = 0.0     # keep-alive comments while silent (a stall all the same)


@dataclass
class Malformed:
    body: str = "data: {\"choices\": [{\"delta\": {\"content\": \"hal\"\n\ndata: nonsense\n\n"
    content_type: str = "text/event-stream"
    hold_s: float = 0.0           # then the connection stays open this long (no end of body)


@dataclass
class Silent:
    """The request is read and never answered (no status line) for `hold_s`."""
    hold_s: float = 30.0


@dataclass
class Flood:
    """Content events of `event_bytes` each, as fast as the client takes them, up to
    `total_bytes` (then [DONE]); `server.flooded` counts what was written."""
    event_bytes: int = 65536
    total_bytes: int = 1 << 30
    line_ends: bool = True        # False: one data line that never ends
    as_json: bool = False         # one application/json body of total_bytes instead


@dataclass
class Json:
    text: str = "Hello, not streamed."
    prompt_tokens: int = 5
    tool_calls: list = field(default_factory=list)  # [{"id", "name", "arguments"}]: message.tool_calls


def tokens(text: str) -> list[str]:
    """Split text into word-ish pieces, as a tokenizer would stream them."""
    out, word = [], ""
    for ch in text:
        word += ch
        if ch == " ":
            out.append(word)
            word = ""
    return out + ([word] if word else [])


class FakeOpenAI:
    """`with FakeOpenAI() as server:` then `server.base_url` (ends in /v1)."""

    def __init__(self, default=None, tls: tuple | None = None, port: int = 0,
                 reuse_port: bool = False):
        """`tls`: (certificate file, key file): served over HTTPS. `reuse_port`: bound
        with SO_REUSEPORT, so that more servers (processes) can listen on `port` too."""
        self.default = default if default is not None else Stream()
        self.requests: list[dict] = []
        self.connections = 0          # TCP connections accepted (keep-alive reuses them)
        self.disconnects: list[float] = []  # monotonic times a client left mid-answer
        self.flooded = 0              # bytes a Flood wrote so far
        self.active = self.max_active = 0   # requests being answered now / at most at once
        # With `key` (body -> a hashable, e.g. the prompt of one task): requests of each key
        # being answered now, and each request that began while another of its key was
        # answered (two runs of one task at once, as the model server sees them).
        self.key = None
        self.active_by: dict = {}
        self.overlaps: list = []
        self._queue: list = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        server_class = _ReusePortServer if reuse_port else _Server
        self.httpd = server_class(("127.0.0.1", port), _handler_class(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        if tls is not None:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, tls))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.base_url = f"https://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-openai",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def script(self, *behaviours) -> None:
        """Queue behaviours for the next requests, in order."""
        with self._lock:
            self._queue.extend(behaviours)

    def reset(self, default=None) -> None:
        """Forget queued behaviours and recorded requests (a module-scoped server)."""
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.default = default if default is not None else Stream()

    def next(self, body: dict, headers: dict, path: str, peer=None):
        with self._lock:
            self.requests.append({"path": path, "body": body, "headers": headers, "peer": peer})
            return self._queue.pop(0) if self._queue else self.default

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a hundred calls that connect at once overflowed
    # it, and some were reset (a real model server's is in the thousands).
    request_queue_size = 4096


class _ReusePortServer(_Server):
    allow_reuse_port = True


def _handler_class(server: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (ConnectionResetError, BrokenPipeError):
                pass  # a client closed a kept-alive connection: expected

        def setup(self) -> None:
            super().setup()
            # Each event is its own small write: without this, Nagle's algorithm holds
            # one back until the client's delayed ACK (40 ms) on a kept-alive connection.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with server._lock:
                server.connections += 1
            self.chunked = False

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"_raw": raw.decode("utf-8", "replace")}
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            behaviour = server.next(body, dict(self.headers), self.path, self.client_address)
            with server._lock:
                server.active += 1
                server.max_active = max(server.max_active, server.active)
                key = server.key(body) if server.key is not None else None
                if key is not None:
                    server.active_by[key] = server.active_by.get(key, 0) + 1
                    if server.active_by[key] > 1:
                        server.overlaps.append((key, time.monotonic()))
            try:
                self._serve(behaviour, body)
            except (BrokenPipeError, ConnectionResetError):
                server.disconnects.append(time.monotonic())  # the client gave up: expected
                self.close_connection = True
            finally:
                with server._lock:
                    server.active -= 1
                    if key is not None:
                        server.active_by[key] -= 1

        def _serve(self, b, body: dict) -> None:
            if isinstance(b, Status):
                return self._send(b.code, b.body, b.headers)
            if isinstance(b, Silent):
                server.stopping.wait(b.hold_s)
                self.close_connection = True
                return
            if isinstance(b, Malformed):
                self._send(200, b.body, {"Content-Type": b.content_type}, hold=b.hold_s > 0)
                server.stopping.wait(b.hold_s)
                return
            if isinstance(b, Json):
                pieces = tokens(b.text)
                message = {"role": "assistant", "content": b.text}
                if b.tool_calls:
                    message["tool_calls"] = [_tool_call(c) for c in b.tool_calls]
                return self._send(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake-model",
                    "choices": [{"index": 0, "finish_reason": "tool_calls" if b.tool_calls else "stop",
                                 "message": message}],
                    "usage": {"prompt_tokens": b.prompt_tokens, "completion_tokens": len(pieces),
                              "total_tokens": b.prompt_tokens + len(pieces)}})
            self.send_response(200)
            if isinstance(b, Flood) and b.as_json:
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                return self._flood(b)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            if isinstance(b, Stream) and b.keep_alive:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.chunked = True
                self._stream(b, body)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                self.chunked = False
                return
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if isinstance(b, Stall):
                return self._stall(b)
            if isinstance(b, Flood):
                return self._flood(b)
            self._stream(b, body)

        def _flood(self, b: Flood) -> None:
            event = "data: " + json.dumps(_chunk("fake-model", {"content": "x" * b.event_bytes})) + "\n\n"
            if not b.line_ends or b.as_json:
                self._write('{"choices": [{"message": {"content": "' if b.as_json else
                            'data: {"choices": [{"delta": {"content": "')
                event = "x" * b.event_bytes
            sent = 0
            while sent < b.total_bytes and not server.stopping.is_set():
                self._write(event)
                sent += len(event)
                server.flooded = sent
            if not b.line_ends or b.as_json:
                return  # (never reached past a client's cap: it stops reading first)
            self._write("data: [DONE]\n\n")

        def _stream(self, b: Stream, body: dict) -> None:
            pieces = tokens(b.text)
            model = body.get("model") or b.model
            self._event(_chunk(model, {"role": "assistant", "content": ""}))
            for n, piece in enumerate(pieces, 1):
                if b.delay_s:
                    self._pause(b.delay_s)
                self._event(_chunk(model, {"content": piece}))
                if b.ping_every and n % b.ping_every == 0:
                    self._write(": keep-alive\n\n")
            arguments = self._tool_calls(b, model)
            self._event(_chunk(model, {}, finish_reason=b.finish_reason))
            if b.usage and (body.get("stream_options") or {}).get("include_usage"):
                completion = len(pieces) + arguments
                usage = {"prompt_tokens": b.prompt_tokens, "completion_tokens": completion,
                         "total_tokens": b.prompt_tokens + completion}
                self._event({**_chunk(model, None), "choices": [], "usage": usage})
            self._write("data: [DONE]\n\n")

        def _pause(self, seconds: float) -> None:
            """Wait between two pieces; a client that closed its connection meanwhile ends
            the answer at once (ConnectionResetError), as a real server's event loop sees a
            closed connection, rather than at the next write."""
            sock = self.connection
            end = time.monotonic() + seconds
            if isinstance(sock, ssl.SSLSocket):  # no MSG_PEEK through TLS
                time.sleep(seconds)
                return
            poller = select.poll()  # not select(): no limit on the descriptor's number
            poller.register(sock, select.POLLIN)
            while (left := end - time.monotonic()) > 0:
                if not poller.poll(left * 1000):
                    return
                try:
                    peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise ConnectionResetError(str(exc)) from None
                if not peek:
                    raise ConnectionResetError("the client closed the connection")
                time.sleep(max(0.0, end - time.monotonic()))  # a next request waits its turn
                return

        def _tool_calls(self, b: Stream, model: str) -> int:
            """Tool-call deltas as OpenAI streams them: each call's first piece (index, id,
            type, name, empty arguments), then the arguments in pieces, the calls' pieces
            interleaved by index. Returns how many argument pieces were sent."""
            n = max(1, b.argument_chars)
            split = []
            for index, call in enumerate(b.tool_calls):
                first = {**_tool_call(call), "index": index}
                first["function"]["arguments"] = ""
                self._event(_chunk(model, {"tool_calls": [first]}))
                args = call["arguments"]
                split.append([args[k:k + n] for k in range(0, len(args), n)])
            for step in range(max((len(p) for p in split), default=0)):
                for index, pieces in enumerate(split):
                    if step < len(pieces):
                        self._event(_chunk(model, {"tool_calls": [
                            {"index": index, "function": {"arguments": pieces[step]}}]}))
            return sum(len(p) for p in split)

        def _stall(self, b: Stall) -> None:
            self._event(_chunk("fake-model", {"role": "assistant", "content": ""}))
            for piece in tokens("the stream is about to stall forever")[:b.tokens]:
                self._event(_chunk("fake-model", {"content": piece}))
            end = time.monotonic() + b.hold_s
            while time.monotonic() < end and not server.stopping.is_set():
                server.stopping.wait(b.ping_every_s or 0.05)
                if b.ping_every_s:
                    self._write(": keep-alive\n\n")

        def _event(self, obj: dict) -> None:
            # Raw UTF-8, as llama.cpp's server writes it: U+2028 and the like unescaped.
            self._write("data: " + json.dumps(obj, ensure_ascii=False) + "\n\n")

        def _write(self, text: str) -> None:
            data = text.encode()
            if self.chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            self.wfile.write(data)
            self.wfile.flush()

        def _send(self, code: int, body, headers: dict | None = None, hold: bool = False) -> None:
            """`hold`: no Content-Length, so the body ends only when the connection closes."""
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(code)
            headers = dict(headers or {})
            headers.setdefault("Content-Type", "application/json" if isinstance(body, dict)
                               else "text/plain")
            for k, v in headers.items():
                self.send_header(k, str(v))
            if hold:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

    return Handler


def _tool_call(call: dict) -> dict:
    """A whole tool call in OpenAI's message shape, from {"id", "name", "arguments"}."""
    return {"id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def _chunk(model: str, delta: dict | None, finish_reason: str | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": choices}


# The supervisor these tests run against is started by tests/support/launcher.py; these
# names stay importable from here for tests written before the launcher existed.
from tests.support.launcher import SupervisorProcess, supervisor_config  # noqa: E402,F401
