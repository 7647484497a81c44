"""Handlers for `taskvisor demo`: an agent run (plan, research, summary, publish), an
offline stand-in for a model, and tasks that end in each outcome on purpose.

The agent run: `demo.plan` asks the model for a plan, decides one research topic per plan
line and spawns a `demo.research` per topic, a `demo.summary` that depends on all of
them and a `demo.publish` that waits for an approval event. `demo.research` is an agent
loop that checkpoints after each step (one of them kills itself once mid-way and
resumes from its checkpoint); `demo.summary` reads their results from ctx.inputs. With
`"llm": true` in a payload the model is `llm.chat`'s server, else the offline stand-in.

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
    "plan": ("Plan for researching {topic}:\n1. Prior work: survey the known approaches.\n"
             "2. Failure modes: collect what people report in practice.\n3. Benchmarks: "
             "compare published figures and how they were measured.\n4. Costs: estimate "
             "hardware, latency and operations.\nEach step can run in parallel; a summary "
             "will merge them."),
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


def ask_model(payload: Mapping[str, Any], ctx: Any, role: str, topic: str, prompt: str) -> dict:
    """One model call: llm.chat's server when the payload says "llm", else the stand-in."""
    if payload.get("llm"):
        from workers.handlers.llm import chat_sync
        return chat_sync({"messages": [{"role": "user", "content": prompt}],
                          "options": {"max_tokens": 200}}, ctx)
    return offline_llm({"role": role, "topic": topic,
                        "messages": [{"role": "user", "content": prompt}]}, ctx)


@task("demo.plan")
def plan(payload: Mapping[str, Any], ctx: Any) -> dict:
    """Ask for a plan, decide the research topics (one per numbered plan line, at most
    `max_topics`), spawn the research steps, their summary and the publish step."""
    topic = str(payload.get("topic") or "the question")
    answer = ask_model(payload, ctx, "plan", topic,
                       f"Write a four-step research plan on {topic}, one numbered line per step.")
    topics = [line.split(".", 1)[1].split(":", 1)[0].strip().rstrip(".").lower()
              for line in answer["text"].splitlines()
              if line[:1].isdigit() and "." in line][: int(payload.get("max_topics", 4))]
    topics = topics or ["prior work", "failure modes", "benchmarks", "costs"]
    common = {"llm": bool(payload.get("llm"))}
    research = []
    for n, name in enumerate(topics):
        step = {"demo": f"research: {name[:40]}", "topic": name, **common}
        if n == 1 and payload.get("busy_once"):
            step["busy_once"] = payload["busy_once"]
        if n == 2 and payload.get("die_once"):
            step["die_once"] = payload["die_once"]
        research.append(ctx.spawn("demo.research", step, priority=5))
    summary = ctx.spawn("demo.summary", {"demo": "research: summary", "topic": topic,
                                         "topics": topics, **common},
                        depends_on=research, priority=5)
    publish = ctx.spawn("demo.publish", {"demo": "publish (needs approval)"},
                        depends_on=[summary], await_event=payload["approval_event"], priority=5)
    return {"plan": answer["text"], "topics": topics, "research": research, "summary": summary,
            "publish": publish, "model": answer.get("model")}


@task("demo.research")
def research(payload: Mapping[str, Any], ctx: Any) -> dict:
    """An agent loop: search, read, write notes (a model call), checkpointing after each
    step. With `die_once` (a file path) the first attempt kills itself (SIGKILL, as the
    OOM killer would) right after the checkpoint of step 2; the retry resumes there."""
    marker = payload.get("busy_once")
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("busy once\n")
        raise Retry(1.0, "the stand-in model is busy (as a server's 429 with Retry-After: 1)")
    state = ctx.checkpoint_state or {"step": 0, "found": []}
    resumed_from = state["step"]
    steps = ("search", "read")
    while state["step"] < len(steps):
        name = steps[state["step"]]
        for i in range(4):
            ctx.progress((state["step"] + i / 4) / 3, f"{name}: source {i + 1} of 4")
            time.sleep(0.15)
        state = {"step": state["step"] + 1, "found": state["found"] + [f"{name} done"]}
        ctx.checkpoint(state)  # durable before it returns: a crash now resumes here
        marker = payload.get("die_once")
        if marker and state["step"] == 2 and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write("killed once\n")
            os.kill(os.getpid(), signal.SIGKILL)
    topic = str(payload.get("topic"))
    notes = ask_model(payload, ctx, "step", topic, f"Write short research notes on {topic}.")
    return {"topic": topic, "notes": notes["text"], "steps": state["found"],
            "resumed_from": resumed_from, "model": notes.get("model"), "usage": notes.get("usage")}


@task("demo.summary")
def summary(payload: Mapping[str, Any], ctx: Any) -> dict:
    """Merge the research notes its dependencies returned (ctx.inputs) with one model call."""
    notes = [r for r in ctx.inputs.values() if isinstance(r, Mapping) and "notes" in r]
    notes.sort(key=lambda r: payload.get("topics", []).index(r["topic"])
               if r["topic"] in payload.get("topics", []) else 99)
    topic = str(payload.get("topic"))
    prompt = (f"Summarise this research on {topic}:\n" +
              "\n".join(f"- {r['topic']}: {r['notes']}" for r in notes))
    answer = ask_model(payload, ctx, "summary", topic, prompt)
    return {"text": answer["text"], "sources": [r["topic"] for r in notes],
            "model": answer.get("model"), "usage": answer.get("usage")}


@task("demo.publish")
def publish(payload: Mapping[str, Any], ctx: Any) -> dict:
    """Runs once a person (or the demo) sent its approval event; returns what it got."""
    time.sleep(0.3)
    return {"published": True, "approval": ctx.event}


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
