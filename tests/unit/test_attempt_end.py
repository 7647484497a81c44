"""supervisor.children.classify: what a task process's last message makes of its attempt,
here the limits a Retry may pause."""

import logging
from types import SimpleNamespace

from supervisor.children import Child, classify
from supervisor.store import Outcome
from workers import wire


def child_of(limit_keys=(), type_limits=()) -> Child:
    task = SimpleNamespace(id="01T", type="llm.chat", limit_keys=tuple(limit_keys))
    child = Child(key="01T:1", task=task, lease=None, server=None, spawned_mono=0.0,
                  timeout_s=None, memory_mb=None, cpu_s=None, type_limits=tuple(type_limits))
    child.status = 0
    return child


def retry(child: Child, pause) -> tuple:
    child.final = {"kind": wire.RETRY, "delay_s": 7.0, "reason": "HTTP 429", "pause_limit": pause}
    end = classify(child)
    assert end.outcome is Outcome.RESCHEDULED
    return end.pause_limits


def test_a_retry_pauses_its_own_limits_and_its_types_not_anothers(caplog):
    assert retry(child_of(limit_keys=["tenant:7"]), ["tenant:7"]) == ("tenant:7",)
    # llm.chat pauses its type's limits (ctx.type_limits); a reload may have given the
    # type a limit after the task was enqueued: it is the task's type's all the same
    assert retry(child_of(type_limits=["openai"]), ["openai"]) == ("openai",)
    with caplog.at_level(logging.WARNING, logger="taskvisor.supervisor"):
        assert retry(child_of(limit_keys=["tenant:7"]), ["openai", "tenant:7"]) == ("tenant:7",)
    assert "Retry(pause_limit='openai') not applied" in caplog.text


def test_an_attempt_that_never_had_a_process_spent_no_tokens():
    """Given back between claim and start (its supervisor paused past the fence, say), an
    attempt kept the token estimate its claim charged: the limit lost them for nothing."""
    child = child_of(limit_keys=["openai"])
    child.status = None
    child.stop = (Outcome.INTERRUPTED, "fenced before it started")
    assert classify(child).spent_tokens == 0
    child.pid = 4242
    assert classify(child).spent_tokens is None  # it ran: what it used is unknown
