"""llm.chat and named limits: it reports the tokens a call used (ctx.spend) and, on a 429
or 503 with Retry-After, pauses its type's limits for that long, on a real supervisor
talking to the local fake OpenAI server."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from supervisor.config import load as load_config
from tests.support import wait_until
from tests.support.openai_server import (
    FakeOpenAI, Status, Stream, SupervisorProcess, supervisor_config)
from workers import Retry
from workers.handlers import llm


class Ctx:
    type_limits = ("openai",)

    def __init__(self):
        # the [llm] section a supervisor hands over: supervisor.config alone resolves it
        self.config = {"llm": dataclasses.asdict(load_config(None, env={}).llm)}
        self.spent = []

    def progress(self, fraction=None, message=None):
        pass

    def heartbeat(self):
        pass

    def spend(self, tokens):
        self.spent.append(tokens)


@pytest.mark.timeout(30)
def test_the_handler_spends_its_usage_and_pauses_its_types_limits():
    with FakeOpenAI(Stream(text="one two three")) as srv:
        ctx = Ctx()
        result = asyncio.run(llm.chat({"prompt": "hi", "base_url": srv.base_url}, ctx))
        assert ctx.spent == [result["usage"]["total_tokens"]] == [15]
        assert llm.chat_sync({"prompt": "hi", "base_url": srv.base_url}, ctx)["text"]
        assert ctx.spent == [15, 15]
        srv.script(Status(429, {"error": {"message": "rate limited"}}, {"Retry-After": "7"}))
        with pytest.raises(Retry) as info:
            asyncio.run(llm.chat({"prompt": "hi", "base_url": srv.base_url}, ctx))
        assert info.value.pause_limit == ["openai"] and info.value.delay_s == 7
        assert ctx.spent == [15, 15, 0]  # a refused call used no tokens


LIMITS = '''
[limits."openai"]
concurrency = 4
tokens_per_minute = 60000

[types."llm.chat"]
limits = ["openai"]
estimated_tokens = 500
'''


@pytest.mark.timeout(90)
def test_a_429_pauses_the_provider_limit_for_every_task_of_it(tmp_path):
    with FakeOpenAI(Stream(text="fine")) as srv:
        toml = supervisor_config(["workers.handlers.llm"], extra=(
            f'[llm]\nbase_url = "{srv.base_url}"\n' + LIMITS))
        with SupervisorProcess(tmp_path, toml) as proc:
            srv.script(Status(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"}))
            first = proc.queue.enqueue("llm.chat", {"prompt": "a"})
            wait_until(lambda: proc.queue.get(first).outcome == "rescheduled", timeout=20)
            paused = next(r for r in proc.queue.limits() if r["key"] == "openai")
            assert paused["blocked_by"] == "paused" and "429" in paused["pause_reason"]
            second = proc.queue.enqueue("llm.chat", {"prompt": "b"})
            done = [proc.wait(first), proc.wait(second)]
            assert [t.status for t in done] == ["succeeded", "succeeded"]
            assert len(srv.requests) == 3  # nobody asked the server during the pause
            assert min(t.history[-1].started_at for t in done) >= paused["paused_until"] - 0.05
            row = next(r for r in proc.queue.limits() if r["key"] == "openai")
            # Charged 500 at each claim, corrected to what each call used: a few tokens for
            # the two answers, none for the refused one.
            assert row["available"]["tokens"] > 1000 - 100
