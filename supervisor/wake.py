"""Wake-ups: a datagram on 127.0.0.1 tells idle supervisors that the queue changed.

Owns the wake socket of a supervisor (a UDP port on loopback, recorded in the
`supervisors` table) and `WakeSender.notify()`, which a client calls after a commit so a new task
starts within milliseconds instead of a poll interval. A wake-up carries no data and is
only a hint: losing one costs at most one poll interval, never a task. Never put task
state in a datagram.
"""

from __future__ import annotations

import socket
import time

HOST = "127.0.0.1"


class WakeSocket:
    """The supervisor's end: a non-blocking UDP socket to put in the loop's selector."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> int:
        """Read every pending datagram; returns how many there were."""
        n = 0
        while True:
            try:
                self.sock.recv(64)
                n += 1
            except (BlockingIOError, InterruptedError):
                return n
            except OSError:
                return n

    def close(self) -> None:
        self.sock.close()


class WakeSender:
    """The client's end: sends one byte to every live supervisor of a database file (a
    supervisor uses one too, to wake the others when it cannot take what it made ready).

    The list of ports is read from the store at most once a second.
    """

    def __init__(self, store, host: str, refresh_s: float = 1.0, skip: int | None = None):
        self._store = store
        self._host = host
        self._skip = skip  # a supervisor's own port, when it wakes the others
        self._refresh_s = refresh_s
        self._ports: list[int] = []
        self._read_mono = float("-inf")
        self._sock: socket.socket | None = None

    def notify(self) -> None:
        now_mono = time.monotonic()
        if now_mono - self._read_mono > self._refresh_s:
            try:
                self._ports = [p for p in self._store.wake_ports(self._host) if p != self._skip]
            except Exception:  # a hint only: never fail an enqueue for it
                self._ports = []
            self._read_mono = now_mono
        if not self._ports:
            return
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                # Bound before the first sendto, which would otherwise bind it to
                # 0.0.0.0: a port open on every interface for the life of the client.
                sock.bind((HOST, 0))
                sock.setblocking(False)
            except OSError:
                sock.close()
                return  # a hint only: the poll finds the work
            self._sock = sock
        for port in self._ports:
            try:
                self._sock.sendto(b"!", (HOST, port))
            except OSError:
                pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
