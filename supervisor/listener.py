"""The listening sockets of the HTTP server: a TCP address (IPv6 only on an IPv6 address,
no DNS lookup at bind) or a Unix socket file (`listen = "unix:/path"`, created mode 0600,
a stale file of a dead supervisor removed, a live one refused), and the bookkeeping of
connections handed to the event fan-out process (closed here, never shut down).

Owns binding and closing those sockets and the error a person reads when an address
cannot be used. It never reads or answers a request (that is `supervisor.http`, whose
handler class it is given) and never touches the store.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import socketserver
import stat
from http.server import ThreadingHTTPServer
from socketserver import TCPServer

from supervisor.errors import ConfigError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


class _HandOver:
    """Sockets of event streams given to the fan-out process: closed here, never shut
    down (shutdown() would end the connection in that process too)."""

    def handed_over(self, sock) -> None:
        self._handed.add(sock.fileno())

    def shutdown_request(self, request) -> None:
        if request.fileno() in self._handed:
            self._handed.discard(request.fileno())
            self.close_request(request)
        else:
            super().shutdown_request(request)


class TcpListener(_HandOver, ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, family: int, address: tuple, app, handler):
        self._handed: set[int] = set()
        self.address_family = family
        self.app = app
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can stall start-up.
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class UnixListener(_HandOver, socketserver.ThreadingUnixStreamServer):
    """The same API on a Unix socket, created with mode 0600."""
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, path: str, app, handler):
        self._handed: set[int] = set()
        self.app = app
        self.path = path
        super().__init__(path, handler)

    def server_bind(self) -> None:
        _remove_stale_socket(self.path)
        old = os.umask(0o177)  # no moment where the socket is open to others
        try:
            self.socket.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.server_address = self.path
        self.server_name, self.server_port = "localhost", 0

    def server_close(self) -> None:
        super().server_close()
        try:
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a supervisor that died; refuse a live one or a file
    that is not a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left behind
        return
    finally:
        probe.close()
    raise OSError(f"another process is serving on {path}")


def bind(listen: str, app, handler) -> TcpListener | UnixListener:
    """A listener on `listen` ([http] listen) whose requests `handler` (a request handler
    class) answers, with `app` as its `.app`. Raises ConfigError saying what to change."""
    if listen.startswith("unix:"):
        try:
            return UnixListener(listen[5:], app, handler)
        except OSError as exc:
            raise ConfigError(f"[http] listen {listen}: cannot listen there "
                              f"({exc.strerror or exc}); check the folder exists, or remove "
                              "the file if no supervisor uses it") from exc
    host, port = parse_listen(listen)
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return TcpListener(family, address, app, handler)
    except OSError as exc:
        raise ConfigError(f"[http] listen {listen}: cannot listen there "
                          f"({exc.strerror or exc}); choose another address, or set "
                          'listen = "" to turn the HTTP server off') from exc
