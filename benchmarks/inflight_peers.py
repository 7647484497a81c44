"""The peers of inflight_bench.py: Celery (threads, prefork), arq and Dramatiq with gevent,
each on the benchmark's private redis-server, doing the same work at the same concurrency.

Owns, per peer, how its queue is filled (before its worker starts), the command that
starts its worker with N jobs in flight, and one run: the window and the number in flight
come from the counters the jobs keep in Redis (inflight_work.py), CPU and memory from
/proc over every process of the worker's session (pool processes included). arq needs
redis-py < 6 and Celery >= 6.4, so arq lives in its own environment, benchmarks/.env-arq
(setup-peers.sh makes it). It never touches taskvisor's processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import inflight_proc as procfs
from inflight_run import Hang, System, follow

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ARQ_PYTHON = HERE / ".env-arq" / "bin" / "python"
PEERS = ("celery-threads", "celery-prefork", "arq", "dramatiq-gevent")
PREFORK_SHARE = 0.5   # Celery prefork runs only when its estimated PSS fits in this share of MemAvailable
PREFORK_GUESS_KIB = 20 * 1024  # per pool process, before one has been measured


def available(peer: str) -> str | None:
    """None when the peer can run here, else why not."""
    try:
        if peer.startswith("celery"):
            import celery  # noqa: F401
        elif peer == "dramatiq-gevent":
            import dramatiq  # noqa: F401
            import gevent  # noqa: F401
        elif peer == "arq" and not ARQ_PYTHON.exists():
            return f"{ARQ_PYTHON} missing: run benchmarks/setup-peers.sh"
    except ImportError as exc:
        return f"not installed ({exc}): run benchmarks/setup-peers.sh"
    return None


def prefork_fits(concurrency: int, pss_per_process_kib: float | None) -> str | None:
    """None when Celery prefork at `concurrency` pool processes fits this machine, else why not."""
    per = pss_per_process_kib or PREFORK_GUESS_KIB
    avail = _meminfo_kib("MemAvailable")
    need = per * concurrency
    if need > PREFORK_SHARE * avail:
        return (f"not run: {concurrency} pool processes x {per / 1024:.1f} MiB PSS "
                f"= {need / 2**20:.1f} GiB > {PREFORK_SHARE:.0%} of MemAvailable "
                f"({avail / 2**20:.1f} GiB)")
    return None


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _argv(peer: str, concurrency: int, run: str) -> list[str]:
    if peer.startswith("celery"):
        return [sys.executable, "-m", "celery", "-A", "inflight_celery", "worker",
                "-P", peer.split("-")[1], "-c", str(concurrency), "-n", f"{run}@%h",
                "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if peer == "arq":
        return [str(ARQ_PYTHON), "-m", "arq", "inflight_arq.WorkerSettings"]
    if peer == "dramatiq-gevent":
        return [str(BIN / "dramatiq-gevent"), "inflight_dramatiq", "-p", "1", "-t", str(concurrency),
                "--path", str(HERE)]
    raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


def _fill(peer: str, redis_url: str, run: str, n: int, kind: str, seconds: float,
          base_url: str | None) -> None:
    """Put all N jobs on the peer's queue before its worker starts."""
    args = (run, n, kind, seconds, base_url)
    if peer.startswith("celery"):
        import inflight_celery
        with inflight_celery.app.producer_or_acquire() as producer:
            for _ in range(n):
                inflight_celery.work.apply_async(args, producer=producer)
    elif peer == "dramatiq-gevent":
        import inflight_dramatiq
        for _ in range(n):
            inflight_dramatiq.work.send(*args)
    elif peer == "arq":
        subprocess.run([str(ARQ_PYTHON), str(HERE / "inflight_arq.py"), run, str(n), kind,
                        repr(seconds), base_url or ""], env=_env(redis_url, n), cwd=HERE,
                       check=True, timeout=300)


def _env(redis_url: str, concurrency: int) -> dict:
    env = dict(os.environ)
    env["BENCH_REDIS_URL"] = redis_url
    env["BENCH_CONCURRENCY"] = str(concurrency)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    return env


def run(sessions: procfs.Sessions, redis, workdir: Path, peer: str, kind: str, seconds: float,
        concurrency: int, n: int, base_url: str | None, hang_s: float, boot_s: float) -> dict:
    """One peer run: N jobs, queue filled first, `concurrency` in flight."""
    out: dict = {"system": peer, "kind": kind, "concurrency": concurrency, "tasks": n}
    r = redis.client
    r.flushall()
    run_id = f"{peer}-{uuid.uuid4().hex[:8]}"
    log = workdir / f"{run_id}.log"
    proc = None
    try:
        _fill(peer, redis.url, run_id, n, kind, seconds, base_url)
        with open(log, "wb") as f:
            proc = sessions.add(subprocess.Popen(
                _argv(peer, concurrency, run_id), cwd=HERE, env=_env(redis.url, concurrency),
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        sid = proc.pid

        def counts() -> tuple[int, int]:
            started, done = r.mget(f"{run_id}:started", f"{run_id}:done")
            return int(started or 0), int(done or 0)

        system = System(done=lambda: counts()[1], in_flight=lambda: (lambda s, d: s - d)(*counts()),
                        alive=lambda: proc.poll() is None,
                        task_pids=lambda: procfs.session_members(sid),
                        cpu=lambda: {"consumer": procfs.session_cpu(sid)},
                        log_tail=lambda: log.read_text(errors="replace")[-2000:])
        got = follow(system, n, concurrency, hang_s=hang_s, boot_s=boot_s)
        first, last, errors = r.mget(f"{run_id}:first", f"{run_id}:last", f"{run_id}:errors")
        c = got["cpu"]["consumer"]
        out.update(status="ok", window_s=float(last) - float(first), memory=got["memory"],
                   succeeded=n - int(errors or 0), max_in_flight_seen=got["max_in_flight_seen"],
                   cpu_ms_per_task={"total": (c.own_s + c.reaped_s) * 1000 / n})
        if errors:
            out.update(status="FAIL", error=f"{int(errors)} of {n} jobs raised (see {log})")
    except Hang as exc:
        out.update(status="HANG", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one row fails, the benchmark goes on
        out.update(status="ERROR", error=f"{type(exc).__name__}: {exc}")
    finally:
        if proc is not None:
            sessions.stop(proc, signal.SIGTERM if out.get("status") == "ok" else signal.SIGKILL,
                          timeout=20)
    return out
