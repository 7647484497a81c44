"""A pytest plugin: under CI (CI=true, as .ci/run runs), a skipped test is a failure.

Locally a test may skip when a *tool* is missing (chromium, promtool, systemd-analyze,
node, the optional `embed` extra), saying what to install; CI installs every one of them,
so a skip there means a missing install step or a hidden regression, and must fail the
run. Loaded by tests/conftest.py. It never touches a test that passed or failed.
"""

from __future__ import annotations

import os

import pytest


def _strict() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if _strict() and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = (f"skipped under CI=true, which must run every test "
                        f"(install what it names in .ci/run): {_reason(rep.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if _strict() and rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = (f"module skipped under CI=true, which must run every test: "
                        f"{_reason(rep.longrepr)}")
