"""taskvisor's side of inflight_bench.py: a supervisor on its own database, filled first.

Owns one taskvisor run (`run`: N tasks at pool P, three waves when N = 3P) and the
enqueue-to-start probe (`probe`: one task at a time, enqueued while `in_flight` long tasks
run). Figures come from the store (started_at, completed_at, created_at), from the
handlers (the time they were entered) and from /proc (CPU of the supervisor and of the
fork server; the fork server's reaped-children time is the task processes' own CPU).
Every process it starts is registered with the caller's `Sessions` and killed whole on a
hang. It never touches a peer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import inflight_proc as procfs
from inflight_run import Hang, System, follow
from supervisor.store import NewTask, Store
from supervisor.wake import WakeSender

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUN_SUPERVISOR = ("import sys; from supervisor.config import load; from supervisor import start; "
                  "sys.exit(start.run(load(sys.argv[1])))")
MESSAGES = [{"role": "user", "content": "Say hello."}]


PRELOAD = {"sleep": ("inflight_handlers",),
           "chat": ("inflight_handlers", "workers.handlers.llm")}


def workload(kind: str, seconds: float, base_url: str | None) -> tuple[str, str]:
    """(task type, payload) of one task of the workload."""
    if kind == "chat":
        return "llm.chat", json.dumps({"base_url": base_url, "model": "fake-model",
                                       "messages": MESSAGES})
    return "inflight.sleep", json.dumps({"s": seconds})


class Supervisor:
    """One supervisor process on a fresh database in `workdir`."""

    def __init__(self, sessions: procfs.Sessions, workdir: Path, name: str, pool: int,
                 preload: tuple[str, ...] = ("inflight_handlers",), llm_mode: str = "hosted",
                 relay_shared: bool = False):
        self.llm_relay = llm_mode != "off"
        self.llm_mode = llm_mode
        self.relay_shared = relay_shared  # the relay's PSS counts per task in flight (chat)
        self.relay = 0
        self.sessions = sessions
        self.preload = preload
        self.workdir = workdir
        self.name = name
        self.db = workdir / f"{name}.db"
        self.log = workdir / f"{name}.log"
        self.pool = pool
        self.store = Store(self.db)
        self.proc: subprocess.Popen | None = None
        self.fork_server = 0

    def start(self) -> None:
        cfg = self.workdir / f"{self.name}.toml"
        # shutdown and kill graces are short so that stopping a run does not wait on
        # thousands of sleeping tasks; nothing else differs from the defaults
        cfg.write_text("[supervisor]\n"
                       f"database = {json.dumps(str(self.db))}\n"
                       f"preload = {json.dumps(list(self.preload))}\n"
                       f"pool_size = {self.pool}\nshutdown_grace_s = 2\nkill_grace_s = 1\n\n"
                       '[http]\nlisten = ""\n\n[log]\nlevel = "WARNING"\n\n'
                       f"[llm]\nrelay = {json.dumps(self.llm_relay)}\n"
                       f"run_in_relay = {json.dumps(self.llm_mode == 'hosted')}\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(HERE), env.get("PYTHONPATH")) if p)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "wb") as log:
            self.proc = self.sessions.add(subprocess.Popen(
                [sys.executable, "-c", RUN_SUPERVISOR, str(cfg)], cwd=self.workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        deadline = time.monotonic() + 60
        while not self.store.supervisors():
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise Hang("the supervisor did not register within 60 s")
            time.sleep(0.005)
        for pid in procfs.children(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"workers.zygote" in cmdline:
                self.fork_server = pid
            elif b"workers.relay" in cmdline:
                self.relay = pid
        if not self.fork_server:
            raise RuntimeError("no fork server found under the supervisor")
        if self.llm_relay and not self.relay:
            raise RuntimeError("no model-call relay found under the supervisor")

    def stop(self, hung: bool = False) -> None:
        """SIGTERM and wait; after a hang, SIGKILL at once (a deadlocked supervisor does
        not handle SIGTERM)."""
        if self.proc is not None:
            self.sessions.stop(self.proc, signal.SIGKILL if hung else signal.SIGTERM, timeout=20)
        self.store.close()

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def finished(self) -> int:
        with self.store.conn.read() as db:
            return db.execute("SELECT count(*) FROM tasks WHERE status IN "
                              "('succeeded', 'failed', 'cancelled')").fetchall()[0][0]

    def running(self) -> int:
        """Attempts in flight, as the store has them: task processes and the llm.chat
        attempts the relay hosts (which have none)."""
        with self.store.conn.read() as db:
            return db.execute("SELECT count(*) FROM tasks WHERE status = 'running'").fetchall()[0][0]

    def relays(self) -> list[int]:
        """The relay processes now: the first, and those started as hosted calls grew."""
        out = []
        for pid in procfs.children(self.proc.pid):
            try:
                if b"workers.relay" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
            except OSError:
                continue
        return out

    def cpu(self) -> dict:
        s, z = procfs.cpu(self.proc.pid), procfs.cpu(self.fork_server)
        if s is None or z is None:
            return {}
        out = {"supervisor": s, "fork_server": z}
        if self.relay:  # every relay's: one started after the window opened counts whole
            out["relay"] = sum((procfs.cpu(p) or procfs.ZERO for p in self.relays()), procfs.ZERO)
        return out

    def system(self) -> System:
        return System(done=self.finished, in_flight=self.running,
                      alive=lambda: self.proc.poll() is None,
                      task_pids=lambda: procfs.children(self.fork_server),
                      overhead_pids=lambda: [self.proc.pid, self.fork_server] + (
                          self.relays() if self.relay and not self.relay_shared else []),
                      shared_pids=lambda: self.relays() if self.relay and self.relay_shared else [],
                      cpu=self.cpu, log_tail=self.log_tail)


def run(sessions, workdir: Path, name: str, kind: str, seconds: float, pool: int, n: int,
        base_url: str | None, hang_s: float, preload_llm: bool = False,
        llm_mode: str = "hosted") -> dict:
    """N tasks, queue filled first, pool `pool`; the row's figures, or status HANG/ERROR.
    `preload_llm`: preload workers.handlers.llm whatever the variant. `llm_mode`: "hosted"
    (the default config, "taskvisor": the relay runs each llm.chat call), "process" (a
    task process per call through the relay, "taskvisor via relay") or "off" ([llm] relay
    = false, "taskvisor no relay"). In the chat
    variant the relay's PSS is counted per task in flight and its CPU per task; in the
    sleep variant it is idle, a fixed cost like the supervisor's."""
    # What a user running each workload would preload: the chat variant's handler is
    # llm.chat (httpx and a TLS context, 13 MiB the fork server holds and every fork copies
    # the page tables of); the sleep variant's is inflight_handlers alone.
    preload = PRELOAD["chat" if preload_llm else kind]
    sv = Supervisor(sessions, workdir, name, pool, preload, llm_mode=llm_mode,
                    relay_shared=kind == "chat")
    type_, payload = workload(kind, seconds, base_url)
    sv.store.enqueue_many([NewTask(type=type_, payload=payload) for _ in range(n)], time.time())
    system = {"hosted": "taskvisor", "process": "taskvisor via relay", "off": "taskvisor no relay"}
    out: dict = {"system": system[llm_mode], "kind": kind, "concurrency": pool, "tasks": n,
                 "preload": list(preload), "llm_mode": llm_mode}
    try:
        sv.start()
        base = sv.cpu()
        got = follow(sv.system(), n, pool, hang_s=hang_s, base_cpu=base)
        cpu = got["cpu"]
        per_task = {"supervisor": cpu["supervisor"].own_s * 1000 / n,
                    "fork_server": cpu["fork_server"].own_s * 1000 / n,
                    "task_processes": cpu["fork_server"].reaped_s * 1000 / n}
        if kind == "chat" and "relay" in cpu:
            per_task["relay"] = cpu["relay"].own_s * 1000 / n
        per_task["total"] = sum(per_task.values())
        out.update(status="ok", memory=got["memory"], cpu_ms_per_task=per_task,
                   max_in_flight_seen=got["max_in_flight_seen"])
        with sv.store.conn.read() as db:
            ok, first, last = db.execute(
                "SELECT count(*), min(started_at), max(completed_at) FROM tasks "
                "WHERE status = 'succeeded'").fetchall()[0]
        out.update(succeeded=ok, window_s=(last - first) if ok else None)
        if kind == "sleep":
            out["lags_ms"] = lags(sv.store, seconds)
        else:
            out["call_s"] = call_times(sv.store)
        if ok != n:
            out.update(status="FAIL", error=f"{n - ok} of {n} tasks did not succeed")
    except Hang as exc:
        out.update(status="HANG", error=str(exc), done_at_hang=sv.finished())
    except Exception as exc:  # noqa: BLE001 - one row fails, the benchmark goes on
        out.update(status="ERROR", error=f"{type(exc).__name__}: {exc}")
    finally:
        sv.stop(hung=out.get("status") != "ok")
    return out


def call_times(store: Store) -> dict:
    """A chat task's claim to its recorded end, p50/p99/max in seconds: the model's S
    plus what the call's path added (a window over the ideal that these do not explain
    is in the claims between waves)."""
    from inflight_report import percentile
    with store.conn.read() as db:
        v = [r[0] for r in db.execute("SELECT completed_at - started_at FROM tasks "
                                      "WHERE status = 'succeeded'").fetchall()]
    return {"p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v, default=None)}


def lags(store: Store, seconds: float) -> dict:
    """Where a sleep task's time went besides its sleep, from the store and the handler's
    entry time: claim -> handler entry (spawn), and handler end -> outcome recorded (reap).
    p50/p99/max in ms; shows which side makes a window longer than the ideal."""
    from inflight_report import percentile
    with store.conn.read() as db:
        rows = db.execute("SELECT started_at, completed_at, result FROM tasks "
                          "WHERE status = 'succeeded' AND type = 'inflight.sleep'").fetchall()
    spawn, reap = [], []
    for started, completed, result in rows:
        entered = json.loads(result)["t"]
        spawn.append((entered - started) * 1000)
        reap.append((completed - entered - seconds) * 1000)
    return {name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v, default=None)}
            for name, v in (("claim_to_handler", spawn), ("handler_end_to_recorded", reap))}


def probe(sessions, workdir: Path, in_flight: int, probes: int, gap_s: float,
          hang_s: float) -> dict:
    """Enqueue-to-start with `in_flight` tasks running (pool in_flight + 10, so a slot is
    free): one probe at a time, enqueued and announced (UDP wake-up) as a client does."""
    sv = Supervisor(sessions, workdir, f"probe-{in_flight}", in_flight + 10)
    hold = json.dumps({"s": 3600})
    sv.store.enqueue_many([NewTask(type="inflight.sleep", payload=hold) for _ in range(in_flight)],
                          time.time())
    out: dict = {"in_flight": in_flight, "probes": probes, "gap_s": gap_s}
    try:
        sv.start()
        deadline = time.monotonic() + hang_s + 60
        while len(procfs.children(sv.fork_server)) < in_flight:
            if sv.proc.poll() is not None or time.monotonic() > deadline:
                raise Hang(f"only {len(procfs.children(sv.fork_server))} of {in_flight} "
                           "long tasks started")
            time.sleep(0.1)
        time.sleep(1.0)
        out["task_processes_at_start"] = len(procfs.children(sv.fork_server))
        notifier = WakeSender(sv.store, socket.gethostname())
        to_handler, to_claim = [], []
        for i in range(-2, probes):  # two warm-ups
            time.sleep(gap_s)
            t0 = time.time()
            task_id = sv.store.enqueue(NewTask(type="inflight.stamp", payload="{}"), t0)
            notifier.notify()
            row = _wait_finished(sv, task_id, hang_s)
            if row[0] != "succeeded":
                raise RuntimeError(f"probe {task_id} ended {row[0]}: {sv.log_tail()}")
            if i >= 0:
                to_handler.append((json.loads(row[1])["t"] - t0) * 1000)
                to_claim.append((row[2] - row[3]) * 1000)
        notifier.close()
        out["task_processes_at_end"] = len(procfs.children(sv.fork_server))
        out.update(status="ok", enqueue_to_handler_ms=to_handler, enqueue_to_claim_ms=to_claim)
    except Hang as exc:
        out.update(status="HANG", error=str(exc))
    except Exception as exc:  # noqa: BLE001
        out.update(status="ERROR", error=f"{type(exc).__name__}: {exc}")
    finally:
        sv.stop(hung=out.get("status") != "ok")
    return out


def _wait_finished(sv: Supervisor, task_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    db = sv.store.conn.db
    while True:
        row = db.execute("SELECT status, result, started_at, created_at FROM tasks WHERE id = ?",
                         (task_id,)).fetchall()[0]
        if row[0] in ("succeeded", "failed", "cancelled"):
            return row
        if sv.proc.poll() is not None:
            raise RuntimeError(f"supervisor exited: {sv.log_tail()}")
        if time.monotonic() > deadline:
            raise Hang(f"probe {task_id} not finished within {timeout:g} s")
        time.sleep(0.002)
