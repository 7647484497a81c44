"""Four real processes claim from one file at once: every task is claimed exactly once.

The children are forked, open their own Store after the fork (never the parent's), wait
on a start pipe so that they really race, claim and complete until the queue is empty,
and write the ids they claimed to a file of their own. The parent checks the union.
"""

from __future__ import annotations

import os
import time
import traceback

import pytest

from supervisor.store import Status, Store
from tests.store.factory import T0, new, ok
from tests.store.forking import reap
from tests.support import kill_tree

WORKERS = 4
TASKS = 10_000


def _work(db_path, n: int, start_fd: int, out_dir) -> int:
    """The child's whole life; returns its exit code."""
    claimed = []
    try:
        store = Store(db_path, migrate=False)
        os.read(start_fd, 1)  # blocks until the parent says go (or closes the pipe)
        owner = f"worker-{n}"
        while (task := store.claim(owner, T0, lease_s=600)) is not None:
            claimed.append(task.id)
            if not store.complete(task.lease, ok({"by": n}), T0 + 1):
                raise AssertionError(f"lost the lease of {task.id}")
        store.close()
        (out_dir / f"claimed-{n}.txt").write_text("\n".join(claimed))
        return 0
    except BaseException:  # noqa: BLE001 - the child reports through a file, never raises
        (out_dir / f"error-{n}.txt").write_text(f"after {len(claimed)} claims:\n{traceback.format_exc()}")
        return 1


@pytest.mark.timeout(120)
def test_four_processes_claim_every_task_exactly_once(db_path, tmp_path):
    store = Store(db_path)
    all_ids = store.enqueue_many([new(payload={"i": i}, priority=i % 3) for i in range(TASKS)], T0)
    store.close()
    assert len(set(all_ids)) == TASKS

    read_fd, write_fd = os.pipe()
    pids = []
    codes: list[int] = []
    try:
        for n in range(WORKERS):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(write_fd)
                    code = _work(db_path, n, read_fd, tmp_path)
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(read_fd)
        started = time.monotonic()
        os.write(write_fd, b"g" * WORKERS)  # one byte each: all start together
        for pid in pids:
            codes.append(reap(pid, timeout=100))
        elapsed = time.monotonic() - started
    finally:
        os.close(write_fd)
        for pid in pids[len(codes):]:  # only the unreaped: a reaped pid may be reused
            kill_tree(pid)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    errors = [p.read_text() for p in sorted(tmp_path.glob("error-*.txt"))]
    assert codes == [0] * WORKERS, errors
    per_worker = [(tmp_path / f"claimed-{n}.txt").read_text().split() for n in range(WORKERS)]
    claimed = [task_id for ids in per_worker for task_id in ids]
    assert len(claimed) == TASKS, f"{len(claimed) - len(set(claimed))} claimed twice"
    assert set(claimed) == set(all_ids)
    assert all(per_worker), f"a worker claimed nothing: {[len(w) for w in per_worker]} in {elapsed:.1f}s"

    store = Store(db_path)
    try:
        stats = store.stats(T0 + 2)
        assert stats.totals()[str(Status.SUCCEEDED)] == TASKS
        assert stats.totals()[str(Status.RUNNING)] == 0
        db = store.conn.db
        assert db.execute("SELECT count(*), min(attempts), max(attempts) FROM tasks").fetchall() == [(TASKS, 1, 1)]
        assert db.execute("SELECT count(*), count(DISTINCT task_id) FROM attempts "
                          "WHERE outcome = 'succeeded'").fetchall() == [(TASKS, TASKS)]
        # Each task's result names the worker whose claim file lists it.
        owner_of = {task_id: n for n, ids in enumerate(per_worker) for task_id in ids}
        mismatched = [(i, by) for i, by in db.execute("SELECT id, result ->> 'by' FROM tasks")
                      if owner_of[i] != by]
        assert mismatched == []
    finally:
        store.close()
