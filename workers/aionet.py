"""httpcore's network backend on asyncio's own transports, for the model-call relay's clients.

Why: httpcore reaches asyncio through anyio, whose socket stream pauses the transport
after every read and resumes it before the next (epoll_ctl calls each read) and opens a
cancel scope per read for its timeout: about a quarter of the relay's CPU at 1,000 calls
in flight (py-spy, benchmarks/README.md). Here a connection is an asyncio.Protocol that
keeps reading into a buffer (paused only past HIGH_WATER unread bytes: backpressure), and
a read waits on one future with one timer for its timeout.

Owns connecting (TCP, Unix socket), reading, writing, the TLS upgrade and closing, and
raising httpcore's own exceptions for them (ConnectError, ConnectTimeout, ReadError,
ReadTimeout, WriteError, WriteTimeout: httpx maps them as it maps anyio's). It never
parses HTTP (h11 does, inside httpcore). Used by workers.relay only; plugged in with
httpcore's documented `network_backend`.
"""

from __future__ import annotations

import asyncio
import ssl
import typing

import httpcore

HIGH_WATER = 1 << 18  # unread bytes before the connection stops reading (then LOW_WATER)
LOW_WATER = 1 << 16
# Every connection's reads land here first (BufferedProtocol: the transport calls recv_into
# and then buffer_updated, in one callback of the loop's one thread), then are copied to
# that connection's buffer. A plain Protocol is handed a new bytes object per read, which
# asyncio allocates at 256 KiB and shrinks: a mmap, a mremap and a munmap per read (strace
# of a relay at 300 calls in flight: 10 of them per call).
_READ_INTO = memoryview(bytearray(1 << 16))


class _Protocol(asyncio.BufferedProtocol):
    """What has arrived on one connection, and who waits for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.paused = False            # reading paused: the buffer is past HIGH_WATER
        self.waiter: asyncio.Future | None = None       # a read waiting for data
        self.writable: asyncio.Future | None = None     # a write waiting for the buffer to drain
        self.write_paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_INTO

    def buffer_updated(self, nbytes: int) -> None:
        self.buffer += _READ_INTO[:nbytes]
        if not self.paused and len(self.buffer) > HIGH_WATER:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too: HTTP/1.1 never half-closes

    def connection_lost(self, exc) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        self.write_paused = False
        _done(self.writable)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _done(self.writable)

    def _wake(self) -> None:
        _done(self.waiter)


class Stream(httpcore.AsyncNetworkStream):
    """One connection, as httpcore reads and writes it."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol):
        self.transport = transport
        self.protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self.protocol
        if not p.buffer and not p.eof:
            p.waiter = _until(timeout, httpcore.ReadTimeout)
            try:
                await p.waiter
            finally:
                p.waiter = None
        if p.buffer:
            data = bytes(p.buffer[:max_bytes])
            del p.buffer[:max_bytes]
            if p.paused and len(p.buffer) <= LOW_WATER:
                p.paused = False
                self.transport.resume_reading()
            return data
        if p.error is not None:
            raise httpcore.ReadError(str(p.error) or type(p.error).__name__)
        return b""  # the end of the connection

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        p = self.protocol
        if self.transport.is_closing():
            raise httpcore.WriteError(str(p.error) if p.error else "the connection is closed")
        self.transport.write(buffer)
        if p.write_paused:
            p.writable = _until(timeout, httpcore.WriteTimeout)
            try:
                await p.writable
            finally:
                p.writable = None
            if p.error is not None:
                raise httpcore.WriteError(str(p.error))

    async def aclose(self) -> None:
        # abort, not close: a connection closed mid-answer must not wait to flush
        # anything, and its server sees the end at once.
        self.transport.abort()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> "Stream":
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(self.transport, self.protocol, ssl_context,
                                                 server_hostname=server_hostname)
        except TimeoutError:
            self.transport.abort()
            raise httpcore.ConnectTimeout("the TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self.transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        return Stream(transport, self.protocol)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "ssl_object":
            return self.transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self.transport.get_extra_info("sockname")
        if info == "server_addr":
            return self.transport.get_extra_info("peername")
        if info == "socket":
            return self.transport.get_extra_info("socket")
        if info == "is_readable":
            # An idle kept-alive connection with bytes or an end waiting: the server
            # closed it (or broke the protocol); httpcore then drops it from the pool.
            return bool(self.protocol.buffer) or self.protocol.eof
        return None


class Backend(httpcore.AsyncNetworkBackend):
    """Connections as Streams on the running asyncio loop."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable | None = None) -> Stream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        return await self._connect(loop.create_connection(_Protocol, host, port, local_addr=local),
                                   timeout, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable | None = None) -> Stream:
        loop = asyncio.get_running_loop()
        return await self._connect(loop.create_unix_connection(_Protocol, path), timeout,
                                   socket_options)

    async def _connect(self, connecting, timeout: float | None, socket_options) -> Stream:
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await connecting
        except TimeoutError:
            raise httpcore.ConnectTimeout("the connection timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return Stream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _until(timeout: float | None, error: type) -> asyncio.Future:
    """A future for one wait, failed with `error` after `timeout` seconds (None: never);
    its timer goes with it once it is done, whichever way."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    if timeout is not None:
        timer = loop.call_later(timeout, _fail, future, error)
        future.add_done_callback(lambda _f: timer.cancel())
    return future


def _fail(future: asyncio.Future, error: type) -> None:
    if not future.done():
        future.set_exception(error("timed out"))


def _done(future: asyncio.Future | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def transport(httpx, *, verify: ssl.SSLContext, limits) -> object:
    """An httpx.AsyncHTTPTransport whose connection pool runs on this backend (httpx
    passes no network_backend through; its `_pool` is replaced, with the same settings)."""
    t = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    t._pool = httpcore.AsyncConnectionPool(
        ssl_context=verify, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry, network_backend=Backend())
    return t
