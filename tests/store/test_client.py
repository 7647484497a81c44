"""supervisor.client.Queue on a real SQLite file: validation, defaults from the config,
batches, cancel/retry/prune, wait (latency and CPU), and use after fork and from threads."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from supervisor import Queue, config, policy
from supervisor.errors import ConfigError, DependencyError, InputError, NotFound, StoreUnavailable
from supervisor.store import AttemptEnd, Outcome, Status, Store
from supervisor.wake import WakeSocket
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def queue(db_path):
    with Queue(db_path) as q:
        yield q


def count(db_path) -> int:
    store = Store(db_path)
    try:
        return sum(store.stats(time.time()).totals().values())
    finally:
        store.close()


def finish(db_path, *, ok: bool = True, now: float | None = None) -> None:
    """Play the supervisor: claim the next task and complete it (or fail it for good),
    recording the end at `now` (default: the present)."""
    store = Store(db_path)
    try:
        task = store.claim("test-owner", time.time(), lease_s=30)
        now = time.time() if now is None else now
        assert task is not None
        if ok:
            assert store.complete(task.lease, AttemptEnd(Outcome.SUCCEEDED, result='{"ok":1}'), now)
        else:
            end = AttemptEnd(Outcome.ERROR, reason="ValueError: boom", retryable=False)
            assert store.fail(task.lease, end, now, policy.Backoff()) is Status.FAILED
    finally:
        store.close()


def test_enqueue_and_get(queue):
    task_id = queue.enqueue("echo", {"text": "héllo"}, priority=3, timeout_s=5,
                            memory_mb=64, max_attempts=2, dedupe_key="k")
    task = queue.get(task_id)
    assert (task.type, task.payload, task.priority, task.status) == (
        "echo", {"text": "héllo"}, 3, Status.QUEUED)
    assert (task.timeout_s, task.memory_mb, task.max_attempts, task.dedupe_key) == (5, 64, 2, "k")
    assert queue.enqueue("echo", {"other": 1}, dedupe_key="k") == task_id
    assert queue.get(queue.enqueue("echo")).payload == {}


def test_defaults_come_from_the_type_then_the_defaults(tmp_path):
    cfg_file = tmp_path / "tv.toml"
    cfg_file.write_text('[supervisor]\ndatabase = "q.db"\n[defaults]\nmax_attempts = 4\n'
                        '[types."hi"]\npriority = 5\nmax_attempts = 7\n')
    with Queue(cfg_file) as q:
        assert q.path == tmp_path / "q.db"
        hi, other = q.get(q.enqueue("hi")), q.get(q.enqueue("other"))
        assert (hi.priority, hi.max_attempts) == (5, 7)
        assert (other.priority, other.max_attempts) == (0, 4)
        assert q.get(q.enqueue("hi", priority=-1)).priority == -1


@pytest.mark.parametrize("kwargs, field", [
    (dict(type=""), "type"),
    (dict(type=5), "type"),
    (dict(payload=[1, 2]), "payload"),
    (dict(payload="text"), "payload"),
    (dict(payload={"x": float("nan")}), "payload"),
    (dict(payload={"x": object()}), "payload"),
    (dict(delay=-1), "delay"),
    (dict(delay=dt.timedelta(seconds=-1)), "delay"),
    (dict(delay=1, run_at=time.time()), "delay"),
    (dict(run_at=dt.datetime(2030, 1, 1)), "run_at"),
    (dict(timeout_s=-1), "timeout_s"),
    (dict(timeout_s=0), "timeout_s"),
    (dict(memory_mb=-5), "memory_mb"),
    (dict(memory_mb=1.5), "memory_mb"),
    (dict(max_attempts=0), "max_attempts"),
    (dict(priority="high"), "priority"),
    (dict(depends_on=[5]), "depends_on"),
    (dict(dedupe_key=""), "dedupe_key"),
])
def test_bad_input_names_the_field_and_writes_nothing(queue, db_path, kwargs, field):
    queue.enqueue("seed")
    kwargs = {"type": "echo", **kwargs}
    with pytest.raises(InputError) as info:
        queue.enqueue(kwargs.pop("type"), **kwargs)
    assert info.value.field == field
    assert count(db_path) == 1


def test_payload_size_limit_names_the_limit(tmp_path):
    cfg_file = tmp_path / "taskvisor.toml"
    cfg_file.write_text("[supervisor]\nmax_payload_bytes = 100\n")
    with Queue(cfg_file) as q:
        q.enqueue("t", {"s": "x" * 50})
        with pytest.raises(InputError, match=r"over the limit of 100 bytes"):
            q.enqueue("t", {"s": "x" * 100})
        assert len(q.list()) == 1


def test_bad_input_does_not_create_the_database(db_path):
    with Queue(db_path) as q, pytest.raises(InputError):
        q.enqueue("t", [1])
    assert not db_path.exists()


def test_delay_and_run_at(queue):
    before = time.time()
    a = queue.get(queue.enqueue("t", delay=60))
    b = queue.get(queue.enqueue("t", delay=dt.timedelta(minutes=2)))
    when = dt.datetime(2031, 5, 1, 12, tzinfo=dt.timezone.utc)
    c = queue.get(queue.enqueue("t", run_at=when))
    d = queue.get(queue.enqueue("t", run_at=when.timestamp()))
    assert before + 60 <= a.run_after <= time.time() + 60
    assert before + 120 <= b.run_after <= time.time() + 120
    assert c.run_after == d.run_after == when.timestamp()


def test_enqueue_many_with_batch_names(queue):
    ids = queue.enqueue_many([
        {"type": "fetch", "payload": {"url": "u"}, "id": "fetch"},
        {"type": "embed", "id": "embed", "depends_on": ["fetch"]},
        {"type": "store", "depends_on": ["embed", "fetch"], "priority": 2},
    ])
    fetch, embed, store = (queue.get(i) for i in ids)
    assert fetch.status is Status.QUEUED and fetch.payload == {"url": "u"}
    assert embed.status is Status.BLOCKED and embed.depends_on == (fetch.id,)
    assert store.status is Status.BLOCKED and set(store.depends_on) == {fetch.id, embed.id}
    assert ids == sorted(ids)  # fresh time-ordered ids, in item order


@pytest.mark.parametrize("items, error", [
    ([{"type": "a"}, {"type": "b", "depends_on": ["missing"]}], DependencyError),
    ([{"type": "a", "id": "x", "depends_on": ["y"]}, {"type": "b", "id": "y", "depends_on": ["x"]}],
     DependencyError),
    ([{"type": "a"}, {"type": "b", "payload": [1]}], InputError),
    ([{"type": "a", "id": "x"}, {"type": "b", "id": "x"}], InputError),
    ([{"type": "a", "colour": "red"}], InputError),
    ([{"payload": {}}], InputError),
])
def test_enqueue_many_is_all_or_nothing(queue, db_path, items, error):
    queue.enqueue("seed")
    with pytest.raises(error):
        queue.enqueue_many(items)
    assert count(db_path) == 1


def test_list_filters_and_validates(queue):
    ids = [queue.enqueue("a"), queue.enqueue("b"), queue.enqueue("a")]
    queue.cancel(ids[0])
    assert [t.id for t in queue.list()] == ids[::-1]
    assert [t.id for t in queue.list(type="a")] == [ids[2], ids[0]]
    assert [t.id for t in queue.list(status="cancelled")] == [ids[0]]
    assert [t.id for t in queue.list(status=Status.QUEUED, limit=1)] == [ids[2]]
    assert [t.id for t in queue.list(before=ids[2])] == [ids[1], ids[0]]
    with pytest.raises(InputError, match="unknown status 'bogus'") as info:
        queue.list(status="bogus")
    assert info.value.field == "status"
    with pytest.raises(InputError):
        queue.list(limit=0)


@pytest.mark.parametrize("before", ["zzz", "", "0" * 25, "0" * 26 + " ", "o" * 26, 5])
def test_list_before_must_be_a_task_id(queue, before):
    """list(before="zzz") returned every task ("zzz" sorts after every id), as if there
    were no cursor; `taskvisor list --before` passed it on the same way."""
    ids = [queue.enqueue("a"), queue.enqueue("a")]
    with pytest.raises(InputError, match="before must be a task id") as info:
        queue.list(before=before)
    assert info.value.field == "before"
    assert [t.id for t in queue.list(before=ids[1])] == [ids[0]]


def test_cancel_retry_prune_stats(queue, db_path):
    with pytest.raises(NotFound):
        queue.cancel("nope")
    first, second = queue.enqueue("t", max_attempts=1), queue.enqueue("t")
    assert queue.cancel(second) is Status.CANCELLED
    assert queue.retry(second) is Status.QUEUED
    with pytest.raises(InputError, match="only failed or cancelled"):
        queue.retry(second)
    finish(db_path, ok=False, now=time.time() - 10 * 86400)
    assert queue.get(first).status is Status.FAILED
    stats = queue.stats()
    assert stats.totals()["failed"] == 1 and stats.totals()["queued"] == 1
    assert queue.prune(7 * 86400) == 1
    with pytest.raises(NotFound):
        queue.get(first)
    with pytest.raises(InputError):
        queue.prune(-1)


def test_missing_database_is_not_created_with_create_false(db_path):
    with Queue(db_path, create=False) as q, pytest.raises(StoreUnavailable, match="no such database"):
        q.list()
    assert not db_path.exists()


def test_discovery_env_then_cwd_then_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKVISOR_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert Queue().path == tmp_path / "taskvisor.db"
    (tmp_path / "taskvisor.toml").write_text('[supervisor]\ndatabase = "local.db"\n')
    assert Queue().path == tmp_path / "local.db"
    other = tmp_path / "etc" / "tv.toml"
    other.parent.mkdir()
    other.write_text('[supervisor]\ndatabase = "env.db"\n')
    monkeypatch.setenv("TASKVISOR_CONFIG", str(other))
    assert Queue().path == tmp_path / "etc" / "env.db"
    monkeypatch.setenv("TASKVISOR_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        Queue()
    assert Queue(config.load(other)).path == tmp_path / "etc" / "env.db"


def test_wait_times_out_and_rejects_unknown_ids(queue):
    task_id = queue.enqueue("t")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still queued"):
        queue.wait(task_id, timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 1.0
    with pytest.raises(NotFound):
        queue.wait("nope", timeout=0.1)


_COMPLETER = textwrap.dedent("""
    import sys, time
    from supervisor.store import AttemptEnd, Outcome, Store
    store = Store(sys.argv[1])
    time.sleep(float(sys.argv[2]))
    task = store.claim("other-process", time.time(), lease_s=30)
    store.complete(task.lease, AttemptEnd(Outcome.SUCCEEDED, result="42"), time.time())
    print(time.time(), flush=True)
""")


def test_wait_returns_soon_after_another_process_completes(queue, db_path):
    task_id = queue.enqueue("t")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _COMPLETER, str(db_path), "1.0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        task = queue.wait(task_id, timeout=20)
        returned = time.time()
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert task.status is Status.SUCCEEDED and task.result == 42
    assert returned - float(out) < 0.3


def test_wait_uses_little_cpu(queue):
    task_id = queue.enqueue("t")
    cpu_start, start = time.process_time(), time.monotonic()
    with pytest.raises(TimeoutError):
        queue.wait(task_id, timeout=2.0)
    cpu = time.process_time() - cpu_start
    wall = time.monotonic() - start
    assert wall >= 2.0
    assert cpu / wall < 0.05, f"wait used {cpu:.3f}s CPU in {wall:.2f}s"


def test_queue_works_in_a_forked_child(queue, db_path):
    parent_id = queue.enqueue("parent")  # the parent's connection is open before fork
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            os.write(write_fd, queue.enqueue("child", {"pid": os.getpid()}).encode())
            code = 0 if queue.get(parent_id).type == "parent" else 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        child_id = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert queue.get(child_id).payload == {"pid": pid}
    assert queue.get(queue.enqueue("after")).type == "after"  # the parent's handle still works


def test_one_queue_shared_by_threads(queue):
    ids: list[str] = []
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(25):
                ids.append(queue.enqueue("t"))
                queue.list(limit=5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(set(ids)) == 100 and queue.stats().totals()["queued"] == 100


def test_writes_wake_live_supervisors_and_status_lists_them(queue, db_path):
    wake = WakeSocket()
    store = Store(db_path)
    try:
        store.register_supervisor(owner="sup-1", host=socket.gethostname(), pid=os.getpid(),
                                  pid_started_at=0.0, now=time.time(), wake_port=wake.port,
                                  pool_size=2, version="test")
        task_id = queue.enqueue("t")
        wait_until(lambda: wake.drain() >= 1, timeout=5, message="no wake-up after enqueue")
        queue.cancel(task_id)
        wait_until(lambda: wake.drain() >= 1, timeout=5, message="no wake-up after cancel")
        [sup] = queue.supervisors()
        assert (sup["owner"], sup["wake_port"], sup["pool_size"]) == ("sup-1", wake.port, 2)
    finally:
        store.close()
        wake.close()
