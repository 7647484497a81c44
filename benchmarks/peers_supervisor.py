"""Peers for supervisor_bench.py: a private redis-server, RQ's forking worker, Celery prefork,
and the bare fork+reap floor of this machine.

Each runner starts its own processes (in their own session, so a failure can end the whole
group by its id), measures, and stops them. Job code lives in rq_jobs.py and
celery_app.py; both record times in Redis, so every figure here comes from timestamps
taken inside the jobs themselves:

  throughput: all N jobs are enqueued before any consumer runs; then the consumers start;
              rate = N / (last job's completion - first job's start).
  latency:    one job at a time on idle, warmed-up consumers; latency = the time the job
              function was entered minus the time just before the enqueue call.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


# -- processes -----------------------------------------------------------------------------

def start(argv: list[str], log_path: Path, env: dict | None = None, cwd: Path = HERE) -> subprocess.Popen:
    """Start a process in its own session, output to `log_path`."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal the process, wait, then SIGKILL its whole process group (its own id)."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of that session only
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.002, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


# -- the floor -----------------------------------------------------------------------------

FORK_LOOP = """
import os, sys, time
n = int(sys.argv[1])
t = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(n / (time.perf_counter() - t))
"""


def fork_floor(n: int) -> float:
    """fork + _exit + waitpid per second, one at a time, from a bare `python -c`."""
    out = subprocess.run([sys.executable, "-c", FORK_LOOP, str(n)], check=True,
                         capture_output=True, text=True, timeout=120)
    return float(out.stdout.strip())


# -- redis ---------------------------------------------------------------------------------

class RedisServer:
    """A private redis-server on a free loopback port, without persistence."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server "
                               "(benchmarks/setup-peers.sh does it)")
        self.proc = start([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
                           "--loglevel", "warning"], self.workdir / "redis.log")
        import redis
        self.client = redis.Redis.from_url(self.url)

        def up():
            try:
                return self.client.ping()
            except redis.ConnectionError:
                return False
        wait_until(up, 10, 0.01, "redis-server")
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.proc is not None:
            stop(self.proc)

    def version(self) -> str:
        return self.client.info("server")["redis_version"]

    def env(self) -> dict:
        env = dict(os.environ)
        env["BENCH_REDIS_URL"] = self.url
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
        return env


def _float(value) -> float | None:
    return None if value is None else float(value)


def _run_window(r, run: str, n: int, timeout: float, procs: list[subprocess.Popen]) -> dict:
    """Wait for n completions of a run; return its figures from the jobs' timestamps."""
    def done():
        if all(p.poll() is not None for p in procs) and int(r.get(f"{run}:done") or 0) < n:
            raise RuntimeError(f"the consumers exited after {r.get(f'{run}:done')} of {n} jobs")
        return r.get(f"{run}:last")
    wait_until(done, timeout, 0.02, f"{n} jobs of {run}")
    first, last = _float(r.get(f"{run}:first")), _float(r.get(f"{run}:last"))
    return {"tasks": n, "window_s": last - first, "tasks_per_s": n / (last - first)}


# -- RQ ------------------------------------------------------------------------------------

def _rq_worker_argv(redis_url: str, queue: str, burst: bool) -> list[str]:
    exe = BIN / "rq"
    head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from rq.cli import main; main()"]
    return head + ["worker", "-u", redis_url, "-q", "--path", str(HERE), *(["--burst"] if burst else []),
                   "--worker-class", "rq.Worker", queue]


def rq_throughput(server: RedisServer, workers: int, n: int, workdir: Path, timeout: float = 600) -> dict:
    """RQ's default forking Worker (a work-horse forked per job), `workers` processes."""
    import rq
    import rq_jobs
    run = f"rq-{uuid.uuid4().hex[:8]}"
    q = rq.Queue(run, connection=server.client)
    for i in range(0, n, 500):
        q.enqueue_many([rq.Queue.prepare_data(rq_jobs.noop, args=(run, n))
                        for _ in range(min(500, n - i))])
    procs = [start(_rq_worker_argv(server.url, run, burst=True), workdir / f"{run}-{k}.log",
                   env=server.env()) for k in range(workers)]
    try:
        out = _run_window(server.client, run, n, timeout, procs)
    finally:
        for p in procs:
            stop(p)
    return out


def rq_latency(server: RedisServer, n: int, workdir: Path, gap_s: float) -> list[float]:
    """One idle RQ forking worker; per job: job entered minus just before enqueue (ms)."""
    import rq
    import rq_jobs
    run = f"rql-{uuid.uuid4().hex[:8]}"
    q = rq.Queue(run, connection=server.client)
    proc = start(_rq_worker_argv(server.url, run, burst=False), workdir / f"{run}.log", env=server.env())
    r = server.client
    out = []
    try:
        for i in range(-2, n):  # two warm-up jobs, not counted
            time.sleep(gap_s if i > -2 else 0)
            t0 = time.time()
            q.enqueue(rq_jobs.stamp, run, i)
            stamp = wait_until(lambda: r.get(f"{run}:stamp:{i}"), 60, 0.002, "an RQ job")
            if i >= 0:
                out.append((float(stamp) - t0) * 1000)
    finally:
        stop(proc)
    return out


# -- Celery --------------------------------------------------------------------------------

def _celery_argv(queue: str, concurrency: int, max_tasks_per_child: int | None) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "-P", "prefork",
            "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "-l", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    return argv


def _celery_tasks(server: RedisServer):
    os.environ["BENCH_REDIS_URL"] = server.url  # celery_app reads it at import
    sys.path.insert(0, str(HERE))
    import celery_app
    if celery_app.URL != server.url:  # imported earlier for another server
        celery_app.URL = server.url
        celery_app.app.conf.broker_url = server.url
        celery_app._client = None
    return celery_app


def celery_throughput(server: RedisServer, concurrency: int, n: int, workdir: Path,
                      max_tasks_per_child: int | None = None, timeout: float = 900) -> dict:
    """Celery prefork worker with `concurrency` processes; `max_tasks_per_child=1` forks a
    fresh pool process for every task."""
    app = _celery_tasks(server)
    run = f"cel-{uuid.uuid4().hex[:8]}"
    with app.app.producer_or_acquire() as producer:
        for _ in range(n):
            app.noop.apply_async((run, n), queue=run, producer=producer)
    proc = start(_celery_argv(run, concurrency, max_tasks_per_child), workdir / f"{run}.log",
                 env=server.env())
    try:
        out = _run_window(server.client, run, n, timeout, [proc])
    finally:
        stop(proc, signal.SIGTERM, timeout=30)
    return out


def celery_latency(server: RedisServer, n: int, workdir: Path, gap_s: float,
                   concurrency: int = 2) -> list[float]:
    app = _celery_tasks(server)
    run = f"cell-{uuid.uuid4().hex[:8]}"
    proc = start(_celery_argv(run, concurrency, None), workdir / f"{run}.log", env=server.env())
    r = server.client
    out = []
    try:
        with app.app.producer_or_acquire() as producer:
            for i in range(-3, n):  # warm-ups: the first waits for the worker to boot
                time.sleep(gap_s if i > -3 else 0)
                t0 = time.time()
                app.stamp.apply_async((run, i), queue=run, producer=producer)
                stamp = wait_until(lambda: r.get(f"{run}:stamp:{i}"), 60, 0.002, "a Celery task")
                if i >= 0:
                    out.append((float(stamp) - t0) * 1000)
    finally:
        stop(proc, signal.SIGTERM, timeout=30)
    return out


def versions() -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("rq", "redis", "celery", "kombu", "billiard"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
