"""What keeps CI honest: under CI=true a skipped test fails the run (tests/support/
ci_skips.py), and `.ci/run` installs every tool a test may skip without, exports CI=true,
and smoke-tests a built wheel in a clean virtualenv (.ci/smoke-wheel)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI_RUN = ROOT / ".ci" / "run"
SMOKE = ROOT / ".ci" / "smoke-wheel"

SAMPLE = '''
import pytest

def test_passes():
    pass

def test_skips_at_run_time():
    pytest.skip("no chromium")

@pytest.mark.skipif(True, reason="no promtool")
def test_skips_by_marker():
    pass

@pytest.mark.xfail(reason="a known failure stays expected")
def test_xfails():
    assert False
'''


def run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repo's settings
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "tests.support.ci_skips", "test_sample.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_a_skip_fails_the_run_under_ci(tmp_path):
    res = run_sample(tmp_path, "true")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "skipped under CI=true" in out and "no chromium" in out and "no promtool" in out
    assert "1 xfailed" in out and "1 passed" in out


@pytest.mark.timeout(60)
def test_a_skip_is_only_a_skip_outside_ci(tmp_path):
    res = run_sample(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 skipped" in res.stdout


def test_ci_run_installs_every_tool_a_test_may_skip_without():
    text = CI_RUN.read_text()
    for tool, package in [("promtool", "prometheus"), ("systemd-analyze", "systemd"),
                          ("chromium", "chromium"), ("node", "nodejs"), ("curl", "curl")]:
        assert re.search(rf"command -v {re.escape(tool)} .*\|\| need\+=\({package}\)", text), tool
    assert "export CI=true" in text
    assert '".[test,embed]"' in text  # the test extra (playwright, schemathesis) and embed


def test_ci_run_smoke_tests_a_built_wheel():
    text = CI_RUN.read_text()
    assert "bash .ci/smoke-wheel" in text
    smoke = SMOKE.read_text()
    assert "pip wheel" in smoke and "-m venv" in smoke
    for step in ("taskvisor --version", "taskvisor check-config", "taskvisor demo",
                 "--ready-file", "/api/openapi.json"):
        assert step in smoke, step


def test_pyproject_license_is_an_spdx_string():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
