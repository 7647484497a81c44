"""A packet channel from the supervisor to one of its helper processes (a fork server, the
model-call relay): spawn requests out, events in, and the execution fence beside them.

Owns the non-blocking side of the supervisor: what the socket cannot take now waits in an
outbox (with the descriptors each packet carries) that the loop flushes when the socket is
writable, so the supervisor and a helper can never both block writing to each other; the
events read back and checked by workers.wire (a helper that breaks the protocol is killed);
the spawn request itself (the report socket passed as a descriptor, the spec in the same
packet or in a memfd when it is too big for one); the fence (shared memory, never queued).
It never starts or reaps a process (the subclasses do) and never touches the database.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket

from workers import wire

MAX_PACKET = wire.MAX_PACKET
INLINE_SPEC_MAX = 60000  # bytes: under MAX_PACKET with room for the header line; bigger: a memfd
# One encoder for every spec (json.dumps with arguments builds one per call).
_encode_spec = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Channel:
    """The supervisor's end of one helper's SOCK_SEQPACKET socket."""

    output_pipes = True     # spawn() makes an output pipe for the task's stdout and stderr
    hosts_attempts = False  # True: it runs attempts itself, with no process each (the relay)

    def __init__(self) -> None:
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self.exited = False
        self.broken: str | None = None  # why its messages can no longer be trusted
        # Packets the socket could not take yet, with the descriptors they carry.
        self.outbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.fence_map: wire.Fence | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def spawn(self, key: str, spec: dict | bytes, start_by: float | None = None) -> tuple[int, int]:
        """Ask for one attempt, to be started before monotonic time `start_by` or not at
        all; returns (the supervisor's end of its report socket, the read end of its
        output pipe or -1), both non-blocking. Raises OSError only when the helper is gone."""
        body = spec if isinstance(spec, bytes) else _encode_spec(spec).encode()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.detach()]
        output_r = -1
        if self.output_pipes:
            output_r, output_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            os.set_blocking(output_w, True)  # the task's stdout: a plain blocking pipe
            fds.append(output_w)
        if len(body) <= INLINE_SPEC_MAX:
            packet = wire.encode_spawn(key, body, start_by)
        else:
            packet = wire.encode_spawn(key, None, start_by)
            fds.append(_spec_file(body))
        ours.setblocking(False)
        try:
            self.send(packet, fds)
        except OSError:
            ours.close()
            if output_r >= 0:
                os.close(output_r)
            raise
        return ours.detach(), output_r

    def fence(self, deadline_mono: float) -> None:
        """Attempts run by this helper must not run past `deadline_mono` (monotonic
        seconds) unless a later fence is set first: the helper reads it at once."""
        if self.fence_map is not None:
            self.fence_map.set(deadline_mono)

    def send(self, packet: bytes, fds: list[int]) -> None:
        """Send now if the socket takes it, else queue it (in order); the descriptors
        are closed once sent. Raises OSError when the helper is gone."""
        if self.sock is None:
            for fd in fds:
                os.close(fd)
            raise OSError("the helper's socket is closed")
        self.outbox.append((packet, fds))
        if len(self.outbox) == 1:
            self.flush()

    def flush(self) -> None:
        """Send what the outbox holds until the socket would block (never blocks)."""
        while self.outbox and self.sock is not None:
            packet, fds = self.outbox[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [packet], fds)
                else:
                    self.sock.send(packet)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.exited = True
                self._drop_outbox()
                raise
            self.outbox.popleft()
            for fd in fds:
                os.close(fd)

    def _drop_outbox(self) -> None:
        while self.outbox:
            for fd in self.outbox.popleft()[1]:
                os.close(fd)

    def events(self) -> list[dict]:
        """Every message waiting from the helper; [] when none. Sets `exited` on EOF
        and `broken` (and kills it) on a message that breaks the protocol."""
        out = []
        while self.sock is not None and self.broken is None:
            try:
                data = self.sock.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.exited = True
                break
            if not data:
                self.exited = True
                break
            try:
                out.append(wire.parse_server_event(data))
            except wire.ProtocolError as exc:
                self.broken = str(exc)
                self.kill()  # what it runs dies with it; the supervisor starts it again
        return out

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._drop_outbox()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _spec_file(data: bytes) -> int:
    """An anonymous file holding the spec (any size, unlike a socket packet)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("taskvisor-spec", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        import tempfile
        fd, path = tempfile.mkstemp(prefix="taskvisor-spec-")
        os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
