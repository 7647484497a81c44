"""kill -9 in the middle of a large enqueue_many: afterwards the file holds all or nothing.

A subprocess opens a Store and enqueues 200,000 tasks in one enqueue_many. The parent
SIGKILLs it at several moments of that transaction: just after it took the write lock
(nothing spilled yet), after the page cache spilled a little and a lot into the WAL, and
after the commit (the connection never closed). Then a fresh Store must recover a sound
file with either none or every one of the tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import apsw
import pytest

from supervisor.store import Store
from tests.store.factory import T0, new
from tests.support import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 200_000
MIB = 1 << 20

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from supervisor.store import NewTask, Store
    store = Store({path!r})
    tasks = [NewTask("bulk", '{{"i": %d}}' % i, priority=i % 7) for i in range({n})]
    print("started", flush=True)
    store.enqueue_many(tasks, {now!r})
    print("done", flush=True)
    sys.stdin.read()  # hold the connection open until killed
""")


def wal_size(path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


def write_locked(path) -> bool:
    """True while another connection holds the write lock (the batch's transaction)."""
    probe = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except apsw.BusyError:
        return True
    finally:
        probe.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment", ["lock-taken", "wal+4MiB", "wal+36MiB", "after-commit"])
def test_sigkill_during_enqueue_many_leaves_all_or_nothing(db_path, moment):
    Store(db_path).close()  # created and migrated; the child only writes the batch
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=ROOT, path=str(db_path), n=N, now=T0)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started", proc.stderr.read()
        base = wal_size(db_path)
        if moment == "lock-taken":
            wait_until(lambda: write_locked(db_path) or proc.poll() is not None, timeout=60)
            assert wal_size(db_path) < base + 4 * MIB  # killed before much spilled
        elif moment.startswith("wal+"):
            grow = int(moment[4:-3]) * MIB
            wait_until(lambda: wal_size(db_path) >= base + grow or proc.poll() is not None,
                       timeout=90, interval=0.005)
        else:
            assert proc.stdout.readline().strip() == "done", proc.stderr.read()
        assert proc.poll() is None, f"the batch finished before the kill: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()

    store = Store(db_path)
    try:
        db = store.conn.db
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        count, distinct = db.execute("SELECT count(*), count(DISTINCT payload ->> 'i') FROM tasks").fetchall()[0]
        expected = N if moment == "after-commit" else 0
        assert count in (0, N), f"{count} of {N} tasks survived a kill: a torn batch"
        assert (count, distinct) == (expected, expected)
        # The recovered file takes new writes and serves claims.
        store.enqueue(new(type="after-crash"), T0 + 1)
        assert store.claim("o", T0 + 2, lease_s=30) is not None
    finally:
        store.close()

