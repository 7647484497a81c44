"""Process-test fixtures: a real supervisor in its own process (the one launcher in
tests/support/launcher.py), started on a config written to tmp_path, with handlers from
tests/process/handlers.

`supervisor_proc(**settings)` returns a `SupervisorProc`: start / stop / kill9 / restart,
the supervisor's log (shown when a test fails), a `Queue` for enqueues (which also sends
the wake-up datagram), a `Store` for reads, and readers of the handlers' event log. The
finalizer SIGKILLs the supervisor's tree and every pid a handler recorded, so nothing a
test started outlives it (a setsid() grandchild re-parented to init included).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from supervisor.client import Queue
from supervisor.store import Status, Store, Task
from tests.support import pid_alive, wait_until
from tests.support.launcher import ROOT, SupervisorProcess, merge, render_config  # noqa: F401

HANDLERS = Path(__file__).resolve().parent / "handlers"

# Short timings so the suite stays fast; a test overrides what it needs.
BASE = {
    "supervisor": {
        "database": "t.db", "pool_size": 2, "preload": ["tvp_handlers"], "lease_s": 2,
        "poll_interval_s": 0.2, "shutdown_grace_s": 5, "kill_grace_s": 0.5,
        "boot_timeout_s": 5, "memory_budget_mb": 100_000,
    },
    "defaults": {"timeout_s": 60, "max_attempts": 3, "backoff_initial_s": 0.1,
                 "backoff_max_s": 0.5},
    "http": {"listen": ""},
    "log": {"level": "INFO"},
}


class SupervisorProc(SupervisorProcess):
    """One test's supervisor: the launcher plus BASE settings, the handlers' folder on
    PYTHONPATH, a Store for reads and readers of what the handlers wrote."""

    def __init__(self, tmp_path: Path, settings: dict, name: str = "taskvisor"):
        self.settings = merge(BASE, settings)
        super().__init__(tmp_path, self.settings, name=name, pythonpath=[HANDLERS],
                         env={"TVP_DIR": str(tmp_path)}, ready_timeout=30)
        self.db_path = tmp_path / self.settings["supervisor"]["database"]
        self._store: Store | None = None
        self._queue = Queue(self.config_path)

    def write_config(self, settings: dict | None = None, text: str | None = None) -> None:
        if settings is not None:
            self.settings = merge(self.settings, settings)
        self.write_config_text(text if text is not None else render_config(self.settings))

    def fork_servers(self) -> list[psutil.Process]:
        out = []
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return out
        for p in kids:
            try:
                if "workers.zygote" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def task_log(self, task_id: str, attempt: int = 1) -> str:
        """The task's own log (its stdout and stderr, stored by the supervisor)."""
        from supervisor.store import events as live
        return b"".join(c.data for c in live.read_log(self.store.conn, task_id, attempt)).decode(
            errors="replace")

    def wait_task_log(self, task_id: str, text: str, timeout: float = 10) -> str:
        """Wait until `text` is in the task's log (stored at least every second while it
        runs); returns the line holding it."""
        wait_until(lambda: text in self.task_log(task_id), timeout=timeout,
                   message=f"the log of task {task_id} never said {text!r}")
        return next(ln for ln in self.task_log(task_id).splitlines() if text in ln)

    # -- the database ----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.db_path)
        return self._store

    @property
    def queue(self):
        """A client Queue on the first config (so a later invalid config does not stop it)."""
        return self._queue

    def enqueue(self, type: str, payload: dict | None = None, **kw) -> str:
        payload = {"dir": str(self.dir), **(payload or {})}
        return self.queue.enqueue(type, payload, **kw)

    def get(self, task_id: str) -> Task:
        return self.store.get(task_id)

    def wait_status(self, task_id: str, *statuses: str, timeout: float = 15) -> Task:
        wanted = {Status(s) for s in statuses}

        def done():
            t = self.get(task_id)
            return t if t.status in wanted else None
        try:
            return wait_until(done, timeout=timeout)
        except AssertionError:
            t = self.get(task_id)
            raise AssertionError(f"task {task_id} is {t.status} ({t.outcome}: {t.error}), not "
                                 f"{statuses} after {timeout}s; history="
                                 f"{[(a.outcome, a.reason) for a in t.history]}\n"
                                 f"{self.log()[-4000:]}") from None

    def wait_all(self, ids, *statuses: str, timeout: float = 30) -> list[Task]:
        deadline = time.monotonic() + timeout
        return [self.wait_status(i, *statuses, timeout=max(0.1, deadline - time.monotonic()))
                for i in ids]

    # -- what the handlers wrote -------------------------------------------------------------

    def events(self) -> list[tuple[str, str, float, int]]:
        """(kind, task id, time, pid) for every line of events.log."""
        try:
            text = (self.dir / "events.log").read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[0], parts[1], float(parts[2]), int(parts[3])))
        return out

    def runs(self) -> dict[str, list[tuple[float, float | None, int, int | None]]]:
        """task id -> [(start, end or None, pid, life)] in start order. `life` is the
        1-based supervisor life whose fork server forked the run (None if unknown)."""
        lives = self.fork_server_lives()
        out: dict[str, list[list]] = {}
        try:
            text = (self.dir / "events.log").read_text()
        except FileNotFoundError:
            return {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            kind, task_id, at, pid = parts[0], parts[1], float(parts[2]), int(parts[3])
            if kind == "start":
                life = lives.get(int(parts[4])) if len(parts) > 4 else None
                out.setdefault(task_id, []).append([at, None, pid, life])
            elif kind == "end":
                for run in out.get(task_id, []):
                    if run[2] == pid and run[1] is None:
                        run[1] = at
        return {k: [tuple(r) for r in v] for k, v in out.items()}

    def fork_server_lives(self) -> dict[int, int]:
        """fork server pid -> the supervisor life (1-based) that started it, from the log."""
        out, life = {}, 0
        for line in self.log().splitlines():
            marker = re.search(r"==== life (\d+) ====", line)
            if marker:
                life = int(marker.group(1))
            else:
                m = re.search(r"fork server (\d+) (ready|started|restarted)", line) or \
                    re.search(r"fork server restarted as pid (\d+)", line)
                if m:
                    out[int(m.group(1))] = life
        return out

    def recorded_pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.dir / "pids").read_text().split()]
        except FileNotFoundError:
            return []

    # -- clean-up -----------------------------------------------------------------------------

    def cleanup(self) -> None:
        queue = self._queue
        self.close(graceful_s=0)
        for pid in self.recorded_pids():
            try:
                p = psutil.Process(pid)
                if p.create_time() >= self.born - 1:
                    p.kill()
            except psutil.Error:
                pass
        for closer in (queue, self._store):
            if closer is not None:
                try:
                    closer.close()
                except Exception:
                    pass


@pytest.fixture
def supervisor_proc(tmp_path, request):
    """Factory: `supervisor_proc(supervisor={...}, types={...}, start=True, name=...)`.
    Supervisors made with different names share tmp_path (and so the database)."""
    made: list[SupervisorProc] = []

    def make(start: bool = True, name: str = "taskvisor", **settings) -> SupervisorProc:
        sup = SupervisorProc(tmp_path, settings, name=name)
        made.append(sup)
        if start:
            sup.start()
        return sup

    yield make
    failed = getattr(request.node, "rep_call", None)
    for sup in made:
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n---- supervisor log ({sup.log_path}) ----\n{sup.log()[-20000:]}\n")
        sup.cleanup()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def assert_dead(pid: int, timeout: float = 5.0, what: str = "process") -> None:
    wait_until(lambda: not pid_alive(pid), timeout=timeout,
               message=f"{what} {pid} still alive after {timeout}s")


def max_concurrent(runs: dict) -> int:
    """Most runs (of any task) alive at one instant, from `SupervisorProc.runs()`."""
    edges = []
    for intervals in runs.values():
        for start, end, *_ in intervals:
            edges += [(start, 1), (end if end is not None else float("inf"), -1)]
    best = cur = 0
    for _, step in sorted(edges):  # at equal times an end (-1) sorts before a start
        cur += step
        best = max(best, cur)
    return best
