"""The operations files in config/ through the real tools:

- promtool (Debian package `prometheus`): `check rules` and `test rules` on the alert
  rules, and every Grafana panel expression must parse as PromQL;
- systemd-analyze (Debian package `systemd`): `verify` on the unit, and its offline
  `security` exposure score.

Each test skips, saying which package to install, when its tool is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_ops_files import ALERT_TESTS, ALERTS, CONFIG, DASHBOARD, ROOT, UNIT  # noqa: F401


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: install Debian's `{package}` package "
                    f"(apt-get install -y {package})")
    return path


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def report(result: subprocess.CompletedProcess) -> str:
    return (f"$ {' '.join(result.args)}\nexit {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")


# ---------------------------------------------------------------- promtool

def test_promtool_check_rules():
    promtool = tool("promtool", "prometheus")
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, report(result)
    assert "SUCCESS" in result.stdout, report(result)


def test_promtool_test_rules():
    promtool = tool("promtool", "prometheus")
    # rule_files in the test file are relative to the test file's directory.
    result = run([promtool, "test", "rules", ALERT_TESTS.name], cwd=CONFIG)
    assert result.returncode == 0, report(result)
    assert "SUCCESS" in result.stdout, report(result)


def test_promtool_test_rules_catches_a_broken_rule(tmp_path):
    """The fixtures really pin the thresholds: loosen one and the tests fail."""
    promtool = tool("promtool", "prometheus")
    broken = ALERTS.read_text(encoding="utf-8").replace(") > 0.2\n", ") > 0.9\n")
    assert broken != ALERTS.read_text(encoding="utf-8")
    (tmp_path / ALERTS.name).write_text(broken, encoding="utf-8")
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = run([promtool, "test", "rules", ALERT_TESTS.name], cwd=tmp_path)
    assert result.returncode != 0, report(result)
    assert "TaskvisorFailureRatioHigh" in result.stdout + result.stderr, report(result)


def test_dashboard_expressions_parse_as_promql(tmp_path):
    """Each panel query, with Grafana's variables filled in, as a recording rule that
    `promtool check rules` parses."""
    promtool = tool("promtool", "prometheus")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    values = {"$__rate_interval": "5m", "$__interval": "1m", "$job": "taskvisor",
              "$instance": ".*", "$type": ".*"}
    rules = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unknown variable in {panel['title']!r}: {expr}"
            rules.append((panel["title"], expr))
    assert len(rules) >= 15
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(rules):
        lines += [f"      - record: dashboard:panel_{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, report(result) + "\n" + "\n".join(
        f"panel_{i}: {title}: {expr}" for i, (title, expr) in enumerate(rules))
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout, report(result)


# ---------------------------------------------------------------- systemd-analyze

def verifiable_unit(tmp_path: Path, text: str | None = None) -> Path:
    """A copy of the unit whose ExecStart names a binary that exists here.

    `systemd-analyze verify` checks that ExecStart's program is executable, and
    /opt/taskvisor/venv/bin/taskvisor is not installed in a test environment; so the copy runs
    `true` with the same arguments. Everything else is verified as shipped (ExecReload's
    /bin/kill included). PID 1 need not be systemd: verify works offline."""
    text = UNIT.read_text(encoding="utf-8") if text is None else text
    true = shutil.which("true")
    assert true, "no `true` binary on PATH"
    text, n = re.subn(r"(?m)^ExecStart=/opt/taskvisor/venv/bin/taskvisor ", f"ExecStart={true} ", text)
    assert n == 1, "ExecStart=/opt/taskvisor/venv/bin/taskvisor ... not found in the unit"
    path = tmp_path / UNIT.name
    path.write_text(text, encoding="utf-8")
    return path


def verify(systemd_analyze: str, unit: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run verify; return the result and the complaints about this unit. verify exits 0
    on warnings such as unknown keys or bad values (it logs "ignoring"), so stderr counts."""
    result = run([systemd_analyze, "verify", "--man=no", str(unit)], cwd=unit.parent)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if unit.name in line]
    return result, complaints


def test_systemd_analyze_verify(tmp_path):
    systemd_analyze = tool("systemd-analyze", "systemd")
    result, complaints = verify(systemd_analyze, verifiable_unit(tmp_path))
    assert result.returncode == 0 and not complaints, report(result)


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path):
    """verify really reads our file here: a bad value and an unknown key are reported."""
    systemd_analyze = tool("systemd-analyze", "systemd")
    text = UNIT.read_text(encoding="utf-8")
    assert "\nKillMode=mixed\n" in text
    text = text.replace("\nKillMode=mixed\n", "\nKillMode=mixd\nNoSuchKey=1\n")
    result, complaints = verify(systemd_analyze, verifiable_unit(tmp_path, text))
    joined = "\n".join(complaints)
    assert "mixd" in joined and "NoSuchKey" in joined, report(result)


def test_systemd_analyze_security_exposure(tmp_path):
    """The hardening keeps systemd's exposure score "OK" (lower is better; 10 = none)."""
    systemd_analyze = tool("systemd-analyze", "systemd")
    unit = verifiable_unit(tmp_path)
    result = run([systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                 cwd=tmp_path)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, report(result)
    assert float(match.group(1)) <= 4.0, report(result)
