"""The OpenAPI document states every limit the server checks on a new task, so input
that is valid by the document is never refused with 400 (schemathesis generates the
bodies from the document; each goes through the API's and the Queue's checks in-process,
without a database). Only `depends_on` is left out: ids that do not exist are bad input
no schema can describe. The document follows the supervisor's config where a limit does
(memory_mb over the memory budget)."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from supervisor import config as _config, openapi
from supervisor.api import ErrorAnswer, _enqueue_fields
from supervisor.client import Queue
from supervisor.errors import InputError


def _check(cfg, body: dict) -> None:
    body = {**body, "depends_on": None}
    queue = Queue(cfg)
    try:
        fields = _enqueue_fields(body)
        queue._new_task({"type": None, **fields}, time.time())
    except (ErrorAnswer, InputError) as exc:
        pytest.fail(f"schema-valid body refused: {exc} (field {exc.field}): {body!r}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("budget", [None, 4096])
def test_every_schema_valid_new_task_is_accepted(tmp_path, budget):
    env = {} if budget is None else {"TASKVISOR_SUPERVISOR__MEMORY_BUDGET_MB": str(budget)}
    cfg = _config.load(None, env=env).with_database(tmp_path / "never-created.db")
    schema = schemathesis.openapi.from_dict(openapi.document(cfg))
    strategy = schema["/api/tasks"]["POST"].as_strategy()

    @settings(max_examples=150, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def accepted(case):
        _check(cfg, case.body)

    accepted()
    assert not (tmp_path / "never-created.db").exists()


def test_type_limits_are_stated():
    new_task = openapi.document()["components"]["schemas"]["NewTask"]["properties"]["type"]
    assert new_task["maxLength"] == 200 and new_task["minLength"] == 1
    assert "pattern" in new_task
