"""Handlers for `taskvisor demo`: an offline stand-in for a model, and tasks that end in
each outcome on purpose.

`demo.offline_llm` is NOT a model: it streams canned text with realistic delays and
progress, and returns what `llm.chat` returns ({text, finish_reason, usage, model}, model
"offline-stand-in"), so the demo runs on a machine with no model server. The others
exist to be seen on the dashboard: `demo.sleep` (progress, then done; or past its time
limit), `demo.flaky` (fails on its first attempt), `demo.hog` (allocates until its
memory limit stops it) and `demo.crash` (dies by a signal). Runs in task processes only.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Mapping
from typing import Any

from workers import Retry, task

STAND_IN_MODEL = "offline-stand-in"
TOKENS_PER_S = 15.0

_CANNED = {
    "plan": ("Plan for researching {topic}:\n1. Survey prior work and the known approaches.\n"
             "2. Collect the failure modes people report in practice.\n3. Compare published "
             "benchmarks and how they were measured.\n4. Estimate costs: hardware, latency and "
             "operations.\nEach step can run in parallel; a summary will merge them."),
    "step": ("Notes on {topic}: the sources agree on the main trade-offs, disagree on how "
             "to measure them, and leave open questions about behaviour under load. Three "
             "findings stand out, each with a caveat worth checking before relying on it."),
    "summary": ("Summary of {topic}: the parallel steps converge on a clear picture. The "
                "approach works when its limits are respected; the failure modes are known "
                "and can be watched for; costs are dominated by a few choices made early. "
                "Recommended next step: a small experiment on real data."),
}


def canned_text(payload: Mapping[str, Any]) -> str:
    role = payload.get("role") if payload.get("role") in _CANNED else "step"
    topic = str(payload.get("topic") or "the question")
    return _CANNED[role].format(topic=topic)


@task("demo.offline_llm")
def offline_llm(payload: Mapping[str, Any], ctx: Any) -> dict:
    """Stream canned text like a small local model on a CPU would (first-token latency,
    then ~15 tokens/s), reporting progress as `llm.chat` does. Payload: {role, topic, messages?, busy_once?}:
    with `busy_once` (a file path), the first call answers like a server's 429 by asking to
    be run again in 1 s, without spending an attempt."""
    marker = payload.get("busy_once")
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("busy once\n")
        raise Retry(1.0, "the stand-in model is busy (as a server's 429 with Retry-After: 1)")
    words = canned_text(payload).split(" ")
    speed = float(payload.get("tokens_per_s") or TOKENS_PER_S)
    rng = random.Random(ctx.id if ctx is not None else 0)
    time.sleep(rng.uniform(0.3, 0.8))  # prompt processing before the first token
    parts: list[str] = []
    last = 0.0
    for n, word in enumerate(words, 1):
        parts.append(word)
        time.sleep(rng.uniform(0.5, 1.5) / speed)
        now = time.monotonic()
        if ctx is not None and now - last >= 0.3:
            last = now
            ctx.progress(n / len(words), f"{n} tokens (offline stand-in)")
    text = " ".join(parts)
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in payload.get("messages") or []
                        if isinstance(m, Mapping)) or 20
    return {"text": text, "finish_reason": "stop", "model": STAND_IN_MODEL,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                      "total_tokens": prompt_tokens + len(words)}}


@task("demo.sleep")
def sleep(payload: Mapping[str, Any], ctx: Any) -> dict:
    """Sleep `seconds` (default 2) with progress every 0.25 s."""
    seconds = float(payload.get("seconds", 2.0))
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        ctx.progress(elapsed / seconds, f"working: {elapsed:.1f}s of {seconds:g}s")
        time.sleep(min(0.25, seconds - elapsed))
    return {"slept_s": round(time.monotonic() - started, 3)}


@task("demo.flaky")
def flaky(payload: Mapping[str, Any], ctx: Any) -> dict:
    """Fail on attempts before `succeed_on` (default 2), as a transient error would."""
    time.sleep(float(payload.get("seconds", 0.5)))
    if ctx.attempt < int(payload.get("succeed_on", 2)):
        raise ConnectionError(f"simulated transient failure on attempt {ctx.attempt}; "
                              "the retry policy runs it again after a backoff")
    return {"attempt": ctx.attempt}


@task("demo.hog")
def hog(payload: Mapping[str, Any], ctx: Any) -> dict:
    """Allocate (and touch) `step_mb` MiB every 0.1 s until `max_mb`: with a memory limit
    below that, the limit ends the attempt as memory_limit."""
    step = int(payload.get("step_mb", 16)) * 1024 * 1024
    held: list[bytes] = []
    for _ in range(int(payload.get("max_mb", 4096)) * 1024 * 1024 // step):
        held.append(b"\x01" * step)  # written, so resident: RSS grows for real
        ctx.progress(None, f"holding {len(held) * step >> 20} MiB")
        time.sleep(0.1)
    return {"held_mb": len(held) * step >> 20}


@task("demo.crash")
def crash(payload: Mapping[str, Any], ctx: Any) -> None:
    """Die by SIGSEGV after `seconds`, as a fault in native code would."""
    time.sleep(float(payload.get("seconds", 0.5)))
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)  # pragma: no cover - the signal ends the process
