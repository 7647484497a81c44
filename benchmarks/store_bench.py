#!/usr/bin/env python3
"""Store benchmark: taskvisor's SQLite store against Huey's SqliteHuey and litequeue.

Run from the repository root, in the benchmark's own environment (see README.md here):

    bash benchmarks/setup-peers.sh && benchmarks/.env/bin/python benchmarks/store_bench.py

Measures, on fresh database files in a temporary folder, all in one invocation:
  - single enqueue: one task per transaction (ops/s);
  - enqueue in batches of 1,000, one transaction per batch (tasks/s);
  - claim + complete cycles/s with the queue about 1,000 and about 1,000,000 deep
    (`--quick`: 100,000 deep), at the head of the queue.
Each figure is the median of several repetitions. Prints a table and the bars of issue 2
as PASS/FAIL, and writes everything to benchmarks/results/store.json.

Not a test: pytest does not collect it (it is outside tests/ and not named test_*).
To add a peer: write a subclass of Peer below, add it to PEERS, and add its package to
requirements-peers.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # taskvisor from this checkout even without install

perf = time.perf_counter


# -- peers ---------------------------------------------------------------------------------

class Peer:
    """One queue under test. Each method works on the file opened by `open`.

    enqueue_one: the peer's public one-task enqueue (its own transaction).
    enqueue_batch(n): n tasks in one transaction through the public API (has_batch = False: none).
    fill(n): put n tasks in as fast as possible (untimed set-up; may use raw SQL in the
             peer's own schema, producing the same rows its enqueue would).
    cycle: take the next task and mark it finished, the peer's nearest equivalent of
           taskvisor's claim + complete.
    checkpoint: fold the WAL back into the database (untimed, after a big fill).
    """
    name = ""
    package = ""
    durability = ""
    cycle_label = "claim + complete"
    has_batch = True
    single_only = False  # a reference row: single enqueue only

    def open(self, path: str) -> None: raise NotImplementedError
    def close(self) -> None: raise NotImplementedError
    def enqueue_one(self) -> None: raise NotImplementedError
    def enqueue_batch(self, n: int) -> None: raise NotImplementedError
    def fill(self, n: int) -> None: raise NotImplementedError
    def cycle(self) -> None: raise NotImplementedError
    def checkpoint(self, mode: str = "TRUNCATE") -> None: raise NotImplementedError

    def version(self) -> str:
        return metadata.version(self.package)


class Taskvisor(Peer):
    name = "taskvisor"
    package = "taskvisor"
    durability = "WAL, synchronous=NORMAL (apsw, bundled SQLite {sqlite})"

    def __init__(self):
        import apsw
        from supervisor.store import AttemptEnd, NewTask, Outcome, Store
        self.durability = self.durability.format(sqlite=apsw.sqlite_lib_version())
        self._Store, self._NewTask = Store, NewTask
        self._task = NewTask(type="bench", payload="{}")
        self._end = AttemptEnd(Outcome.SUCCEEDED, result="null")

    def version(self) -> str:
        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return "checkout"

    def open(self, path):
        # As the supervisor opens it: WAL checkpoints on a background thread.
        self.store = self._Store(path, synchronous="NORMAL", background_checkpoints=True)
        self._held = None

    def close(self):
        self.store.close()

    def enqueue_one(self):
        self.store.enqueue(self._task, time.time())

    def enqueue_batch(self, n):
        self.store.enqueue_many([self._task] * n, time.time())

    def fill(self, n):
        step = 50_000
        for i in range(0, n, step):
            self.store.enqueue_many([self._task] * min(step, n - i), time.time())

    def cycle(self):
        # As a supervisor pass does it: the outcome of the attempt that ended and the
        # claim for the slot it freed share one transaction.
        now = time.time()
        with self.store.transaction():
            if self._held is not None:
                self.store.complete(self._held.lease, self._end, now)
            self._held = self.store.claim("bench", now, lease_s=30)

    def checkpoint(self, mode="TRUNCATE"):
        self.store.conn.db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()


class Huey(Peer):
    """SqliteHuey, used as its users do: a @task called with immediate=False enqueues a
    pickled message; `huey.dequeue()` is what its consumer calls to take one."""
    name = "huey"
    package = "huey"
    durability = "WAL, synchronous=NORMAL set on its connection (stdlib sqlite3, SQLite {sqlite})"
    cycle_label = "dequeue"
    has_batch = False
    sync = "NORMAL"

    def __init__(self):
        import sqlite3
        from huey import SqliteHuey
        self.durability = self.durability.format(sqlite=sqlite3.sqlite_version)
        self._cls = SqliteHuey

    def open(self, path):
        self.huey = self._cls("bench", filename=path, results=False, immediate=False)
        conn = self.huey.storage.conn  # opened lazily; pragmas hold for its life
        if self.sync:
            conn.execute(f"PRAGMA synchronous={self.sync}")
        self.sync_effective = conn.execute("PRAGMA synchronous").fetchone()[0]

        @self.huey.task()
        def noop():
            return None
        self.noop = noop

    def close(self):
        self.huey.storage.close()

    def enqueue_one(self):
        self.noop()

    def fill(self, n):
        storage = self.huey.storage
        data = self.huey.serialize_task(self.noop.s())
        step = 100_000
        for i in range(0, n, step):
            with storage.db(commit=True) as curs:
                curs.executemany("INSERT INTO task (queue, data, priority) VALUES (?, ?, 0)",
                                 ((storage.name, data) for _ in range(min(step, n - i))))

    def cycle(self):
        if self.huey.dequeue() is None:
            raise RuntimeError("huey: queue unexpectedly empty")

    def checkpoint(self, mode="TRUNCATE"):
        self.huey.storage.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()


class HueyDefault(Huey):
    """SqliteHuey exactly as constructed by default: WAL with SQLite's default
    synchronous=FULL (an fsync per commit). Shown for reference; bars use `huey`."""
    name = "huey (default sync)"
    durability = "WAL, synchronous=FULL (Huey's default; fsync per commit)"
    sync = None
    single_only = True


class LiteQueue(Peer):
    """litequeue: `put` (autocommit), `pop` (BEGIN IMMEDIATE … UPDATE … RETURNING) + `done`."""
    name = "litequeue"
    package = "litequeue"
    durability = "WAL, synchronous=NORMAL (its defaults; stdlib sqlite3, SQLite {sqlite}; cache 256 MB)"
    cycle_label = "pop + done"

    def __init__(self):
        import sqlite3
        import litequeue
        self.durability = self.durability.format(sqlite=sqlite3.sqlite_version)
        self._mod = litequeue

    def open(self, path):
        self.q = self._mod.LiteQueue(path)

    def close(self):
        self.q.close()

    def enqueue_one(self):
        self.q.put("{}")

    def enqueue_batch(self, n):
        with self.q.transaction("IMMEDIATE"):
            for _ in range(n):
                self.q.put("{}")

    def fill(self, n):
        uuid7, now = self._mod.uuid7, time.time_ns
        step = 100_000
        for i in range(0, n, step):
            with self.q.transaction("IMMEDIATE"):
                self.q.conn.executemany(
                    f"INSERT INTO {self.q.table} (data, message_id, status, in_time) VALUES (?, ?, 0, ?)",
                    (("{}", uuid7(), now()) for _ in range(min(step, n - i))))

    def cycle(self):
        message = self.q.pop()
        self.q.done(message.message_id)

    def checkpoint(self, mode="TRUNCATE"):
        self.q.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()


PEERS = [Taskvisor, Huey, LiteQueue, HueyDefault]


# -- measurement ---------------------------------------------------------------------------

class Bench:
    """Each figure is measured for every peer at once: all peers' files are opened and
    filled first, then the repetitions take turns (rep 1 of every peer, then rep 2, ...),
    so a burst of noise from the rest of the machine lands on all peers alike and the
    ratios stay fair."""

    def __init__(self, args, workdir: Path, log):
        self.args = args
        self.workdir = workdir
        self.log = log
        self.quick = args.quick
        self.reps = args.reps or (3 if self.quick else 5)
        self.n_single = 1_000 if self.quick else 5_000
        self.n_batches = 5 if self.quick else 10
        self.cycles_per_rep = 300 if self.quick else 1_000
        self.rep_budget_s = 1.0 if self.quick else 4.0
        self.window = 100
        self.deep = args.deep or (100_000 if self.quick else 1_000_000)
        self.depths = [1_000, self.deep]
        self._files = 0

    def _open(self, peers: list[Peer], what: str) -> None:
        for peer in peers:
            self._files += 1
            peer.open(str(self.workdir / f"{self._files:02d}-{peer.name.split()[0]}-{what}.db"))

    def _interleave(self, lanes: list, rep) -> list[list[tuple[int, float]]]:
        """rep(lane) -> (operations, seconds); returns each lane's list, rep by rep."""
        out: list[list[tuple[int, float]]] = [[] for _ in lanes]
        for _ in range(self.reps):
            for i, lane in enumerate(lanes):
                out[i].append(rep(lane))
        return out

    def single(self, peers: list[Peer]) -> dict[str, dict]:
        self._open(peers, "single")
        try:
            for peer in peers:
                for _ in range(500):  # warm-up: statement cache, first pages, WAL file grown
                    peer.enqueue_one()

            def rep(peer):
                settle(peers)
                # Stops early past the budget (Huey with synchronous=FULL fsyncs each one).
                n, t = 0, perf()
                while n < self.n_single and (n % 100 or perf() - t < self.rep_budget_s):
                    peer.enqueue_one()
                    n += 1
                return n, perf() - t
            runs = self._interleave(peers, rep)
        finally:
            for peer in peers:
                peer.close()
        return {p.name: _figure(r, "ops/s") for p, r in zip(peers, runs)}

    def batch(self, peers: list[Peer]) -> dict[str, dict]:
        peers = [p for p in peers if p.has_batch]
        self._open(peers, "batch")
        try:
            for peer in peers:
                peer.enqueue_batch(1_000)

            def rep(peer):
                settle(peers)
                t = perf()
                for _ in range(self.n_batches):
                    peer.enqueue_batch(1_000)
                return self.n_batches * 1_000, perf() - t
            runs = self._interleave(peers, rep)
        finally:
            for peer in peers:
                peer.close()
        return {p.name: _figure(r, "tasks/s") for p, r in zip(peers, runs)}

    def cycles(self, peers: list[Peer]) -> dict[str, dict[int, dict]]:
        """Cycles/s at the head of a queue kept between `depth` and `depth + window` deep,
        for every peer at every depth; returns {peer name: {depth: figure}}.

        One file per (peer, depth), all filled first; then the repetitions of every
        (peer, depth) take turns, so the deep/shallow ratio compares like with like.
        Before each window of `window` cycles the queue is topped up (untimed) to
        depth + window; only the cycles themselves are timed. A repetition ends after
        `cycles_per_rep` cycles or once its timed total passes the budget (for a peer whose
        take is O(depth)), so a slow peer reports a rate from fewer cycles.
        """
        lanes = []  # [peer instance, depth, window, pending, fill seconds]
        for depth in self.depths:
            for peer in peers:
                lane_peer = type(peer)()
                self._files += 1
                lane_peer.open(str(self.workdir / f"{self._files:02d}-{peer.name.split()[0]}-cycles-{depth}.db"))
                lanes.append([lane_peer, depth, min(self.window, max(1, depth // 10)), 0, 0.0])
        try:
            for lane in lanes:
                peer, depth, window = lane[:3]
                self.log(f"  {peer.name}: filling to {depth:,}")
                t = perf()
                peer.fill(depth + window)
                lane[4] = perf() - t
                peer.checkpoint()
                lane[3] = depth + window
            # The fills leave hundreds of MB dirty in the page cache; written back during
            # the first repetitions they slowed every peer's deep figure by up to 40%.
            os.sync()

            def run(lane, limit: int, budget: float) -> tuple[int, float]:
                peer, depth, window = lane[:3]
                done, spent = 0, 0.0
                while done < limit and spent < budget:
                    if lane[3] < depth + window:
                        peer.fill(depth + window - lane[3])
                        lane[3] = depth + window
                    n = min(window, limit - done)
                    k, t0 = 0, perf()
                    while k < n:
                        peer.cycle()
                        k += 1
                        if k % 10 == 0 and spent + perf() - t0 > budget:
                            break
                    spent += perf() - t0
                    done += k
                    lane[3] -= k
                return done, spent

            self.log("  measuring (reps of every peer and depth take turns)")
            for lane in lanes:
                run(lane, lane[2], self.rep_budget_s)  # warm-up
            runs = self._interleave(lanes, lambda lane: run(lane, self.cycles_per_rep, self.rep_budget_s))
        finally:
            for lane in lanes:
                lane[0].close()
        out: dict[str, dict[int, dict]] = {}
        for (peer, depth, window, _, fill_s), r in zip(lanes, runs):
            fig = _figure(r, "cycles/s")
            fig.update(depth=depth, fill_s=round(fill_s, 2), fill_rate=round((depth + window) / fill_s))
            out.setdefault(peer.name, {})[depth] = fig
        return out


def settle(peers: list[Peer]) -> None:
    """Untimed, before a repetition: checkpoint every peer's WAL, so no peer's timed
    window pays for (or, through taskvisor's checkpoint thread, shares its cores with)
    pages another peer wrote. RESTART, not TRUNCATE: the WAL file keeps its size, as in
    a long-running program, so the next writes reuse its blocks instead of growing it."""
    for peer in peers:
        peer.checkpoint("RESTART")


def _figure(runs: list[tuple[int, float]], unit: str) -> dict:
    rates = [n / s for n, s in runs]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "samples": [round(r, 1) for r in rates], "unit": unit, "per_rep": [n for n, _ in runs]}


# -- report --------------------------------------------------------------------------------

def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def depth_label(d: int) -> str:
    return f"{d // 1_000_000:,}M" if d >= 1_000_000 and d % 1_000_000 == 0 else f"{d:,}"


def bars(results: dict, deep: int) -> list[dict]:
    def med(peer, key):
        fig = results.get(peer, {}).get(key)
        return fig and fig["median"]

    tv = "taskvisor"
    cyc1, cycd = "cycles@1000", f"cycles@{deep}"
    spec = [
        ("single enqueue >= 2x Huey's (same synchronous)", med(tv, "single"), med("huey", "single"), 2.0),
        ("single enqueue >= litequeue put", med(tv, "single"), med("litequeue", "single"), 1.0),
        ("claim+complete >= 3x litequeue pop+done @1,000", med(tv, cyc1), med("litequeue", cyc1), 3.0),
        (f"claim+complete >= 3x litequeue pop+done @{depth_label(deep)}", med(tv, cycd), med("litequeue", cycd), 3.0),
        (f"claim+complete @{depth_label(deep)} >= 0.8x @1,000", med(tv, cycd), med(tv, cyc1), 0.8),
        # Not a bar of the issue: the same ratio against Huey as it ships (synchronous=FULL).
        ("(reference) single enqueue vs Huey's default sync", med(tv, "single"), med("huey (default sync)", "single"), 2.0),
    ]
    out = []
    for name, num, den, need in spec:
        ratio = num / den if num and den else None
        verdict = "SKIP" if ratio is None else ("PASS" if ratio >= need else "FAIL")
        out.append({"bar": name, "ratio": ratio, "need": need, "result": verdict,
                    "numerator": num, "denominator": den, "reference": name.startswith("(reference)")})
    return out


def print_report(meta: dict, results: dict, peers: list[Peer], bar_rows: list[dict], deep: int) -> None:
    cols = [("single", "enqueue 1/txn"), ("batch", "enqueue x1000"),
            ("cycles@1000", "cycle @1,000"), (f"cycles@{deep}", f"cycle @{depth_label(deep)}")]
    print()
    print(f"taskvisor store benchmark ({meta['mode']}): {meta['cpus']} cores, Python {meta['python']}, "
          f"{meta['reps']} reps, medians; folder {meta['tmp_fs']}")
    print(f"load average before/after: {meta['loadavg_before'][0]:.2f} / {meta['loadavg_after'][0]:.2f} "
          "(other work on the machine makes every figure noisier; the reps of all peers take turns)")
    head = f"{'':24s}" + "".join(f"{c[1]:>16s}" for c in cols) + "   cycle is"
    print(head)
    print("-" * len(head))
    for p in peers:
        r = results.get(p.name)
        if r is None:
            continue
        row = f"{p.name:24s}" + "".join(f"{fmt(r[k]['median']) if k in r else '—':>16s}" for k, _ in cols)
        print(row + f"   {p.cycle_label}")
    print("units: enqueue 1/txn ops/s; enqueue x1000 tasks/s; cycle @N: cycles/s with the queue kept "
          "N..N+100 deep")
    print()
    print("notes:")
    for p in peers:
        if p.name in results:
            extra = results[p.name].get("_note", "")
            print(f"  {p.name} {results[p.name]['_version']}: {p.durability}{extra}")
    print("  huey has no lease and no completion: dequeue() deletes the row in the same transaction"
          " (a crash after it loses the task), so its 'cycle' is one write, taskvisor's two.")
    print("  huey has no batch enqueue in its API (—); litequeue's batch is put() x1000 inside its"
          " transaction('IMMEDIATE').")
    targets = {"single": meta["n_single"], "cycles@1000": meta["cycles_per_rep"],
               f"cycles@{deep}": meta["cycles_per_rep"]}
    for name, r in results.items():
        for key, target in targets.items():
            fig = r.get(key)
            if fig and min(fig["per_rep"]) < target:
                why = (" (pop is O(depth): SIdx(status) then a temp B-tree sort on message_id)"
                       if name == "litequeue" and key.startswith("cycles") else "")
                print(f"  {name} {key}: reps stopped at the {meta['rep_budget_s']:g} s budget after "
                      f"{'/'.join(map(str, fig['per_rep']))} operations{why}.")
    print()
    w = max(len(b["bar"]) for b in bar_rows)
    print(f"{'bar':{w}s}  {'ratio':>8s}  {'need':>6s}  result")
    for b in bar_rows:
        ratio = "—" if b["ratio"] is None else f"{b['ratio']:.2f}x"
        print(f"{b['bar']:{w}s}  {ratio:>8s}  {b['need']:>5g}x  {b['result']}")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes for a CI smoke run (100,000 deep)")
    ap.add_argument("--reps", type=int, help="repetitions per figure (default 5, quick 3)")
    ap.add_argument("--deep", type=int, help="the deep queue's depth (default 1,000,000, quick 100,000)")
    ap.add_argument("--peers", default=",".join(p.name for p in PEERS),
                    help="comma-separated peers to run (default: all)")
    ap.add_argument("--dir", help="folder for the temporary databases (default: the system temp dir)")
    ap.add_argument("--json", default=str(HERE / "results" / "store.json"), help="where to write the JSON")
    ap.add_argument("--keep", action="store_true", help="keep the database files")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    args = ap.parse_args(argv)

    wanted = [s.strip() for s in args.peers.split(",") if s.strip()]
    peers: list[Peer] = []
    missing = []
    for cls in PEERS:
        if cls.name not in wanted:
            continue
        try:
            peers.append(cls())
        except ImportError as exc:
            missing.append(f"{cls.name} ({exc.name})")
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}; run: bash benchmarks/setup-peers.sh "
              "and use benchmarks/.env/bin/python", file=sys.stderr)
    if not any(p.name == "taskvisor" for p in peers):
        print("taskvisor itself cannot be imported", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="taskvisor-bench-", dir=args.dir))
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    bench = Bench(args, workdir, log)
    load_before = os.getloadavg()
    results: dict[str, dict] = {p.name: {"_version": p.version()} for p in peers}
    full = [p for p in peers if not p.single_only]
    try:
        log("single enqueue: " + ", ".join(p.name for p in peers))
        for name, fig in bench.single(peers).items():
            results[name]["single"] = fig
        for p in peers:
            if getattr(p, "sync_effective", None) is not None:
                results[p.name]["_note"] = f" [checked: PRAGMA synchronous={p.sync_effective}]"
        log("batches of 1,000")
        for name, fig in bench.batch(full).items():
            results[name]["batch"] = fig
        log("cycles at " + " and ".join(f"{d:,}" for d in bench.depths) + " deep")
        for name, by_depth in bench.cycles(full).items():
            for depth, fig in by_depth.items():
                results[name][f"cycles@{depth}"] = fig
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    import apsw
    import sqlite3
    meta = {
        "mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1), "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(), "apsw": apsw.apsw_version(),
        "apsw_sqlite": apsw.sqlite_lib_version(), "stdlib_sqlite": sqlite3.sqlite_version,
        "reps": bench.reps, "n_single": bench.n_single, "batches_per_rep": bench.n_batches,
        "cycles_per_rep": bench.cycles_per_rep, "rep_budget_s": bench.rep_budget_s,
        "window": bench.window, "depths": bench.depths, "tmp_fs": str(workdir.parent),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    bar_rows = bars(results, bench.deep)
    print_report(meta, results, peers, bar_rows, bench.deep)
    print(f"total {meta['seconds']} s", file=sys.stderr)

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "bars": bar_rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 1 if args.strict and any(b["result"] == "FAIL" and not b["reference"] for b in bar_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
