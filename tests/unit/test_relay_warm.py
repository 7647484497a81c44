"""supervisor.relay.Relays.warm_when_idle: the relays load their HTTP stack once the
supervisor has had no attempt for WARM_IDLE_S, where model calls can come (a fork server
with the llm.chat type). The loop asks only while it has no attempt, with the time its
table last emptied (Children.emptied_at: tests/store/test_loop_pass.py). Fake clock."""

from __future__ import annotations

from types import SimpleNamespace

from supervisor.relay import LLM_TYPE, WARM_IDLE_S, Relays


class FakeRelay:
    def __init__(self):
        self.warmed = 0

    def warm(self):
        self.warmed += 1


def relays_with(types: list[str]) -> tuple[Relays, list[FakeRelay]]:
    fakes = [FakeRelay(), FakeRelay()]
    relays = Relays(fakes[0], owner=None)
    relays.all.append(fakes[1])
    server = SimpleNamespace(types=types)
    relays.supervisor = SimpleNamespace(servers=SimpleNamespace(all=lambda: [server]))
    return relays, fakes


def test_idle_for_warm_idle_s_with_model_calls_possible_warms_every_relay():
    relays, fakes = relays_with(["shell", LLM_TYPE])
    relays.warm_when_idle(101.0, 101.0)          # idle from here (the loop asks only then)
    relays.warm_when_idle(101.0, 101.0 + WARM_IDLE_S / 2)
    assert [f.warmed for f in fakes] == [0, 0]
    # busy again, then idle from 102.0 (Children.emptied_at): the wait starts over
    relays.warm_when_idle(102.0, 102.0)
    relays.warm_when_idle(102.0, 102.0 + WARM_IDLE_S * 0.99)
    assert [f.warmed for f in fakes] == [0, 0]
    relays.warm_when_idle(102.0, 102.0 + WARM_IDLE_S)
    assert [f.warmed for f in fakes] == [1, 1]  # Relay.warm asks once a start itself


def test_no_warm_where_no_model_call_can_come():
    relays, fakes = relays_with(["shell", "noop"])
    for t in range(10):
        relays.warm_when_idle(100.0, 100.0 + t * WARM_IDLE_S)
    assert [f.warmed for f in fakes] == [0, 0]
