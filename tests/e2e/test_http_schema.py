"""schemathesis against a real supervisor: requests generated from /api/openapi.json (valid
and invalid ones, unknown methods, stateful sequences through the links it infers) must
never get a server error, and every response must match the document.

The positive_data_acceptance check is left out on purpose: a schema-valid `depends_on`
names task ids that do not exist, and the API answers that with 400 naming the field.
Bounded: at most 30 examples per operation and a fixed seed (TASKVISOR_SCHEMATHESIS_SEED
picks another), about 40 s.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.http_support import supervisor  # noqa: F401  (fixture)


@pytest.mark.timeout(240)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(supervisor, tmp_path):
    seed = os.environ.get("TASKVISOR_SCHEMATHESIS_SEED", "1")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run",
           f"{supervisor.url}/api/openapi.json",
           "--header", f"Authorization: Bearer {supervisor.token}",
           "--max-examples", "30", "--seed", seed, "--request-timeout", "10",
           "--exclude-checks", "positive_data_acceptance",
           # An event stream stays open: a client that reads the body to its end waits for ever.
           "--exclude-path", "/api/events",
           "--no-color",
           "--report", "junit", "--report-dir", str(tmp_path / "report")]
    env = {**os.environ, "NO_COLOR": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=220, stdin=subprocess.DEVNULL)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-20000:]
    assert "No issues found" in output, output[-5000:]
    assert "ERROR taskvisor.http" not in supervisor.log_text()
