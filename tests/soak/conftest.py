"""Soak-test fixtures: the scale (short, or long from --soak-minutes), a `soak` object per
test (tests/soak/harness.py) whose finalizer kills everything carrying the test's marker,
and the figures table at the end of the session.

`pytest tests/soak` runs the short version (about 2-3 minutes on 2 cores);
`pytest tests/soak --soak-minutes N` the long one, sized to about N minutes (N >= 10 gives
the full 2,000 tasks and 50 supervisor kills). A plain `pytest` leaves this folder out
(tests/conftest.py). Set TVSOAK_SEED to replay a run's random choices.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import pytest

from tests.soak.harness import FIGURES, Soak, print_table


@dataclass(frozen=True)
class Scale:
    long: bool
    minutes: float   # the long run's budget (0 for the short one)

    def share(self, fraction: float) -> float:
        """Seconds of the long run's budget for a test that takes `fraction` of it."""
        return self.minutes * 60 * fraction


@pytest.fixture
def scale(request) -> Scale:
    minutes = request.config.getoption("soak_minutes")
    return Scale(long=bool(minutes), minutes=minutes or 0.0)


@pytest.fixture
def soak(tmp_path, request):
    seed = int(os.environ.get("TVSOAK_SEED") or time.time_ns() % 1_000_000)
    run = Soak(tmp_path, request.node.name, seed)
    yield run
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for sup in run.sups:
            sys.stderr.write(f"\n---- supervisor {sup.name} log ({sup.log_path}), tail ----\n"
                             f"{sup.log()[-8000:]}\n")
        sys.stderr.write(f"(soak seed {seed}: TVSOAK_SEED={seed} replays its choices)\n")
    run.cleanup()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("soak figures")
        terminalreporter.write_line(print_table(FIGURES))
