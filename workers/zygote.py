"""The fork server: imports the preload modules once, then forks one process per attempt.

Started by the supervisor as a fresh interpreter (`python -m workers.zygote --fd N
--parent PID`) before the supervisor opens the database or starts a thread. It has no
threads and no database connection, so a fork from it is cheap and safe, and every task
process shares the preloaded modules copy-on-write. It owns the spawn protocol on its
SOCK_SEQPACKET socket, and it is the parent of the task processes, so it reaps them and
reports each exit status with its rusage. Once idle it keeps one spare task process
forked ahead (named `taskvisor-spare`), so an idle supervisor's next task starts without
waiting for a fork. It must never run a handler itself.

To a spare, on its own socket: the spec JSON (or "{}" and a memfd) + fds [report_w,
(memfd)]; closing the socket tells it to leave.

Messages, one per packet. Start-up is JSON; the per-task messages are short text lines
(see _LEAN: json.dumps and json.loads cost this process page faults at every fork):
  supervisor -> zygote  {"op": "boot", "preload": [...], "handlers": {type: "mod:fn"}}
                        "spawn KEY START_BY\n" spec JSON  + fds [report, output_w]
                        "spawn KEY START_BY"  + fds [report, output_w, spec memfd] (big specs)
                        "stop"
  zygote -> supervisor  {"op": "ready", "pid", "types": [...], "preload_s", "warnings": [...]}
                        {"op": "boot_error", "error": traceback text}
                        "spawned KEY PID"
                        "spawn_failed KEY error text"
                        "exited PID STATUS UTIME STIME MAXRSS_KB"
                        "fenced COUNT"
The execution fence is not a message: the supervisor writes it into a shared memfd
(workers.wire.Fence, `--fence-fd`) that this process reads whenever it decides.
KEY is "<task id>:<attempt>" (no spaces); UTIME and STIME are seconds (repr of a float).
"""

from __future__ import annotations

import _socket
import gc
import importlib
import json
import os
import select
import signal
import sys
import time

from workers import child, limits, registry, wire
from workers import outcome as proto
from workers.pdeathsig import set_parent_death_signal

MAX_PACKET = wire.MAX_PACKET
SPARE_IDLE_S = 0.02  # no spawn for this long: fork a spare for the next one
BATCH = 32  # requests read before their forks (back to back); the rest at the next wake
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE
_SCAN = json.JSONDecoder().scan_once  # (text, index) -> (value, end), in C with _json

_FDS_SPACE = _socket.CMSG_SPACE(4 * 4)  # room for up to 4 descriptors
_CLOEXEC = getattr(_socket, "MSG_CMSG_CLOEXEC", 0)  # received descriptors: not inherited
# SIGCHLD's handler: only its wake-up byte matters. A C callable taking (signum, frame),
# not a lambda: no Python frame runs for it at every task's exit.
_IGNORE_ARGS = {}.get
_ENDED = os.WEXITED | os.WNOHANG | os.WNOWAIT  # waitid: report an ended child, reap none
_DONTWAIT = _socket.MSG_DONTWAIT

# _LEAN: every page of this process is shared copy-on-write with each task process, and
# the after-fork hooks of every module it imported run in each of them. So it imports no
# more than the spawn protocol needs: not logging (its import of threading alone doubles
# the CPU a fork and exit cost), not inspect, typing, dataclasses, argparse or
# traceback, and `_socket` rather than socket.py and array (socket.py's enums, selectors
# and math, with array, held 0.35 MiB and 11 mappings more: 12-16 us more a fork and
# exit). A preload module that imports them still gets them. For the
# same reason the loop between two forks touches as few objects as it can: every page it
# writes after a fork is copied first (selectors, socket.recv_fds and JSON messages
# cost a task many more faults: benchmarks/README.md).


class Zygote:
    def __init__(self, sock: _socket.socket, parent_pid: int, fence: "wire.Fence | None" = None):
        self.sock = sock
        self.parent_pid = parent_pid
        self.children: set[int] = set()
        # One spare: a process forked ahead of its task, set up as far as it can be
        # without a spec, waiting on its socket. A spawn hands it the task (a send, not
        # a fork, on the path from claim to handler). It is forked once no spawn came
        # for SPARE_IDLE_S: an idle supervisor's next task starts at once, while a busy
        # one forks directly (a hand-over costs a task more CPU than a fork, and under
        # load a task waits for a free slot anyway). Not a task: never reported, ended
        # by closing its socket.
        self.spare: tuple[int, _socket.socket] | None = None
        self.spare_pids: set[int] = set()  # spares forked and not yet reaped
        self.spare_after = 0.0  # monotonic time before which no new spare is forked
        # The execution fence: the supervisor's leases are renewed up to this monotonic
        # time minus a margin. Past it, every task process is killed and no spawn starts:
        # a supervisor that is stopped or stuck past its lease cannot have its tasks run
        # on while another supervisor rescues them. Read from shared memory each time.
        self.fence_map = fence
        self.name = _process_name()
        self.stopping = False
        self.pid = os.getpid()
        # Messages the supervisor's socket could not take yet: a stopped supervisor reads
        # nothing, and this process must never block on it (it enforces the fence).
        self.outq: list[bytes] = []
        self.sock_fd = -1  # registered with the poller while the supervisor is connected
        self.wake_r, self.wake_w = os.pipe()
        # Buffers made once: a read or receive into them allocates nothing (between two
        # forks every allocation may copy a page; see _LEAN).
        self.wake_bufs = [bytearray(64)]
        self.bufs = [bytearray(MAX_PACKET)]
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)

    def send(self, msg: dict) -> None:
        self.sock.sendall(json.dumps(msg, separators=(",", ":")).encode())

    def boot(self) -> bool:
        data = self.sock.recv(MAX_PACKET)
        msg = json.loads(data)
        started = time.monotonic()
        try:
            for name in msg.get("preload") or ():
                importlib.import_module(name)
            for type_name, spec in (msg.get("handlers") or {}).items():
                registry.register(type_name, registry.resolve(spec))
        except BaseException:
            import traceback  # only here: see _LEAN
            self.send({"op": "boot_error", "error": traceback.format_exc(limit=30)[-30000:]})
            return False
        if any(_is_async(registry.lookup(n)) for n in registry.names()):
            import asyncio  # noqa: F401 - async handlers: import once here, not per task
        if "logging" in sys.modules:
            # A preload module logs: set the task-process handler up once, here. Else
            # a task process does it if and when its handler touches ctx.logger.
            from workers import tasklog
            tasklog.setup(msg.get("log_format") == "json", msg.get("log_level", "INFO"),
                          registry.names())
        warnings = registry.run_warm_ups()  # the preload modules' own (@warm_up)
        child.warm_up()
        os.register_at_fork(after_in_child=child.detach_after_fork)
        # Objects that exist now live as long as the fork server: keep the collector from
        # scanning them in every task process (each scan would copy their pages).
        gc.collect()
        gc.freeze()
        _trim_heap()
        self.send({"op": "ready", "pid": os.getpid(), "types": registry.names(),
                   "preload_s": round(time.monotonic() - started, 4), "warnings": warnings})
        return True

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, _IGNORE_ARGS)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; ^C reaches it
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.poller = poller = select.epoll()
        self.sock_fd = sock_fd = self.sock.fileno()
        wake_r = self.wake_r
        poller.register(sock_fd, select.EPOLLIN)
        poller.register(wake_r, select.EPOLLIN)
        # After "stop" it takes no new spawns but stays until its children have exited:
        # they die with it (parent-death signal), and a reload lets them finish.
        while not (self.stopping and not self.children and not self.spare_pids):
            timeout = 1.0
            if self.spare is None and not self.stopping:
                timeout = min(1.0, max(0.0, self.spare_after - time.monotonic()))
            fence = self.fence_map.get() if self.fence_map is not None else None
            if fence is not None and self.children:
                # Past the fence, look again soon until the killed processes are reaped.
                timeout = min(timeout, max(0.05, fence - time.monotonic()))
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                events = ()
            for fd, ev in events:
                if fd == sock_fd:
                    if ev & select.EPOLLOUT:
                        self._flush()
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._on_request()
                else:
                    try:
                        os.readv(wake_r, self.wake_bufs)
                    except BlockingIOError:
                        pass
            if self.fence_map is not None and self.children:
                self._enforce_fence()
            if self.children or self.spare_pids:
                self._reap()
            if self.stopping:
                self._drop_spare()
            elif self.spare is None and time.monotonic() >= self.spare_after:
                self._fork_spare()
            if os.getppid() != self.parent_pid:
                break  # the supervisor is gone; pdeathsig normally got here first
        self._drop_spare()
        self._reap()

    def _on_stop(self, *_):
        self.stopping = True

    def _fenced(self) -> bool:
        fence = self.fence_map.get() if self.fence_map is not None else None
        return fence is not None and time.monotonic() >= fence

    def _send(self, msg: bytes) -> None:
        """Send one message to the supervisor without ever blocking: queued (in order)
        while its socket is full, flushed when it can take more."""
        if not self.outq:
            try:
                self.sock.send(msg, _DONTWAIT)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return  # the supervisor is gone
        self.outq.append(msg)
        if len(self.outq) == 1 and self.sock_fd >= 0:
            self.poller.modify(self.sock_fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self) -> None:
        outq = self.outq
        while outq:
            try:
                self.sock.send(outq[0], _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                outq.clear()
                break
            del outq[0]
        if self.sock_fd >= 0:
            self.poller.modify(self.sock_fd, select.EPOLLIN)

    def _enforce_fence(self) -> None:
        """Past the fence, KILL every task process (its process group, where it already
        made one) and say how many; the exit statuses follow as usual."""
        fence = self.fence_map.get()
        if fence is None or time.monotonic() < fence:
            return
        killed = 0
        for pid in self.children:
            # Its descendants first (a command the handler runs in a session of its own
            # is in no group of ours): a task process is a subreaper, so they are all
            # below it while it lives.
            for member in _descendants(pid):
                try:
                    os.kill(member, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:  # before its setpgid the group does not exist yet
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        if killed:
            try:
                self._send(b"fenced %d" % killed)
            except OSError:
                pass

    def _fork_spare(self) -> None:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            self.spare_after = time.monotonic() + 1.0  # spawns fork directly meanwhile
            return
        if pid == 0:
            ours.close()
            child.run_spare(theirs.detach(), parent_pid=self.pid, name=self.name)
        theirs.close()
        self.spare = (pid, ours)
        self.spare_pids.add(pid)

    def _drop_spare(self) -> None:
        """Let the spare go: end of file on its socket makes it exit (reaped later)."""
        if self.spare is not None:
            self.spare[1].close()
            self.spare = None

    def _hand_to_spare(self, spec: bytes, fds: list[int]) -> int | None:
        """Give a spawn to the spare; its pid, or None when there is none that works."""
        if self.spare is None:
            return None
        pid, sock = self.spare
        self.spare = None
        try:
            sock.sendmsg([spec or b"{}"], wire.passing_fds(fds))
        except OSError:
            return None  # it died meanwhile: it is reaped as a spare, the spawn forks
        finally:
            sock.close()
        self.spare_pids.discard(pid)
        return pid

    def _on_request(self) -> None:
        """Every request waiting on the socket (up to BATCH), then the forks of the spawns
        among them back to back: each page this process writes after a fork is copied
        first, so the writes of receiving and answering are paid once a batch, not once a
        fork. (A task process forked in a batch holds its siblings' descriptors for the
        few microseconds until its set-up closes every descriptor but its own.)"""
        spawns = []
        for _ in range(BATCH):
            got = self._receive()
            if got is None:
                break
            op, key, start_by, spec, fds = got
            if op == b"stop":
                self.stopping = True
            elif op == b"spawn" and self.stopping:
                self._fail(key, "fork server is stopping")
            elif op == b"spawn" and (self._fenced() or start_by and time.monotonic() >= float(start_by)):
                self._fail(key, "fenced: the supervisor's lease was not renewed in time")
            elif op == b"spawn":
                spawns.append((key, spec, fds))
                continue
            _close(fds)
        if spawns:
            self._spawn_all(spawns)

    def _receive(self) -> tuple | None:
        """(op, key, start_by, spec, fds) of the next request, or None when none waits
        (or the supervisor closed its end)."""
        try:
            size, anc, _flags, _addr = self.sock.recvmsg_into(self.bufs, _FDS_SPACE,
                                                              _CLOEXEC | _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        data = self.bufs[0][:size]
        fds = wire.received_fds(anc) if anc else []
        if not data:  # the supervisor closed its end
            self.stopping = True
            self.poller.unregister(self.sock_fd)
            self.sock_fd = -1
            self.outq.clear()
            _close(fds)
            return None
        head, _, spec = data.partition(b"\n")  # a spec inline after the header line
        op, _, key = head.partition(b" ")
        key, _, start_by = key.partition(b" ")
        return op, key, start_by, spec, fds

    def _fail(self, key: bytes, error: str) -> None:
        self._send(b"spawn_failed %s %s" % (key, error.encode(errors="replace")))

    def _spawn_all(self, spawns: list) -> None:
        ready = []  # (key, the parsed spec or its memfd, fds)
        for key, spec, fds in spawns:
            if len(fds) != (2 if spec else 3):
                self._fail(key, "expected a report socket, an output pipe and a spec")
                _close(fds)
                continue
            pid = self._hand_to_spare(spec, fds) if not ready else None
            if pid is not None:
                self._started(key, pid, fds)
                continue
            try:  # parsed here: it costs a task process more page faults than this one
                ready.append((key, _parse_spec(spec) if spec else fds[2], fds))
            except ValueError as exc:
                self._fail(key, f"bad spec: {exc}")
                _close(fds)
        pids = []
        for _key, parsed, fds in ready:  # back to back: nothing but the forks in between
            try:
                pid = os.fork()
            except OSError as exc:
                pid = exc
            if pid == 0:
                child.run(parsed, fds[0], fds[1], parent_pid=self.pid)
            pids.append(pid)
        for (key, _parsed, fds), pid in zip(ready, pids):
            if isinstance(pid, OSError):
                self._fail(key, f"fork failed: {pid}")
                _close(fds)
            else:
                self._started(key, pid, fds)

    def _started(self, key: bytes, pid: int, fds) -> None:
        self.spare_after = max(self.spare_after, time.monotonic() + SPARE_IDLE_S)
        self.children.add(pid)
        self._send(b"spawned %s %d" % (key, pid))
        _close(fds)

    def _reap(self) -> None:
        while self.children or self.spare_pids:
            try:  # has one ended? (waitid builds no rusage when none has)
                if os.waitid(os.P_ALL, 0, _ENDED) is None:
                    return
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                self.spare_pids.clear()
                self.spare = None
                return
            if pid == 0:
                return
            if pid in self.spare_pids:  # a spare that never had a task: not reported
                self.spare_pids.discard(pid)
                if self.spare is not None and self.spare[0] == pid:
                    # It died waiting (killed from outside, or its set-up failed): spawns
                    # fork directly, and the next spare waits a second, so a spare that
                    # cannot start never turns into a fork loop.
                    self._drop_spare()
                    self.spare_after = time.monotonic() + 1.0
                continue
            self.children.discard(pid)
            self._send(b"exited %d %d %r %r %d" % (
                pid, status, ru.ru_utime, ru.ru_stime, ru.ru_maxrss))


def _trim_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim(0)), once, after
    the preload: the imports' temporary objects leave ~0.7 MiB of freed pages mapped, and
    every fork copies the page-table entries of all that is mapped, and every task
    process's exit tears them down (0.03-0.04 ms less CPU in each of the fork server and
    the task process at pool 4: benchmarks/README.md). False where there is no glibc."""
    import ctypes  # already imported (workers.pdeathsig)
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _descendants(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc/PID/task/*/children (Linux; [] elsewhere)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10000:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _parse_spec(spec: bytes) -> dict:
    """json.loads for the supervisor's own spec text (compact JSON, nothing around it),
    with json's C scanner alone: json.loads runs enough Python around it to cost this
    process 29 page faults a task, against 6. Raises ValueError."""
    text = spec.decode()
    try:
        value, end = _SCAN(text, 0)
    except StopIteration as exc:
        raise ValueError(f"not JSON at character {exc.value}") from None
    if end != len(text) or not isinstance(value, dict):
        raise ValueError("the spec is not one JSON object")
    return value


def _is_async(fn) -> bool:
    """An `async def` handler (inspect.iscoroutinefunction without importing inspect)."""
    return bool(getattr(getattr(fn, "__code__", None), "co_flags", 0) & _CO_COROUTINE)


def _process_name() -> bytes:
    """This process's name (/proc/self/comm), which a spare takes back with its task."""
    try:
        with open("/proc/self/comm", "rb") as f:
            return f.read().rstrip(b"\n")
    except OSError:
        return b"python"


def _args(argv: list[str]) -> dict[str, int]:
    """`--fd N --parent PID [--fence-fd N]`, as the supervisor passes them. Not argparse:
    it (with gettext and textwrap) would be in the fork server's memory, which every fork
    copies."""
    args = dict(zip(argv[::2], argv[1::2]))
    try:
        return {"fd": int(args["--fd"]), "parent": int(args["--parent"]),
                "fence_fd": int(args.get("--fence-fd", -1))}
    except (KeyError, ValueError):
        sys.exit("usage: python -m workers.zygote --fd N --parent PID [--fence-fd N]")


def main(argv: list[str] | None = None) -> int:
    # Set by the supervisor for this process alone (the dynamic linker read it at start
    # and keeps binding at load for every later dlopen): not for what tasks run.
    if os.environ.pop("TASKVISOR_UNSET_LD_BIND_NOW", None):
        os.environ.pop("LD_BIND_NOW", None)
    args = _args(sys.argv[1:] if argv is None else argv)
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != args["parent"]:
        return proto.ZYGOTE_PARENT_GONE
    limits.no_core_dumps()  # for every task process it forks
    sock = _socket.socket(fileno=args["fd"])
    fence = None
    if args["fence_fd"] >= 0:
        fence = wire.Fence(args["fence_fd"])
        os.close(args["fence_fd"])  # the mapping stays; task processes inherit neither
    zygote = Zygote(sock, args["parent"], fence)
    if not zygote.boot():
        return proto.ZYGOTE_PRELOAD_ERROR
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
