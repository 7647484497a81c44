"""kill -9 of the model-call relays while they host hundreds of streaming `llm.chat` calls.

Two relays host the calls ([llm] run_in_relay, the default; relays = 2). At random moments
the test SIGKILLs one of them while both stream calls. Every attempt the killed
relay hosted must be given back (`interrupted`, no attempt spent), the relay restarted and
the task run again to one success, and no task's call may be answered twice at once: the
model server keys each request by its task's prompt and records any that begins while
another of the same task is being answered. Short: 900 calls of about 1.5 s (more while
kills remain), 6 kills; long: more of both over its share of --soak-minutes.
"""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest

from tests.e2e.test_llm_relay import llm_config, relay_pids, streaming_relays
from tests.soak.harness import FIGURES, print_table
from tests.support import wait_until
from tests.support.launcher import SupervisorProcess
from tests.support.openai_server import FakeOpenAI, Stream

WORDS = 30
DELAY_S = 0.05  # between pieces: about 1.5 s a call


@pytest.mark.timeout(900)
def test_kill9_of_relays_hosting_streaming_calls(tmp_path, scale):
    seed = int(os.environ.get("TVSOAK_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    budget = scale.share(0.15) if scale.long else 0.0
    n_tasks = max(900, int(budget * 100)) if scale.long else 900
    kills_planned = max(20, int(budget / 3)) if scale.long else 6
    began = time.monotonic()
    with FakeOpenAI(Stream(text=" ".join(["w"] * WORDS), delay_s=DELAY_S)) as srv:
        srv.key = lambda body: str((body.get("messages") or [{}])[-1].get("content"))
        with SupervisorProcess(tmp_path, llm_config(srv.base_url, "relays = 2\n", pool_size=150)) as sup:
            ids: list[str] = []

            def more(n: int) -> None:
                ids.extend(sup.queue.enqueue_many([
                    {"type": "llm.chat", "max_attempts": 1, "payload": {"prompt": f"soak-{i}"}}
                    for i in range(len(ids), len(ids) + n)]))
            more(n_tasks)

            def unfinished() -> int:
                t = sup.queue.stats().totals()
                return t["queued"] + t["running"] + t["blocked"]
            wait_until(lambda: len(streaming_relays(sup, srv.port)[1]) == 2, timeout=30,
                       message="the calls never spread over two relays")
            killed: list[int] = []
            last_kill = time.monotonic()
            deadline = time.monotonic() + (budget if scale.long else 0) + 120
            while len(killed) < kills_planned:
                assert time.monotonic() < deadline, (
                    f"only {len(killed)} of {kills_planned} kills landed: the two relays were "
                    f"seldom both up and streaming (seed {seed})")
                if unfinished() < 300:  # every kill lands under load: the relays' restart
                    more(300)           # backoff (0.5, 1, 2 s...) outlasts the first batch
                time.sleep(rng.uniform(0.2, 1.2))
                pids, busy = streaming_relays(sup, srv.port)
                if len(busy) < 2:
                    # One is restarting (its process may be up before it is ready): kill
                    # only while the other hosts calls, or new attempts go to task processes,
                    # whose calls through a relay that dies fail and spend the attempt.
                    continue
                victim = rng.choice(busy)
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(victim)
                last_kill = time.monotonic()
            wait_until(lambda: unfinished() == 0, timeout=300, interval=0.2,
                       message=f"calls still unfinished: {sup.queue.stats().totals()}")
            drain_s = time.monotonic() - last_kill
            tasks = [sup.queue.get(i) for i in ids]
            seen = set(relay_pids(sup)) | set(killed)
        # the supervisor has stopped: nothing of it is left
        left = [p for p in seen if _alive(p)]
        requests: dict[str, int] = {}
        for r in srv.requests:
            key = srv.key(r["body"])
            requests[key] = requests.get(key, 0) + 1
        overlaps = list(srv.overlaps)

    runs = sum(requests.values())
    row = {"test": "test_kill9_of_relays_hosting_streaming_calls", "tasks": len(ids),
           "relay kills": len(killed), "runs": runs, "duplicate runs": runs - len(requests),
           "overlaps": len(overlaps), "drain s": f"{drain_s:.1f}",
           "wall s": f"{time.monotonic() - began:.0f}", "notes": "runs: requests at the model server"}
    FIGURES.append(row)
    print(f"\n{print_table([row])}\n(seed {seed})")

    problems = []
    for i, task in enumerate(tasks):
        outcomes = [a.outcome for a in task.history]
        if task.status != "succeeded" or outcomes.count("succeeded") != 1 or outcomes[-1] != "succeeded":
            problems.append(f"{task.id}: {task.status} {outcomes} {task.error}")
        elif not set(outcomes[:-1]) <= {"interrupted"} or task.attempts != 1:
            problems.append(f"{task.id}: attempts {task.attempts}, {outcomes}: a relay's death "
                            f"must spend none")
        elif task.result["text"] != " ".join(["w"] * WORDS):
            problems.append(f"{task.id}: result {task.result!r}")
        elif requests.get(f"soak-{i}", 0) > len(outcomes):
            problems.append(f"{task.id}: {requests[f'soak-{i}']} requests for {len(outcomes)} attempts")
    if overlaps:
        problems.append(f"{len(overlaps)} call(s) answered twice at once: {overlaps[:5]}")
    if left:
        problems.append(f"relay processes left after the stop: {left}")
    assert not problems, f"(seed {seed})\n" + "\n".join(problems[:40])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
