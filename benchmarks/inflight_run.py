"""The measurement loop of inflight_bench.py, the same for taskvisor and every peer.

Owns following one run from the moment its consumer starts until its N tasks are done:
polling progress, detecting a hang (no task finished for `hang_s`, or none started within
`boot_s`), taking the CPU readings at the start and the end of the window, and sampling
memory at the peak: a few samples as the number in flight grows (each 1.5x the last,
0.5 s after it got there, until 90% of the concurrency), keeping the one with the most in
flight. It never starts or stops a process: the caller does, and kills everything when
`follow` raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import inflight_proc as procfs

POLL_S = 0.1
SETTLE_S = 0.5   # after a new high, let the last-started tasks reach their wait
PEAK_SHARE = 0.9  # no more samples once this share of the concurrency was sampled in flight
SAMPLE_FROM = 0.1
SAMPLE_GROWTH = 1.5


class Hang(Exception):
    """No progress for too long: the caller reports HANG for the row and kills everything."""


@dataclass
class System:
    """What the loop reads of the system under test."""
    done: Callable[[], int]                       # tasks finished so far (any outcome)
    in_flight: Callable[[], int]                  # tasks running now
    alive: Callable[[], bool]                     # the consumer is still running
    task_pids: Callable[[], list[int]]            # processes whose memory counts per task
    cpu: Callable[[], dict[str, procfs.Cpu]]      # CPU readings by role
    overhead_pids: Callable[[], list[int]] = lambda: []   # fixed-cost processes, shown apart
    shared_pids: Callable[[], list[int]] = lambda: []     # serve every task: counted per task in flight
    log_tail: Callable[[], str] = lambda: ""


def follow(system: System, n: int, concurrency: int, *, hang_s: float = 30.0,
           boot_s: float = 120.0, base_cpu: dict | None = None) -> dict:
    """Wait for `n` tasks; return CPU deltas by role, the peak memory sample and timings.
    Without `base_cpu`, the CPU window opens when the first task is seen in flight."""
    t0 = time.monotonic()
    last_done, last_change = 0, t0
    sample_at = None
    memory = None
    max_in_flight = 0
    while True:
        now = time.monotonic()
        done = system.done()
        in_flight = system.in_flight() if done < n else 0
        max_in_flight = max(max_in_flight, in_flight)
        if base_cpu is None and (in_flight > 0 or done > 0):
            base_cpu = system.cpu()
        if done >= n:
            end_cpu = system.cpu()
            break
        if done != last_done:
            last_done, last_change = done, now
        if not system.alive():
            raise RuntimeError(f"the consumer exited after {done} of {n} tasks: "
                               + system.log_tail()[-1500:])
        if done == 0 and max_in_flight == 0 and now - t0 > boot_s:
            raise Hang(f"no task started within {boot_s:g} s")
        if (done or max_in_flight) and now - last_change > hang_s:
            raise Hang(f"no task finished for {hang_s:g} s: {done} of {n} done, "
                       f"{in_flight} in flight")
        # Sampled each time the number in flight has grown by SAMPLE_GROWTH since the last
        # sample (from SAMPLE_FROM of the concurrency on), SETTLE_S after it got there; the
        # sample with the most in flight is kept. Stops once PEAK_SHARE were sampled.
        sampled = memory["in_flight"] if memory else 0
        if sampled < PEAK_SHARE * concurrency:
            if sample_at is None and in_flight >= max(SAMPLE_FROM * concurrency,
                                                      SAMPLE_GROWTH * sampled, 1):
                sample_at = now + SETTLE_S
            elif sample_at is not None and now >= sample_at:
                m = sample_memory(system, in_flight)
                if m["in_flight"] >= sampled:
                    memory = m
                sample_at = None
        time.sleep(POLL_S)
    cpu = {role: end_cpu[role] - base_cpu[role] for role in end_cpu if role in base_cpu}
    return {"cpu": cpu, "memory": memory, "max_in_flight_seen": max_in_flight,
            "follow_s": time.monotonic() - t0}


def sample_memory(system: System, in_flight: int) -> dict:
    pids = system.task_pids()
    t = time.monotonic()
    tasks = procfs.memory(pids)
    fixed = procfs.memory(system.overhead_pids())
    shared = procfs.memory(system.shared_pids())
    return {"in_flight": in_flight, "task_processes": tasks.processes,
            "task_pss_kib": tasks.pss_kib, "task_rss_kib": tasks.rss_kib,
            "overhead_pss_kib": fixed.pss_kib, "overhead_rss_kib": fixed.rss_kib,
            "shared_pss_kib": shared.pss_kib, "shared_rss_kib": shared.rss_kib,
            "sample_s": time.monotonic() - t}
