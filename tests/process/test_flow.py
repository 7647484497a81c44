"""Flow control on real supervisors: named limits admitted in the claim (shared by two
supervisors on one file), a Retry that pauses a whole limit, ctx.spend correcting a
token budget, a schedule fired once per fire time by two supervisors, and retention;
a concurrency limit through crashes and a supervisor's kill -9, and through reloads.
The handlers (tvp_flow) log start/end lines; the tests read the intervals."""

from __future__ import annotations

import signal
import time

import pytest

from supervisor.errors import NotFound
from tests.process.conftest import max_concurrent
from tests.support import wait_until

FLOW = {"supervisor": {"preload": ["tvp_handlers", "tvp_flow"], "pool_size": 3}}


def flow(**sections):
    out = {k: dict(v) for k, v in FLOW.items()}
    for name, table in sections.items():
        out.setdefault(name, {}).update(table)
    return out


def starts(sup, ids):
    runs = sup.runs()
    return sorted(run[0] for i in ids for run in runs.get(i, []))


@pytest.mark.timeout(90)
def test_two_supervisors_share_one_concurrency_limit(supervisor_proc):
    """a (one slot) holds one of the limit's two places when b (three slots) starts: b
    may take only the other one. Counted per supervisor, b would run three at once."""
    settings = flow(limits={"shared": {"concurrency": 2}},
                    types={"f.work": {"limits": ["shared"]}})
    a = supervisor_proc(name="a", **{**settings, "supervisor": {**settings["supervisor"],
                                                                 "pool_size": 1}})
    limited = [a.enqueue("f.work", {"s": 0.6}) for _ in range(8)]
    wait_until(lambda: any(a.get(i).status == "running" for i in limited), timeout=10)
    b = supervisor_proc(name="b", **settings)
    free = [b.enqueue("f.other", {"s": 0.6}) for _ in range(3)]
    done = a.wait_all(limited + free, "succeeded", timeout=60)
    runs = a.runs()
    assert max_concurrent({i: runs[i] for i in limited}) == 2  # never 3, and the cap was used
    assert max_concurrent(runs) >= 3  # tasks of no limit ran beside them
    owners = {a.get(i).history[-1].owner for i in limited}
    assert len(owners) == 2, "both supervisors ran tasks of the shared limit"
    assert done[0].limit_keys == ("shared",) and done[0].result["type_limits"] == ["shared"]


@pytest.mark.timeout(60)
def test_tasks_of_a_free_limit_are_not_held_behind_a_full_one(supervisor_proc):
    sup = supervisor_proc(**flow(limits={"slow": {"concurrency": 1},
                                         "tenant:*": {"concurrency": 5}}))
    slow = [sup.enqueue("f.work", {"s": 1.5}, limit_keys=["slow"]) for _ in range(4)]
    fast = [sup.enqueue("f.work", {"s": 0}, limit_keys=[f"tenant:{i}"]) for i in range(3)]
    sup.wait_all(fast, "succeeded", timeout=15)
    statuses = [sup.get(i).status for i in slow]
    assert statuses.count("queued") >= 2, statuses  # still waiting on "slow"
    sup.wait_all(slow, "succeeded", timeout=30)
    runs = sup.runs()
    first_slow_end = min(run[1] for i in slow for run in runs[i])
    assert max(run[1] for i in fast for run in runs[i]) < first_slow_end
    assert max_concurrent({i: runs[i] for i in slow}) == 1


@pytest.mark.timeout(90)
def test_requests_per_minute_hold_across_two_supervisors(supervisor_proc):
    settings = flow(limits={"api": {"requests_per_minute": 120, "burst": 1}},
                    types={"f.work": {"limits": ["api"]}},
                    supervisor={"poll_interval_s": 5})
    a = supervisor_proc(name="a", **settings)
    b = supervisor_proc(name="b", **settings)
    ids = [a.enqueue("f.work", {"s": 0}) for _ in range(7)]
    a.wait_all(ids, "succeeded", timeout=60)
    at = starts(a, ids)
    gaps = [y - x for x, y in zip(at, at[1:])]
    assert min(gaps) > 0.4, gaps  # 2 a second, one at a time (burst 1)
    assert at[-1] - at[0] >= 2.7  # 7 starts need 3 s at 2/s
    assert at[-1] - at[0] < 4.5  # and each supervisor woke for the refill, not a poll later


@pytest.mark.timeout(60)
def test_retry_with_pause_limit_pauses_the_whole_limit(supervisor_proc):
    sup = supervisor_proc(**flow(limits={"api": {"concurrency": 5}}))
    first = sup.enqueue("f.work", {"pause": "api", "retry_s": 2.0}, limit_keys=["api"])
    wait_until(lambda: sup.get(first).outcome == "rescheduled", timeout=10)
    row = next(r for r in sup.queue.limits() if r["key"] == "api")
    assert row["blocked_by"] == "paused" and "HTTP 429" in row["pause_reason"]
    paused_until = row["paused_until"]
    held = sup.enqueue("f.work", {"s": 0}, limit_keys=["api"])
    other = sup.enqueue("f.other", {"s": 0})
    sup.wait_status(other, "succeeded", timeout=10)
    assert sup.get(held).status == "queued"  # same limit: waits out the pause
    sup.wait_all([first, held], "succeeded", timeout=20)
    assert starts(sup, [held])[0] >= paused_until - 0.05
    assert starts(sup, [first])[1] >= paused_until - 0.05
    assert sup.get(first).attempts == 1  # the Retry gave its attempt back


@pytest.mark.timeout(60)
def test_a_task_cannot_pause_a_limit_it_does_not_draw_from(supervisor_proc):
    """Retry(pause_limit=) of a limit the task does not draw from (a typo, or a task that
    should not) shut that limit for every task of every supervisor."""
    sup = supervisor_proc(**flow(limits={"api": {"concurrency": 5}}))
    stray = sup.enqueue("f.other", {"pause": "api", "retry_s": 30.0})
    wait_until(lambda: sup.get(stray).outcome == "rescheduled", timeout=10)
    row = next((r for r in sup.queue.limits() if r["key"] == "api"), None)
    assert row is None or row["blocked_by"] != "paused", row
    held = sup.enqueue("f.work", {"s": 0}, limit_keys=["api"])
    sup.wait_status(held, "succeeded", timeout=10)
    assert "Retry(pause_limit='api') not applied" in sup.log()


@pytest.mark.timeout(60)
def test_spend_corrects_the_token_budget(supervisor_proc):
    """A 1,000-token bucket refilling 1,000 a second; the claim charges 10, the task says
    it used 3,000: the next task waits about two seconds for the debt to be repaid."""
    sup = supervisor_proc(**flow(limits={"tok": {"tokens_per_minute": 60000}},
                                 types={"f.work": {"limits": ["tok"], "estimated_tokens": 10}}))
    big = sup.enqueue("f.work", {"spend": 3000})
    sup.wait_status(big, "succeeded")
    row = next(r for r in sup.queue.limits() if r["key"] == "tok")
    assert row["available"]["tokens"] < -500  # in debt
    after = sup.enqueue("f.work", {"spend": 1})
    sup.wait_status(after, "succeeded", timeout=15)
    big_end = max(run[1] for run in sup.runs()[big])
    assert starts(sup, [after])[0] - big_end >= 1.2
    assert sup.get(big).estimated_tokens == 10


@pytest.mark.timeout(90)
def test_a_schedule_fires_once_per_fire_time_across_two_supervisors(supervisor_proc, tmp_path):
    settings = flow(schedules={"tick": {"every": "1s", "type": "f.other",
                                        "payload": {"dir": str(tmp_path)}}})
    a = supervisor_proc(name="a", **settings)
    b = supervisor_proc(name="b", **settings)

    def fired():
        return [t for t in a.store.list(limit=1000) if t.schedule == "tick"]
    wait_until(lambda: len(fired()) >= 4, timeout=20)
    tasks = fired()
    times = sorted(t.scheduled_for for t in tasks)
    assert len(times) == len(set(times)), "a fire time enqueued twice"
    assert all(abs((y - x) - 1.0) < 1e-6 for x, y in zip(times, times[1:])), times
    assert all(t.created_at >= t.scheduled_for for t in tasks)
    a.wait_all([t.id for t in tasks], "succeeded", timeout=20)
    # Paused on the database: neither supervisor fires it; resumed: both may again.
    a.queue.set_schedule_paused("tick", True)
    time.sleep(0.3)  # a fire already in its transaction may still land
    count = len(fired())
    time.sleep(2.5)
    assert len(fired()) == count
    rows = {r["name"]: r for r in a.queue.schedules()}
    assert rows["tick"]["paused"] and rows["tick"]["next_fire_at"] is None
    a.queue.set_schedule_paused("tick", False)
    wait_until(lambda: len(fired()) >= count + 2, timeout=10)
    times = sorted(t.scheduled_for for t in fired())
    assert len(times) == len(set(times))


@pytest.mark.timeout(60)
def test_retention_deletes_old_finished_tasks_in_the_background(supervisor_proc):
    sup = supervisor_proc(**flow(supervisor={"retain_finished": "1s"}))
    ids = [sup.enqueue("t.ok") for _ in range(30)]
    sup.wait_all(ids, "succeeded")
    waiting = sup.enqueue("t.ok", delay=60)  # unfinished: kept whatever its age

    def gone():
        for i in ids:
            try:
                sup.get(i)
                return False
            except NotFound:
                pass
        return True
    wait_until(gone, timeout=15)
    assert sup.get(waiting).status == "queued"
    assert sup.store.conn.db.execute("SELECT count(*) FROM attempts").fetchall()[0][0] == 0


@pytest.mark.timeout(60)
def test_a_schedule_of_a_type_with_no_handler_is_named_at_start(supervisor_proc, tmp_path):
    """Each fire of it fails: the log says so at start, not first at the fire (02:30 for
    a nightly schedule); a schedule of a known type is not named."""
    sup = supervisor_proc(**flow(schedules={
        "nightly": {"cron": "30 2 * * *", "type": "f.nope"},
        "tick": {"every": "1h", "type": "f.other", "payload": {"dir": str(tmp_path)}}}))
    sup.wait_log("schedule 'nightly' enqueues type 'f.nope', which no handler here takes")
    assert "schedule 'tick'" not in sup.log()


def over_limit(sup) -> list[str]:
    """The runs of f.slot that found every slot of their limit held (tvp_flow)."""
    try:
        return (sup.dir / "over").read_text().splitlines()
    except FileNotFoundError:
        return []


@pytest.mark.timeout(120)
def test_a_concurrency_limit_holds_through_crashes_time_limits_and_a_supervisor_kill9(supervisor_proc):
    """Two supervisors share concurrency 2; attempts SIGKILL themselves, raise, or hang
    past their time limit, and one supervisor is killed with kill -9 and restarted. The
    limit is counted by flocks that only the death of a run's process releases, so a
    slot given back before its process was gone (a leak in recovery) or counted twice
    shows as an "over" line; at the end no slot is left counted."""
    n = 2
    settings = flow(limits={"c": {"concurrency": n}},
                    types={"f.slot": {"limits": ["c"], "timeout_s": 1.0, "max_attempts": 4}},
                    supervisor={"pool_size": 4})
    a = supervisor_proc(name="a", **settings)
    supervisor_proc(name="b", **settings)  # shares the file and the limit
    plans = [["kill", "ok"], ["hang", "ok"], ["error", "ok"], ["ok"], ["kill", "error", "ok"],
             ["ok"], ["hang", "kill", "ok"], ["ok"], ["error", "ok"], ["ok"]]
    ids = [a.enqueue("f.slot", {"n": n, "s": 0.2, "modes": modes}) for modes in plans]
    wait_until(lambda: any(t.lease_owner and t.lease_owner.rsplit(":", 2)[1] == str(a.pid)
                           for t in map(a.get, ids) if t.status == "running"), timeout=15)
    a.kill9()
    a.restart()
    done = a.wait_all(ids, "succeeded", timeout=90)
    assert over_limit(a) == []
    assert {at.outcome for t in done for at in t.history} >= {"crashed", "timeout", "error"}
    state = a.store.conn.db.execute("SELECT key, running FROM limit_state").fetchall()
    assert state == [("c", 0)]


@pytest.mark.timeout(60)
def test_a_reload_lowers_and_raises_a_concurrency_limit(supervisor_proc):
    """Lowered from 3 to 1 while three run: those finish, and no task starts while
    another runs; raised to 4: four run at once."""
    def settings(n):
        return flow(limits={"c": {"concurrency": n}}, types={"f.work": {"limits": ["c"]}},
                    supervisor={"pool_size": 6})
    sup = supervisor_proc(**settings(3))
    ids = [sup.enqueue("f.work", {"s": 0.5}) for _ in range(6)]
    wait_until(lambda: sum(sup.get(i).status == "running" for i in ids) == 3, timeout=10)
    sup.write_config(settings(1))
    sup.signal(signal.SIGHUP)
    sup.wait_log("config reloaded")
    reloaded = time.time()
    done = sup.wait_all(ids, "succeeded", timeout=30)
    runs = [r for i in ids for r in sup.runs()[i]]
    # Claimed after the reload (a task claimed just before it, as one of the first three
    # ended, may start its process just after: it ran under the old limit).
    later = [r for t in done if t.started_at > reloaded for r in sup.runs()[t.id]]
    assert later, "every task started before the reload"
    for start, *_ in later:
        assert not [r for r in runs if r[0] < start < r[1]], "started beside another"
    sup.write_config(settings(4))
    sup.signal(signal.SIGHUP)
    sup.wait_log("config reloaded", count=2)
    more = [sup.enqueue("f.work", {"s": 0.5}) for _ in range(8)]
    sup.wait_all(more, "succeeded", timeout=30)
    runs = sup.runs()
    assert max_concurrent({i: runs[i] for i in more}) == 4


@pytest.mark.timeout(60)
def test_tasks_made_ready_by_a_full_supervisor_wake_the_others(supervisor_proc):
    """a and b, one slot each, polling every 30 s. The one that runs x makes y and z
    ready when x succeeds (its own commit: no client wakes anyone) and takes one of
    them; the other, idle, started the second only at its next poll, 30 s later."""
    settings = flow(supervisor={"pool_size": 1, "poll_interval_s": 30})
    a = supervisor_proc(name="a", **settings)
    b = supervisor_proc(name="b", **settings)
    x = a.enqueue("f.other", {"s": 0.3})
    y, z = (a.enqueue("f.other", {"s": 5}, depends_on=[x]) for _ in range(2))
    wait_until(lambda: a.runs().get(y) and a.runs().get(z), timeout=10,
               message="y and z did not both start soon after x")
    x_end = a.runs()[x][0][1]
    assert max(starts(a, [y, z])) - x_end < 2.0  # (pool 1 each: on both supervisors)
