"""The job body every peer of inflight_bench.py runs: wait S seconds, and count itself in Redis.

Not a test. `kind` is "sleep" (a sleep of `s` seconds) or "chat" (one streamed chat
completion from the benchmark's local OpenAI-compatible server, which answers in a fixed
time). Each job increments `{run}:started` when entered and `{run}:done` when finished,
sets `{run}:first` (first entry) and `{run}:last` (when the last of `total` finished),
and counts failures in `{run}:errors` (a failed job still counts as done): the
benchmark reads its window and the number in flight from these keys. The sync body runs
in Celery (threads, prefork) and Dramatiq (gevent); the async one in arq.
"""

from __future__ import annotations

import json
import os
import time

import httpx

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MESSAGES = [{"role": "user", "content": "Say hello."}]
_client = None
_client_pid = None


def redis_client():
    """One client per process (a forked pool process must not share its parent's sockets)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        import redis
        # Thousands of threads or greenlets share one client: a bounded pool that waits
        # for a free connection (redis-py's default pool raises "Too many connections").
        pool = redis.BlockingConnectionPool.from_url(URL, max_connections=64, timeout=60)
        _client, _client_pid = redis.Redis(connection_pool=pool), os.getpid()
    return _client


def _text(lines) -> str:
    parts = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data.strip() == "[DONE]":
            break
        for choice in json.loads(data).get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def _body() -> dict:
    return {"model": "fake-model", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}


def chat_sync(base_url: str) -> str:
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/chat/completions", json=_body()) as resp:
            resp.raise_for_status()
            return _text(resp.iter_lines())


async def chat_async(base_url: str) -> str:
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{base_url}/chat/completions", json=_body()) as resp:
            resp.raise_for_status()
            return _text([line async for line in resp.aiter_lines()])


def started(r, run: str, t: float) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.setnx(f"{run}:first", t)
    pipe.incr(f"{run}:started")
    pipe.execute()


def work_sync(run: str, total: int, kind: str, s: float, base_url: str | None) -> None:
    r = redis_client()
    started(r, run, time.time())
    try:
        if kind == "chat":
            chat_sync(base_url)
        else:
            time.sleep(s)
    except Exception:
        r.incr(f"{run}:errors")
        raise
    finally:
        if r.incr(f"{run}:done") == total:
            r.set(f"{run}:last", time.time())


async def work_async(r, run: str, total: int, kind: str, s: float, base_url: str | None) -> None:
    import asyncio
    t = time.time()
    pipe = r.pipeline(transaction=False)
    pipe.setnx(f"{run}:first", t)
    pipe.incr(f"{run}:started")
    await pipe.execute()
    try:
        if kind == "chat":
            await chat_async(base_url)
        else:
            await asyncio.sleep(s)
    except Exception:
        await r.incr(f"{run}:errors")
        raise
    finally:
        if await r.incr(f"{run}:done") == total:
            await r.set(f"{run}:last", time.time())
