"""Loading and validating taskvisor's TOML config.

Owns the config format: finding the file, parsing it with the standard library's
``tomllib``, applying ``TASKVISOR_<SECTION>__<KEY>`` environment overrides, checking every
key and value (every problem is collected and raised as one ``ConfigError``), and writing
the effective config back out as TOML. Runs in the supervisor and the CLI, before fork.
It must never open the database or import user code: a handler is checked for its
``module:function`` form only, and preload modules are imported by the fork server.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from supervisor.budget import LimitSpec, Limits
from supervisor.errors import ConfigError
from supervisor.flowconfig import ScheduleSpec
from supervisor import flowconfig


@dataclass(frozen=True)
class SupervisorConfig:
    database: Path
    pool_size: int = 4
    preload: tuple[str, ...] = ()
    lease_s: float = 30.0
    poll_interval_s: float = 1.0
    shutdown_grace_s: float = 30.0
    kill_grace_s: float = 5.0
    boot_timeout_s: float = 10.0
    memory_budget_mb: int | None = None
    synchronous: str = "NORMAL"
    busy_timeout_s: float = 5.0
    max_payload_bytes: int = 1048576
    max_result_bytes: int = 1048576
    retain_finished: float | None = 14 * 86400.0  # seconds; None: "forever"
    max_output_bytes: int = 1048576     # ctx.stream output kept per task
    max_log_bytes: int = 262144         # stdout/stderr tail kept per attempt


@dataclass(frozen=True)
class Defaults:
    timeout_s: float | None = 3600.0
    memory_mb: int | None = None
    cpu_s: float | None = None
    open_files: int | None = 1024
    max_attempts: int = 3
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    priority: int = 0
    max_reschedules: int = 25
    nice: int = 10      # task processes run this much below the supervisor's CPU priority


@dataclass(frozen=True)
class TypeConfig:
    """Per-type settings; None means "use [defaults]"."""

    handler: str | None = None
    concurrency: int | None = None
    timeout_s: float | None = None
    memory_mb: int | None = None
    cpu_s: float | None = None
    open_files: int | None = None
    max_attempts: int | None = None
    backoff_initial_s: float | None = None
    backoff_max_s: float | None = None
    priority: int | None = None
    max_reschedules: int | None = None
    nice: int | None = None
    limits: tuple[str, ...] | None = None   # [limits] keys every task of the type draws from
    estimated_tokens: int | None = None     # what a claim charges token budgets per task


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"      # "host:port", "unix:/path", or "" for off
    token_file: Path | None = None
    events_retention: float = 600.0     # seconds the event log keeps events
    allow_origins: tuple[str, ...] = () # CORS: origins allowed to call the API


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class LlmConfig:
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout_s: float = 600.0
    stall_timeout_s: float = 60.0
    relay: bool = True                  # calls made by one relay process (workers.relay)
    run_in_relay: bool = True           # llm.chat attempts hosted by it: no process each
    relays: int = 0                     # relay processes at most; 0: one per CPU, up to 8


@dataclass(frozen=True)
class Config:
    path: Path | None
    supervisor: SupervisorConfig
    defaults: Defaults
    types: Mapping[str, TypeConfig]
    http: HttpConfig
    log: LogConfig
    llm: LlmConfig
    limits: Mapping[str, LimitSpec] = dataclasses.field(default_factory=dict)
    schedules: Mapping[str, ScheduleSpec] = dataclasses.field(default_factory=dict)
    # The database was named by the caller (--db, Queue(path)), not by the config file:
    # a reload then has no reason to look at the file's [supervisor] database.
    database_pinned: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "types", MappingProxyType(dict(self.types)))
        object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))
        object.__setattr__(self, "schedules", MappingProxyType(dict(self.schedules)))

    def __reduce__(self):
        # A mappingproxy cannot be pickled; rebuild from a plain dict.
        return (Config, (self.path, self.supervisor, self.defaults, dict(self.types),
                         self.http, self.log, self.llm, dict(self.limits), dict(self.schedules),
                         self.database_pinned))

    def limit_table(self) -> Limits:
        """The [limits] entries, matching keys by name or `prefix:*` (built once per
        config: the claim asks on every call)."""
        cached = _limit_tables.get(id(self.limits))
        if cached is None or cached[0] is not self.limits:
            if len(_limit_tables) > 16:
                _limit_tables.clear()
            cached = _limit_tables[id(self.limits)] = (self.limits, Limits(self.limits))
        return cached[1]

    def type_limits(self, type_name: str) -> tuple[str, ...]:
        return self.types.get(type_name, _NO_TYPE).limits or ()

    def setting(self, type_name: str, key: str) -> Any:
        """The type's value for a [defaults] key, else the default. KeyError for other keys."""
        if key not in _DEFAULT_KEYS:
            raise KeyError(f"{key!r} is not a [defaults] setting")
        value = getattr(self.types.get(type_name, _NO_TYPE), key)
        return getattr(self.defaults, key) if value is None else value

    def origin(self, type_name: str, key: str) -> str:
        """Where `setting(type_name, key)` comes from: '[types."NAME"]' or '[defaults]'."""
        if getattr(self.types.get(type_name, _NO_TYPE), key) is not None:
            return f"[types.{toml_string(type_name)}]"
        return "[defaults]"

    def concurrency_caps(self) -> dict[str, int]:
        return {n: t.concurrency for n, t in self.types.items() if t.concurrency is not None}

    def with_database(self, path: str | os.PathLike, *, pinned: bool = True) -> Config:
        """A copy using another database file; a relative path is taken from the cwd.
        `pinned`: the caller named it (--db), so the file's database no longer counts."""
        database = _absolute(path, Path.cwd())
        return dataclasses.replace(
            self, supervisor=dataclasses.replace(self.supervisor, database=database),
            database_pinned=pinned)


_NO_TYPE = TypeConfig()
_limit_tables: dict[int, tuple] = {}  # id of a config's limits -> (that mapping, its Limits)
_DEFAULT_KEYS = frozenset(f.name for f in dataclasses.fields(Defaults))


@dataclass(frozen=True)
class _Field:
    kind: str  # int | seconds | str | path | modules | origins | handler | listen | url | envname
    minimum: float | None = None
    above: bool = False  # the minimum itself is out of range
    maximum: float | None = None
    hint: str = ""  # appended to a range error
    null: str | None = None  # the word meaning "not set" ("none", "auto"), if allowed
    choices: tuple[str, ...] = ()


# Every number has a range: a value past it used to pass here and then crash `run` (an
# OverflowError in setrlimit, SQLite's busy timeout or a selector) or quietly misbehave.
# Maxima are far above any sane setting, well inside what the calls that use them take.
HOUR_S, DAY_S, YEAR_S = 3600.0, 86400.0, 365 * 86400.0
MAX_MB = 1 << 30                   # 1 PiB in MiB; MiB * 2**20 still fits an rlimit
MAX_BYTES = 1 << 30                # 1 GiB: SQLite's default limit on one value is 1e9
MIN_LEASE_S = 2.0                  # leases are renewed every lease_s / 3, with a margin
_POSITIVE_S = _Field("seconds", 0, above=True, maximum=HOUR_S)
_SECTIONS: dict[str, dict[str, _Field]] = {
    "supervisor": {
        "database": _Field("path"),
        "pool_size": _Field("int", 1, maximum=1_000_000),
        "preload": _Field("modules"),
        "lease_s": _Field("seconds", MIN_LEASE_S, maximum=DAY_S, hint=(
            f" (the minimum is {MIN_LEASE_S:g} s: a lease is renewed every lease_s / 3 and "
            "a task stops a safety margin before its lease could expire)")),
        "poll_interval_s": _POSITIVE_S,
        "shutdown_grace_s": _Field("seconds", 0, maximum=DAY_S),
        "kill_grace_s": _Field("seconds", 0, maximum=HOUR_S),
        "boot_timeout_s": _POSITIVE_S,
        "memory_budget_mb": _Field("int", 1, null="auto", maximum=MAX_MB),
        "synchronous": _Field("str", choices=("NORMAL", "FULL")),
        "busy_timeout_s": _Field("seconds", 0, maximum=HOUR_S),
        "max_payload_bytes": _Field("int", 1, maximum=MAX_BYTES),
        "max_result_bytes": _Field("int", 1, maximum=MAX_BYTES),
        "retain_finished": _Field("seconds", 0, above=True, null="forever", maximum=100 * YEAR_S),
        "max_output_bytes": _Field("int", 1, maximum=MAX_BYTES),
        "max_log_bytes": _Field("int", 1, maximum=MAX_BYTES),
    },
    "defaults": {
        "timeout_s": _Field("seconds", 0, above=True, null="none", maximum=YEAR_S),
        "memory_mb": _Field("int", 1, null="none", maximum=MAX_MB),
        "cpu_s": _Field("seconds", 0, above=True, null="none", maximum=YEAR_S),
        "open_files": _Field("int", 1, null="none", maximum=1 << 20),
        "max_attempts": _Field("int", 1, maximum=1_000_000),
        "backoff_initial_s": _Field("seconds", 0, maximum=DAY_S),
        "backoff_max_s": _Field("seconds", 0, maximum=7 * DAY_S),
        "priority": _Field("int", -1_000_000_000, maximum=1_000_000_000),
        "max_reschedules": _Field("int", 0, maximum=1_000_000),
        "nice": _Field("int", 0, maximum=19, hint=(
            " (steps below the supervisor's CPU priority: 0 runs tasks at the supervisor's, "
            "19 lowest; a task cannot be raised above the supervisor)")),
    },
    "http": {"listen": _Field("listen"), "token_file": _Field("path"),
             "events_retention": _Field("seconds", 0, above=True, maximum=7 * DAY_S),
             "allow_origins": _Field("origins")},
    "log": {
        "level": _Field("str", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        "format": _Field("str", choices=("text", "json")),
    },
    "llm": {
        "base_url": _Field("url"),
        "model": _Field("str"),
        "api_key_env": _Field("envname"),
        "request_timeout_s": _Field("seconds", 0, above=True, maximum=DAY_S),
        "stall_timeout_s": _Field("seconds", 0, above=True, maximum=DAY_S),
        "relay": _Field("bool"),
        "run_in_relay": _Field("bool"),
        "relays": _Field("int", 0, maximum=64),
    },
}
# A type cannot say "none": None in a TypeConfig means "fall back to [defaults]".
_TYPE_FIELDS: dict[str, _Field] = {
    "handler": _Field("handler"),
    "concurrency": _Field("int", 1, maximum=flowconfig.MAX_CONCURRENCY),
    **{k: dataclasses.replace(f, null=None) for k, f in _SECTIONS["defaults"].items()},
    "limits": _Field("limitkeys"),
    "estimated_tokens": _Field("int", 0, maximum=flowconfig.MAX_TOKENS),
}
_SECTION_CLASSES = {"supervisor": SupervisorConfig, "defaults": Defaults,
                    "http": HttpConfig, "log": LogConfig, "llm": LlmConfig}
_ENV_PREFIX = "TASKVISOR_"
_NAME = r"(?!\d)\w+(?:\.(?!\d)\w+)*"
_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})", re.ASCII)
_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.ASCII)


def parse_duration(text: str) -> float:
    """Seconds in "30", "30s", "500ms", "5m", "2h", "7d", "1w", "1.5h"; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None or match.group(2) not in _UNITS or not math.isfinite(float(match.group(1))):
        raise ValueError(f"invalid duration {text!r}: expected a number of seconds with an "
                         "optional unit ms, s, m, h, d or w (e.g. 30, 30s, 5m, 1.5h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def find(explicit: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The config file to use: ``explicit``, else $TASKVISOR_CONFIG, else ./taskvisor.toml if
    present, else None (built-in defaults). Raises ConfigError if a named file is missing."""
    env = os.environ if env is None else env
    if explicit is not None and os.fspath(explicit) != "":
        return _existing(explicit, "")
    if env.get("TASKVISOR_CONFIG"):
        return _existing(env["TASKVISOR_CONFIG"], " (named by TASKVISOR_CONFIG)")
    local = Path.cwd() / "taskvisor.toml"
    return local if local.is_file() else None


def load(path: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> Config:
    """Read, check and return the config; None means built-in defaults. Environment overrides
    (``env``, default ``os.environ``) apply either way. Raises ConfigError listing every problem."""
    env = os.environ if env is None else env
    if path is None:
        file, label, base, data = None, "<defaults>", Path.cwd(), {}
    else:
        file = _absolute(path, Path.cwd())
        label, base, data = str(file), file.parent, _read(file)
    errors: list[str] = []
    values, types = _check_document(data, label, base, errors)
    limits = flowconfig.check_limits(data.get("limits", {}), label, errors)
    schedules = flowconfig.check_schedules(data.get("schedules", {}), label, errors)
    for section, overrides in _env_overrides(env, errors).items():
        values[section].update(overrides)
    values["supervisor"].setdefault("database", _absolute("taskvisor.db", base))
    sections = {name: cls(**values[name]) for name, cls in _SECTION_CLASSES.items()}
    type_configs = {name: TypeConfig(**v) for name, v in types.items()}
    errors += flowconfig.unmatched_type_limits(type_configs, limits, label)
    errors += flowconfig.oversized_estimates(type_configs, limits, schedules, label)
    errors += flowconfig.oversized_payloads(schedules, sections["supervisor"].max_payload_bytes,
                                            label)
    _check_backoff(label, "[defaults]", sections["defaults"], Defaults(), errors)
    for name, tc in type_configs.items():
        _check_backoff(label, f"[types.{toml_string(name)}]", tc, sections["defaults"], errors)
    if errors:
        raise ConfigError(errors)
    return Config(path=file, types=type_configs, limits=limits, schedules=schedules, **sections)


# Read once by `run` (the database file and its connections, the HTTP server, the
# relay): a reload that changes them keeps the running value, and says so.
START_ONLY = (("supervisor", "database"), ("supervisor", "synchronous"),
              ("supervisor", "busy_timeout_s"),
              *(("http", f.name) for f in dataclasses.fields(HttpConfig)), ("llm", "relay"))


def start_only_changes(old: Config, new: Config) -> list[str]:
    """"[section] key" of each START_ONLY setting that differs between the running config
    `old` and `new` as read from the file. The database only counts when the running one
    came from the file too: under --db the file's [supervisor] database is not used."""
    return [f"[{section}] {key}" for section, key in START_ONLY
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
            and not (key == "database" and old.database_pinned)]


def dump(config: Config) -> str:
    """The effective config as TOML that ``load`` reads back to an equal Config."""
    origin = f"from {config.path}" if config.path else "built-in defaults"
    lines = [f"# Effective taskvisor config ({origin}, environment applied).", ""]
    for section in _SECTION_CLASSES:
        lines.append(f"[{section}]")
        for key, spec in _SECTIONS[section].items():
            value = getattr(getattr(config, section), key)
            if value is not None:
                lines.append(f"{key} = {_toml(value)}")
            elif spec.null:
                lines.append(f"{key} = {toml_string(spec.null)}")
            else:
                lines.append(f"# {key} is not set")
        lines.append("")
    for name, tc in config.types.items():
        lines.append(f"[types.{toml_string(name)}]")
        for key in _TYPE_FIELDS:
            if (value := getattr(tc, key)) is not None:
                lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    lines += flowconfig.dump(dict(config.limits), dict(config.schedules))
    return "\n".join(lines)


class _Bad(Exception):
    """One value failed its check; the message says why."""


def _read(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise ConfigError([f"{file}: cannot read config file: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"{file}: not UTF-8 text ({e.reason} at byte {e.start})"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{file}: TOML syntax error: {e}"]) from e


def _check_document(data: dict, label: str, base: Path, errors: list[str]):
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    types: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section in ("limits", "schedules"):
            continue  # flowconfig checks them
        if section not in _SECTIONS and section != "types":
            errors.append(f"{label}: {_unknown_top(section, table)}")
        elif not isinstance(table, dict):
            errors.append(f"{label}: [{section}]: expected a table, got {_describe(table)}")
        elif section != "types":
            _check_table(table, section, _SECTIONS[section], base, values[section],
                         lambda key, s=section: f"{label}: [{s}] {key}", errors)
    raw_types = data.get("types", {})
    for name, table in raw_types.items() if isinstance(raw_types, dict) else ():
        where = f"{label}: [types.{toml_string(name)}]"
        if not name.strip():
            errors.append(f"{where}: a type name must not be empty")
        elif not isinstance(table, dict):
            errors.append(f"{where}: expected a table of settings, got {_describe(table)}")
        else:
            _check_table(table, "types", _TYPE_FIELDS, base, types.setdefault(name, {}),
                         lambda key, w=where: f"{w} {key}", errors, type_name=name)
    return values, types


def _check_table(table: dict, section: str, specs: dict[str, _Field], base: Path,
                 out: dict, where, errors: list[str], type_name: str = "") -> None:
    for key, value in table.items():
        if key in specs:
            try:
                out[key] = _convert(specs[key], value, base)
            except _Bad as e:
                errors.append(f"{where(key)}: {e}")
        elif type_name and isinstance(value, dict):
            # [types.llm.chat] parses as type "llm" holding a table "chat".
            errors.append(f"{where(key)}: unknown key (a type name containing dots must be "
                          f"quoted: [types.{toml_string(type_name + '.' + key)}])")
        else:
            errors.append(f"{where(key)}: unknown key{_suggest(key, section)}")


def _unknown_top(name: str, value: Any) -> str:
    if not isinstance(value, dict) and (hint := _suggest(name, "")):
        return f"{name}: a key outside any section{hint}"
    close = difflib.get_close_matches(name, [*_SECTIONS, "types", "limits", "schedules"], n=1)
    return f"[{name}]: unknown section" + (f" (did you mean [{close[0]}]?)" if close else "")


def _suggest(key: str, section: str, env: bool = False) -> str:
    """' (did you mean …?)' naming the same key in another section, else a close one here."""
    tables = {**_SECTIONS, "types": _TYPE_FIELDS}
    found = next((other for other, specs in tables.items()
                  if other != section and key in specs), None)
    if found is None and (close := difflib.get_close_matches(key, list(tables.get(section, ())),
                                                             n=1)):
        found, key = section, close[0]
    if found is None or (env and found == "types"):
        return ""
    if env:
        return f" (did you mean {_env_name(found, key)}?)"
    title = '[types."NAME"] ' if found == "types" else f"[{found}] "
    return f" (did you mean {'' if found == section else title}{key}?)"


# Short names people expect for the model server (the double-underscore form wins).
_ALIASES = {"TASKVISOR_LLM_BASE_URL": ("llm", "base_url"), "TASKVISOR_LLM_MODEL": ("llm", "model")}


def _env_overrides(env: Mapping[str, str], errors: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for var in sorted(env, key=lambda v: (v.upper() not in _ALIASES, v)):
        if not var.upper().startswith(_ENV_PREFIX):
            continue
        rest = var[len(_ENV_PREFIX):].lower()
        where = f"environment: {var}"
        if var.upper() in _ALIASES:
            section, key = _ALIASES[var.upper()]
            try:
                out.setdefault(section, {})[key] = _convert(_SECTIONS[section][key], env[var], Path.cwd())
            except _Bad as e:
                errors.append(f"{where}: {e}")
            continue
        if "__" not in rest:
            for section, specs in _SECTIONS.items():
                if rest.startswith(section + "_") and rest[len(section) + 1:] in specs:
                    errors.append(f"{where}: section and key are separated by two underscores"
                                  f" (did you mean {_env_name(section, rest[len(section) + 1:])}?)")
            continue
        section, _, key = rest.partition("__")
        specs = _SECTIONS.get(section)
        if section == "types":
            errors.append(f"{where}: per-type settings cannot come from the environment; "
                          'set them under [types."NAME"] in the config file')
        elif specs is None:
            close = difflib.get_close_matches(section, list(_SECTIONS), n=1)
            hint = f" (did you mean {_env_name(close[0], key)}?)" if close else ""
            errors.append(f"{where}: unknown section {section!r}{hint}")
        elif key not in specs:
            errors.append(f"{where}: unknown key {key!r} in [{section}]"
                          f"{_suggest(key, section, env=True)}")
        else:
            try:
                out.setdefault(section, {})[key] = _convert(specs[key], _env_value(env[var]),
                                                            Path.cwd())
            except _Bad as e:
                errors.append(f"{where}: {e}")
    return out


def _env_name(section: str, key: str) -> str:
    return f"{_ENV_PREFIX}{section.upper()}__{key.upper()}"


def _env_value(text: str) -> Any:
    """A TOML value if the text is one (8, 1.5, true, ["a"], "x"), else the text itself."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if parsed.keys() == {"v"} else text


def _convert(spec: _Field, value: Any, base: Path) -> Any:
    """The checked, normalized value; raises _Bad. Relative paths are taken from ``base``."""
    if spec.null and isinstance(value, str) and value.lower() == spec.null:
        return None
    null_text = f' or "{spec.null}"' if spec.null else ""
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(_expected("an integer" + null_text, value))
    elif spec.kind == "seconds":
        if isinstance(value, str):
            try:
                value = parse_duration(value)
            except ValueError as e:
                raise _Bad(str(e) + (f', or "{spec.null}"' if spec.null else "")) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(_expected('a number of seconds or a duration like "5m"' + null_text,
                                 value))
        value = float(value)
        if not math.isfinite(value):
            raise _Bad(f"expected a finite number of seconds, got {value}")
    elif spec.kind == "limitkeys":
        try:
            return flowconfig.check_type_limits(value)
        except ValueError as e:
            raise _Bad(str(e)) from None
    elif spec.kind == "modules":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise _Bad(_expected("a list of module names", value))
        for item in items:
            if not re.fullmatch(_NAME, item):
                raise _Bad(f"{toml_string(item)} is not a module name like \"package.module\"")
        return tuple(items)
    elif spec.kind == "origins":
        return _origins(value)
    elif spec.kind == "bool":
        if not isinstance(value, bool):
            raise _Bad(_expected("true or false", value))
        return value
    elif not isinstance(value, str):
        raise _Bad(_expected("a string", value))
    else:
        return _convert_text(spec, value, base)
    if (spec.minimum is not None and (value < spec.minimum
                                      or (spec.above and value == spec.minimum))) \
            or (spec.maximum is not None and value > spec.maximum):
        raise _Bad(f"must be {_range(spec)}{null_text}, got {value!r}{spec.hint}")
    return value


def _range(spec: _Field) -> str:
    """The allowed range in words: "from 1 to 65536", "more than 0 and at most 3600 s"."""
    unit = " s" if spec.kind == "seconds" else ""
    low, high = _number(spec.minimum), _number(spec.maximum)
    if high is None:
        return f"{'>' if spec.above else '>='} {low}{unit}"
    if low is None:
        return f"at most {high}{unit}"
    if spec.above:
        return f"more than {low} and at most {high}{unit}"
    return f"from {low} to {high}{unit}"


def _number(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _convert_text(spec: _Field, value: str, base: Path) -> Any:
    kind = spec.kind
    if spec.choices:
        if choice := next((c for c in spec.choices if c.lower() == value.lower()), None):
            return choice
        raise _Bad(f"expected one of {', '.join(spec.choices)}, got {toml_string(value)}")
    if kind == "path":
        if not value:
            raise _Bad("expected a file path, got an empty string")
        return _absolute(value, base)
    if kind == "handler" and not re.fullmatch(f"{_NAME}:{_NAME}", value):
        raise _Bad(f'expected "package.module:function", got {toml_string(value)}')
    if kind == "listen" and value.startswith("unix:"):
        if not value[5:].strip():
            raise _Bad('expected "unix:/path/to/api.sock" with a socket path after "unix:"')
        return "unix:" + str(_absolute(value[5:], base))
    if kind == "listen" and value and not ((m := _LISTEN.fullmatch(value))
                                           and int(m.group(2)) <= 65535):
        raise _Bad('expected "host:port" with a port from 0 to 65535, "unix:/path" for a '
                   f'Unix socket (or "" to disable), got {toml_string(value)}')
    if kind == "url" and not re.match(r"https?://.", value):
        raise _Bad(f"expected an http:// or https:// URL, got {toml_string(value)}")
    if kind == "envname" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        # Never echo the value: it may be the secret itself, pasted by mistake.
        raise _Bad("expected the NAME of an environment variable holding the API key "
                   "(e.g. OPENAI_API_KEY); never put the key itself in the config")
    return value


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#]+", re.ASCII)


def _origins(value: Any) -> tuple[str, ...]:
    """CORS origins: "scheme://host[:port]" each, as a browser sends them in Origin."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise _Bad(_expected('a list of origins like ["http://localhost:5173", "app://x"]', value))
    out = []
    for item in items:
        if item == "*":
            raise _Bad('"*" is not allowed: list each origin that may call the API')
        if not _ORIGIN.fullmatch(item):
            raise _Bad(f"{toml_string(item)} is not an origin: expected scheme://host[:port] with "
                       "no path or trailing slash (e.g. http://localhost:5173)")
        out.append(item.lower())
    return tuple(out)


def _check_backoff(label: str, title: str, item, fallback, errors: list[str]) -> None:
    initial, maximum = (getattr(fallback, k) if getattr(item, k) is None else getattr(item, k)
                        for k in ("backoff_initial_s", "backoff_max_s"))
    if maximum < initial:
        errors.append(f"{label}: {title} backoff_max_s ({maximum:g}) is less than "
                      f"backoff_initial_s ({initial:g})")


def _absolute(path: str | os.PathLike, base: Path) -> Path:
    return Path(os.path.abspath(base / Path(path).expanduser()))


def _existing(path: str | os.PathLike, origin: str) -> Path:
    file = _absolute(path, Path.cwd())
    if not file.exists():
        raise ConfigError([f"config file {file}{origin} does not exist"])
    if not file.is_file():
        raise ConfigError([f"config file {file}{origin} is not a file"])
    return file


def _expected(what: str, value: Any) -> str:
    return f"expected {what}, got {_describe(value)}"


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{'integer' if isinstance(value, int) else 'float'} {value!r}"
    if isinstance(value, dict):
        return "a table"
    kind = {str: "string", list: "array"}.get(type(value), type(value).__name__)
    text = toml_string(value) if isinstance(value, str) else str(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: JSON's escapes (\\" \\\\ \\n \\t \\uXXXX for the other
    controls) are TOML's too; DEL, which JSON leaves bare and TOML forbids, is escaped.
    A str holding a lone surrogate (a file name that is not UTF-8) has no TOML form:
    writing the result as UTF-8 raises UnicodeEncodeError."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")



def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return toml_string(str(value))
