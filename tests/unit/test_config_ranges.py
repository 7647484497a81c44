"""Every numeric config key has a range, checked by `load` (so by `check-config` and by
`run` alike) with one line naming the key and the allowed range: values that used to pass
here and then crash `run` with an OverflowError (pool_size, memory_mb, busy_timeout_s,
cpu_s, ...) never reach it. `lease_s` has a minimum of 2 s, named in the error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import config, flowconfig
from supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
NUMERIC = ("int", "seconds")
KEYS = [(section, key, spec) for section, specs in config._SECTIONS.items()
        for key, spec in specs.items() if spec.kind in NUMERIC]
TYPE_KEYS = [("types", key, spec) for key, spec in config._TYPE_FIELDS.items()
             if spec.kind in NUMERIC]


def _table(section: str) -> str:
    return '[types."x"]' if section == "types" else f"[{section}]"


def _errors(tmp_path: Path, section: str, key: str, value) -> list[str]:
    path = tmp_path / "taskvisor.toml"
    text = f"{_table(section)}\n{key} = {value!r}\n"
    if key.startswith("backoff_"):  # keep max >= initial, a check of its own
        text += "backoff_initial_s = 0\n" if key == "backoff_max_s" else "backoff_max_s = 6e5\n"
    path.write_text(text)
    try:
        config.load(path, env={})
    except ConfigError as exc:
        return exc.errors
    return []


@pytest.mark.parametrize("section, key, spec", KEYS + TYPE_KEYS,
                         ids=[f"{s}.{k}" for s, k, _ in KEYS + TYPE_KEYS])
def test_every_numeric_key_has_a_range_with_a_one_line_error(tmp_path, section, key, spec):
    assert spec.minimum is not None and spec.maximum is not None, (
        f"[{section}] {key} needs a minimum and a maximum")
    for bad in (spec.maximum * 2 + 1, (1 << 63) - 1, 1e300, spec.minimum - 1):
        value = int(bad) if spec.kind == "int" and bad < 1 << 63 else bad
        if spec.kind == "int" and isinstance(value, float):
            continue  # a float is already refused as "expected an integer"
        (error,) = _errors(tmp_path, section, key, value)
        assert "\n" not in error
        assert f"{_table(section)} {key}: must be " in error, error
        high = str(int(spec.maximum)) if float(spec.maximum).is_integer() else f"{spec.maximum:g}"
        assert high in error, error
    ok = spec.maximum if spec.kind == "int" else float(spec.maximum)
    assert _errors(tmp_path, section, key, int(ok) if spec.kind == "int" else ok) == []


def test_lease_below_two_seconds_is_refused_naming_the_minimum(tmp_path):
    (error,) = _errors(tmp_path, "supervisor", "lease_s", 1.9)
    assert "[supervisor] lease_s: must be from 2 to 86400 s, got 1.9" in error
    assert "the minimum is 2 s" in error
    assert _errors(tmp_path, "supervisor", "lease_s", 2) == []


def test_environment_values_get_the_same_ranges():
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"TASKVISOR_SUPERVISOR__BUSY_TIMEOUT_S": "1e300",
                               "TASKVISOR_SUPERVISOR__LEASE_S": "500ms"})
    errors = info.value.errors
    assert len(errors) == 2
    assert any("TASKVISOR_SUPERVISOR__BUSY_TIMEOUT_S: must be from 0 to 3600 s" in e for e in errors)
    assert any("TASKVISOR_SUPERVISOR__LEASE_S: must be from 2 to 86400 s" in e for e in errors)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("line", [
    "[supervisor]\npool_size = 9223372036854775807",
    "[supervisor]\nbusy_timeout_s = 1e300",
    "[defaults]\nmemory_mb = 9223372036854775807",
    "[defaults]\ncpu_s = 1e300",
    "[defaults]\nopen_files = 9223372036854775807",
])
def test_check_config_and_run_refuse_values_that_used_to_overflow(tmp_path, line):
    (tmp_path / "taskvisor.toml").write_text(f'{line}\n[http]\nlisten = ""\n')
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    key = line.split("\n")[1].split(" = ")[0]
    for command in ("check-config", "run"):
        res = subprocess.run([sys.executable, "-m", "supervisor", command], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 2, (command, res.stderr)
        assert "Traceback" not in res.stderr and "OverflowError" not in res.stderr
        [error] = res.stderr.splitlines()
        assert re.match(rf"taskvisor: error: .*\] {key}: must be (from|more than) ", error), error
    assert not (tmp_path / "taskvisor.db").exists()


@pytest.mark.parametrize("key", sorted(flowconfig.LIMIT_RANGES))
def test_every_limits_number_has_a_range_with_a_one_line_error(tmp_path, key):
    """[limits] numbers had a minimum only: concurrency = 10^20 or requests_per_minute =
    1e300 passed, and `taskvisor limits` printed 300-digit budgets."""
    low, high = flowconfig.LIMIT_RANGES[key]
    integer = key in ("concurrency", "estimated_tokens")
    base = "" if key in ("requests_per_minute", "tokens_per_minute", "concurrency") else (
        "requests_per_minute = 60\n")

    def errors(value) -> list[str]:
        path = tmp_path / "taskvisor.toml"
        path.write_text(f'[limits."openai"]\n{base}{key} = {value!r}\n')
        try:
            config.load(path, env={})
        except ConfigError as exc:
            return exc.errors
        return []

    bads = [high + 1, 10 ** 20, low - 1] + ([] if integer else [1e300, high * 1.5])
    for bad in bads:
        (error,) = errors(bad)
        assert "\n" not in error
        assert error.endswith(f'[limits."openai"] {key}: must be from {low} to {high}, '
                              f"got {bad!r}"), error
    assert errors(high) == [] and errors(low) == []
