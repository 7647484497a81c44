"""Workflow handlers for the process tests (issue 12): spawning, fan-in over results,
checkpoints that resume after a kill, waiting for an event. Each may append lines to
`payload["dir"]/workflow.log` so a test can see what ran, and in which attempt."""

from __future__ import annotations

import os
import signal
import time

from workers import DependencyFailure, task


def log(payload: dict, line: str) -> None:
    if payload.get("dir"):
        fd = os.open(os.path.join(payload["dir"], "workflow.log"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
            fd = os.open(os.path.join(payload["dir"], "pids"),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)


@task("wf.plan")
def plan(payload, ctx):
    """Spawn one wf.square per number and a wf.join over them; fail after spawning in
    the attempts listed in "fail_in" (those spawns must never be stored)."""
    kids = [ctx.spawn("wf.square", {"x": x, "dir": payload.get("dir")})
            for x in payload["numbers"]]
    join = ctx.spawn("wf.join", {"dir": payload.get("dir")}, depends_on=kids)
    log(payload, f"plan attempt {ctx.attempt} spawned {len(kids) + 1}")
    if ctx.attempt in payload.get("fail_in", ()):
        raise RuntimeError(f"planned failure in attempt {ctx.attempt}")
    return {"children": kids, "join": join}


@task("wf.square")
def square(payload, ctx):
    return {"x": payload["x"], "square": payload["x"] ** 2}


@task("wf.join")
def join(payload, ctx):
    squares = {k: v["square"] for k, v in ctx.inputs.items()}
    try:
        single = ctx.input["square"]
    except ValueError:  # not exactly one dependency
        single = None
    total = sum(v["square"] for k, v in ctx.inputs.items() if len(k) == 26)  # ids, not names
    return {"total": total, "inputs": squares, "single": single}


@task("wf.spawn_unknown")
def spawn_unknown(payload, ctx):
    ctx.spawn("no.such.type", {})
    return "not reached"


@task("wf.spawn_cycle")
def spawn_cycle(payload, ctx):
    """Send a result whose spawns depend on each other (ctx.spawn cannot make a cycle;
    a broken or hostile task process can), then leave without another message."""
    from workers.ids import new_id
    a, b = new_id(time.time()), new_id(time.time())
    ctx._reporter.send("result", result="null", spawn=[
        {"id": a, "type": "wf.square", "payload": {"x": 1}, "depends_on": [b]},
        {"id": b, "type": "wf.square", "payload": {"x": 2}, "depends_on": [a]}])
    raise SystemExit(0)


@task("wf.steps")
def steps(payload, ctx):
    """An agent loop: one step at a time, a checkpoint after each. In attempt 1 it kills
    itself (SIGKILL, like the OOM killer) right after the checkpoint of step `die_after`,
    or hangs there (`hang_after`) until the supervisor's timeout stops it."""
    state = ctx.checkpoint_state or {"step": 0, "done": []}
    log(payload, f"steps attempt {ctx.attempt} resumes at {state['step']}")
    for step in range(state["step"], payload["steps"]):
        state = {"step": step + 1, "done": state["done"] + [step]}
        ctx.checkpoint(state)
        log(payload, f"steps attempt {ctx.attempt} did {step}")
        if ctx.attempt == 1 and step + 1 == payload.get("die_after"):
            os.kill(os.getpid(), signal.SIGKILL)
        if ctx.attempt == 1 and step + 1 == payload.get("hang_after"):
            time.sleep(1000)
    return {"done": state["done"], "attempt": ctx.attempt, "resumed": payload.get("steps")}


@task("wf.event")
def on_event(payload, ctx):
    log(payload, f"event ran {ctx.id}")
    return {"event": ctx.event}


@task("wf.fail")
def fail(payload, ctx):
    raise ValueError("this dependency fails")


@task("wf.fanin")
def fanin(payload, ctx):
    return {k: ({"failed": dict(v)} if isinstance(v, DependencyFailure) else {"ok": v})
            for k, v in ctx.inputs.items()}


@task("wf.sleep")
def sleep(payload, ctx):
    log(payload, f"sleep started {ctx.id}")
    time.sleep(payload.get("s", 1000))
    return None


@task("wf.steps_hog")
def steps_hog(payload, ctx):
    """Checkpoint, then in attempt 1 allocate past the memory limit (RLIMIT_DATA)."""
    state = ctx.checkpoint_state or {"step": 0}
    log(payload, f"hog attempt {ctx.attempt} resumes at {state['step']}")
    if state["step"] == 0:
        ctx.checkpoint({"step": 1})
    if ctx.attempt == 1:
        hoard = [b"\x01" * (16 << 20) for _ in range(64)]  # 1 GiB, over the limit
        return len(hoard)
    return {"resumed_at": state["step"]}


@task("wf.big_checkpoint")
def big_checkpoint(payload, ctx):
    try:
        ctx.checkpoint({"blob": "x" * payload["size"]})
    except ValueError as exc:
        return {"refused": str(exc)}
    return {"stored": True}


@task("wf.spawn_with")
def spawn_with(payload, ctx):
    """Spawn one wf.square with the options in payload["options"] (any of Queue.enqueue's)."""
    return {"child": ctx.spawn("wf.square", {"x": 2}, **payload["options"])}


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@task("wf.deep_checkpoint")
def deep_checkpoint(payload, ctx):
    """A state nested deeper than json.dumps can go: ctx.checkpoint raises ValueError."""
    try:
        ctx.checkpoint(nested(5000))
    except ValueError as exc:
        return {"refused": str(exc)}
    return {"stored": True}


@task("wf.deep_spawn")
def deep_spawn(payload, ctx):
    ctx.spawn("wf.square", {"x": 1, "deep": nested(5000)})
    return "not reached"
