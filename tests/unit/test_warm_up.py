"""@warm_up: the registry runs every registered warm-up and reports the ones that fail
without stopping; llm's warm-up of the relay path makes a whole call against a canned
answer and leaves nothing behind (no descriptor, no thread, nothing in the environment)."""

from __future__ import annotations

import os
import threading

import pytest

from workers import registry, warm_up


def test_run_warm_ups_runs_each_and_reports_the_failures(monkeypatch):
    monkeypatch.setattr(registry, "_warm_ups", [])
    ran = []

    @warm_up
    def first():
        ran.append("first")

    @warm_up
    def broken():
        raise OSError("no such thing")

    @warm_up
    def last():
        ran.append("last")

    errors = registry.run_warm_ups()
    assert ran == ["first", "last"]
    assert len(errors) == 1
    assert "broken failed: OSError: no such thing" in errors[0]


def test_warm_up_refuses_what_it_cannot_call():
    with pytest.raises(TypeError, match="@warm_up"):
        warm_up(42)


def test_llm_relay_warm_up_makes_a_canned_call_and_leaves_nothing_behind():
    from workers.handlers import llmrelay
    fds = set(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    result = llmrelay.warm_up(rounds=3)
    assert result == {"text": "warm up", "finish_reason": "stop", "model": "warm-up",
                      "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
    assert set(os.listdir("/proc/self/fd")) <= fds  # (listdir's own descriptor aside)
    assert threading.active_count() == threads


def test_the_fork_servers_warm_up_of_the_task_path_changes_nothing_of_this_process():
    """workers.child.warm_up runs the task path's side-effect-free part QUICKEN_CALLS times
    in the fork server: no limit, priority, descriptor or signal of the process moves."""
    import resource
    import signal

    from workers import child
    limits = [resource.getrlimit(r) for r in (resource.RLIMIT_DATA, resource.RLIMIT_CPU,
                                              resource.RLIMIT_NOFILE)]
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    fds = sorted(os.listdir("/proc/self/fd"))
    term = signal.getsignal(signal.SIGTERM)
    child.warm_up()
    assert [resource.getrlimit(r) for r in (resource.RLIMIT_DATA, resource.RLIMIT_CPU,
                                            resource.RLIMIT_NOFILE)] == limits
    assert os.getpriority(os.PRIO_PROCESS, 0) == nice
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert signal.getsignal(signal.SIGTERM) is term
