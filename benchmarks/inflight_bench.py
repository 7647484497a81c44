#!/usr/bin/env python3
"""In-flight benchmark (issue 11): thousands of waiting tasks on one machine, taskvisor and peers.

Usage (from the repository root, after benchmarks/setup-peers.sh):

    benchmarks/.env/bin/python benchmarks/inflight_bench.py              # 100, 1,000, 3,000 in flight, S=3
    benchmarks/.env/bin/python benchmarks/inflight_bench.py --quick      # 100 and 1,000, S=2
    ... --only taskvisor | --only taskvisor,arq   --sizes 100,1000   --chat-sizes 100
    ... --seconds 3   --variants sleep   --probes 100   --hang-s 30   --preload-llm

Workload: N tasks that each wait S seconds, the queue filled before the consumer starts,
concurrency P = N/3 so that three waves run (N = 3P). Two variants: `sleep` (the handler
sleeps S s) and `chat` (the handler streams one chat completion from the repo's
OpenAI-compatible test server, which answers in S s; taskvisor runs its built-in
`llm.chat`). Systems, one after the other in one invocation: taskvisor (pool P), Celery
`-P threads` and `-P prefork` (prefork only where its pool processes fit in memory),
arq (asyncio, max_jobs P), Dramatiq with gevent (P greenlets), all on a private
redis-server on 127.0.0.1 and a random port.

Figures per run (see benchmarks/README.md, "In flight (issue 11)"): the window (first
start to last completion) over the ideal 3*S; CPU ms per task from /proc/PID/stat over the
window (taskvisor: the supervisor's own time, the fork server's own time, and the fork
server's reaped-children time = the task processes; peers: every process of the worker's
session); PSS and RSS per task in flight, from smaps_rollup, sampled once at the peak.
Plus taskvisor at pool 4 with the same handler (the CPU bar's baseline) and the
enqueue-to-start latency of probe tasks enqueued one at a time while 1,000 tasks run.

A run with no task finished for 30 s is killed whole and reported as HANG. Every process
the benchmark starts runs in its own session and is killed at exit, on Ctrl-C and on
SIGTERM. Prints a table and the bars of issue 11 (PASS/FAIL) and writes
benchmarks/results/inflight.json. Exit code 0 whatever the bars say. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import inflight_peers  # noqa: E402
import inflight_proc as procfs  # noqa: E402
import inflight_taskvisor  # noqa: E402
from inflight_report import bars, print_report, pss_per_task_mib  # noqa: E402

SYSTEMS = ("taskvisor", *inflight_peers.PEERS)
POOL4_WAVES = 8   # the pool-4 baseline runs 32 tasks: 3 waves of 4 are too few for 10 ms CPU ticks


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


LLM_SERVER: list = []  # the model server's pid, for its CPU per call (on the same cores)


def start_llm_server(sessions: procfs.Sessions, workdir: Path, seconds: float,
                     chunks: int | None = None, kind: str = "asyncio") -> str:
    """The chat variant's model server in its own processes (one event loop each, or the
    test server's thread per stream: `kind`); returns its base URL."""
    proc = sessions.add(subprocess.Popen(
        [sys.executable, str(HERE / "inflight_llm_server.py"), repr(seconds),
         "4" if kind == "threads" else "2", str(chunks or 10), kind], cwd=HERE,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=open(workdir / "llm-server.log", "wb"), start_new_session=True, text=True))
    line = proc.stdout.readline().strip()
    if not line.startswith("http://"):
        raise RuntimeError(f"the model server did not start: {line!r}")
    LLM_SERVER[:] = [proc.pid]
    return line


def start_redis(sessions: procfs.Sessions, workdir: Path):
    import peers_supervisor
    redis = peers_supervisor.RedisServer(workdir).__enter__()
    sessions.add(redis.proc)
    os.environ["BENCH_REDIS_URL"] = redis.url   # read by inflight_work at import
    return redis


def line(r: dict, seconds: float) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('error', '')}"[:160]
    cpu = r["cpu_ms_per_task"]
    mem = r.get("memory") or {}
    pss = pss_per_task_mib(r)
    parts = [f"{r['window_s'] / (3 * seconds):.2f}x ideal", f"CPU {cpu['total']:.2f} ms/task"]
    if "supervisor" in cpu:
        parts.append(f"(supervisor {cpu['supervisor']:.2f}, fork server {cpu['fork_server']:.2f}"
                     + (f", relay {cpu['relay']:.2f})" if "relay" in cpu else ")"))
    if pss is not None:
        parts.append(f"PSS {pss:.2f} MiB/in flight" + (
            f" (relay {mem['shared_pss_kib'] / 1024:.1f} MiB of it)" if mem.get("shared_pss_kib") else ""))
    if r.get("call_s"):
        c = r["call_s"]
        parts.append(f"claim to end p50 {c['p50']:.2f} s, p99 {c['p99']:.2f} s")
    if r.get("model_server_cpu_ms_per_call") is not None:
        parts.append(f"model server {r['model_server_cpu_ms_per_call']:.2f} ms/call (not counted)")
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 in flight, S=2")
    ap.add_argument("--sizes", help="tasks in flight per run, comma-separated (default 100,1000,3000)")
    ap.add_argument("--seconds", type=float, help="S, how long each task waits (default 3, quick 2)")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"systems, of: {', '.join(SYSTEMS)}")
    ap.add_argument("--variants", default="sleep,chat", help="sleep, chat or both")
    ap.add_argument("--chat-sizes", help="sizes of the chat variant (default: those of --sizes up to 100)")
    ap.add_argument("--probes", type=int, help="enqueue-to-start probes (default 100, quick 40)")
    ap.add_argument("--probe-in-flight", type=int, default=1000)
    ap.add_argument("--preload-llm", action="store_true",
                    help="taskvisor's sleep variant preloads workers.handlers.llm too, as an agent's config would")
    ap.add_argument("--llm-relay", choices=("on", "process", "off", "all"), default="on",
                    help="taskvisor's chat variant: on (the default config: the relay runs each "
                         "call), process (a task process per call, through the relay: "
                         "run_in_relay = false), off (each task process makes its call: "
                         "relay = false), or all three, one after the other")
    ap.add_argument("--chat-chunks", type=int,
                    help="pieces each chat answer streams over S (default 10; a model streaming "
                         "30 tokens/s for 3 s sends ~100)")
    ap.add_argument("--model-server", choices=("asyncio", "threads"), default="asyncio",
                    help="the chat variant's model server: one event loop per process "
                         "(default), or the repo's test server with a thread per stream "
                         "(the runs before 2026-12-04)")
    ap.add_argument("--hang-s", type=float, default=30.0, help="no task finished for this long = HANG")
    ap.add_argument("--out", default=str(HERE / "results" / "inflight.json"))
    args = ap.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("100,1000" if args.quick else "100,1000,3000")).split(",")]
    # The chat variant runs at 100 by default: every system's HTTP client costs 25-45 ms CPU
    # per call here, so at 1,000 in flight (3,000 calls) each system took 2-5 minutes of CPU on
    # 2 cores (16-31x the ideal) and measured the client and the machine, not the queue.
    chat_sizes = ([int(x) for x in args.chat_sizes.split(",")] if args.chat_sizes
                  else [x for x in sizes if x <= 100] or [min(sizes)])
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    probes = args.probes or (40 if args.quick else 100)
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [s for s in systems if s not in SYSTEMS] + [v for v in variants if v not in ("sleep", "chat")]
    if bad:
        ap.error(f"unknown --only/--variants value(s) {', '.join(bad)}; systems: {', '.join(SYSTEMS)}; "
                 "variants: sleep, chat")
    nofile = raise_nofile()
    chunks = args.chat_chunks or 10
    res: dict = {"machine": machine(nofile), "seconds": seconds, "sizes": sizes, "chat_sizes": chat_sizes,
                 "chat_chunks": chunks, "model_server": args.model_server,
                 "systems": systems, "variants": variants, "runs": [], "skipped": []}
    print(f"In flight: S={seconds:g}s, sizes {sizes} (chat {chat_sizes}, {chunks} pieces an answer, "
          f"{args.model_server} model server), systems {systems}, variants {variants}; "
          f"load {os.getloadavg()[0]:.1f}, open files {nofile[0]}", flush=True)
    sessions = procfs.Sessions()
    t_start = time.monotonic()
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="tv-inflight-") as tmp:
            run_all(args, Path(tmp), sessions, res, sizes, chat_sizes, seconds, probes, systems,
                    variants)
    except KeyboardInterrupt:
        sessions.kill_all()
        print("\ninterrupted: every process started has been killed; the runs so far:",
              file=sys.stderr)
        interrupted = res["interrupted"] = True
    finally:
        sessions.kill_all()
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["elapsed_s"] = time.monotonic() - t_start
    res["bars"] = bars(res)
    print_report(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({res['elapsed_s']:.0f} s)")
    return 130 if interrupted else 0


MODES = {"taskvisor": "hosted", "taskvisor via relay": "process", "taskvisor no relay": "off"}


def ours(kind: str, llm_relay: str) -> list[str]:
    """taskvisor's rows of a size: the default config ("taskvisor": the relay runs each
    call), a task process per call through the relay ("taskvisor via relay"), a task
    process that makes its own call ("taskvisor no relay"), or all three (chat variant)."""
    if kind != "chat" or llm_relay == "on":
        return ["taskvisor"]
    return {"process": ["taskvisor via relay"], "off": ["taskvisor no relay"],
            "all": ["taskvisor no relay", "taskvisor via relay", "taskvisor"]}[llm_relay]


def run_all(args, workdir: Path, sessions, res: dict, sizes, chat_sizes, seconds, probes, systems,
            variants) -> None:
    peers = [p for p in systems if p != "taskvisor"]
    for p in list(peers):
        why = inflight_peers.available(p)
        if why:
            print(f"  skip {p}: {why}", flush=True)
            res["skipped"].append({"system": p, "why": why})
            peers.remove(p)
    redis = start_redis(sessions, workdir) if peers else None
    base_url = (start_llm_server(sessions, workdir, seconds, args.chat_chunks, args.model_server)
                if "chat" in variants else None)
    prefork_pss: float | None = None
    for kind in variants:
        print(f"\nVariant {kind}", flush=True)
        if "taskvisor" in systems:
            r = inflight_taskvisor.run(sessions, workdir, f"{kind}-pool4", kind, seconds, 4,
                                       4 * POOL4_WAVES, base_url, args.hang_s,
                                       preload_llm=args.preload_llm)
            r["baseline"] = True
            res["runs"].append(r)
            print(f"  taskvisor pool 4 ({4 * POOL4_WAVES} tasks): {line(r, POOL4_WAVES * seconds / 3)}",
                  flush=True)
        for size in (chat_sizes if kind == "chat" else sizes):
            for system in [*ours(kind, args.llm_relay), *peers] if "taskvisor" in systems else peers:
                t = time.monotonic()
                if system == "celery-prefork":
                    why = inflight_peers.prefork_fits(size, prefork_pss)
                    if why:
                        print(f"  {size:>5} in flight  {system:<16} SKIP {why}", flush=True)
                        res["skipped"].append({"system": system, "kind": kind, "concurrency": size,
                                               "why": why})
                        continue
                served = procfs.session_cpu(LLM_SERVER[0]) if kind == "chat" and LLM_SERVER else None
                if system.startswith("taskvisor"):
                    mode = MODES[system]
                    r = inflight_taskvisor.run(sessions, workdir, f"{kind}-{size}-{mode}",
                                               kind, seconds, size, 3 * size, base_url,
                                               args.hang_s, preload_llm=args.preload_llm,
                                               llm_mode=mode)
                else:
                    r = inflight_peers.run(sessions, redis, workdir, system, kind, seconds, size,
                                           3 * size, base_url, args.hang_s, boot_s=180)
                if system == "celery-prefork" and r.get("memory"):
                    m = r["memory"]
                    prefork_pss = m["task_pss_kib"] / max(1, m["task_processes"])
                r["elapsed_s"] = time.monotonic() - t
                if served is not None and (after := procfs.session_cpu(LLM_SERVER[0])) is not None:
                    # not in the row's CPU: what the test server took of the same 2 cores
                    r["model_server_cpu_ms_per_call"] = (after - served).own_s * 1000 / (3 * size)
                r["loadavg_1m"] = os.getloadavg()[0]
                res["runs"].append(r)
                print(f"  {size:>5} in flight  {system:<16} {line(r, seconds)}  "
                      f"({r['elapsed_s']:.0f} s, load {r['loadavg_1m']:.1f})", flush=True)
        if kind == "sleep" and "taskvisor" in systems and args.probe_in_flight:
            print(f"  probes: {probes} tasks enqueued one at a time with {args.probe_in_flight} "
                  "in flight", flush=True)
            res["probe"] = inflight_taskvisor.probe(sessions, workdir, args.probe_in_flight, probes,
                                                    0.05, args.hang_s)
    if redis is not None:
        res["machine"]["redis_server"] = redis.version()


def machine(nofile) -> dict:
    import apsw
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    arq = None
    if inflight_peers.ARQ_PYTHON.exists():
        arq = subprocess.run([str(inflight_peers.ARQ_PYTHON), "-c", "import arq; print(arq.VERSION)"],
                             capture_output=True, text=True).stdout.strip() or None
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "git_commit": git("rev-parse", "HEAD"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "mem_gib": mem_kib / 2**20,
            "apsw": apsw.apsw_version(), "open_files": nofile, "loadavg_start": os.getloadavg(),
            "peers": {p: version(p) for p in ("celery", "kombu", "redis", "dramatiq", "gevent")}
            | {"arq": arq}}


if __name__ == "__main__":
    sys.exit(main())
