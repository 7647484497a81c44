"""What one `llm.chat` call costs a task process: private memory and CPU, by path.

Like a task process: a parent imports workers.handlers.llm (as the fork server's preload
does: with the relay's socket named in its environment, or not), calls gc.freeze(), and
forks a child per call (one such parent per path); the child reads Private_Dirty from
/proc/self/smaps_rollup, makes one call to benchmarks/inflight_llm_server.py (10 chunks),
reads it again, and reports the difference with its own CPU time. Paths: `direct` (httpx in
the task process: [llm] relay = false), `relay` (through a relay process, the default; the
relay's own cost is printed apart, per call; the parent runs the @warm_up functions as the
fork server does), `relay, cold` (the same without the warm-up), `http.client` (the
standard library, for scale). Usage: python benchmarks/llm_call_memory.py [--calls N]. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RELAY_ENV = "TASKVISOR_LLM_RELAY_SOCKET"


def private_dirty_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    return 0


def stdlib_call(base_url: str, payload: dict) -> None:
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = json.dumps({"messages": payload["messages"], "stream": True})
    conn.request("POST", parts.path + "/chat/completions", body,
                 {"Content-Type": "application/json", "Accept": "text/event-stream"})
    resp = conn.getresponse()
    for line in resp:
        pass
    conn.close()


def one(path: str, base_url: str) -> tuple[float, float]:
    """Fork, call once in the child; returns (MiB of Private_Dirty added, CPU ms)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        payload = {"base_url": base_url, "messages": [{"role": "user", "content": "hi"}],
                   "request_timeout_s": 30, "stall_timeout_s": 30}
        before = private_dirty_kib()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        if path == "http.client":
            stdlib_call(base_url, payload)
        else:
            sys.modules["workers.handlers.llm"].chat_sync(payload)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        after = private_dirty_kib()
        cpu_ms = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) * 1000
        os.write(w, json.dumps([(after - before) / 1024, cpu_ms]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    mib, cpu = json.loads(data)
    return mib, cpu


def proc_cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def parent(path: str, base_url: str, relay_path: str, relay_pid: int, calls: int) -> None:
    """One preload, then `calls` forked calls; prints one JSON row."""
    if path.startswith("relay"):
        os.environ[RELAY_ENV] = relay_path  # as the supervisor names it to the fork server
    else:
        os.environ.pop(RELAY_ENV, None)
    import workers.handlers.llm  # noqa: F401 - the preload
    if path != "relay, cold":  # the fork server runs the @warm_up functions after its preload
        from workers import registry
        registry.run_warm_ups()
    gc.collect()
    gc.freeze()
    one(path, base_url)  # warm the server (and the relay's connection)
    relay_cpu0 = proc_cpu_ms(relay_pid)
    results = [one(path, base_url) for _ in range(calls)]
    relay_cpu = (proc_cpu_ms(relay_pid) - relay_cpu0) / calls
    print(json.dumps([path, statistics.median(m for m, _ in results),
                      statistics.median(c for _, c in results),
                      relay_cpu if path.startswith("relay") else None]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=9, help="forked calls per path (default 9)")
    ap.add_argument("--parent", nargs=4, help=argparse.SUPPRESS)  # path url relay-path relay-pid
    args = ap.parse_args()
    if args.parent:
        path, url, relay_path, relay_pid = args.parent
        parent(path, url, relay_path, int(relay_pid), args.calls)
        return
    server = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "inflight_llm_server.py"),
                               "0.2"], stdout=subprocess.PIPE, text=True)
    from supervisor.relay import Relay
    relay = Relay()
    relay.start(wait=True)
    try:
        base_url = server.stdout.readline().strip()
        rows = []
        for path in ("direct", "relay", "relay, cold", "http.client"):
            out = subprocess.run([sys.executable, __file__, "--calls", str(args.calls), "--parent",
                                  path, base_url, relay.path, str(relay.pid)],
                                 capture_output=True, text=True, check=True, timeout=300)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"one llm.chat call in a forked task process, median of {args.calls} "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):")
        print(f"{'path':<12} {'Private_Dirty +MiB':>19} {'task CPU ms':>12} {'relay CPU ms/call':>18}")
        for path, mib, cpu, rcpu in rows:
            print(f"{path:<12} {mib:>19.2f} {cpu:>12.1f} {'' if rcpu is None else f'{rcpu:.1f}':>18}")
    finally:
        relay.stop()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
