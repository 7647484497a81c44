"""The model-call relays, seen from the supervisor: the process handles, their restarts,
and how many run.

Owns starting `python -m workers.relay` (its own process group, the parent-death signal,
the owner marker in its environment like the fork server's, its execution fence in a
memfd), the private folder its socket lives in (mode 0700, made with mkdtemp under
$XDG_RUNTIME_DIR or the temporary folder, so the AF_UNIX path stays short), the variable
TASKVISOR_LLM_RELAY_SOCKET that names the first relay's socket to the fork server and so
to every task process, the control channel over which a relay runs `llm.chat` attempts
itself (supervisor.channel: the fork server's spawn request, "cancel KEY", its events),
noticing an exit, restarting with the fork server's backoff, starting more relays as the
calls they run grow ([llm] relays), stopping them at shutdown, and logging each. Tasks
that find no relay (it died and is being restarted) make their calls themselves. It never
touches the database and never reads what passes through a relay.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time

from supervisor.channel import MAX_PACKET, Channel
from supervisor.forkserver import RESTART_BACKOFF_S, STABLE_S
from supervisor.proctree import describe_status, helper_env, spawn_helper
from workers import wire
from workers.relaycall import RELAY_ENV

log = logging.getLogger("taskvisor.supervisor")
READY = b'{"op":"ready"}'  # its first packet, once it listens
START_TIMEOUT_S = 10.0   # the first start waits this long for "ready"; restarts do not wait
HOST_SPLIT = 100         # hosted calls per relay before another one starts (Relays.pick)
WARM_IDLE_S = 1.0        # no attempt for this long: the relays load their HTTP stack (warm)
LLM_TYPE = "llm.chat"    # registered by workers.handlers.llm: model calls can come
GROW_WAIT_S = 1.0        # how long the loop waits for such a relay (it is used once ready)
AUTO_MAX = 8             # [llm] relays = 0: one per CPU, at most this many
FOLDER_PREFIX = "taskvisor-relay-"  # then the supervisor's pid, "-" and mkdtemp's letters
STOP_TIMEOUT_S = 5.0


class Relay(Channel):
    """The supervisor's handle on its relay process, and the channel of the attempts it
    hosts (Channel: `spawn`, the fence, events). Runs in the supervisor's main thread."""

    output_pipes = False  # a hosted attempt has no stdout of its own
    hosts_attempts = True
    types: list[str] = []  # a hosted attempt spawns no tasks (llm.chat never calls ctx.spawn)

    def __init__(self, owner: str | None = None):
        super().__init__()
        self.owner = owner
        base = os.environ.get("XDG_RUNTIME_DIR")
        if not (base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)):
            base = None
        remove_stale_folders(base or tempfile.gettempdir())
        # 0700; named after this process, so that a later supervisor can tell it is stale
        self.folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=base)
        self.path = os.path.join(self.folder, "llm-relay.sock")
        self.ready = False  # it said "ready" since its last start: it may host attempts
        self.warming = False  # asked to load its HTTP stack since its last start (warm)
        self.hosting = 0    # attempts it hosts now (Children keeps the count)
        self.fence_mono: float | None = None  # the last fence set, given again at a restart
        self.started_mono = 0.0
        self.reaped_status: int | None = None  # see reaped()
        self.restarts = 0
        self.restart_at: float | None = None
        self.stopped = False
        self.selector: selectors.BaseSelector | None = None
        self.helper_pids: set[int] | None = None

    def announce(self) -> None:
        """Name the socket in this process's environment, before the fork server starts:
        it inherits the variable, and every task process with it."""
        os.environ[RELAY_ENV] = self.path

    def attach(self, supervisor) -> None:
        """Let the loop's selector wake on the relay's exit, and keep its pid out of the
        orphan sweep (supervisor.loop)."""
        self.selector = supervisor.selector
        self.helper_pids = supervisor.helper_pids
        self._watch()

    def start(self, wait: bool = False) -> None:
        """Start the process; with `wait`, until it listens (wait_ready)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_inheritable(theirs.fileno(), True)
        if self.fence_map is not None:  # the last process's: a new one for each
            self.fence_map.close()
        self.fence_map, fence_fd = wire.Fence.create()
        os.set_inheritable(fence_fd, True)
        if self.fence_mono is not None:
            self.fence_map.set(self.fence_mono)
        argv = [sys.executable, "-m", "workers.relay", "--socket", self.path,
                "--parent", str(os.getpid()), "--ctrl-fd", str(theirs.fileno()),
                "--fence-fd", str(fence_fd)]
        try:
            # Its own group: ^C or ^Z aimed at the supervisor's group leaves it serving the
            # tasks that are still draining; the supervisor stops it after them.
            self.pid = spawn_helper(argv, _env(self.owner))
        finally:
            theirs.close()
            os.close(fence_fd)
        self.sock = ours
        self.exited = self.ready = self.warming = False
        self.broken = None
        self.reaped_status = None
        self.started_mono = time.monotonic()
        ours.setblocking(False)
        if wait:
            self.wait_ready()
        self._watch()

    def fence(self, deadline_mono: float) -> None:
        self.fence_mono = deadline_mono
        super().fence(deadline_mono)

    def hosts(self) -> bool:
        """Whether it can take an attempt now: started, said ready, and still there."""
        return self.ready and self.sock is not None and not self.exited and not self.stopped

    def warm(self) -> None:
        """Ask it, once a start, to load what its first call would (httpx, the TLS
        context, llm: workers.hosting.Host.warm). Never blocks."""
        if self.warming or not self.hosts():
            return
        self.warming = True
        try:
            self.send(b"warm", [])
        except OSError:
            pass

    def cancel(self, key: str) -> None:
        """Ask it to end hosted attempt `key` (TaskCancelled in its handler: a cancel, a
        time limit, a lost lease, the shutdown). Never blocks; a relay that is gone has
        ended the attempt already."""
        try:
            self.send(b"cancel " + key.encode(), [])
        except OSError:
            pass

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Wait until the relay listens (after the fork server started: the two start side
        by side). A relay that does not is logged; tasks call directly until it does."""
        ctrl = self.sock
        if ctrl is None:
            return False
        ctrl.settimeout(timeout_s)
        try:
            first = ctrl.recv(MAX_PACKET)
        except OSError:
            first = b""
        finally:
            ctrl.setblocking(False)
        if first == READY:
            self._ready()
            return True
        log.error("model-call relay %d did not start within %gs; it is not used until it "
                  "does (llm.chat attempts run in task processes meanwhile)", self.pid, timeout_s)
        return False

    def _watch(self) -> None:
        if self.helper_pids is not None and self.pid is not None:
            self.helper_pids.add(self.pid)
        if self.selector is not None and self.sock is not None:
            try:
                self.selector.register(self.sock, selectors.EVENT_READ, ("server", self))
            except KeyError:
                pass  # already registered

    def _ready(self) -> None:
        self.ready = True
        log.info("model-call relay %d ready on %s", self.pid, self.path)

    def events(self) -> list[dict]:
        """What its socket holds (read when the loop's selector finds it readable, and by
        Children before a hosted attempt's end): "ready" after a start, taken here; the
        events of the attempts it hosts, returned for Children.on_server_event; the end
        of file of its exit, which `tend` then turns into its exit status."""
        out = []
        for msg in super().events():
            if msg["op"] == "ready":
                self._ready()
            elif msg["op"] == "warmed":
                log.info("model-call relay %d loaded its HTTP stack while the supervisor was "
                         "idle (%.2fs)", self.pid, float(msg.get("seconds") or 0.0))
            else:
                out.append(msg)
        if self.exited or self.broken is not None:
            self._close_ctrl()
        return out

    def reaped(self, status: int) -> None:
        """The loop's wait4(-1) took its exit status before `tend` could (Children.reap):
        `tend` logs it from here."""
        self.reaped_status = status

    def tend(self, mono: float) -> None:
        """Once a pass, first in the pass (before the loop's wait4(-1) can take its exit
        status): once its control socket ended, take its exit status and log it; restart
        when due. While the relay runs, nothing here makes a system call."""
        if self.pid is not None and self.sock is None:  # it exited, or is exiting
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped with the task processes (Children.reap)
                pid, status = self.pid, self.reaped_status
            if pid:
                self._exited(status, mono)
        if self.restart_at is not None and mono >= self.restart_at and not self.stopped:
            self.restart_at = None
            self.restarts += 1
            self.start()
            log.info("model-call relay %d started again on %s (%d restart(s) so far)",
                     self.pid, self.path, self.restarts)

    def _exited(self, status: int | None, mono: float) -> None:
        how = describe_status(status) if status is not None else "exited"
        pid, self.pid = self.pid, None
        self._close_ctrl()
        if self.helper_pids is not None:
            self.helper_pids.discard(pid)
        if self.stopped:
            log.info("model-call relay %d %s", pid, how)
            return
        if mono - self.started_mono > STABLE_S:
            self.restarts = 0  # it had been fine for a while: not a crash loop
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restart_at = mono + delay
        log.error("model-call relay %d %s; restarting in %.1fs (calls are made in the task "
                  "processes meanwhile)", pid, how, delay)

    def _close_ctrl(self) -> None:
        """Its socket ended (it exited) or is closed by us: nothing more is hosted there;
        what waited in the outbox is dropped (each report socket's end closes with it, so
        those attempts end, given back)."""
        self.ready = False
        if self.sock is None:
            return
        if self.selector is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.close()

    def stop(self, _supervisor=None) -> None:
        """End the relay (the end of its control socket, then KILL after STOP_TIMEOUT_S)
        and remove its folder. An on_shutdown hook: every task has ended by then."""
        self.stopped = True
        self.restart_at = None
        pid = self.pid
        self._close_ctrl()
        if pid is not None:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            status = None
            while status is None:
                try:
                    got, st = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if got:
                    status = st
                elif time.monotonic() > deadline:
                    _kill(pid)
                    _, status = os.waitpid(pid, 0)
                else:
                    time.sleep(0.01)
            self.pid = None
            log.info("model-call relay %d stopped (%s)", pid,
                     describe_status(status) if status is not None else "exited")
        if os.environ.get(RELAY_ENV) == self.path:
            del os.environ[RELAY_ENV]
        shutil.rmtree(self.folder, ignore_errors=True)

    def next_due(self) -> float | None:
        return self.restart_at


class Relays:
    """Every relay process of one supervisor: the first, whose socket task processes call
    through, and those started as the calls it hosts grow ([llm] relays): one asyncio
    loop is one core, and past a few hundred calls a second the calls queue behind it."""

    def __init__(self, first: Relay, owner: str | None):
        self.all = [first]
        self.owner = owner
        self.supervisor = None
        self.cpus = os.cpu_count() or 1

    @property
    def first(self) -> Relay:
        return self.all[0]

    def attach(self, supervisor) -> None:
        self.supervisor = supervisor
        for relay in self.all:
            relay.attach(supervisor)

    def warm_when_idle(self, idle_since: float, mono: float) -> None:
        """Asked by the loop while it has no attempt (since monotonic time `idle_since`):
        from WARM_IDLE_S on, each relay that has not loads its HTTP stack (0.17-0.3 s of
        CPU, 15 MiB), which the first model call would otherwise wait for, when no task
        waits for the cores (at the relay's start it ran beside the first tasks of every
        run). Only where model calls can come: a fork server preloaded
        `workers.handlers.llm` (the `llm.chat` type, and `llm.chat_sync` for handlers of
        one's own)."""
        if mono - idle_since >= WARM_IDLE_S and any(
                LLM_TYPE in server.types for server in self.supervisor.servers.all()):
            for relay in self.all:
                relay.warm()

    def cap(self) -> int:
        wanted = self.supervisor.config.llm.relays
        return wanted if wanted > 0 else max(1, min(self.cpus, AUTO_MAX))

    def pick(self) -> Relay | None:
        """The relay to host the next attempt: the one hosting the fewest, of those that
        can; None when none can (the attempt then gets a task process). When even that
        one hosts HOST_SPLIT, another relay is started (up to `cap`) for the next ones."""
        best = None
        for relay in self.all:
            if relay.hosts() and (best is None or relay.hosting < best.hosting):
                best = relay
        if best is not None and best.hosting >= HOST_SPLIT and len(self.all) < self.cap():
            self._grow()
        return best

    def _grow(self) -> None:
        relay = Relay(self.owner)
        relay.fence_mono = self.supervisor.children.fence_mono  # set as it starts
        try:
            relay.start()
            # Waited for (~0.1 s, once per relay in the supervisor's life): a burst claimed
            # in one pass then spreads at once, instead of all going to the busy ones.
            relay.wait_ready(GROW_WAIT_S)
        except OSError as exc:  # no process to be had now (EAGAIN): the next pick tries again
            log.error("could not start another model-call relay: %s", exc)
            relay.stop()
            return
        relay.attach(self.supervisor)
        self.all.append(relay)
        log.info("model-call relay %d started beside %d other(s): the hosted calls passed "
                 "%d per relay", relay.pid, len(self.all) - 1, HOST_SPLIT)

    def stop(self, _supervisor=None) -> None:
        for relay in self.all:
            relay.stop()


def remove_stale_folders(base: str) -> int:
    """Remove the socket folders in `base` that supervisors killed with kill -9 left
    (stop() removes a folder otherwise): ours (same user), named after a pid that no
    longer runs. A pid in use again by another process keeps its folder; no harm. How many."""
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        pid = name[len(FOLDER_PREFIX):].partition("-")[0]
        if not (name.startswith(FOLDER_PREFIX) and pid.isascii() and pid.isdigit()):
            continue
        path = os.path.join(base, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
            os.kill(int(pid), 0)
            continue  # it runs
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        except OSError:  # PermissionError: another user's process runs with that pid
            continue
    return removed


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _env(owner: str | None) -> dict:
    env = helper_env(owner)
    env.pop(RELAY_ENV, None)  # the relay is not its own client
    return env


def launch(config, owner: str | None = None) -> Relays | None:
    """Start the first relay (not waiting for it: `wait_ready` after the fork server
    started) and name its socket in the environment the fork server will inherit; None,
    and no socket named (not even one inherited from an outer environment), with
    `[llm] relay = false`."""
    if not config.llm.relay:
        os.environ.pop(RELAY_ENV, None)
        log.info("model-call relay off ([llm] relay = false): task processes make their calls")
        return None
    relay = Relay(owner)
    relay.announce()
    relay.start()
    return Relays(relay, owner)
