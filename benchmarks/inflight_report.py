"""The table and the bars of inflight_bench.py, from its result dict. Prints; never measures.

Bars (issue 11), each per variant where it applies: 3,000 in flight completes; window at
most 1.3x the ideal at 1,000 in flight; supervisor CPU per task at 1,000 in flight at most
2x its figure at pool 4 (same handler, same run); PSS of the task processes per task in
flight at most 1 MiB (every size that was sampled); enqueue-to-start p99 under 50 ms
with 1,000 in flight (handler entry minus the moment before the enqueue call).
"""

from __future__ import annotations

MIB = 1024


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def _find(res: dict, kind: str, system: str, concurrency: int, baseline: bool = False) -> dict | None:
    for r in res["runs"]:
        if (r["kind"], r["system"], r["concurrency"], bool(r.get("baseline"))) == (
                kind, system, concurrency, baseline):
            return r
    return None


def _per_task(r: dict, key: str) -> float | None:
    """Over the tasks in flight at the sample: taskvisor's task processes read (one per
    task, the fork server's spare included), or when it has none (llm.chat run in the
    relay) its attempts running in the store; a peer's own count (its processes are
    shared)."""
    m = r.get("memory")
    if not m:
        return None
    if not r["system"].startswith("taskvisor"):
        return m[key] / MIB / m["in_flight"] if m["in_flight"] else None
    # taskvisor's chat variant: the relay serves every call; its memory is shared by them
    shared = m.get(key.replace("task_", "shared_"), 0)
    count = m["in_flight"] if _hosted(r) else m["task_processes"]
    return (m[key] + shared) / MIB / count if count else None


def _hosted(r: dict) -> bool:
    """A taskvisor chat row whose calls the relay runs: no task process each."""
    return r.get("kind") == "chat" and r.get("llm_mode", "hosted") == "hosted"


def relay_line(r: dict) -> str | None:
    """The relay's own share of a taskvisor chat row (already inside its figures)."""
    m, cpu = r.get("memory") or {}, r.get("cpu_ms_per_task") or {}
    if not m.get("shared_pss_kib") and "relay" not in cpu:
        return None
    pss = m.get("shared_pss_kib", 0) / MIB
    count = m.get("in_flight") if _hosted(r) else m.get("task_processes")
    per = pss / count if count else None
    return (f"relay PSS {pss:.1f} MiB ({fmt(per, '.3f')} MiB per task in flight), "
            f"CPU {fmt(cpu.get('relay'))} ms per call (included above)")


def pss_per_task_mib(r: dict) -> float | None:
    return _per_task(r, "task_pss_kib")


def rss_per_task_mib(r: dict) -> float | None:
    return _per_task(r, "task_rss_kib")


def bars(res: dict) -> list[dict]:
    out = []
    ideal = 3 * res["seconds"]

    def bar(what, value, ok, limit, note=""):
        out.append({"bar": what, "value": value, "pass": ok, "limit": limit, "note": note})

    for kind in res["variants"]:
        if "taskvisor" not in res["systems"]:
            continue
        r3k = _find(res, kind, "taskvisor", 3000)
        if r3k is not None or kind == "sleep":  # chat runs at 100 by default (inflight_bench.py)
            bar(f"[{kind}] 3,000 in flight completes", r3k["status"] if r3k else None,
                None if r3k is None else r3k["status"] == "ok", "ok", (r3k or {}).get("error", ""))
        r1k = _find(res, kind, "taskvisor", 1000)
        ok1k = r1k is not None and r1k["status"] == "ok"
        ratio = r1k["window_s"] / ideal if ok1k else None
        bar(f"[{kind}] window / ideal at 1,000 in flight", ratio,
            None if r1k is None else (ratio is not None and ratio <= 1.3), "<= 1.3x",
            "" if ok1k or r1k is None else r1k["status"])
        p4 = _find(res, kind, "taskvisor", 4, baseline=True)
        if ok1k and p4 and p4["status"] == "ok":
            a, b = r1k["cpu_ms_per_task"]["supervisor"], p4["cpu_ms_per_task"]["supervisor"]
            bar(f"[{kind}] supervisor CPU/task at 1,000 / at pool 4", a / b if b else None,
                a <= 2 * b, "<= 2x", f"{a:.2f} ms vs {b:.2f} ms")
        else:
            bar(f"[{kind}] supervisor CPU/task at 1,000 / at pool 4", None,
                None if r1k is None else False, "<= 2x", "no figure at 1,000" if r1k else "")
        for size in res["chat_sizes"] if kind == "chat" else res["sizes"]:
            r = _find(res, kind, "taskvisor", size)
            if r is None:
                continue
            v = pss_per_task_mib(r)
            bar(f"[{kind}] PSS per task in flight at {size:,}", v,
                None if v is None else v <= 1.0, "<= 1 MiB",
                "" if v is not None else f"no sample ({r['status']})")
    probe = res.get("probe")
    if probe:
        ms = probe.get("enqueue_to_handler_ms") or []
        p99 = percentile(ms, 99)
        bar(f"enqueue-to-start p99 with {probe['in_flight']:,} in flight", p99,
            None if p99 is None else p99 < 50.0, "< 50 ms",
            probe.get("error", "") if p99 is None else "")
    return out


def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def print_report(res: dict) -> None:
    s = res["seconds"]
    print(f"\nIn flight: N = 3 x concurrency tasks that each wait S = {s:g} s, queue filled first "
          f"(ideal window {3 * s:g} s)")
    head = (f"  {'variant':<7} {'in flight':>9} {'system':<16} {'tasks':>6} {'status':<6} "
            f"{'x ideal':>7} {'CPU ms/task':>11} {'sup ms':>7} {'fs ms':>6} {'task ms':>7} "
            f"{'PSS MiB':>7} {'RSS MiB':>7} {'fixed PSS':>9} {'max seen':>8}")
    print(head)
    for r in res["runs"]:
        cpu = r.get("cpu_ms_per_task") or {}
        mem = r.get("memory") or {}
        ideal = (r["tasks"] / r["concurrency"]) * s
        label = "4 (base)" if r.get("baseline") else f"{r['concurrency']:,}"
        print(f"  {r['kind']:<7} {label:>9} {r['system']:<16} {r['tasks']:>6} {r['status']:<6} "
              f"{fmt(r['window_s'] / ideal if r.get('window_s') else None):>7} "
              f"{fmt(cpu.get('total')):>11} {fmt(cpu.get('supervisor')):>7} "
              f"{fmt(cpu.get('fork_server')):>6} {fmt(cpu.get('task_processes')):>7} "
              f"{fmt(pss_per_task_mib(r)):>7} {fmt(rss_per_task_mib(r)):>7} "
              f"{fmt(mem.get('overhead_pss_kib', 0) / MIB if mem.get('overhead_pss_kib') else None, '.0f'):>9}"
              f" {fmt(r.get('max_in_flight_seen'), ',d'):>8}")
    for sk in res.get("skipped", []):
        print(f"  skipped {sk['system']}{' at ' + format(sk['concurrency'], ',') if 'concurrency' in sk else ''}"
              f"{' (' + sk['kind'] + ')' if 'kind' in sk else ''}: {sk['why']}")
    for r in res["runs"]:
        lag = r.get("lags_ms")
        if lag:
            label = "pool 4" if r.get("baseline") else f"{r['concurrency']:,} in flight"
            print(f"  taskvisor {r['kind']} {label}: " + "; ".join(
                f"{k.replace('_', ' ')} p50 {fmt(v['p50'], '.0f')} p99 {fmt(v['p99'], '.0f')} "
                f"max {fmt(v['max'], '.0f')} ms" for k, v in lag.items()))
    for r in res["runs"]:
        relay = relay_line(r) if r["kind"] == "chat" else None
        if relay:
            label = "pool 4" if r.get("baseline") else f"{r['concurrency']:,} in flight"
            print(f"  {r['system']} chat {label}: {relay}")
    for r in res["runs"]:
        if r["status"] != "ok":
            print(f"  {r['system']} {r['kind']} at {r['concurrency']:,}: {r['status']} {r.get('error', '')[:300]}")
    print("  x ideal: first start to last completion over N/P x S. CPU: /proc/PID/stat over that window;\n"
          "  taskvisor = supervisor (own) + fork server (own) + task processes (the fork server's\n"
          "  reaped children) + the model-call relay (chat); peers = every process of the worker's\n"
          "  session. PSS/RSS: per task in flight at the peak (taskvisor: task processes, plus in\n"
          "  the chat variant the relay's; the supervisor and fork server are 'fixed PSS'; peers:\n"
          "  all worker processes). max seen: most tasks in flight at once\n"
          "  (polled every 0.1 s; taskvisor: attempts running in the store, hosted ones included).")
    probe = res.get("probe")
    if probe:
        print(f"\nEnqueue-to-start with {probe['in_flight']:,} in flight ({probe['probes']} probes, one at a time)")
        if probe.get("status") == "ok":
            for key in ("enqueue_to_claim_ms", "enqueue_to_handler_ms"):
                ms = probe[key]
                print(f"  {key.removesuffix('_ms').replace('_', ' '):<22} p50 {fmt(percentile(ms, 50)):>7} ms"
                      f"  p99 {fmt(percentile(ms, 99)):>7} ms  max {fmt(max(ms)):>7} ms")
            print(f"  task processes at start/end: {probe.get('task_processes_at_start')}"
                  f"/{probe.get('task_processes_at_end')}")
        else:
            print(f"  {probe.get('status')}: {probe.get('error')}")
    print("\nBars (issue 11)")
    for b in res["bars"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[b["pass"]]
        v = b["value"]
        v = fmt(v, ".3g") if isinstance(v, (int, float)) else (v or "-")
        print(f"  {verdict}  {b['bar']:<52} {v:>8}  (bar {b['limit']}) {b['note']}")
