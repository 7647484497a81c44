"""The fork servers, seen from the supervisor: the process handle and its generations.

Owns starting a fork server (`python -m workers.zygote`, a fresh interpreter in its own
process group that imports the preload modules, with its fence memfd), the boot handshake,
and the generations: the current server, the retiring ones that keep running their tasks
after a reload, and the restart backoff after a crash. The channel itself (spawn requests
that never block the loop, events, the fence) is supervisor.channel's. It never imports
user code and never touches the database.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

from supervisor.channel import MAX_PACKET, Channel
from supervisor.proctree import describe_status, helper_env, spawn_helper
from workers import wire

log = logging.getLogger("taskvisor.supervisor")


class ForkServerError(Exception):
    """The fork server failed to start; `detail` holds its traceback or exit status."""

    def __init__(self, message: str, detail: str = ""):
        self.detail = detail
        super().__init__(message)


class ForkServer(Channel):
    """The supervisor's handle on one fork server process (one generation)."""

    def __init__(self, preload: tuple[str, ...], handlers: dict[str, str], generation: int = 1,
                 log_format: str = "text", log_level: str = "INFO", owner: str | None = None):
        super().__init__()
        self.owner = owner
        self.log_format = log_format
        self.log_level = log_level
        self.preload = tuple(preload)
        self.handlers = dict(handlers)
        self.generation = generation
        self.types: list[str] = []

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the process and wait until it has imported every preload module.

        Runs in the supervisor's main thread (the parent-death signal is per thread).
        Raises ForkServerError with the import traceback."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_inheritable(theirs.fileno(), True)
        self.fence_map, fence_fd = wire.Fence.create()
        os.set_inheritable(fence_fd, True)
        argv = [sys.executable, "-m", "workers.zygote", "--fd", str(theirs.fileno()),
                "--parent", str(os.getpid()), "--fence-fd", str(fence_fd)]
        try:
            # Its own process group: a stop aimed at the supervisor's group (^Z in a
            # terminal) leaves it running, so it can still enforce the fence.
            self.pid = spawn_helper(argv, _child_env(self.owner))
        finally:
            os.close(fence_fd)
            theirs.close()
        self.sock = ours
        ours.sendall(json.dumps({"op": "boot", "preload": list(self.preload),
                                 "handlers": self.handlers, "log_format": self.log_format,
                                 "log_level": self.log_level}).encode())
        ours.settimeout(timeout_s)
        try:
            data = ours.recv(MAX_PACKET)
        except socket.timeout:
            self.kill()
            raise ForkServerError(f"the fork server did not finish importing preload modules "
                                  f"within {timeout_s:g}s")
        if not data:
            status = self.wait()
            raise ForkServerError(f"the fork server exited during start-up ({status})")
        msg = json.loads(data)
        if msg["op"] == "boot_error":
            self.wait()
            raise ForkServerError("a preload module or configured handler failed to import",
                                  msg["error"])
        self.types = msg.get("types", [])
        for warning in msg.get("warnings") or ():  # a preload module's @warm_up failed
            log.warning("fork server %s: %s", self.pid, warning)
        ours.setblocking(False)

    def reaped(self, status: int) -> None:
        """The supervisor's wait4(-1) took its exit status (Children.reap)."""
        self.exited = True

    def stop(self) -> None:
        """Ask it to exit once idle; its running task processes keep running."""
        try:
            self.send(b"stop", [])
        except OSError:
            pass

    def wait(self) -> str:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "already reaped"
        self.exited = True
        return describe_status(status)


def _child_env(owner: str | None = None) -> dict:
    env = helper_env(owner)
    # Bind every symbol of the interpreter and of the preloaded extension modules when
    # they load, in the fork server: with lazy binding each task process resolved its
    # own first calls (a write to a shared page, and a symbol search, per function).
    # The fork server takes it out of its environment at once (workers.zygote.main), so
    # task processes and the programs they run do not inherit it.
    if "LD_BIND_NOW" not in env:  # the operator's own setting is left as it is
        env["LD_BIND_NOW"] = "1"
        env["TASKVISOR_UNSET_LD_BIND_NOW"] = "1"
    return env


RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30, 60)
STABLE_S = 60.0  # a fork server up this long before dying resets the backoff


class ForkServers:
    """The current fork server, the retiring ones, and when to restart a dead current one."""

    def __init__(self, first: ForkServer, owner: str | None = None):
        self.owner = owner
        self.current = first
        self.retiring: list[ForkServer] = []
        self.restarts = 0
        self.restart_at: float | None = None
        self.current_since_mono = time.monotonic()

    def all(self) -> list[ForkServer]:
        return [self.current, *self.retiring]

    def launch(self, config) -> ForkServer:
        """Start the next generation (raises ForkServerError); the caller installs it."""
        return launch(config, generation=self.current.generation + 1, owner=self.owner)

    def take_due_restart(self, mono: float) -> bool:
        """True (and counted) when a scheduled restart is due now."""
        if self.restart_at is None or mono < self.restart_at:
            return False
        self.restart_at = None
        self.restarts += 1
        return True

    def replace(self, new: ForkServer) -> None:
        """`new` takes the new tasks; the old one exits once its tasks have ended."""
        old, self.current = self.current, new
        self.current_since_mono = time.monotonic()
        if not old.exited:
            old.stop()
            self.retiring.append(old)

    def schedule_restart(self, mono: float, *, died: bool) -> float:
        """Back off by the number of restarts so far; returns the delay in seconds.
        `died`: the current one just died (not: a restart of it failed)."""
        if died and mono - self.current_since_mono > STABLE_S:
            self.restarts = 0  # it had been fine for a while: not a crash loop
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restart_at = mono + delay
        return delay


def launch(config, generation: int = 1, owner: str | None = None) -> ForkServer:
    """A started fork server for `config`'s preload, handlers and logging (raises
    ForkServerError with the preload's traceback). `owner` marks its environment, so the
    processes it leaves behind can be found if the supervisor dies (proctree.kill_marked)."""
    server = ForkServer(config.supervisor.preload, handlers_of(config), generation=generation,
                        log_format=config.log.format, log_level=config.log.level, owner=owner)
    server.start(timeout_s=max(60.0, config.supervisor.boot_timeout_s))
    return server


def handlers_of(config) -> dict[str, str]:
    """The `[types."x"] handler = "module:function"` entries the fork server imports."""
    return {name: t.handler for name, t in config.types.items() if t.handler}
