"""Service-manager integration: systemd notifications, the pidfile and the ready file.

Owns the sd_notify datagram (READY=1, STATUS=, WATCHDOG=1, STOPPING=1, RELOADING=1) sent
to $NOTIFY_SOCKET as a plain unix datagram, with no extra dependency; without the
variable every call does nothing. It must never block the loop: sends are non-blocking
and failures are ignored (a lost STATUS is harmless; a lost WATCHDOG is retried next pass).
The ready file (`taskvisor run --ready-file PATH`) is the machine-readable "ready" for
launchers without systemd (tests, scripts): one JSON object written atomically, mode 0600,
once the database is migrated and rescued and HTTP is bound; removed at a clean exit.
"""

from __future__ import annotations

import json
import os
import socket
import time


class Notifier:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or ""
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.addr = addr or None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_s = int(usec) / 1e6 if usec and usec.isdigit() and (
            not pid or pid == str(os.getpid())) else None
        self._sock = None
        self._last_watchdog_mono = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.addr is not None

    def send(self, *fields: str) -> bool:
        if not self.addr:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(fields).encode(), self.addr)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 for Type=notify-reload.
        self.send("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self, now_mono: float) -> None:
        """Ping at most every half watchdog interval; called from the main loop only."""
        if self.watchdog_s is None or now_mono - self._last_watchdog_mono < self.watchdog_s / 2:
            return
        if self.send("WATCHDOG=1"):
            self._last_watchdog_mono = now_mono

    def next_watchdog_mono(self) -> float | None:
        if self.watchdog_s is None:
            return None
        return self._last_watchdog_mono + self.watchdog_s / 2

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def write_pidfile(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pidfile(path: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


def write_ready_file(path: str, *, owner: str, http_url: str | None) -> None:
    """{"pid", "owner", "http", "ready_at"}: written to a temporary name, then renamed, so
    a reader sees the whole object or no file. `http` is the bound URL or null."""
    tmp = f"{path}.{os.getpid()}.tmp"
    data = {"pid": os.getpid(), "owner": owner, "http": http_url or None,
            "ready_at": time.time()}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data) + "\n")
    os.replace(tmp, path)


def remove_ready_file(path: str) -> None:
    """Remove the ready file if this process wrote it (a successor's is left alone)."""
    try:
        with open(path) as f:
            if json.loads(f.read()).get("pid") == os.getpid():
                os.unlink(path)
    except (OSError, ValueError, AttributeError):
        pass
