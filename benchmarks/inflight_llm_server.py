"""The model server of inflight_bench.py's chat variant: an OpenAI-compatible streaming
endpoint answering every request with the same stream of CHUNKS tokens spread over S
seconds (a fixed latency).

Usage: python inflight_llm_server.py S [PROCESSES [CHUNKS [KIND]]]  -> prints its base URL
on one line, serves until SIGTERM. PROCESSES copies listen on the same port (SO_REUSEPORT;
the kernel spreads connections); their listen backlog is the kernel's maximum, so a
thousand clients connecting at once are not dropped into SYN retries.

KIND picks the implementation; both send the same events (those of
tests/support/openai_server.py's `Stream`) and close the connection after each answer:
  asyncio  (default) one event loop per process, each model's events encoded once: 0.45-0.85
           ms of CPU a call at 1,000 in flight (2026-12-04). A model provider runs on other
           machines; this stand-in shares the cores with what is measured, so it should
           take as little of them as it can.
  threads  the repo's test server (`FakeOpenAI`: http.server, a thread per stream), as the
           runs before 2026-12-04 used: 1.1-1.5 ms a call, and at 1,000 streams in one process
           GIL hand-offs added 0.7 s to a 3 s stream by themselves (p50, a bare asyncio
           client, 2 cores), hence 4 processes.
Not a test; not user-facing.
"""

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.openai_server import FakeOpenAI, Stream, _chunk, tokens  # noqa: E402

CHUNKS = 10
MAX_HEAD = 65536


def main() -> None:
    seconds = float(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    chunks = int(sys.argv[3]) if len(sys.argv) > 3 else CHUNKS
    kind = sys.argv[4] if len(sys.argv) > 4 else "asyncio"
    text = " ".join(f"token{i}" for i in range(chunks))
    if kind == "threads":
        return serve_threads(seconds, processes, chunks, text)
    if kind != "asyncio":
        sys.exit(f"KIND must be asyncio or threads, not {kind!r}")
    sock = _listener(0)
    port = sock.getsockname()[1]
    for _ in range(processes - 1):
        if os.fork() == 0:
            _die_with_parent()
            copy = _listener(port)
            sock.close()
            asyncio.run(Server(text, seconds / chunks).serve(copy))
            os._exit(0)
    print(f"http://127.0.0.1:{port}/v1", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(Server(text, seconds / chunks).serve(sock))


class Server:
    """One process's event loop: reads a request (head and Content-Length body), streams
    the answer with `delay_s` between pieces, closes the connection. The events of a model
    name are encoded once (their `created` is when they were made, within a second)."""

    def __init__(self, text: str, delay_s: float):
        self.pieces = tokens(text)
        self.delay_s = delay_s
        self.events: dict[str, tuple] = {}

    async def serve(self, sock: socket.socket) -> None:
        sock.listen(65535)  # capped by net.core.somaxconn
        server = await asyncio.start_server(self.handle, sock=sock, limit=MAX_HEAD)
        async with server:
            await server.serve_forever()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length)) if length else {}
            await self.stream(writer, body)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        finally:
            writer.close()

    def encoded(self, model: str) -> tuple:
        """(head and the role's event, one event per piece, the end without usage, with)."""
        if model not in self.events:
            n = len(self.pieces)
            end = _event(_chunk(model, {}, finish_reason="stop"))
            usage = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
            self.events[model] = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
                + _event(_chunk(model, {"role": "assistant", "content": ""})),
                [_event(_chunk(model, {"content": piece})) for piece in self.pieces],
                end + b"data: [DONE]\n\n",
                end + _event({**_chunk(model, None), "choices": [], "usage": usage})
                + b"data: [DONE]\n\n")
        return self.events[model]

    async def stream(self, writer: asyncio.StreamWriter, body: dict) -> None:
        first, pieces, end, end_usage = self.encoded(str(body.get("model") or "fake-model"))
        writer.write(first)
        for piece in pieces:
            await asyncio.sleep(self.delay_s)
            if writer.is_closing():
                return
            writer.write(piece)
        writer.write(end_usage if (body.get("stream_options") or {}).get("include_usage")
                     else end)
        await writer.drain()


def _listener(port: int) -> socket.socket:
    """A socket bound on 127.0.0.1:`port` (0: a free one) that other processes can bind
    too (SO_REUSEPORT: the kernel spreads connections over them)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _die_with_parent() -> None:
    from workers.pdeathsig import set_parent_death_signal
    set_parent_death_signal(signal.SIGKILL)


def serve_threads(seconds: float, processes: int, chunks: int, text: str) -> None:
    def serve(port: int = 0) -> FakeOpenAI:
        server = FakeOpenAI(default=Stream(text=text, delay_s=seconds / chunks), port=port,
                            reuse_port=True)
        server.httpd.socket.listen(65535)  # capped by net.core.somaxconn
        server.requests = _Counter()       # the test server keeps every request; count them only
        return server
    server = serve()
    for _ in range(processes - 1):  # forked before any thread starts
        if os.fork() == 0:
            _die_with_parent()
            copy = serve(server.port)
            copy.start()
            signal.pause()
            os._exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start()
    print(server.base_url, flush=True)
    try:
        signal.pause()
    finally:
        server.close()


class _Counter(list):
    """Stands in for FakeOpenAI.requests: counts appends, keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def append(self, item) -> None:
        self.count += 1


if __name__ == "__main__":
    main()
