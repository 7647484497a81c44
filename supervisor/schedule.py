"""Recurring schedules: when each `[schedules."NAME"]` fires, and firing it once.

Owns fire-time arithmetic (cron expressions through cronsim in the schedule's time zone;
`every` periods aligned to the epoch, so every supervisor computes the same fire times)
and the supervisor's schedule step: for each schedule, the latest fire time that passed
since the last one handled is either enqueued (through `Store.fire_schedule`, which
claims the (name, fire time) row in the same transaction as the enqueue, so however
many supervisors share the file, one task per fire) or skipped (`catch_up = "skip"` and
more than CATCH_UP_GRACE_S late; paused). Earlier missed fire times are never run. It
never sleeps: the loop waits until `due_mono`. It never writes SQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import zoneinfo

import cronsim

from supervisor.flowconfig import ScheduleSpec

log = logging.getLogger("taskvisor.schedule")
CATCH_UP_GRACE_S = 60.0   # a fire this late still counts as on time with catch_up = "skip"
REREAD_S = 30.0           # pauses and resumes by others are seen at least this often


def previous_fire(spec: ScheduleSpec, now: float) -> float:
    """The latest fire time <= now (epoch seconds)."""
    if spec.every_s is not None:
        return math.floor(now / spec.every_s) * spec.every_s
    tz = zoneinfo.ZoneInfo(spec.timezone)
    start = dt.datetime.fromtimestamp(math.floor(now) + 1, tz)  # cronsim's start is exclusive
    return next(cronsim.CronSim(spec.cron, start, reverse=True)).timestamp()


def next_fire(spec: ScheduleSpec, after: float) -> float:
    """The first fire time > after."""
    if spec.every_s is not None:
        return (math.floor(after / spec.every_s) + 1) * spec.every_s
    tz = zoneinfo.ZoneInfo(spec.timezone)
    return next(cronsim.CronSim(spec.cron, dt.datetime.fromtimestamp(after, tz))).timestamp()


def decide(spec: ScheduleSpec, last: float, paused: bool, now: float) -> tuple[float | None, float | None]:
    """(fire time to enqueue or None, fire time to advance to or None) for one step."""
    due = previous_fire(spec, now)
    if due <= last:
        return None, None
    late = now - due
    run = not paused and (spec.catch_up == "one" or late <= CATCH_UP_GRACE_S)
    return (due if run else None), due


class Scheduler:
    """The supervisor's schedule step; `due_mono` is when it next needs to run."""

    def __init__(self) -> None:
        self.due_mono = 0.0
        self.fired = 0

    def step(self, store, config, new_task, now: float, mono: float) -> int:
        """Fire what is due; returns how many tasks this supervisor enqueued.
        `new_task(type, payload_dict)` builds the NewTask (the client's validation and
        per-type defaults). Raises StoreError (the caller retries later)."""
        if mono < self.due_mono:
            return 0
        specs = config.schedules
        if not specs:
            self.due_mono = mono + REREAD_S
            return 0
        states, _ = store.schedule_states()
        soonest = now + REREAD_S
        enqueued = 0
        for name, spec in specs.items():
            paused, last = states.get(name, (False, None))
            if last is None:
                store.init_schedule(name, now)  # starts from its first sight: no fire for the past
                last = now
            fire_at, advance_to = decide(spec, last, paused, now)
            if advance_to is not None:
                task = dataclasses.replace(new_task(spec.type, spec.payload, spec.priority),
                                           schedule=name, scheduled_for=fire_at)
                task_id = store.fire_schedule(name, fire_at, advance_to, task, now)
                if task_id is not None:
                    enqueued += 1
                    log.info("schedule %s fired for %s: task %s", name,
                             _iso(fire_at), task_id, extra={"task_id": task_id})
                elif fire_at is None:
                    log.info("schedule %s: fire time %s skipped (%s)", name, _iso(advance_to),
                             "paused" if paused else f"{now - advance_to:.0f}s late, catch_up = skip")
            soonest = min(soonest, next_fire(spec, now))
        self.fired += enqueued
        self.due_mono = mono + max(0.0, soonest - now)
        return enqueued


def describe(specs, states: dict, fires: dict, now: float) -> list[dict]:
    """The rows of `taskvisor schedules` and /api/schedules."""
    out = []
    for name, spec in specs.items():
        paused, _ = states.get(name, (False, None))
        last = fires.get(name)
        out.append({
            "name": name, "type": spec.type, "cron": spec.cron, "every_s": spec.every_s,
            "timezone": spec.timezone, "catch_up": spec.catch_up, "paused": paused,
            "payload": spec.payload,
            "last_fire_at": last[0] if last else None, "last_task_id": last[1] if last else None,
            "next_fire_at": None if paused else next_fire(spec, now),
        })
    return out


def _iso(ts: float | None) -> str:
    from supervisor.store import iso
    return iso(ts) or "-"

