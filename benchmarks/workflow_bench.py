#!/usr/bin/env python3
"""Workflow benchmark (issue 12): a fan-out of spawned children and a fan-in over them.

Run from the repository root with taskvisor's own environment:

    PYTHONPATH=. /work/venv/bin/python benchmarks/workflow_bench.py [--children 1000]

Two parts, each the median of several repetitions on fresh database files:
  - store: the cost of storing N spawned tasks (plus a join that depends on all of them)
    with the parent's success (`Store.check_spawns` + `Store.complete` in one
    transaction), per spawned task, against `enqueue_many` of the same tasks; and the cost
    of completing the N children one by one with the join waiting on them (the fan-in
    check each completion makes);
  - end to end: a real supervisor (fork server, real task processes) runs a parent that
    spawns N no-op children and a join over them; from the store's times: the parent's
    success -> the join's start (bar: under 1 s), and the last child's success -> the
    join's start (the fan-in's own latency).
Prints a table, the bar as PASS/FAIL, and writes benchmarks/results/workflow.json.
Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from supervisor.store import AttemptEnd, NewTask, Outcome, Store, new_id  # noqa: E402

BAR_S = 1.0
HANDLERS = textwrap.dedent('''
    from workers import task

    @task("bench.fanout")
    def fanout(payload, ctx):
        kids = [ctx.spawn("bench.child", {"i": i}) for i in range(payload["n"])]
        join = ctx.spawn("bench.join", {}, depends_on=kids)
        return {"join": join}

    @task("bench.child")
    def child(payload, ctx):
        return payload["i"]

    @task("bench.join")
    def join(payload, ctx):
        return {"n": len(ctx.inputs), "sum": sum(ctx.inputs.values())}
''')


# -- the store -------------------------------------------------------------------------------

def store_once(folder: Path, n: int, rep: int) -> dict:
    store = Store(folder / f"store-{rep}.db")
    now = time.time()
    try:
        parent = store.enqueue(NewTask(type="plan", payload="{}"), now)
        task = store.claim("bench", now, lease_s=60)
        kids = [NewTask(type="child", payload=json.dumps({"i": i}), id=new_id(now))
                for i in range(n)]
        join = NewTask(type="join", payload="{}", id=new_id(now),
                       depends_on=tuple(k.id for k in kids))
        end = AttemptEnd(Outcome.SUCCEEDED, result="null", spawn=tuple(kids + [join]))
        t0 = time.perf_counter()
        with store.transaction(all_or_nothing=True):
            assert store.check_spawns(end.spawn) is None
            assert store.complete(task.lease, end, now)
        spawn_s = time.perf_counter() - t0

        other = Store(folder / f"batch-{rep}.db")
        batch = [NewTask(type="child", payload=json.dumps({"i": i}), id=new_id(now))
                 for i in range(n)]
        batch.append(NewTask(type="join", payload="{}", id=new_id(now),
                             depends_on=tuple(k.id for k in batch)))
        t0 = time.perf_counter()
        other.enqueue_many(batch, now)
        batch_s = time.perf_counter() - t0
        other.close()

        done = AttemptEnd(Outcome.SUCCEEDED, result="1")
        t0 = time.perf_counter()
        for _ in range(n):  # each completion checks whether the join may run now
            with store.transaction(all_or_nothing=True):
                child = store.claim("bench", now, lease_s=60)
                store.complete(child.lease, done, now)
        fan_in_s = time.perf_counter() - t0
        last = store.claim("bench", now, lease_s=60)
        assert last is not None and last.type == "join" and last.parent_id == parent
        assert len(last.context["inputs"]) == n

        plain = Store(folder / f"plain-{rep}.db")  # the same cycles with nobody waiting
        plain.enqueue_many([NewTask(type="child", payload="{}") for _ in range(n)], now)
        t0 = time.perf_counter()
        for _ in range(n):
            with plain.transaction(all_or_nothing=True):
                child = plain.claim("bench", now, lease_s=60)
                plain.complete(child.lease, done, now)
        plain_s = time.perf_counter() - t0
        plain.close()
    finally:
        store.close()
    return {"spawn_us_per_task": spawn_s / (n + 1) * 1e6,
            "enqueue_many_us_per_task": batch_s / (n + 1) * 1e6,
            "child_cycle_us_with_join_waiting": fan_in_s / n * 1e6,
            "child_cycle_us_nobody_waiting": plain_s / n * 1e6}


# -- end to end ------------------------------------------------------------------------------

def end_to_end_once(folder: Path, n: int, rep: int, pool: int) -> dict:
    run = folder / f"e2e-{rep}"
    run.mkdir()
    (run / "bench_wf.py").write_text(HANDLERS)
    db = run / "wf.db"
    cfg = run / "taskvisor.toml"
    cfg.write_text(f'[supervisor]\ndatabase = "{db}"\npool_size = {pool}\n'
                   'preload = ["bench_wf"]\npoll_interval_s = 1\n\n[http]\nlisten = ""\n\n'
                   '[log]\nlevel = "WARNING"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(run)])}
    log = open(run / "supervisor.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)],
                            cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        from supervisor.client import Queue
        with Queue(str(cfg)) as queue:
            deadline = time.monotonic() + 60
            while not queue.supervisors():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((run / "supervisor.log").read_text()[-3000:])
                time.sleep(0.05)
            parent = queue.enqueue("bench.fanout", {"n": n})
            (done,) = queue.wait_all([parent], timeout=120)
            assert done.status == "succeeded", done.error
            (join,) = queue.wait_all([done.result["join"]], timeout=300)
            assert join.status == "succeeded" and join.result["n"] == n, join.error
            children = [t for t in queue.list(workflow_id=parent, limit=10000)
                        if t.type == "bench.child"]
            assert len(children) == n
            last_child = max(t.completed_at for t in children)
            first_child = min(t.started_at for t in children)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
    return {"parent_success_to_join_start_s": join.started_at - done.completed_at,
            "parent_success_to_first_child_start_s": first_child - done.completed_at,
            "last_child_to_join_start_s": join.started_at - last_child,
            "children_per_s": n / max(1e-9, last_child - first_child)}


def median_of(samples: list[dict]) -> dict:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--children", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pool", type=int, default=32,
                    help="pool_size of the end-to-end supervisor (default 32: agent steps run "
                         "at pools of tens to thousands; see benchmarks/README.md)")
    args = ap.parse_args()
    n = args.children
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="taskvisor-wfbench-") as tmp:
        folder = Path(tmp)
        store = median_of([store_once(folder, n, r) for r in range(max(3, args.reps))])
        e2e_samples = [end_to_end_once(folder, n, r, args.pool) for r in range(args.reps)]
        e2e = median_of(e2e_samples)
    verdict = "PASS" if e2e["parent_success_to_join_start_s"] < BAR_S else "FAIL"
    print(f"workflow benchmark: {n} spawned children + 1 join; {platform.machine()}, "
          f"{os.cpu_count()} cores, load {load[0]:.2f} -> {os.getloadavg()[0]:.2f}, "
          f"pool_size {args.pool}, medians of {args.reps}+ runs")
    print("\nstore (one process, no fork)")
    print(f"  spawn with the success       {store['spawn_us_per_task']:8.1f} us per spawned task")
    print(f"  enqueue_many, same tasks     {store['enqueue_many_us_per_task']:8.1f} us per task")
    print(f"  claim+complete, join waiting {store['child_cycle_us_with_join_waiting']:8.1f} us per child")
    print(f"  claim+complete, no join      {store['child_cycle_us_nobody_waiting']:8.1f} us per child")
    print("\nend to end (real supervisor and task processes)")
    print(f"  parent success -> first child start  {e2e['parent_success_to_first_child_start_s'] * 1000:8.1f} ms")
    print(f"  last child success -> join start     {e2e['last_child_to_join_start_s'] * 1000:8.1f} ms")
    print(f"  children run                         {e2e['children_per_s']:8.0f} /s")
    print(f"  parent success -> join start         {e2e['parent_success_to_join_start_s'] * 1000:8.1f} ms"
          f"   bar < {BAR_S:g} s: {verdict}")
    out = HERE / "results" / "workflow.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"children": n, "pool": args.pool, "store": store, "end_to_end": e2e,
                               "samples": e2e_samples, "bar_s": BAR_S, "result": verdict},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
