"""The model-call relay: one process per supervisor that makes the HTTP exchanges of
`llm.chat` for every task process, on one asyncio loop with httpx.AsyncClients
(connections to the provider pooled and kept alive across tasks: no TLS handshake per task).

Why: a task process is forked from the fork server, and under Python 3.11 every object a
call touches (httpx, httpcore, h11, the client, the TLS context) has its page copied into
that process: ~5.6 MiB of private memory per chat task in flight. Through the relay a task
touches a socket and `json` only: 1.2 MiB at 1,000 in flight, the relay's share included
(benchmarks/README.md, "In flight: `llm.chat` through the model-call relay").

Owns the relay process and its protocol; `workers.handlers.llmrelay` (over
`workers.relaycall`) owns the task's side, `workers.handlers.llm` the call's meaning (the
attempt, the outcome, progress, retries). It never imports `supervisor/`, never opens the
database, and never logs a request's headers or body (the API key travels in them).

Protocol, over one AF_UNIX stream connection per call (the socket's path is in the
environment variable TASKVISOR_LLM_RELAY_SOCKET, which every task process inherits):
- the task sends one line of JSON: {"url", "headers", "body" (the JSON request body),
  "stall_timeout_s", "request_timeout_s"}, and then keeps its side open: end of file from
  the task means it went away, and the relay closes the upstream request at once;
- the relay answers with frames: one kind byte, a 4-byte big-endian length, the payload:
  `H` {"status", "reason", "headers": [[name, value], ...]} once, then either one `B` (the
  whole body, bytes: an HTTP error status or an application/json answer) or any number of
  `L` (body lines, UTF-8, joined by "\\n"; one frame per read from upstream, split at
  CRLF, LF and CR only: workers.sse), then `Z` (the end) or `E` {"kind", "error",
  "message"} where kind is one of ERROR_KINDS (stalled: no bytes for stall_timeout_s;
  connect; transport; decoding; unsupported: a URL httpx cannot use; overran: past
  request_timeout_s; protocol: a request the relay could not read; oversized: an answer
  over MAX_ANSWER_BYTES). After `Z` or `E` the relay closes the connection.
- With "parse" in the request line ({"reports": bool, "model", "max_tokens"}: the
  `llm.chat` call of a TaskContext, or of no context), the relay reads a 2xx answer itself
  (workers.handlers.llmreports: the same Reply a task runs) and sends instead `R` (report
  lines, workers.wire: the stream text, progress and spend that the task's context would
  have sent, for the task to write to its report channel as they are; the first one
  before the request; the stream text at most every STREAM_EVERY_S, the first piece at
  once) and `J` (the result object; the end), or `E` with kind "raised"
  {"error": the llm exception's class name, "message"}. An HTTP error status still comes
  as `H` and `B`.
- Backpressure: the relay writes a frame and waits for the socket to drain before it reads
  upstream again, so a task that does not read holds at most a socket buffer's worth (and,
  with "parse", HOLD_PIECES pieces of held stream text).

Besides the task processes' calls, the relay runs `llm.chat` attempts itself when the
supervisor sends them on the control socket (workers.hosting), each call then going to a
HostedAnswer instead of a task's connection (both take the same frames: TaskFrames' interface).

Run as `python -m workers.relay --socket PATH --parent PID --ctrl-fd FD [--fence-fd FD]`:
it binds PATH (mode 0600; the supervisor makes its folder 0700), sends {"op": "ready"} on
the control socket (a SOCK_SEQPACKET pair), and exits when the control socket ends, on
SIGTERM, or when its parent dies.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import stat
import sys

from workers import sse
from workers.relaycall import RELAY_ENV, frame  # noqa: F401 - RELAY_ENV: the variable naming the socket

ERROR_KINDS = ("stalled", "connect", "transport", "decoding", "unsupported", "overran", "protocol",
               "oversized", "raised")
CONNECT_TIMEOUT_S = 30.0
MAX_REQUEST_BYTES = 1 << 28          # one request line (the messages of a long conversation)
# One answer, as decoded (gzip undone): a chat completion is a few MiB at most. Past it the
# call fails (oversized): a server gone wrong (a line that never ends, a compressed bomb)
# must not fill the relay, which every call in flight shares. Counted in bytes of a whole
# body and in characters of a stream's decoded text (1 to 4 bytes each).
MAX_ANSWER_BYTES = 1 << 26
MAX_ERROR_BODY_BYTES = 1 << 20       # of an HTTP error's body, what is read (the rest is not)
LANE_CALLS = 16                      # calls at once per httpx client (RelayServer.lane)
KEEPALIVE_EXPIRY_S = 30.0
BACKLOG = 4096                       # capped by net.core.somaxconn: a wave of tasks connects at once
EXIT_PARENT_GONE = 3
DONE_DRAIN_S = 0.5                   # after [DONE], how long the body's end is waited for
SOCKET_CHECK_S = 2.0                 # how often the relay looks that its socket is still there
# An answer it reads itself (a hosted attempt, or a task's "parse" call) goes out as stream
# text at most this often: the first piece at once, the next ones held until this long
# after the last went (or HOLD_PIECES came), then together as one report line. Each line is
# read, parsed and stored by the supervisor, and a model that streams 30-100 tokens a second
# sent as many (the supervisor stores output every 50 ms at best anyway).
STREAM_EVERY_S = 0.05
HOLD_PIECES = 64
# The cyclic collector's young-generation threshold once httpx is loaded (the default is
# 700): a call in flight keeps a few hundred objects alive for its seconds (its coroutine,
# connection, parser), so at the default every young collection found them alive, moved
# them up, and the older generations scanned all of them again; with 1,000 calls in flight
# that was 0.54-0.56 s of each relay's CPU in a 12 s run (0.37 ms a call; full
# collections of 75 ms that held the loop). At 20,000 with gc.freeze() after the imports
# it was 0.08 s. Cyclic garbage waits at most this many allocations more.
GC_THRESHOLDS = (20_000, 20, 20)


class Oversized(Exception):
    """An answer over MAX_ANSWER_BYTES."""

    def __init__(self):
        super().__init__(f"over {MAX_ANSWER_BYTES >> 20} MiB, which no chat completion is; "
                         f"stopped reading it")


def grown(size: int, more: int) -> int:
    """What has been read of an answer, `more` later; Oversized past MAX_ANSWER_BYTES."""
    size += more
    if size > MAX_ANSWER_BYTES:
        raise Oversized()
    return size


def is_json(resp) -> bool:
    """An answer that is one JSON object (a server that ignored stream: true), not a stream."""
    return resp.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def error_kind(exc: BaseException) -> str:
    """The protocol's kind for an httpx exception (the task raises the same exception from
    it as from the exception itself: workers.handlers.llm)."""
    import httpx
    if isinstance(exc, httpx.ReadTimeout):
        return "stalled"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return "unsupported"
    if isinstance(exc, httpx.DecodingError):
        return "decoding"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect"
    return "transport"


def _no_missing_sniffio() -> None:
    """httpcore imports sniffio at every request and response of an async client, to tell
    asyncio from trio; where sniffio is not installed (anyio 4 does without it), each of
    those failed imports searched sys.path again: 16% of the relay's CPU (~1.6 ms a call).
    A None entry makes the import fail at once; asyncio is then assumed, as it is."""
    import importlib.util
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None


class RelayServer:
    """The serving side: httpx AsyncClients in lanes (lane()), one coroutine per task
    connection."""

    def __init__(self) -> None:
        self.httpx = None  # with the rest of the serving side, at the first call (_load)
        # Clients ("lanes") of at most LANE_CALLS calls at once each: httpcore's pool does
        # work in proportion to its connections times its requests at every request and
        # response (measured: 200 calls at once in one client spent 75% of the relay's CPU
        # there, and the calls queued for seconds). Calls go to the first lane with room,
        # so the same lanes, and their kept-alive connections, serve wave after wave.
        self.lanes: list[list] = []  # [client, calls in flight]

    def warm(self) -> None:
        """Load the serving side now (the supervisor is idle: workers.hosting), not in the
        first call, which would wait for it."""
        if self.httpx is None:
            self._load()

    def _load(self) -> None:
        """Import httpx and llm's answer reader and build the TLS context: ~0.3 s of CPU,
        paid at the first call rather than at every supervisor's start (where it competed
        with the first tasks for the cores, in every run, model calls or not)."""
        _no_missing_sniffio()
        import httpx

        from workers import aionet
        from workers.handlers import llmreports
        self.aionet = aionet
        self.llmreports = llmreports
        self.tls = httpx.create_ssl_context()
        self.httpx = httpx
        # What the imports made lives as long as the relay: out of every later collection.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    async def serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One task's call, until its end, its error, or the task going away."""
        try:
            try:
                line = await reader.readline()
                if not line:
                    return  # connected and left (a probe)
                req = json.loads(line)
                args = (str(req["url"]), req["body"], dict(req.get("headers") or {}),
                        float(req["stall_timeout_s"]), float(req["request_timeout_s"]),
                        dict(req["parse"]) if req.get("parse") is not None else None)
            except (ValueError, KeyError, TypeError) as exc:  # a line over the limit: ValueError
                await self._error(writer, "protocol", exc)
                return
            call = asyncio.ensure_future(self.call(TaskFrames(writer), *args))
            gone = asyncio.ensure_future(reader.read(1))  # end of file: the task went away
            await asyncio.wait((call, gone), return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                call.cancel()  # closes the upstream response, and so its connection
            else:
                gone.cancel()
            await asyncio.gather(call, gone, return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def lane(self) -> list:
        for lane in self.lanes:
            if lane[1] < LANE_CALLS:
                return lane
        limits = self.httpx.Limits(max_connections=None, max_keepalive_connections=LANE_CALLS,
                                   keepalive_expiry=KEEPALIVE_EXPIRY_S)
        client = self.httpx.AsyncClient(
            verify=self.tls, limits=limits,  # (a proxy from the environment uses these)
            transport=self.aionet.transport(self.httpx, verify=self.tls, limits=limits))
        self.lanes.append([client, 0])
        return self.lanes[-1]

    async def call(self, out: "TaskFrames", url: str, body, headers: dict,
                   stall_s: float, request_s: float, parse: dict | None) -> None:
        """One exchange, its answer sent to `out` as frames (a task's connection, or a
        hosted attempt: workers.hosting)."""
        if self.httpx is None:
            self._load()
        lane = self.lane()
        lane[1] += 1
        try:
            await self._call(lane[0], out, url, body, headers, stall_s, request_s, parse)
        finally:
            lane[1] -= 1

    async def _call(self, client, writer: "TaskFrames", url: str, body, headers: dict,
                    stall_s: float, request_s: float, parse: dict | None) -> None:
        httpx = self.httpx
        timeout = httpx.Timeout(stall_s, connect=min(CONNECT_TIMEOUT_S, stall_s))
        parsed = None
        try:
            if parse is not None:
                parsed = self.llmreports.Parse(parse, url, stall_s)
                first = parsed.start()
                if first:
                    await writer.send(b"R", first)
            async with asyncio.timeout(request_s):
                async with client.stream("POST", url, json=body, headers=headers,
                                         timeout=timeout) as resp:
                    if resp.status_code >= 400 or parsed is None:
                        head = {"status": resp.status_code, "reason": resp.reason_phrase,
                                "headers": [[k, v] for k, v in resp.headers.items()]}
                        await writer.send(b"H", json.dumps(head).encode())
                    if resp.status_code >= 400:
                        await writer.send(b"B", await _body(resp, MAX_ERROR_BODY_BYTES))
                        await writer.send(b"Z")
                    elif parsed is not None:
                        await self._parsed(resp, writer, parsed)
                    else:
                        await self._lines(resp, writer)
        except httpx.HTTPError as exc:
            if parsed is not None and error_kind(exc) == "stalled":
                exc = parsed.stalled()  # the Reply's words: how many tokens came first
                await self._send_error(writer, self.llmreports.raised(exc))
                return
            await self._error(writer, error_kind(exc), exc)
        except TimeoutError:
            await self._error(writer, "overran", None)
        except Oversized as exc:
            await self._error(writer, "oversized", exc)
        except (ConnectionError, asyncio.CancelledError):
            raise  # the task went away
        except Exception as exc:  # noqa: BLE001 - told to the task, never logged here (the
            # request's headers could show): llm's own exceptions of the parse as themselves
            told = self.llmreports.raised(exc) if parsed is not None else None
            if told is not None:
                await self._send_error(writer, told)
            else:
                await self._error(writer, "transport", exc)

    async def _batches(self, resp):
        """The body's lines, one list per upstream read (split where SSE splits: not at
        U+2028 and the like, as httpx's iter_lines does), the last one at the end."""
        decoder = sse.Lines()
        size = 0
        async for text in resp.aiter_text():
            size = grown(size, len(text))
            lines = decoder.decode(text)
            if lines:
                yield lines
        lines = decoder.flush()
        if lines:
            yield lines

    async def _lines(self, resp, writer: "TaskFrames") -> None:
        """The body as it comes: the whole of it (`B`) for one JSON object, else its lines
        (`L`, one frame per upstream read), then `Z`."""
        if is_json(resp):
            await writer.send(b"B", await _body(resp))
        else:
            batches = self._batches(resp)
            async for lines in batches:
                await writer.send(b"L", "\n".join(lines).encode())
                if any(line.startswith("data:") and line[5:].strip() == "[DONE]" for line in lines):
                    await _rest(batches)
                    break
        await writer.send(b"Z")

    async def _parsed(self, resp, writer: "TaskFrames", parsed) -> None:
        """The body read here (llmreports.Parse): `R` frames of report lines as they come,
        then the last ones and `J`, the result. Raises llm's exceptions."""
        if is_json(resp):
            reports = parsed.whole(await _body(resp))
            if reports:
                await writer.send(b"R", reports)
        else:
            await _stream_parsed(self._batches(resp), writer, parsed)
        last, result = parsed.end()
        if last:
            writer.put(b"R", last)
        await writer.send(b"J", result)

    async def _error(self, writer: "TaskFrames", kind: str, exc: BaseException | None) -> None:
        # The exception's text names the URL at most, never a header or the body.
        await self._send_error(writer, {
            "kind": kind, "error": type(exc).__name__ if exc is not None else "",
            "message": str(exc)[:2000] if exc is not None else ""})

    async def _send_error(self, writer: "TaskFrames", msg: dict) -> None:
        try:
            await writer.send(b"E", json.dumps(msg).encode())
        except (ConnectionError, OSError):
            pass


class TaskFrames:
    """Where a call's answer goes: a task's connection, one frame each (`put` queues one
    for the next `send`). `send` waits for the socket to drain (backpressure: no upstream
    read until the task has taken this). workers.hosting has its own kind, for an attempt
    the relay runs itself."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    def put(self, kind: bytes, data: bytes = b"") -> None:
        self.writer.write(frame(kind, data))

    async def send(self, kind: bytes, data: bytes = b"") -> None:
        self.put(kind, data)
        await self.writer.drain()


async def _stream_parsed(batches, writer: "TaskFrames", parsed) -> None:
    """The body's batches fed to `parsed`, its report lines sent as `R` frames, its stream
    text at most every STREAM_EVERY_S: held text goes with the next read that is due, or by
    a timer if none comes, and before whatever ends the call (its error included)."""
    loop = asyncio.get_running_loop()
    last = -STREAM_EVERY_S  # the first piece goes at once
    timer: asyncio.TimerHandle | None = None

    def flush_held() -> None:
        nonlocal timer, last
        timer = None
        last = loop.time()
        reports = parsed.flush()
        if reports:
            writer.put(b"R", reports)
    try:
        async for lines in batches:
            now = loop.time()
            due = now - last >= STREAM_EVERY_S or parsed.held >= HOLD_PIECES
            reports = parsed.lines(lines, flush=due)
            if due:
                if parsed.flushed:  # (a read with no text, the role's chunk, starts no step)
                    last = now
                if timer is not None:
                    timer.cancel()
                    timer = None
            elif parsed.held and timer is None:
                timer = loop.call_at(last + STREAM_EVERY_S, flush_held)
            if reports:
                await writer.send(b"R", reports)  # the wait for the reader: backpressure
            if parsed.done:
                await _rest(batches)
                break
    except BaseException:
        if timer is not None:
            timer.cancel()
        try:
            flush_held()  # (forgets the timer) what came before the error is output too
        except Exception:  # noqa: BLE001 - the first error is the one told
            pass
        raise
    finally:
        if timer is not None:
            timer.cancel()


async def _body(resp, cap: int | None = None) -> bytes:
    """The whole body, decoded; over MAX_ANSWER_BYTES, Oversized. With `cap`, its first
    `cap` bytes, the rest left unread (an error's body: only its start is shown)."""
    parts, size = [], 0
    async for piece in resp.aiter_bytes():
        parts.append(piece)
        if cap is not None and size + len(piece) >= cap:
            return b"".join(parts)[:cap]
        size = grown(size, len(piece))
    return b"".join(parts)


async def _rest(batches) -> None:
    """After data: [DONE] the answer is whole: what is left of the body (its end, at once
    from a well-behaved server) is read for at most DONE_DRAIN_S, so that the connection
    goes back to the pool kept alive; a server or proxy that holds the connection open
    after [DONE] is then left (waiting for its end turned a whole answer into a stall,
    retried: the call made twice)."""
    try:
        async with asyncio.timeout(DONE_DRAIN_S):
            async for _ in batches:
                pass
    except TimeoutError:
        pass


def bind(path: str) -> socket.socket:
    """A listening socket at `path`, mode 0600 from the start; a socket file left there by
    an earlier relay (which died) is replaced. Refuses a path that is not a socket."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    return sock


def file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket file at `path`, or None when there is none. Taken
    right after bind and compared later: fstat of the listening socket gives the socket's
    own inode, never the file's, so comparing with it found the socket "removed" at
    every check and bound it again every SOCKET_CHECK_S, resetting connections that
    waited in the old listener's backlog."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def gone(path: str, bound: tuple[int, int] | None) -> bool:
    """Whether the socket file we bound (`bound`, file_id right after bind) is no longer
    at `path`: removed, or another file in its place."""
    return bound is None or file_id(path) != bound


def rebind(path: str) -> socket.socket:
    """A listening socket at `path` again, its folder made again (0700) when it is gone:
    something cleaned the temporary folder. Raises OSError (tried again later)."""
    folder = os.path.dirname(path)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{folder} is not a folder of ours")
    os.chmod(folder, 0o700)
    return bind(path)


async def run(listener: socket.socket, ctrl: socket.socket, fence=None) -> None:
    """Serve on `listener`, and host the attempts the supervisor sends on `ctrl`
    (workers.hosting, under the execution `fence`), until the control socket ends or
    SIGTERM. Every SOCKET_CHECK_S,
    if its path no longer names the listening socket (the folder was removed: a tmp
    cleaner), bind it again: else every task found no relay and called directly, for the
    rest of the supervisor's life (the relay itself never died, so was never restarted).
    Calls in flight go on on their own connections."""
    relay = RelayServer()
    path = listener.getsockname()

    async def serve(sock: socket.socket):
        return await asyncio.start_unix_server(relay.serve_one, sock=sock, backlog=BACKLOG,
                                               limit=MAX_REQUEST_BYTES)
    server = await serve(listener)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    bound = file_id(path)

    async def watch() -> None:
        nonlocal server, listener, bound
        while True:
            await asyncio.sleep(SOCKET_CHECK_S)
            if not gone(path, bound):
                continue
            try:
                fresh = rebind(path)
            except OSError as exc:
                print(f"taskvisor-relay: its socket {path} is gone and cannot be made again "
                      f"({exc}); tasks call directly meanwhile", file=sys.stderr, flush=True)
                continue
            old, server, listener = server, await serve(fresh), fresh
            bound = file_id(path)
            old.close()  # stops accepting there; its calls in flight go on
            print(f"taskvisor-relay: its socket {path} was removed; listening there again",
                  file=sys.stderr, flush=True)
    watching = asyncio.ensure_future(watch())
    from workers.hosting import Host
    host = Host(relay, ctrl, fence)

    def on_ctrl() -> None:
        if not host.on_readable() and not done.done():
            done.set_result("the supervisor closed the control socket")

    loop.add_reader(ctrl.fileno(), on_ctrl)
    loop.add_signal_handler(signal.SIGTERM, lambda: done.done() or done.set_result("SIGTERM"))
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # ^C goes to the supervisor, who stops us
    await done
    watching.cancel()
    server.close()
    # Stopped once no task is left: nothing to flush, and no connection worth a goodbye.
    # Leaving here skips cancelling what is left (asyncio logs each as an error) and the
    # interpreter's teardown of httpx and the rest, which took longer than the whole stop.
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = dict(zip(argv[::2], argv[1::2]))
    from workers.pdeathsig import set_parent_death_signal, set_process_name
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != int(args["--parent"]):
        return EXIT_PARENT_GONE
    set_process_name(b"taskvisor-relay")
    ctrl = socket.socket(fileno=int(args["--ctrl-fd"]))
    fence = None
    if int(args.get("--fence-fd", -1)) >= 0:
        from workers.wire import Fence
        fence = Fence(int(args["--fence-fd"]))
        os.close(int(args["--fence-fd"]))  # the mapping stays
    # Listening before the serving side's imports (httpx, ~0.3 s, at the first call): the
    # supervisor need not wait for them, and a task that connects meanwhile waits.
    listener = bind(args["--socket"])
    try:
        ctrl.sendall(b'{"op":"ready"}')
    except OSError:
        # The supervisor stopped before it needed us (a database it cannot open): it
        # already said why; a BrokenPipeError traceback under its one-line error only hid it.
        return EXIT_PARENT_GONE
    asyncio.run(run(listener, ctrl, fence))  # leaves the process itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
