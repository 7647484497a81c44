#!/usr/bin/env python3
"""Events benchmark: delivery of the event stream and of streamed output (issue 14).

    python benchmarks/events_bench.py              # full run (~2 min)
    python benchmarks/events_bench.py --quick      # smoke run

Runs a real supervisor in a subprocess (this file with `--serve`, which adds one
measuring hook after each pass's commit: it notes the time and the newest event id, so
every event has its commit time; and it times each `Supervisor.sync`, the pass's
database step). Then:

1. Delivery: `--clients` (200) SSE clients without a filter (each gets every event),
   in `--client-procs` (1) process(es) with one epoll loop each (a client process
   only notes the time and the bytes while measuring; it parses at the end), are
   connected while `--tasks` (1,000) tasks run (each 1 s with progress every 0.25 s;
   `--pool` at once; enqueued at `--enqueue-rate` a second, so tasks arrive while others
   run). For every event each client receives: receive time minus the
   commit time of its event (the client's commit for the enqueue events, taken just after
   `Queue.enqueue` returned; the supervisor's for the others). Reports p50/p99/max (bar:
   p99 under 50 ms), and the supervisor's CPU (user+system, psutil) per event delivered
   and per task, against the same run with no client connected (the event log off), the
   fan-out process's CPU, and the machine's own wake-up latency meanwhile (one process
   pinging another every 10 ms through a pipe): on a shared machine the event path pays
   that at each of its two wake-ups (fan-out process, client process).
2. Streamed output: `--streamers` (8) tasks each call ctx.stream() with `--tokens` tokens
   as fast as they can while one SSE client reads the output events. Tokens/s = tokens
   received / (last output event - first) (bar: 50,000 over all tasks). The loop's pass
   that records outcomes (Supervisor.sync, per outcome recorded), median, while they
   stream against the same no-op work alone (bar: at most 20% slower); the passes that
   only store output are reported on their own.

Writes benchmarks/results/events.json. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO)]

HANDLERS = '''
import time
from workers import task

@task("work")
def work(payload, ctx):
    steps = int(payload.get("steps", 4))
    for i in range(steps):
        ctx.progress(i / steps)
        time.sleep(float(payload.get("step_s", 0.25)))
    return None

@task("noop")
def noop(payload, ctx):
    return None

@task("streamer")
def streamer(payload, ctx):
    token = payload.get("token", "tok ")
    rate = payload.get("rate")          # tokens/s, or as fast as it can
    start = time.monotonic()
    for i in range(int(payload["tokens"])):
        ctx.stream(token)
        if rate and i % 50 == 49:
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return None
'''


# -- the supervisor side (--serve) -------------------------------------------------------

def serve(config_path: str, out_path: str) -> int:
    """Run a supervisor with the measuring hooks; write what they noted at exit."""
    from supervisor import start
    from supervisor.config import load
    from supervisor.loop import Supervisor
    commits: list[tuple[float, int]] = []
    syncs: list[float] = []
    original_init, original_sync = Supervisor.__init__, Supervisor.sync

    def init(self, *a, **kw):
        original_init(self, *a, **kw)

        def noted():
            row = self.store.conn.db.execute("SELECT max(id) FROM task_events").fetchall()[0][0]
            commits.append((time.time(), row or 0))
        self.on_commit.append(noted)

    def sync(self, now, mono):
        # CPU of the loop's thread, not wall time: the task processes that stream take
        # the machine's cores too, and that is not the loop's pass getting slower.
        t0 = time.thread_time()
        outcomes = len(self.children.pending)
        output = self.children.output.due(mono)
        original_sync(self, now, mono)
        if outcomes or output:
            syncs.append((time.time(), time.thread_time() - t0, outcomes, output))

    Supervisor.__init__, Supervisor.sync = init, sync
    _trace_fanout(str(Path(out_path).with_name("fanout.json")))
    if os.environ.get("EVBENCH_SWITCH"):
        sys.setswitchinterval(float(os.environ["EVBENCH_SWITCH"]))
    try:
        return start.run(load(config_path))
    finally:
        Path(out_path).write_text(json.dumps({"commits": commits, "syncs": syncs}))


def _trace_fanout(trace_path: str) -> None:
    """Start the fan-out process as this file with `--fanout`, which notes its stages."""
    from supervisor import broadcast
    real_popen = broadcast.subprocess.Popen

    def popen(argv, **kw):
        if argv[1:3] == ["-m", "supervisor.broadcast"]:
            argv = [argv[0], str(Path(__file__).resolve()), "--fanout", trace_path, *argv[3:]]
        return real_popen(argv, **kw)
    broadcast.subprocess.Popen = popen


def fanout(trace_path: str, argv: list[str]) -> int:
    """The fan-out process with stamps: for every batch of new events it reads, when its
    select returned (and whether a poke woke it), when the rows were read, and when they
    were written to every client's socket (or its buffer, for a client that lags)."""
    import atexit
    from supervisor import broadcast
    batches: list[tuple] = []
    woke = {"at": 0.0, "poked": False}
    read_done = {"at": 0.0}
    real_init, real_read_new = broadcast.FanOut.__init__, broadcast.FanOut.read_new

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        real_select, real_read = self.sel.select, self.store.read_events

        def read(*a, **kw):
            rows = real_read(*a, **kw)
            read_done["at"] = time.time()
            return rows
        self.store.read_events = read

        def select(timeout=None):
            got = real_select(timeout)
            woke["at"] = time.time()
            woke["poked"] = any(key.data is None for key, _ in got)
            return got
        self.sel.select = select

    def read_new(self):
        first = self.last_id
        t0, cpu0 = time.time(), time.thread_time()
        real_read_new(self)
        if self.last_id != first:
            batches.append((woke["at"], woke["poked"], t0, read_done["at"], time.time(),
                            first + 1, self.last_id, time.thread_time() - cpu0))
    broadcast.FanOut.__init__, broadcast.FanOut.read_new = init, read_new
    atexit.register(lambda: Path(trace_path).write_text(json.dumps(batches)))
    return broadcast.main(argv)


# -- the client side -----------------------------------------------------------------------

_ID = __import__("re").compile(rb"(?:^|\n)id: (\d+)\nevent: (\w+)\ndata: (.*)")


# Linux: the kernel stamps each read with the time its data reached the socket.
SO_TIMESTAMPNS = 35


def sse_clients(port: int, n: int, query: str, ready, stop, out) -> None:
    """n SSE connections read by one epoll loop; sends [(event id, receive time, kind,
    text length, time the data reached the socket)] per client through `out` at the end."""
    import struct
    sel = selectors.DefaultSelector()
    socks, states = [], []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.sendall(f"GET /api/events{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Accept: text/event-stream\r\n\r\n".encode())
        s.setblocking(False)
        st = {"buf": b"", "got": [], "headers": False}
        sel.register(s, selectors.EVENT_READ, st)
        socks.append(s)
        states.append(st)
    opened = 0
    while opened < n:  # every response's headers arrived: the stream is open
        for key, _ in sel.select(1.0):
            st = key.data
            st["buf"] += key.fileobj.recv(65536)
            if not st["headers"] and b"\r\n\r\n" in st["buf"]:
                st["headers"] = True
                st["buf"] = st["buf"].split(b"\r\n\r\n", 1)[1]
                opened += 1
    ready.set()
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            now = time.time()
            st = key.data
            data, anc, _flags, _addr = key.fileobj.recvmsg(1 << 20, 64)
            if not data:
                sel.unregister(key.fileobj)
                continue
            arrived = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    arrived = sec + nsec / 1e9
            # Only the times and the bytes here (parsing later): the receive time must not
            # wait for this process to parse what other clients got.
            st["got"].append((now, data, arrived))
    res = []
    for st in states:
        buf = st["buf"]
        got = []
        for now, data, arrived in st["got"]:
            buf += data
            *frames, buf = buf.split(b"\n\n")
            for fr in frames:
                m = _ID.search(fr)
                if m:
                    kind = m.group(2).decode()
                    size = len(json.loads(m.group(3))["text"]) if kind == "output" else 0
                    got.append((int(m.group(1)), now, kind, size, arrived or now))
        res.append(got)
    out.send(res)
    for s in socks:
        s.close()


def _floor_reader(conn, out) -> None:
    got = []
    while True:
        msg = conn.recv()
        if msg is None:
            break
        got.append((time.time() - msg) * 1000)
    out.send(got)


def _floor_writer(conn, stop, interval_s: float) -> None:
    while not stop.is_set():
        conn.send(time.time())
        time.sleep(interval_s)
    conn.send(None)


def start_floor(ctx, interval_s: float = 0.01):
    """The machine's own wake-up latency while the run goes on: one process sends the
    time to another every 10 ms; the other notes how late it got it. The same load slows
    the event path (commit -> fan-out process -> client process) at each wake-up."""
    a, b = ctx.Pipe(duplex=False)
    res_recv, res_send = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    reader = ctx.Process(target=_floor_reader, args=(a, res_send))
    writer = ctx.Process(target=_floor_writer, args=(b, stop, interval_s))
    reader.start()
    writer.start()
    return stop, reader, writer, res_recv


def stop_floor(floor) -> dict:
    stop, reader, writer, res = floor
    stop.set()
    writer.join(10)
    got = res.recv()
    reader.join(10)
    return {"p50": round(pct(got, 50), 2), "p99": round(pct(got, 99), 2),
            "max": round(max(got), 2), "samples": len(got)} if got else {}


def start_clients(ctx, port: int, n: int, query: str, procs: int):
    """n clients spread over `procs` processes; returns (ready events, stop, readers)."""
    stop = ctx.Event()
    readers = []
    for i in range(procs):
        k = n // procs + (1 if i < n % procs else 0)
        if not k:
            continue
        ready = ctx.Event()
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=sse_clients, args=(port, k, query, ready, stop, send))
        p.start()
        readers.append((p, ready, recv))
    for _, ready, _ in readers:
        ready.wait(60)
    return stop, readers


def collect(stop, readers) -> list:
    stop.set()
    got = []
    for p, _, recv in readers:
        got.extend(recv.recv())
        p.join(30)
    return got


class Supervisor:
    def __init__(self, root: Path, pool: int):
        self.root = root
        (root / "evbench_handlers.py").write_text(HANDLERS)
        self.config = root / "taskvisor.toml"
        self.config.write_text(textwrap.dedent(f"""
            [supervisor]
            database = "taskvisor.db"
            pool_size = {pool}
            preload = ["evbench_handlers"]
            poll_interval_s = 1
            [defaults]
            max_attempts = 1
            [http]
            listen = "127.0.0.1:0"
        """))
        self.notes = root / "notes.json"
        self.log = root / "supervisor.log"

    def __enter__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(self.root)])}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.config),
                 str(self.notes)], cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 60
        while b"http: listening on" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text()[-3000:])
            time.sleep(0.05)
        text = self.log.read_text()
        self.port = int(text.split("http: listening on http://127.0.0.1:")[1].split("/")[0])
        import psutil
        self.ps = psutil.Process(self.proc.pid)
        from supervisor.client import Queue
        self.queue = Queue(str(self.config))
        return self

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def helper_cpu_s(self) -> float:
        """CPU of the event fan-out process (a child named taskvisor-events)."""
        total = 0.0
        for child in self.ps.children():
            try:
                if child.name().startswith("taskvisor-even"):  # comm holds 15 characters
                    t = child.cpu_times()
                    total += t.user + t.system
            except Exception:
                pass
        return total

    def count(self, status: str) -> int:
        # A GROUP BY, not a list of every task: this process shares its CPU share with
        # the SSE clients' process it started (a list of 1,000 tasks every 0.2 s took
        # ~10% of a core from them).
        return self.queue.stats().totals()[status]

    def __exit__(self, *exc):
        self.queue.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        notes = json.loads(self.notes.read_text()) if self.notes.exists() else {}
        self.commits = notes.get("commits", [])
        self.syncs = notes.get("syncs", [])
        trace = self.notes.with_name("fanout.json")
        self.batches = json.loads(trace.read_text()) if trace.exists() else []


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def wait_done(sup: Supervisor, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sup.count("succeeded") < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sup.count('succeeded')} of {total} tasks finished")
        time.sleep(0.2)


def stages(batches: list, got: list, commit_of) -> dict:
    """Where the time goes, per delivery: commit -> the fan-out's select returned for the
    batch (`wait`: for a CPU, for the previous batch, for the batch gap) -> its rows read
    (`read`) -> written to every client (`write`) -> in the client's socket (`socket`, the
    kernel's receive stamp) -> read by the client process (`client`: it waits for a CPU).
    p50/p99 of each, and their means over the deliveries at or over the p99."""
    batch_of = {}
    for woke, poked, t0, read, written, first, last, _cpu in batches:
        for ev_id in range(first, last + 1):
            batch_of[ev_id] = (woke, poked, read, written)
    rows, poked_n = [], 0
    for per_client in got:
        for ev_id, at, _kind, _size, arrived in per_client:
            b, c = batch_of.get(ev_id), commit_of(ev_id)
            if b is None or c is None:
                continue
            woke, poked, read, written = b
            poked_n += poked
            rows.append(((at - c) * 1000, (woke - c) * 1000, (read - woke) * 1000,
                         (written - read) * 1000, (arrived - written) * 1000,
                         (at - arrived) * 1000))
    if not rows:
        return {}
    names = ("total", "wait", "read", "write", "socket", "client")
    cut = pct([r[0] for r in rows], 99)
    slow = [r for r in rows if r[0] >= cut]
    res = {n: {"p50": round(pct([r[i] for r in rows], 50), 2),
               "p99": round(pct([r[i] for r in rows], 99), 2),
               "mean_of_slowest_1pct": round(statistics.mean(r[i] for r in slow), 2)}
           for i, n in enumerate(names)}
    res["batches"] = len(batches)
    wall = [b[4] - b[2] for b in batches]
    res["batch_ms"] = {"wall_p50": round(pct(wall, 50) * 1000, 2),
                       "wall_p99": round(pct(wall, 99) * 1000, 2),
                       "cpu_p50": round(pct([b[7] for b in batches], 50) * 1000, 2),
                       "cpu_p99": round(pct([b[7] for b in batches], 99) * 1000, 2)}
    res["events_per_batch"] = round(sum(b[6] - b[5] + 1 for b in batches) / max(len(batches), 1), 1)
    res["woken_by_poke"] = round(poked_n / len(rows), 3)
    return res


def delivery(args, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        return _delivery(args, clients, Path(d))


def _delivery(args, clients: int, root: Path) -> dict:
    with Supervisor(root, args.pool) as sup:
        ctx = multiprocessing.get_context("spawn")
        if clients:
            stop, readers = start_clients(ctx, sup.port, clients, "", args.client_procs)
        floor = start_floor(ctx)
        cpu0, fan0 = sup.cpu_s(), sup.helper_cpu_s()
        enqueued: dict[str, float] = {}
        start = time.monotonic()
        for i in range(args.tasks):  # paced: tasks arrive while others run
            ahead = start + i / args.enqueue_rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            task_id = sup.queue.enqueue("work", {"steps": 4, "step_s": 0.25})
            enqueued[task_id] = time.time()
        wait_done(sup, args.tasks, timeout=args.tasks * 2 + 60)
        cpu = sup.cpu_s() - cpu0
        sup.fanout_cpu = sup.helper_cpu_s() - fan0
        sup.floor = stop_floor(floor)
        got = []
        if clients:
            time.sleep(0.5)
            got = collect(stop, readers)
    out = {"clients": clients, "tasks": args.tasks, "pool": args.pool,
           "supervisor_cpu_s": round(cpu, 3),
           "supervisor_cpu_ms_per_task": round(cpu / args.tasks * 1000, 3),
           "wakeup_floor_ms": sup.floor, "load_average": os.getloadavg()}
    if not clients:
        return out
    commits = sup.commits
    import bisect
    keys = [c[1] for c in commits]

    def committed_at(ev_id: int) -> float | None:
        i = bisect.bisect_left(keys, ev_id)
        return commits[i][0] if i < len(commits) else None

    # Enqueue events were committed by the client: their commit time is the enqueue's.
    with_store = __import__("supervisor.store", fromlist=["Store"]).Store(
        sup.root / "taskvisor.db", migrate=False)
    rows = with_store.conn.db.execute(
        "SELECT id, task_id, json_extract(data, '$.status') FROM task_events").fetchall()
    with_store.close()
    client_commit = {i: enqueued[t] for i, t, s in rows if s == "queued" and t in enqueued}
    lat, lat_client, lat_sup, lat_socket = [], [], [], []
    for per_client in got:
        for ev_id, at, _kind, _size, arrived in per_client:
            t = client_commit.get(ev_id)
            (lat_client if t is not None else lat_sup).append(ev_id)
            t = t or committed_at(ev_id)
            if t is not None:
                ms = (at - t) * 1000
                lat.append(ms)
                lat_socket.append((arrived - t) * 1000)
                (lat_client if ev_id in client_commit else lat_sup)[-1] = ms
    out["stages_ms"] = stages(sup.batches, got, lambda i: client_commit.get(i) or committed_at(i))
    split = lambda xs: {"p50": round(pct(xs, 50), 2), "p99": round(pct(xs, 99), 2)} if xs else None
    delivered = sum(len(g) for g in got)
    out.update({"events": len(rows), "delivered": delivered,
                "expected": len(rows) * clients,
                "latency_ms": {"p50": round(pct(lat, 50), 2), "p99": round(pct(lat, 99), 2),
                               "max": round(max(lat), 2)} if lat else None,
                "latency_ms_to_the_socket": split(lat_socket),
                "latency_ms_client_commits": split(lat_client),
                "latency_ms_supervisor_commits": split(lat_sup),
                "fanout_cpu_s": round(sup.fanout_cpu, 3),
                "supervisor_cpu_us_per_event_delivered": round(cpu / max(delivered, 1) * 1e6, 2),
                "supervisor_cpu_us_per_event": round(cpu / max(len(rows), 1) * 1e6, 1)})
    return out


def streaming(args) -> dict:
    with tempfile.TemporaryDirectory() as d, Supervisor(Path(d), max(args.streamers, 4)) as sup:
        # The pass alone: no-op tasks.
        for _ in range(args.noops):
            sup.queue.enqueue("noop", {})
        wait_done(sup, args.noops, timeout=120)
        ctx = multiprocessing.get_context("spawn")
        stop, readers = start_clients(ctx, sup.port, 1, "?type=streamer", 1)
        started = time.time()
        for _ in range(args.streamers):
            sup.queue.enqueue("streamer", {"tokens": args.tokens, "token": "tok ",
                                           "rate": args.rate / args.streamers if args.rate else None})
        for _ in range(args.noops):  # the same no-op work, while they stream
            sup.queue.enqueue("noop", {})
        wait_done(sup, args.noops * 2 + args.streamers, timeout=300)
        ended = time.time()
        time.sleep(0.5)
        got = collect(stop, readers)[0]
    outputs = [(at, size) for _id, at, kind, size, _arrived in got if kind == "output"]
    tokens = sum(s for _, s in outputs) / len("tok ")
    span = outputs[-1][0] - outputs[0][0] if len(outputs) > 1 else 0.0
    # The pass that matters for the task flow is the one that records outcomes (and
    # claims for the freed slots): its duration alone against while tasks stream.
    alone = [d / n for t, d, n, _ in sup.syncs if t < started and n]
    during = [d / n for t, d, n, _ in sup.syncs if started <= t <= ended and n]
    flushes = [d for t, d, n, out in sup.syncs if started <= t <= ended and out and not n]
    med = lambda xs: round(statistics.median(xs) * 1000, 3) if xs else None
    return {"streamers": args.streamers, "tokens_each": args.tokens, "offered_rate": args.rate,
            "tokens_received": int(tokens), "tokens_expected": args.streamers * args.tokens,
            "output_events": len(outputs), "seconds": round(span, 3),
            "tokens_per_s": round(tokens / span) if span > 0 else None,
            "pass_ms_per_outcome_p50_alone": med(alone),
            "pass_ms_per_outcome_p50_streaming": med(during),
            "output_only_pass_ms_p50": med(flushes), "output_only_passes": len(flushes),
            "passes_alone": len(alone), "passes_streaming": len(during),
            "pass_slowdown": round(statistics.median(during) / statistics.median(alone), 3)
            if alone and during else None}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def delivery_bars(d: dict, alone: dict) -> str:
    lat = d.get("latency_ms") or {}
    p99 = lat.get("p99")
    return "\n".join([
        f"bar: every event to every client: {d['delivered']:,} of {d['expected']:,} "
        f"{verdict(d['delivered'] == d['expected'] > 0)}",
        f"bar: delivery p99 commit -> client {p99} ms (p50 {lat.get('p50')}), under 50 ms "
        f"{verdict(p99 is not None and p99 < 50)}",
        f"supervisor CPU per event: {d['supervisor_cpu_us_per_event']} us "
        f"({d['supervisor_cpu_ms_per_task']} ms per task; with no client connected "
        f"{alone['supervisor_cpu_ms_per_task']} ms); fan-out process {d['fanout_cpu_s']} s"])


def streaming_bars(s: dict) -> str:
    rate, slow = s.get("tokens_per_s"), s.get("pass_slowdown")
    return "\n".join([
        f"bar: ctx.stream tokens/s into a client {rate}, at least 50,000 "
        f"{verdict(rate is not None and rate >= 50000)}",
        f"bar: loop pass per outcome while streaming {slow}x, at most 1.2x "
        f"{verdict(slow is not None and slow <= 1.2)}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", nargs=2, metavar=("CONFIG", "NOTES"), help=argparse.SUPPRESS)
    p.add_argument("--fanout", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--pool", type=int, default=100)
    p.add_argument("--enqueue-rate", type=float, default=200.0, help="tasks enqueued per second")
    p.add_argument("--client-procs", type=int, default=1, help="processes the SSE clients use")
    p.add_argument("--streamers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=50000)
    p.add_argument("--noops", type=int, default=300)
    p.add_argument("--rate", type=float, default=50000,
                   help="tokens/s offered over all streamers (0: as fast as they can)")
    p.add_argument("--only", default="delivery,streaming")
    p.add_argument("--json", default=str(HERE / "results" / "events.json"))
    args = p.parse_args(argv)
    if args.serve:
        return serve(*args.serve)
    if args.fanout:
        return fanout(args.fanout[0], args.fanout[1:])
    if args.quick:
        args.clients, args.tasks, args.pool = 50, 200, 50
        args.tokens, args.noops = 10000, 100
    res = {"args": vars(args)}
    if "delivery" in args.only:
        res["delivery_no_clients"] = delivery(args, 0)
        print("no clients:", json.dumps(res["delivery_no_clients"]), flush=True)
        res["delivery"] = delivery(args, args.clients)
        print(f"{args.clients} clients:", json.dumps(res["delivery"]), flush=True)
        print(delivery_bars(res["delivery"], res["delivery_no_clients"]), flush=True)
    if "streaming" in args.only:
        res["streaming"] = streaming(args)
        print("streaming:", json.dumps(res["streaming"]), flush=True)
        print(streaming_bars(res["streaming"]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
