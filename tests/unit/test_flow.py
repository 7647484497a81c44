"""Pure parts of flow control: key matching, bucket arithmetic, fire times, the config
sections [limits] and [schedules]. No fork, no disk (besides the config file)."""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo

import pytest

from supervisor import budget, config, schedule
from supervisor.budget import KeyState, LimitSpec, Limits
from supervisor.errors import ConfigError
from supervisor.flowconfig import ScheduleSpec


def test_a_key_matches_by_name_else_the_longest_prefix_pattern():
    limits = Limits({"openai": LimitSpec("openai", concurrency=1),
                     "tenant:*": LimitSpec("tenant:*", concurrency=2),
                     "tenant:eu:*": LimitSpec("tenant:eu:*", concurrency=3)})
    assert limits.spec("openai").concurrency == 1
    assert limits.spec("tenant:42").name == "tenant:*"
    assert limits.spec("tenant:eu:7").name == "tenant:eu:*"
    assert limits.spec("openai2") is None and limits.spec("tenant") is None


def test_request_bucket_refills_at_the_per_second_share_up_to_the_burst():
    spec = LimitSpec("api", requests_per_minute=600)  # 10/s, burst 10
    assert spec.request_capacity == 10
    empty = KeyState("api", requests=0.0, updated_at=100.0)
    assert budget.blocked_by(spec, empty, 100.05) == "requests"
    assert budget.wait_s(spec, empty, 100.0) == pytest.approx(0.1)
    assert budget.blocked_by(spec, empty, 100.1) is None
    assert budget.levels(spec, empty, 200.0)[0] == 10  # never above the burst
    assert LimitSpec("slow", requests_per_minute=6).request_capacity == 1


def test_token_bucket_goes_into_debt_and_spend_corrects_it():
    spec = LimitSpec("llm", tokens_per_minute=6000)  # 100/s, a 100-token bucket
    full = KeyState("llm")
    req, tok = budget.charge(spec, full, 10.0, 500)
    assert req is None and tok == -400
    debt = KeyState("llm", tokens=tok, updated_at=10.0)
    assert budget.blocked_by(spec, debt, 13.9) == "tokens"
    assert budget.blocked_by(spec, debt, 14.01) is None
    assert budget.correct(spec, debt, 10.0, 500 - 20) == 80  # it used 20
    assert budget.correct(spec, debt, 10.0, 10_000) == 100  # never above the bucket


def test_concurrency_and_pause():
    spec = LimitSpec("x", concurrency=2)
    assert budget.blocked_by(spec, KeyState("x", running=2), 0) == "concurrency"
    assert budget.wait_s(spec, KeyState("x", running=2), 0) == math.inf
    paused = KeyState("x", paused_until=50.0)
    assert budget.blocked_by(spec, paused, 49.0) == "paused"
    assert budget.blocked_by(None, paused, 49.0) == "paused"  # a key with no entry pauses too
    assert budget.blocked_by(spec, paused, 50.0) is None


def test_group_text_is_canonical():
    assert budget.group_text(["b", "a", "b"]) == '["a","b"]'
    assert budget.group_text([]) is None
    assert budget.group_keys('["a","b"]') == ("a", "b")


def every(seconds, catch_up="skip"):
    return ScheduleSpec("s", "t", every_s=seconds, catch_up=catch_up)


def test_every_is_aligned_to_the_epoch():
    spec = every(30)
    assert schedule.previous_fire(spec, 1000.0) == 990.0
    assert schedule.next_fire(spec, 990.0) == 1020.0


def test_cron_in_a_time_zone_across_daylight_saving():
    spec = ScheduleSpec("n", "t", cron="0 3 * * *", timezone="Europe/Lisbon")
    lisbon = zoneinfo.ZoneInfo("Europe/Lisbon")
    before = dt.datetime(2026, 3, 27, 12, 0, tzinfo=lisbon).timestamp()
    fire = schedule.next_fire(spec, before)
    assert dt.datetime.fromtimestamp(fire, lisbon).hour == 3
    after_dst = schedule.next_fire(spec, fire)  # the clocks went forward that night
    assert after_dst - fire == 23 * 3600
    assert schedule.previous_fire(spec, after_dst + 1) == after_dst


def test_decide_runs_the_latest_missed_fire_only_with_catch_up_one():
    assert schedule.decide(every(60), last=600.0, paused=False, now=605.0) == (None, None)
    assert schedule.decide(every(60), last=600.0, paused=False, now=661.0) == (660.0, 660.0)
    # Down for an hour: "skip" runs nothing, "one" runs the latest fire once.
    assert schedule.decide(every(600), last=600.0, paused=False, now=4300.0) == (None, 4200.0)
    assert schedule.decide(every(600, "one"), last=600.0, paused=False, now=4300.0) == (4200.0, 4200.0)
    assert schedule.decide(every(60), last=600.0, paused=True, now=661.0) == (None, 660.0)


def write(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


def test_limits_and_schedules_load(tmp_path):
    cfg = config.load(write(tmp_path, """
[supervisor]
retain_finished = "forever"
[limits."openai"]
requests_per_minute = 500
tokens_per_minute = 200000
concurrency = 16
burst = 20
[limits."tenant:*"]
concurrency = 2
[types."llm.chat"]
limits = ["openai"]
estimated_tokens = 800
[schedules."nightly-report"]
cron = "0 3 * * *"
timezone = "Europe/Lisbon"
type = "report.build"
payload = { kind = "daily" }
catch_up = "one"
"""), env={})
    assert cfg.supervisor.retain_finished is None
    assert cfg.limits["openai"].request_capacity == 20
    assert cfg.type_limits("llm.chat") == ("openai",)
    assert cfg.types["llm.chat"].estimated_tokens == 800
    nightly = cfg.schedules["nightly-report"]
    assert (nightly.cron, nightly.timezone, nightly.payload, nightly.catch_up) == (
        "0 3 * * *", "Europe/Lisbon", {"kind": "daily"}, "one")
    assert config.load(None, env={}).supervisor.retain_finished == 14 * 86400
    again = config.load(write(tmp_path, config.dump(cfg)), env={})
    assert again.limits == cfg.limits and again.schedules == cfg.schedules


@pytest.mark.parametrize("text, fragment", [
    ('[schedules."n"]\ncron = "0 25 * * *"\ntype = "t"', '[schedules."n"] cron: invalid cron'),
    ('[schedules."n"]\ncron = "0 3 * *"\ntype = "t"', '[schedules."n"] cron: expected five'),
    ('[schedules."n"]\nevery = "1m"\ntype = "t"\ntimezone = "Mars/Base"',
     '[schedules."n"] timezone: unknown time zone "Mars/Base"'),
    ('[schedules."n"]\nevery = "1m"\ncron = "* * * * *"\ntype = "t"', "exactly one of cron"),
    ('[schedules."n"]\nevery = "1m"', '[schedules."n"] type: required'),
    ('[schedules."n"]\nevery = "1m"\ntype = "t"\ncatch_up = "all"', "catch_up"),
    ('[limits."a"]\nrequests_per_minute = 0', '[limits."a"] requests_per_minute: must be from 1 to 1000000000'),
    ('[limits."a"]\nburst = 3', '[limits."a"]: sets no limit'),
    ('[limits."a*b"]\nconcurrency = 1', '[limits."a*b"]: a limit name'),
    ('[limits."a"]\nconcurrency = 1\nspeed = 2', '[limits."a"] speed: unknown key'),
    ('[types."x"]\nlimits = ["nope"]', '[types."x"] limits: "nope" matches no [limits] entry'),
    ('[supervisor]\nretain_finished = "soon"', "[supervisor] retain_finished"),
    # Each task of these would charge more than the limit's whole minute (refused at
    # enqueue): the limit's own estimate, the type's, a schedule payload's max_tokens.
    ('[limits."a"]\ntokens_per_minute = 600\nestimated_tokens = 601',
     '[limits."a"] estimated_tokens: 601 is more than tokens_per_minute (600)'),
    ('[limits."a"]\ntokens_per_minute = 600\n[types."x"]\nlimits = ["a"]\nestimated_tokens = 700',
     '[types."x"] estimated_tokens: 700 is more than limit "a" allows in a minute'),
    ('[limits."a"]\ntokens_per_minute = 600\n[types."x"]\nlimits = ["a"]\n[schedules."n"]\n'
     'every = "1m"\ntype = "x"\npayload = { options = { max_tokens = 9000 } }',
     '[schedules."n"] payload: max_tokens 9000 is more than limit "a" of type "x"'),
    # Each of these passed check-config, then failed every fire of the schedule step (so
    # no schedule fired at all) or crashed `taskvisor schedules` with a traceback.
    ('[schedules."n"]\nevery = "1s"\ntype = "t"\npayload = { at = 1979-05-27T07:32:00Z }',
     '[schedules."n"] payload: not JSON'),
    ('[schedules."n"]\nevery = "1s"\ntype = "t"\npayload = { x = nan }',
     '[schedules."n"] payload: not JSON'),
    ('[supervisor]\nmax_payload_bytes = 10\n[schedules."n"]\nevery = "1s"\ntype = "t"\n'
     'payload = { a = "0123456789" }', '[schedules."n"] payload: 18 bytes, over [supervisor] '
     'max_payload_bytes (10)'),
    ('[schedules."n"]\nevery = "1s"\ntype = "t"\npriority = 100000000000000000000',
     '[schedules."n"] priority: expected an integer from'),
    ('[schedules."n"]\nevery = "1000000000000w"\ntype = "t"', '[schedules."n"] every:'),
    ('[schedules."n"]\nevery = "1s"\ntype = "a\\nb"',
     "[schedules.\"n\"] type: must be at most 200 printable characters: '\\n' at index 1"),
    ('[schedules."n"]\nevery = "1s"\ntype = "' + "t" * 201 + '"', '[schedules."n"] type:'),
])
def test_bad_flow_config_names_the_key(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), env={})
    assert any(fragment in e for e in err.value.errors), err.value.errors


def test_the_openapi_limit_keys_pattern_follows_the_configured_limits(tmp_path):
    import re

    from supervisor import openapi
    from supervisor.client import Queue
    from supervisor.errors import InputError
    cfg = config.load(write(tmp_path, '[limits."openai.v1"]\nconcurrency = 1\n'
                            '[limits."t(x)+:*"]\nconcurrency = 1\n'), env={})
    props = openapi.document(cfg)["components"]["schemas"]["NewTask"]["properties"]
    pattern = props["limit_keys"]["items"]["pattern"]
    queue = Queue(cfg.with_database(tmp_path / "never.db"))
    for key in ("openai.v1", "openaiXv1", "t(x)+:42", "tx:1"):
        try:
            queue.prepare("t", {})  # the type alone is valid
            queue._limit_keys("t", [key])
            accepted = True
        except InputError:
            accepted = False
        assert bool(re.fullmatch(pattern, key)) == accepted, key


def test_a_schedule_the_config_accepts_is_one_enqueue_accepts(tmp_path):
    """At the edges of every range: the schedule step can enqueue it and `describe` can
    show its next fire time (a config error otherwise, never a failure at each fire)."""
    from supervisor.client import Queue
    from supervisor.flowconfig import MAX_EVERY_S, MAX_PRIORITY
    from supervisor.store import iso
    cfg = config.load(write(tmp_path, f"""
[supervisor]
max_payload_bytes = 27
[schedules."n"]
every = {MAX_EVERY_S!r}
type = "{'t' * 200}"
priority = {-MAX_PRIORITY}
payload = {{ a = "0123456789", b = 1.5 }}
"""), env={})
    queue = Queue(cfg.with_database(tmp_path / "never.db"))
    for spec in cfg.schedules.values():
        queue.prepare(spec.type, spec.payload, spec.priority)
        assert iso(schedule.next_fire(spec, 2e9))


def test_an_llm_chat_payload_estimates_its_tokens_from_options_max_tokens(tmp_path):
    """llm.chat takes max_tokens in its payload's `options` (or at its top level): the
    claim's estimate must read it there, not fall back to the limit's default while the
    call may produce far more."""
    from supervisor.client import Queue
    cfg = config.load(write(tmp_path, """
[limits."openai"]
tokens_per_minute = 60000
estimated_tokens = 100
[types."llm.chat"]
limits = ["openai"]
"""), env={})
    queue = Queue(cfg.with_database(tmp_path / "never.db"))
    chat = {"messages": [{"role": "user", "content": "hi"}], "options": {"max_tokens": 4000}}
    assert queue.prepare("llm.chat", chat).estimated_tokens == 4000
    assert queue.prepare("llm.chat", {"max_tokens": 300}).estimated_tokens == 300
    assert queue.prepare("llm.chat", {"options": {"max_completion_tokens": 70}}).estimated_tokens == 70
    both = {"max_completion_tokens": 100, "options": {"max_tokens": 4000}}  # both are sent
    assert queue.prepare("llm.chat", both).estimated_tokens == 4000
    assert queue.prepare("llm.chat", {"options": {"max_tokens": True}}).estimated_tokens is None


def test_a_task_estimating_more_than_a_minute_of_its_limit_is_refused_at_enqueue(tmp_path):
    """Charged at claim, such an estimate closed the limit to every other task for as many
    minutes as it overshot (for good, with no spend reported: 10^9 tokens on a 600 a
    minute limit is three years): the enqueue says so and names the key; nothing is
    stored."""
    from supervisor.client import Queue
    from supervisor.errors import InputError
    cfg = config.load(write(tmp_path, """
[limits."llm"]
tokens_per_minute = 600
estimated_tokens = 50
[limits."tenant:*"]
tokens_per_minute = 60
[types."x"]
limits = ["llm"]
"""), env={})
    queue = Queue(cfg.with_database(tmp_path / "t.db"))
    assert queue.enqueue("x", {}, estimated_tokens=600)  # a whole minute still fits
    for payload, fields, fragment in [
            ({}, {"estimated_tokens": 10 ** 9}, "estimated_tokens is 1000000000, more than limit 'llm'"),
            ({"options": {"max_tokens": 9000}}, {}, "the payload's output cap (max_tokens, max_completion_tokens) is 9000"),
            ({}, {"estimated_tokens": 100, "limit_keys": ["tenant:7"]},
             "more than limit 'tenant:7' allows in a minute (tokens_per_minute = 60)")]:
        with pytest.raises(InputError) as err:
            queue.enqueue("x", payload, **fields)
        assert fragment in str(err.value) and err.value.field == "estimated_tokens"
    assert len(queue.list()) == 1
