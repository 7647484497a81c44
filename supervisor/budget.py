"""Named limits as pure arithmetic: which `[limits]` entry a key draws from, token
buckets, room for one more claim, and what a key has left.

A key ("openai", "tenant:42") matches a `[limits."NAME"]` entry by name, else the
longest `prefix:*` pattern it starts with; each concrete key has its own budget. A
request bucket holds `burst` (default: one second's share of requests_per_minute,
at least 1) and refills at rpm/60 per second; a claim takes 1. A token bucket holds one
second's share of tokens_per_minute and refills at tpm/60 per second; a claim needs it
above zero and takes the task's estimate, which may leave it in debt (a call larger
than the bucket still runs, and the debt holds the next ones back until it is repaid),
and `ctx.spend` corrects it by the difference. Every function takes `now` and returns
values: nothing here reads a clock, the database or the config file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

KINDS = ("requests", "tokens", "concurrency")
EPSILON = 1e-9  # float slack: a bucket refilled to exactly 1 request reads 0.99999…


@dataclass(frozen=True)
class LimitSpec:
    """One `[limits."NAME"]` entry; None: that dimension is not limited."""
    name: str
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrency: int | None = None
    burst: float | None = None
    estimated_tokens: int | None = None  # charged when neither task nor type nor payload says

    @property
    def request_capacity(self) -> float | None:
        if self.requests_per_minute is None:
            return None
        return float(self.burst) if self.burst is not None else max(1.0, self.requests_per_minute / 60)

    @property
    def token_capacity(self) -> float | None:
        return None if self.tokens_per_minute is None else self.tokens_per_minute / 60


@dataclass(frozen=True)
class KeyState:
    """A row of limit_state: bucket levels as of `updated_at` (None: full)."""
    key: str
    running: int = 0
    requests: float | None = None
    tokens: float | None = None
    updated_at: float | None = None
    paused_until: float | None = None
    pause_reason: str | None = None


class Limits:
    """The `[limits]` table of a config: key -> LimitSpec by name or `prefix:*`."""

    def __init__(self, specs: Mapping[str, LimitSpec]):
        self.specs = dict(specs)
        self._exact = {n: s for n, s in self.specs.items() if not n.endswith("*")}
        # Longest prefix first, so "tenant:eu:*" wins over "tenant:*".
        self._patterns = sorted(((n[:-1], s) for n, s in self.specs.items() if n.endswith("*")),
                                key=lambda p: -len(p[0]))
        self._cache: dict[str, LimitSpec | None] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def spec(self, key: str) -> LimitSpec | None:
        """The entry `key` draws from, or None (a key no entry names is not limited)."""
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._exact.get(key)
        if found is None:
            found = next((s for prefix, s in self._patterns if key.startswith(prefix)), None)
        if len(self._cache) < 100_000:
            self._cache[key] = found
        return found


def group_text(keys: Iterable[str]) -> str | None:
    """The canonical text of a set of keys (tasks.limit_keys): sorted, distinct, JSON."""
    unique = sorted(set(keys))
    return json.dumps(unique, ensure_ascii=False, separators=(",", ":")) if unique else None


def group_keys(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def _level(level: float | None, capacity: float, rate_per_s: float, then: float | None,
           now: float) -> float:
    if level is None or then is None:
        return capacity
    return min(capacity, level + rate_per_s * max(0.0, now - then))


def levels(spec: LimitSpec, state: KeyState, now: float) -> tuple[float | None, float | None]:
    """(request level, token level) at `now`; None for a dimension not limited."""
    req = tok = None
    if spec.request_capacity is not None:
        req = _level(state.requests, spec.request_capacity, spec.requests_per_minute / 60,
                     state.updated_at, now)
    if spec.token_capacity is not None:
        tok = _level(state.tokens, spec.token_capacity, spec.tokens_per_minute / 60,
                     state.updated_at, now)
    return req, tok


def blocked_by(spec: LimitSpec | None, state: KeyState, now: float) -> str | None:
    """Why the key has no room for one more claim ("paused", "concurrency", "requests",
    "tokens"), or None when it has room."""
    if state.paused_until is not None and now < state.paused_until:
        return "paused"
    if spec is None:
        return None
    if spec.concurrency is not None and state.running >= spec.concurrency:
        return "concurrency"
    req, tok = levels(spec, state, now)
    if req is not None and req < 1.0 - EPSILON:
        return "requests"
    if tok is not None and tok <= 0.0:
        return "tokens"
    return None


def estimate(task_estimate: int | None, spec: LimitSpec | None) -> int:
    """Tokens a claim charges a key: the task's estimate, else the limit's default."""
    if task_estimate is not None:
        return task_estimate
    return (spec.estimated_tokens or 0) if spec is not None else 0


def charge(spec: LimitSpec, state: KeyState, now: float, tokens: int) -> tuple[float | None, float | None]:
    """The (request level, token level) after one claim that estimates `tokens`."""
    req, tok = levels(spec, state, now)
    return (None if req is None else req - 1.0, None if tok is None else tok - tokens)


def correct(spec: LimitSpec, state: KeyState, now: float, delta: float) -> float | None:
    """The token level after giving back `delta` tokens (estimate minus what was spent;
    negative when the call used more), never above the bucket."""
    _, tok = levels(spec, state, now)
    return None if tok is None else min(spec.token_capacity, tok + delta)


def wait_s(spec: LimitSpec | None, state: KeyState, now: float) -> float:
    """Seconds until the key has room again as far as time alone decides (a pause, an
    empty bucket); 0 when it has room, inf when only a running task ending can free it."""
    why = blocked_by(spec, state, now)
    if why is None:
        return 0.0
    if why == "paused":
        return state.paused_until - now
    if why == "concurrency":
        return math.inf
    req, tok = levels(spec, state, now)
    if why == "requests":
        return (1.0 - req) / (spec.requests_per_minute / 60)
    return (1e-9 - tok) / (spec.tokens_per_minute / 60)


def available(spec: LimitSpec | None, state: KeyState, now: float) -> dict[str, float | None]:
    """What the key has left per kind (requests, tokens, concurrency); None: not limited."""
    if spec is None:
        return {k: None for k in KINDS}
    req, tok = levels(spec, state, now)
    conc = None if spec.concurrency is None else max(0, spec.concurrency - state.running)
    return {"requests": None if req is None else max(0.0, math.floor(req * 1000) / 1000),
            "tokens": None if tok is None else math.floor(tok),
            "concurrency": conc}


def free_groups(groups: Sequence[str], states: Mapping[str, KeyState], limits: Limits,
                now: float) -> list[str]:
    """The groups (limit_keys texts) whose every key has room now."""
    verdict: dict[str, bool] = {}
    out = []
    for group in groups:
        ok = True
        for key in group_keys(group):
            room = verdict.get(key)
            if room is None:
                room = verdict[key] = blocked_by(limits.spec(key), states.get(key) or KeyState(key),
                                                 now) is None
            if not room:
                ok = False
                break
        if ok:
            out.append(group)
    return out
