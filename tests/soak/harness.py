"""The soak tests' harness: supervisors that carry the test's marker, the flock run log,
and the checks every soak test ends with.

Owns: `SoakSupervisor` (a `tests.process.conftest.SupervisorProc` whose argv() runs
`tests.soak.pausing` instead of `taskvisor run`, ready when its ready file says so,
preloading `tvs_soak`, with $TVSOAK_MARK in its environment, which its fork server and
every task process inherit), `read_runs` (the handler's runs.log),
`Soak.finish` (the end-of-test checks) and the figures table. It never writes task state:
tasks go in through `Queue.enqueue_many`, and the database is only read.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import apsw

from tests.process.conftest import SupervisorProc
from tests.support import wait_until

HANDLERS = Path(__file__).resolve().parent / "handlers"
MARK = "TVSOAK_MARK"
TYPE = "soak.run"
FIGURES: list[dict] = []   # one row per finished soak test, printed at the end of the session
COLUMNS = ("test", "tasks", "sup kills", "pauses (aimed)", "fs kills", "task kills",
           "relay kills", "runs", "duplicate runs", "overlaps", "max overlap s", "drain s",
           "wall s", "notes")


class SoakSupervisor(SupervisorProc):
    """A supervisor on the shared test folder whose whole process tree carries `mark`."""

    def __init__(self, tmp_path: Path, settings: dict, name: str, mark: str):
        settings = {**settings, "supervisor": {"preload": ["tvs_soak"],
                                               **settings.get("supervisor", {})}}
        super().__init__(tmp_path, settings, name=name)
        self.mark = mark
        self.arm_path = tmp_path / f"{name}.arm"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HANDLERS)])
        env[MARK] = self.mark
        env["TVSOAK_ARM"] = str(self.arm_path)
        return env

    def argv(self) -> list[str]:
        """`taskvisor run` through tests.soak.pausing (the claim observer); the launcher's
        start() waits for the ready file it is given."""
        return [sys.executable, "-m", "tests.soak.pausing", str(self.config_path),
                "--ready-file", str(self.ready_path)]

    def stopped(self) -> bool:
        """Is the supervisor process in the stopped state (SIGSTOP)?"""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
        except OSError:
            return False


@dataclass
class Run:
    task: str
    attempt: int
    pid: int
    start: float
    end: float | None
    overlap: bool   # the task's flock was held by another live run when this one began


def read_runs(folder: Path) -> list[Run]:
    """Every run the handler logged, in start order (a killed run has end None)."""
    runs: dict[tuple[str, int], Run] = {}
    try:
        text = (folder / "runs.log").read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] not in ("begin", "run"):
            continue  # a line cut by a kill -9 mid-write has no newline; it is not split
        key = (parts[1], int(parts[3]))
        if parts[0] == "begin":
            runs[key] = Run(parts[1], int(parts[2]), int(parts[3]), float(parts[4]), None,
                            parts[-1] == "OVERLAP")
        elif key in runs:
            runs[key].end = float(parts[5])
    return sorted(runs.values(), key=lambda r: r.start)


def overlaps(runs: list[Run]) -> tuple[list[Run], float]:
    """Runs that began while another run of their task was alive (the flock said so, or,
    as a second witness, the [start, end] of two finished runs cross), and the longest
    crossing of finished runs in seconds."""
    bad = {id(r): r for r in runs if r.overlap}
    longest = 0.0
    by_task: dict[str, list[Run]] = {}
    for r in runs:
        by_task.setdefault(r.task, []).append(r)
    for mine in by_task.values():
        done = [r for r in mine if r.end is not None]
        for i, a in enumerate(done):
            for b in done[i + 1:]:
                cross = min(a.end, b.end) - max(a.start, b.start)
                if cross > 0:
                    longest = max(longest, cross)
                    bad.setdefault(id(b), b)
    return sorted(bad.values(), key=lambda r: r.start), longest


def marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries $TVSOAK_MARK=mark (zombies have none)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            pass
    return found


def integrity(db_path: Path) -> str:
    db = apsw.Connection(str(db_path))
    try:
        db.set_busy_timeout(5000)
        return "; ".join(row[0] for row in db.execute("PRAGMA integrity_check"))
    finally:
        db.close()


def print_table(rows: list[dict]) -> str:
    cells = [[str(r.get(c, "")) for c in COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                        enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


class Soak:
    """One soak test: its folder, marker, supervisors, tasks, disruptions and figures."""

    def __init__(self, tmp_path: Path, name: str, seed: int):
        self.dir = tmp_path
        self.name = name
        self.mark = uuid.uuid4().hex
        self.seed = seed
        self.rng = random.Random(seed)
        self.sups: list[SoakSupervisor] = []
        self.ids: list[str] = []
        self.counts = {"sup kills": 0, "pauses": 0, "aimed": 0, "fs kills": 0, "task kills": 0}
        self.began = time.monotonic()
        self.last_disruption = time.monotonic()
        (tmp_path / "locks").mkdir(exist_ok=True)

    def supervisor(self, name: str = "taskvisor", start: bool = True, **settings) -> SoakSupervisor:
        sup = SoakSupervisor(self.dir, settings, name, self.mark)
        self.sups.append(sup)
        if start:
            sup.start()
        return sup

    def enqueue(self, sup: SupervisorProc, n: int, low: float, high: float,
                max_attempts: int = 100) -> list[str]:
        """n tasks sleeping uniform(low, high) seconds each, in one transaction."""
        items = [{"type": TYPE, "max_attempts": max_attempts,
                  "payload": {"dir": str(self.dir), "s": round(self.rng.uniform(low, high), 3)}}
                 for _ in range(n)]
        ids = sup.queue.enqueue_many(items)
        self.ids += ids
        return ids

    def totals(self, sup: SupervisorProc) -> dict[str, int]:
        return sup.store.stats(time.time()).totals()

    def unfinished(self, sup: SupervisorProc) -> int:
        t = self.totals(sup)
        return t["queued"] + t["running"] + t["blocked"]

    def at_random_moment(self, within_s: float) -> float:
        """Let the load run for uniform(0, within_s) seconds: the next disruption lands at
        a moment no code path can anticipate. Returns the time waited."""
        wait = self.rng.uniform(0.0, within_s)
        time.sleep(wait)
        return wait

    def disrupted(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n
        self.last_disruption = time.monotonic()

    def wait_drained(self, sup: SupervisorProc, timeout: float) -> float:
        """Wait until no task is queued or running; returns seconds since the last disruption."""
        def drained():
            t = self.totals(sup)
            assert t["failed"] == 0 and t["cancelled"] == 0, f"tasks gave up: {t}"
            return t["queued"] + t["running"] + t["blocked"] == 0
        wait_until(drained, timeout=timeout, interval=0.2,
                   message=f"tasks still unfinished after {timeout}s: {self.totals(sup)}")
        return time.monotonic() - self.last_disruption

    def finish(self, drain_s: float, earlier: set[str], extra: dict | None = None) -> None:
        """Stop every supervisor, record the figures, then check: each task succeeded once
        (its record: one success, last, earlier attempts in `earlier`, and a finished run
        of that attempt in the log), zero overlaps, no process left, integrity ok."""
        codes = {s.name: s.stop() for s in self.sups if s.proc is not None and s.proc.poll() is None}
        runs = read_runs(self.dir)
        bad, longest = overlaps(runs)
        c = self.counts
        row = {"test": self.name, "tasks": len(self.ids), "sup kills": c["sup kills"],
               "pauses (aimed)": f"{c['pauses']} ({c['aimed']})", "fs kills": c["fs kills"],
               "task kills": c["task kills"], "runs": len(runs),
               "duplicate runs": len(runs) - len({r.task for r in runs}),
               "overlaps": len(bad), "max overlap s": f"{longest:.2f}",
               "drain s": f"{drain_s:.1f}", "wall s": f"{time.monotonic() - self.began:.0f}",
               **(extra or {})}
        FIGURES.append(row)
        print(f"\n{print_table([row])}\n(seed {self.seed})")

        problems = []
        sup = self.sups[0]
        by_task: dict[str, list[Run]] = {}
        for r in runs:
            by_task.setdefault(r.task, []).append(r)
        for task_id in self.ids:
            t = sup.get(task_id)
            outcomes = [a.outcome for a in t.history]
            numbers = [a.attempt for a in t.history]
            finished = {r.attempt for r in by_task.get(task_id, []) if r.end is not None}
            if t.status != "succeeded":
                problems.append(f"{task_id}: {t.status}, not succeeded ({outcomes})")
            elif (outcomes[-1:] != ["succeeded"] or outcomes.count("succeeded") != 1
                  or not set(outcomes[:-1]) <= earlier or not sane(numbers, t.attempts)):
                problems.append(f"{task_id}: attempts {numbers} ended {outcomes}")
            elif t.attempts not in finished:
                problems.append(f"{task_id}: attempt {t.attempts} succeeded but the log has no "
                                f"finished run of it ({sorted(finished)})")
        if bad:
            shown = "\n  ".join(explain(r, by_task[r.task]) for r in bad[:10])
            problems.append(f"{len(bad)} overlapping execution(s):\n  {shown}")
        deadline = time.monotonic() + 10
        while (left := marked_pids(self.mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            problems.append(f"processes left: {describe(left)}")
        for name, code in codes.items():
            if code != 0:
                problems.append(f"supervisor {name} exited {code}")
        check = integrity(sup.db_path)
        if check != "ok":
            problems.append(f"integrity_check: {check}")
        assert not problems, "\n".join(problems[:40])

    def cleanup(self) -> None:
        for sup in self.sups:
            try:
                sup.signal(signal.SIGCONT)
            except (ProcessLookupError, AttributeError):
                pass
            sup.cleanup()
        for pid in marked_pids(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def clock(t: float | None) -> str:
    return "killed" if t is None else time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def explain(run: Run, runs: list[Run]) -> str:
    """One overlap in words: this run began while which other run of its task was alive."""
    alive = [r for r in runs if r is not run and r.start <= run.start + 0.01
             and (r.end is None or r.end > run.start)]
    others = "; ".join(f"attempt {r.attempt} pid {r.pid} from {clock(r.start)} to {clock(r.end)}"
                       for r in alive) or "a run that held the lock"
    return (f"{run.task} attempt {run.attempt} pid {run.pid} began {clock(run.start)} "
            f"(to {clock(run.end)}) while alive: {others}")


def sane(numbers: list[int], attempts: int) -> bool:
    """Attempt numbers of a history: from 1, up by one or repeated (an attempt given back,
    e.g. `interrupted`, keeps its number), ending at the task's attempt count."""
    steps = [b - a for a, b in zip(numbers, numbers[1:])]
    return numbers[:1] == [1] and numbers[-1] == attempts and set(steps) <= {0, 1}


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid} {cmd[:80]}")
        except OSError:
            out.append(str(pid))
    return out
