"""Short task ids, like git's short hashes: the dashboard shows the last 8 characters of
an id, and `taskvisor show | wait | cancel | retry` (and `cancel --workflow`, `list
--workflow`, Queue.workflow) accept any unique end of one, with a clear error when it is
ambiguous or matches nothing. Real CLI subprocesses, a real file."""

from __future__ import annotations

import json
import time

import pytest

from supervisor.client import Queue
from supervisor.errors import InputError, NotFound
from supervisor.store import NewTask, Store
from tests.e2e.test_cli import tv


def stored(path, *ids: str) -> None:
    """Tasks with these ids (ids chosen to share an end) in the database at `path`."""
    store = Store(path)
    try:
        store.enqueue_many([NewTask(id=i, type="t", payload="{}") for i in ids], time.time())
    finally:
        store.close()


def test_cli_commands_accept_the_short_id_the_dashboard_shows(tmp_path):
    with Queue(tmp_path / "taskvisor.db") as q:
        task_id = q.enqueue("noop", {"n": 1})
    short = task_id[-8:]
    for args in (["show", short], ["show", short.lower(), "--json"], ["cancel", short],
                 ["retry", short], ["wait", short, "--timeout", "0.1"]):
        res = tv(tmp_path, *args)
        assert res.returncode in (0, 124), (args, res.stderr)
        assert "error" not in res.stderr, (args, res.stderr)
    assert task_id in tv(tmp_path, "show", short).stdout


def test_an_ambiguous_or_unknown_end_is_a_clear_error(tmp_path):
    stored(tmp_path / "taskvisor.db", "job-alpha-7", "job-beta-7")
    res = tv(tmp_path, "show", "ha-7")
    assert res.returncode == 0 and "job-alpha-7" in res.stdout, res.stderr
    res = tv(tmp_path, "cancel", "-7")
    assert res.returncode == 2
    assert "more than one task id" in res.stderr and "give more characters" in res.stderr
    assert "job-alpha-7" in res.stderr and "job-beta-7" in res.stderr
    res = tv(tmp_path, "show", "nothing")
    assert res.returncode == 2 and "no task with id nothing" in res.stderr


def test_queue_resolve_id_prefers_an_exact_id(tmp_path):
    stored(tmp_path / "t.db", "7", "job-7")
    with Queue(tmp_path / "t.db") as q:
        assert q.resolve_id("7") == "7"  # an id itself, though another id ends with it
        assert q.resolve_id("b-7") == "job-7"
        with pytest.raises(NotFound):
            q.resolve_id("x-7")
        with pytest.raises(InputError, match="must be a non-empty"):
            q.resolve_id("")


def test_workflow_commands_and_calls_accept_a_short_id(tmp_path):
    """`cancel --workflow`, `list --workflow`, `enqueue --workflow`, Queue.workflow and
    cancel_workflow refused the short id `show` takes ("no workflow with id …")."""
    with Queue(tmp_path / "taskvisor.db") as q:
        root = q.enqueue("t")
        member = q.enqueue("t", workflow_id=root, depends_on=[root])
        other = q.enqueue("t")
        assert q.resolve_workflow_id(root[-8:]) == root
        assert q.resolve_workflow_id(member[-8:].lower()) == root  # a member names it
        assert q.workflow(member[-8:]).id == root
        assert {t.id for t in q.workflow(root[-8:]).tasks} == {root, member}
        assert {t.id for t in q.list(workflow_id=member[-8:])} == {root, member}
    res = tv(tmp_path, "list", "--workflow", member[-8:], "--json")
    assert res.returncode == 0, res.stderr
    assert {t["id"] for t in json.loads(res.stdout)} == {root, member}
    res = tv(tmp_path, "cancel", "--workflow", root[-8:])
    assert res.returncode == 0 and res.stdout.strip() == "2 cancelled, 0 running asked to stop", (
        res.stderr)
    with Queue(tmp_path / "taskvisor.db") as q:
        assert q.get(other).status == "queued"
        assert q.cancel_workflow(member[-8:]) == {"id": root, "cancelled": 0, "stopping": 0}
    # enqueue --workflow takes the short id too
    joined = tv(tmp_path, "enqueue", "t", "--workflow", member[-8:]).stdout.strip()
    with Queue(tmp_path / "taskvisor.db") as q:
        assert q.get(joined).workflow == root


def test_a_workflow_short_id_that_is_ambiguous_or_unknown_is_a_clear_error(tmp_path):
    stored(tmp_path / "taskvisor.db", "job-alpha-7", "job-beta-7")
    for args in (["cancel", "--workflow", "-7"], ["list", "--workflow", "-7"]):
        res = tv(tmp_path, *args)
        assert res.returncode == 2 and res.stdout == "", (args, res.stderr)
        [line] = res.stderr.splitlines()
        assert line == ("taskvisor: error: '-7' is the end of more than one task id "
                        "(job-alpha-7, job-beta-7): give more characters"), line
    for args in (["cancel", "--workflow", "nothing"], ["list", "--workflow", "nothing"]):
        res = tv(tmp_path, *args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr == ("taskvisor: error: no workflow with id nothing (nor a task "
                              "whose id ends with it)\n"), res.stderr
    with Queue(tmp_path / "taskvisor.db") as q:
        with pytest.raises(InputError, match="more than one task id") as info:
            q.workflow("-7")
        assert info.value.field == "workflow_id"
        with pytest.raises(NotFound):
            q.cancel_workflow("nothing")
        assert q.workflow("ha-7").id == "job-alpha-7"
        assert [t.status for t in q.list(workflow_id="job-beta-7")] == ["queued"]
