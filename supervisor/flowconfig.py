"""The `[limits."NAME"]` and `[schedules."NAME"]` sections of the config file.

Owns checking those tables (every problem is appended to the caller's error list with
the file, the section and the key), turning them into `budget.LimitSpec` and
`ScheduleSpec` values, and writing them back as TOML for `check-config`. Cron
expressions are parsed by cronsim and time zones by zoneinfo, here, so a bad one is a
config error naming its key. Runs in the CLI and the supervisor; it never opens the
database.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor import names
from supervisor.budget import LimitSpec

CATCH_UP = ("skip", "one")
_LIMIT_KEYS = ("requests_per_minute", "tokens_per_minute", "concurrency", "burst",
               "estimated_tokens")
_SCHEDULE_KEYS = ("cron", "every", "timezone", "type", "payload", "catch_up", "priority")
KEY_RE = re.compile(r"[!-)+-~]{1,200}")  # printable ASCII: no space, no control, no "*"
MAX_KEYS = 16  # limit keys per task
MAX_PRIORITY = 1_000_000_000  # as [defaults] priority
MAX_EVERY_S = 100 * 365 * 86400.0  # a fire time past this could not be shown (year 10000)
MAX_CONCURRENCY = 1_000_000  # as [types] concurrency and [supervisor] pool_size
MAX_TOKENS = 10 ** 12        # as [types] estimated_tokens
# (minimum, maximum) of each [limits] number. Without a maximum, concurrency = 10^20 or
# requests_per_minute = 1e300 passed and `taskvisor limits` printed 300-digit budgets;
# these are far above any provider's limits (a billion requests a minute).
LIMIT_RANGES: dict[str, tuple[int, int]] = {
    "requests_per_minute": (1, 10 ** 9),
    "tokens_per_minute": (1, MAX_TOKENS),
    "concurrency": (1, MAX_CONCURRENCY),
    "burst": (1, 10 ** 9),
    "estimated_tokens": (0, MAX_TOKENS),
}


@dataclass(frozen=True)
class ScheduleSpec:
    """One `[schedules."NAME"]` entry: a cron expression (five fields) or a period."""
    name: str
    type: str
    cron: str | None = None
    every_s: float | None = None
    timezone: str = "UTC"
    payload: dict = field(default_factory=dict, compare=False)
    catch_up: str = "skip"
    priority: int | None = None

    def __hash__(self) -> int:
        return hash((self.name, self.type, self.cron, self.every_s, self.timezone))

    def __eq__(self, other) -> bool:
        return isinstance(other, ScheduleSpec) and (
            self.name, self.type, self.cron, self.every_s, self.timezone, self.catch_up,
            self.priority, json.dumps(self.payload, sort_keys=True)) == (
            other.name, other.type, other.cron, other.every_s, other.timezone, other.catch_up,
            other.priority, json.dumps(other.payload, sort_keys=True))


def check_limit_name(name: str) -> str | None:
    """Why `name` is not a valid limit key or `prefix:*` pattern, or None."""
    pattern = name.endswith("*")
    core = name[:-1] if pattern else name
    if not core or not KEY_RE.fullmatch(core):
        return ("a limit name is 1-200 characters without spaces, or a pattern "
                '"prefix:*" (a * only at the end, after a non-empty prefix)')
    return None


def check_limits(data: Any, label: str, errors: list[str]) -> dict[str, LimitSpec]:
    out: dict[str, LimitSpec] = {}
    if not isinstance(data, dict):
        errors.append(f"{label}: [limits]: expected tables like [limits.\"openai\"]")
        return out
    for name, table in data.items():
        where = f"{label}: [limits.{_quote(name)}]"
        why = check_limit_name(name)
        if why:
            errors.append(f"{where}: {why}")
            continue
        if not isinstance(table, dict):
            errors.append(f"{where}: expected a table of settings")
            continue
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in _LIMIT_KEYS:
                errors.append(f"{where} {key}: unknown key (expected some of {', '.join(_LIMIT_KEYS)})")
                continue
            integer = key in ("concurrency", "estimated_tokens")
            bad = _number(value, integer=integer, bounds=LIMIT_RANGES[key])
            if bad:
                errors.append(f"{where} {key}: {bad}")
            else:
                values[key] = value
        if not table.keys() & {"requests_per_minute", "tokens_per_minute", "concurrency"}:
            errors.append(f"{where}: sets no limit: give requests_per_minute, "
                          "tokens_per_minute or concurrency")
            continue
        if len(values) < len(table):
            continue
        if "burst" in values and "requests_per_minute" not in values:
            errors.append(f"{where} burst: only applies with requests_per_minute")
        if values.get("estimated_tokens", 0) > values.get("tokens_per_minute", math.inf):
            errors.append(f"{where} estimated_tokens: {values['estimated_tokens']} is more than "
                          f"tokens_per_minute ({values['tokens_per_minute']:g}): a task charged "
                          "it could never run within the limit")
        out[name] = LimitSpec(name=name, **values)
    return out


def check_schedules(data: Any, label: str, errors: list[str]) -> dict[str, ScheduleSpec]:
    out: dict[str, ScheduleSpec] = {}
    if not isinstance(data, dict):
        errors.append(f"{label}: [schedules]: expected tables like [schedules.\"nightly\"]")
        return out
    for name, table in data.items():
        where = f"{label}: [schedules.{_quote(name)}]"
        if not name.strip() or len(name) > 200:
            errors.append(f"{where}: a schedule name is 1-200 characters")
            continue
        if not isinstance(table, dict):
            errors.append(f"{where}: expected a table of settings")
            continue
        before = len(errors)
        for key in table:
            if key not in _SCHEDULE_KEYS:
                errors.append(f"{where} {key}: unknown key (expected some of {', '.join(_SCHEDULE_KEYS)})")
        kind = table.get("type")
        if not isinstance(kind, str) or not kind.strip():
            errors.append(f"{where} type: required, the task type to enqueue (a string)")
        elif why := names.problem(kind):
            # what enqueue refuses would fail every fire, and hold up the other schedules
            errors.append(f"{where} type: {why}")
        tz = table.get("timezone", "UTC")
        if not _valid_zone(tz):
            errors.append(f"{where} timezone: unknown time zone {_quote(str(tz))} "
                          '(use an IANA name such as "UTC" or "Europe/Lisbon")')
        cron, every = table.get("cron"), table.get("every")
        every_s = None
        if (cron is None) == (every is None):
            errors.append(f"{where}: give exactly one of cron (five fields, e.g. \"0 3 * * *\") "
                          'or every (e.g. "30s")')
        elif cron is not None:
            why = _cron_error(cron)
            if why:
                errors.append(f"{where} cron: {why}")
        else:
            every_s = _every(every)
            if every_s is None:
                errors.append(f"{where} every: expected a duration from 1s to "
                              f'{MAX_EVERY_S / 86400:g}d such as "30s", "5m", "1h", '
                              f"got {_quote(str(every))}")
        payload = table.get("payload", {})
        if not isinstance(payload, dict):
            errors.append(f"{where} payload: expected a table (e.g. payload = {{ kind = \"daily\" }})")
        elif why := _not_json(payload):
            errors.append(f"{where} payload: {why}")
        catch_up = table.get("catch_up", "skip")
        if catch_up not in CATCH_UP:
            errors.append(f"{where} catch_up: expected \"skip\" or \"one\", got {_quote(str(catch_up))}")
        priority = table.get("priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                     or not -MAX_PRIORITY <= priority <= MAX_PRIORITY):
            errors.append(f"{where} priority: expected an integer from {-MAX_PRIORITY} "
                          f"to {MAX_PRIORITY}, got {priority!r}")
        if len(errors) == before:
            out[name] = ScheduleSpec(name=name, type=kind, cron=cron, every_s=every_s,
                                     timezone=tz, payload=payload, catch_up=catch_up,
                                     priority=priority)
    return out


def check_type_limits(value: Any) -> tuple[str, ...]:
    """The `limits` of a [types."x"] table; raises ValueError saying what is wrong."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError('expected a list of limit names, e.g. limits = ["openai"]')
    for item in items:
        if item.endswith("*") or check_limit_name(item):
            raise ValueError(f"{_quote(item)} is not a limit key (a name without spaces; "
                             "a pattern is matched by concrete keys, not named here)")
    return tuple(dict.fromkeys(items))


def unmatched_type_limits(types: dict, limits: dict[str, LimitSpec], label: str) -> list[str]:
    from supervisor.budget import Limits
    table = Limits(limits)
    return [f"{label}: [types.{_quote(name)}] limits: {_quote(key)} matches no "
            f"[limits] entry (define [limits.{_quote(key)}])"
            for name, tc in types.items() for key in (tc.limits or ()) if table.spec(key) is None]


def oversized_estimates(types: dict, limits: dict[str, LimitSpec],
                        schedules: dict[str, ScheduleSpec], label: str) -> list[str]:
    """A [types] estimated_tokens, or the max_tokens of a schedule's payload, over the
    tokens_per_minute of one of the type's limits (over_budget): enqueue would refuse
    every task of the type, or every fire of the schedule."""
    from supervisor.budget import Limits
    table = Limits(limits)
    out = []
    for name, tc in types.items():
        over = over_budget(tuple(tc.limits or ()), tc.estimated_tokens, table)
        if over is not None and tc.estimated_tokens is not None:
            key, spec, tokens = over
            out.append(f"{label}: [types.{_quote(name)}] estimated_tokens: {tokens} is more "
                       f"than limit {_quote(key)} allows in a minute (tokens_per_minute = "
                       f"{spec.tokens_per_minute:g})")
    for name, spec in schedules.items():
        tc = types.get(spec.type)
        if tc is None or tc.estimated_tokens is not None:
            continue  # no limits, or the type's own estimate (named above)
        estimated = task_estimate(tc, spec.payload)
        over = over_budget(tuple(tc.limits or ()), estimated, table)
        if over is not None and estimated is not None:
            key, limit, tokens = over
            out.append(f"{label}: [schedules.{_quote(name)}] payload: max_tokens {tokens} is "
                       f"more than limit {_quote(key)} of type {_quote(spec.type)} allows in a "
                       f"minute (tokens_per_minute = {limit.tokens_per_minute:g})")
    return out


def task_estimate(type_config, payload: Any) -> int | None:
    """The token estimate of a task with no estimate of its own: its type's, else the
    payload's output cap (what a model call may produce at most): the largest of
    max_tokens and max_completion_tokens, at its top level or in its `options` (llm.chat
    sends each as given, and a server may honour either)."""
    if type_config is not None and type_config.estimated_tokens is not None:
        return type_config.estimated_tokens
    if isinstance(payload, Mapping):
        options = payload.get("options")
        caps = [cap for where in (payload, options if isinstance(options, Mapping) else {})
                for key in ("max_tokens", "max_completion_tokens")
                if isinstance(cap := where.get(key), int) and not isinstance(cap, bool) and cap >= 0]
        if caps:
            return max(caps)
    return None


def over_budget(keys: tuple[str, ...], estimated: int | None, table) -> tuple | None:
    """(key, its LimitSpec, tokens) of the first key whose limit a task estimating
    `estimated` tokens (None: each limit's own estimate) would charge more than its
    tokens_per_minute, else None. Such a task could never run within the limit (a
    provider refuses the request too), and its charge would close the limit to every
    other task for as many minutes as it overshoots, or for good if it reports no spend."""
    from supervisor.budget import estimate
    for key in keys:
        spec = table.spec(key)
        if spec is None or spec.tokens_per_minute is None:
            continue
        tokens = estimate(estimated, spec)
        if tokens > spec.tokens_per_minute:
            return key, spec, tokens
    return None


def oversized_payloads(schedules: dict[str, ScheduleSpec], max_bytes: int,
                       label: str) -> list[str]:
    """A schedule payload enqueue would refuse as over [supervisor] max_payload_bytes."""
    out = []
    for name, spec in schedules.items():
        size = len(json.dumps(spec.payload, ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            out.append(f"{label}: [schedules.{_quote(name)}] payload: {size} bytes, over "
                       f"[supervisor] max_payload_bytes ({max_bytes})")
    return out


def dump(limits: dict[str, LimitSpec], schedules: dict[str, ScheduleSpec]) -> list[str]:
    lines: list[str] = []
    for name, spec in limits.items():
        lines.append(f"[limits.{_quote(name)}]")
        for key in _LIMIT_KEYS:
            if (value := getattr(spec, key)) is not None:
                lines.append(f"{key} = {value!r}")
        lines.append("")
    for name, s in schedules.items():
        lines.append(f"[schedules.{_quote(name)}]")
        if s.cron is not None:
            lines.append(f"cron = {_quote(s.cron)}")
        else:
            lines.append(f"every = {_quote(f'{s.every_s:g}s')}")
        lines += [f"timezone = {_quote(s.timezone)}", f"type = {_quote(s.type)}",
                  f"payload = {_inline(s.payload)}", f"catch_up = {_quote(s.catch_up)}"]
        if s.priority is not None:
            lines.append(f"priority = {s.priority}")
        lines.append("")
    return lines


def _number(value: Any, *, integer: bool, bounds: tuple[int, int]) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"expected {'an integer' if integer else 'a number'}, got {value!r}"
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        return f"must be from {low} to {high}, got {value!r}"
    return None


def _valid_zone(name: Any) -> bool:
    if not isinstance(name, str) or not name:
        return False
    import zoneinfo
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _cron_error(expr: Any) -> str | None:
    if not isinstance(expr, str):
        return f"expected a string of five fields, got {expr!r}"
    if len(expr.split()) != 5:
        return (f"expected five fields (minute hour day-of-month month day-of-week), "
                f"got {_quote(expr)}")
    import datetime as dt

    import cronsim
    try:
        cronsim.CronSim(expr, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    except cronsim.CronSimError as exc:
        return f"invalid cron expression {_quote(expr)}: {exc}"
    return None


def _every(value: Any) -> float | None:
    from supervisor.config import parse_duration
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        try:
            seconds = parse_duration(value)
        except ValueError:
            return None
    return seconds if math.isfinite(seconds) and 1 <= seconds <= MAX_EVERY_S else None


def _not_json(payload: dict) -> str | None:
    """Why a schedule's payload cannot be a task's JSON payload (a TOML date or time,
    nan or inf), or None: checked here, not at the first fire."""
    try:
        json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return (f"not JSON ({exc}); use strings for dates and times, and finite numbers")
    return None


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _inline(value: Any) -> str:
    """A TOML inline value for a payload (tables, arrays, strings, numbers, booleans)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_quote(k)} = {_inline(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return _quote(str(value))
