"""One way to start a supervisor in tests, read from the test sources (no fork, no disk
writes): only the launcher (tests/support/launcher.py) starts `taskvisor run`, and no test
learns that a supervisor is ready, or where it listens, from its log; the ready file says
both. A subclass of the launcher changes what runs by overriding `argv()` (the soak tests'
tests/soak/pausing.py is such a replacement for `taskvisor run`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
LAUNCHER = "tests/support/launcher.py"
THIS = "tests/unit/test_one_harness.py"

# `python -m supervisor run` spelled as an argv, or the run entry point called in-process.
STARTS = re.compile(r"""["']supervisor["'],\s*["']run["']|\bstart\.run\(""")
# Readiness or the bound address scraped from the log: the "ready: pool_size=" line, or a
# pattern that captures what follows "listening on".
SCRAPES = re.compile(r"""ready: pool_size|listening on[^"'\n]*\(""")


def sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(TESTS.rglob("*.py"))}


def test_only_the_launcher_starts_taskvisor_run():
    # pausing.py is what SoakSupervisor.argv() runs in place of `taskvisor run`, through
    # the launcher's start().
    allowed = {LAUNCHER, "tests/soak/pausing.py", THIS}
    found = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for path, text in sources().items() if path not in allowed
             for m in STARTS.finditer(text)]
    assert not found, ("start supervisors with tests.support.launcher.SupervisorProcess "
                       f"(override argv() to run something else): {found}")


def test_no_test_reads_readiness_or_the_address_from_the_log():
    found = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for path, text in sources().items() if path != THIS
             for m in SCRAPES.finditer(text)]
    assert not found, ("wait with SupervisorProcess.start()/wait_ready() and read the address "
                       f"from http_url (the ready file): {found}")


def test_the_soak_supervisor_is_a_launcher_that_changes_argv_only():
    text = (TESTS / "soak" / "harness.py").read_text()
    assert "def argv(self)" in text and "--ready-file" in text
    assert "def start(" not in text and "Popen(" not in text
    assert "_ready_count" not in (TESTS / "process" / "conftest.py").read_text()
