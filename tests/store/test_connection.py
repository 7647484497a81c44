"""supervisor.store.connection: file modes, pragmas, the fork guard and error mapping.

Every test opens a real file in tmp_path. The fork test forks for real: the child reports
through its exit code and always leaves with os._exit, so no pytest machinery (and no
destructor of an inherited connection) runs in it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from supervisor.errors import (
    ForkedConnection,
    SQLiteTooOld,
    StoreError,
    StoreUnavailable,
)
from supervisor.store import Connection, Store, check_sqlite_version
from supervisor.store import connection as connection_module
from tests.store.factory import T0, new
from tests.store.forking import reap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pragma(store_or_conn, name: str):
    conn = store_or_conn.conn if isinstance(store_or_conn, Store) else store_or_conn
    return conn.db.execute(f"PRAGMA {name}").fetchall()[0][0]


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# -- files and pragmas ------------------------------------------------------------------

def test_database_wal_and_shm_files_are_readable_by_owner_only(db_path):
    # umask 0 would leave a file made with the default 0644 world-readable: the mode must
    # come from the store, not from the caller's umask.
    with umask(0):
        store = Store(db_path)
        store.enqueue(new(payload={"secret": "api-key"}), T0)
    try:
        wal, shm = f"{db_path}-wal", f"{db_path}-shm"
        assert os.path.exists(wal) and os.path.exists(shm)
        assert {p: oct(mode_of(p)) for p in (db_path, wal, shm)} == {
            p: oct(0o600) for p in (db_path, wal, shm)}
    finally:
        store.close()


def test_wal_foreign_keys_and_synchronous_normal_by_default(store):
    assert pragma(store, "journal_mode") == "wal"
    assert pragma(store, "foreign_keys") == 1
    assert pragma(store, "synchronous") == 1  # NORMAL


def test_a_new_database_gets_small_pages_and_an_existing_one_keeps_its_own(tmp_path):
    fresh = Store(tmp_path / "fresh.db")
    try:
        assert pragma(fresh, "page_size") == connection_module.PAGE_SIZE == 1024
    finally:
        fresh.close()
    import apsw  # a file made before taskvisor chose 1 KiB pages: SQLite's default 4 KiB
    other = apsw.Connection(str(tmp_path / "other.db"))
    other.execute("PRAGMA page_size=4096")
    other.execute("CREATE TABLE t (x)")
    other.close()
    store = Store(tmp_path / "other.db")
    try:
        assert pragma(store, "page_size") == 4096
        assert pragma(store, "journal_mode") == "wal"
        store.enqueue(new(), T0)
        assert store.stats(T0).counts == {"queued": {"t": 1}}
    finally:
        store.close()


@pytest.mark.parametrize("value, expected", [("FULL", 2), ("full", 2), ("NORMAL", 1)])
def test_synchronous_is_selectable(db_path, value, expected):
    store = Store(db_path, synchronous=value)
    try:
        assert pragma(store, "synchronous") == expected
    finally:
        store.close()


def test_synchronous_other_than_normal_or_full_is_refused(db_path):
    with pytest.raises(StoreError, match="synchronous must be NORMAL or FULL"):
        Connection(db_path, synchronous="OFF")


def test_busy_timeout_is_set_in_milliseconds(db_path):
    conn = Connection(db_path, busy_timeout_s=2.5)
    try:
        assert pragma(conn, "busy_timeout") == 2500
    finally:
        conn.close()


def test_a_write_lock_held_past_the_busy_timeout_gives_store_unavailable(db_path):
    holder = Store(db_path)
    waiter = Store(db_path, busy_timeout_s=0.05)
    try:
        with holder.conn.write(), pytest.raises(StoreUnavailable, match="locked past the busy timeout"):
            waiter.enqueue(new(), T0)
        # The lock is gone with the holder's transaction; the waiter writes now.
        waiter.enqueue(new(), T0)
        assert len(holder.list()) == 1
    finally:
        waiter.close()
        holder.close()


def test_write_rolls_back_on_an_exception(store):
    with pytest.raises(RuntimeError), store.conn.write() as db:
        db.execute("INSERT INTO supervisors (owner, host, pid, pid_started_at, started_at, "
                   "heartbeat_at, pool_size, version) VALUES ('o','h',1,0,0,0,1,'x')")
        raise RuntimeError("boom")
    assert store.supervisors() == []
    assert not store.conn.db.in_transaction


def test_sqlite_version_check_names_the_minimum(monkeypatch):
    check_sqlite_version()  # the bundled SQLite is new enough
    monkeypatch.setattr(connection_module.apsw, "sqlite_lib_version", lambda: "3.34.1")
    with pytest.raises(SQLiteTooOld, match=r"3\.34\.1 is too old.*3\.35"):
        check_sqlite_version()


# -- fork ------------------------------------------------------------------------------

CHILD_OK, CHILD_NO_ERROR, CHILD_WRONG_ERROR, CHILD_OWN_STORE_FAILED, CHILD_CRASHED = range(5)


@pytest.mark.timeout(30)
def test_connection_used_in_a_forked_child_raises_and_parent_database_stays_intact(db_path):
    store = Store(db_path)
    first = store.enqueue(new(payload={"n": 1}), T0)
    pid = os.fork()
    if pid == 0:  # the child: report by exit code only, leave by os._exit whatever happens
        code = CHILD_CRASHED
        try:
            try:
                store.get(first)
                code = CHILD_NO_ERROR
            except ForkedConnection:
                code = CHILD_OK
            except BaseException:  # noqa: BLE001 - the child reports, never raises
                code = CHILD_WRONG_ERROR
            if code == CHILD_OK:
                try:
                    with store.conn.write():
                        pass
                    code = CHILD_NO_ERROR
                except ForkedConnection:
                    pass
            if code == CHILD_OK:
                # Dropping and collecting the inherited store must not close its handle,
                # and a store of the child's own works on the same file.
                store.close()
                gc.collect()
                own = Store(db_path)
                try:
                    assert own.get(first).payload == {"n": 1}
                    own.enqueue(new(payload={"n": "child"}), T0 + 1)
                finally:
                    own.close()
        except BaseException:  # noqa: BLE001 - the child reports, never raises
            code = CHILD_OWN_STORE_FAILED if code == CHILD_OK else code
        finally:
            os._exit(code)
    try:
        assert reap(pid) == CHILD_OK
        # The parent's connection still works, reads and writes, and the file is sound.
        second = store.enqueue(new(payload={"n": 2}), T0 + 2)
        assert store.get(second).payload == {"n": 2}
        assert sorted(str(t.payload["n"]) for t in store.list()) == ["1", "2", "child"]
        assert pragma(store, "integrity_check") == "ok"
        assert os.path.exists(f"{db_path}-wal")
    finally:
        store.close()
    reopened = Store(db_path)
    try:
        assert len(reopened.list()) == 3
        assert pragma(reopened, "integrity_check") == "ok"
    finally:
        reopened.close()


# -- failures of the file system ----------------------------------------------------------

def test_disk_full_gives_store_unavailable_and_writes_nothing(store):
    store.enqueue(new(), T0)
    pages = pragma(store, "page_count")
    # SQLITE_FULL without filling a real disk: cap the file at its current size.
    store.conn.db.execute(f"PRAGMA max_page_count={pages}")
    big = [new(payload={"blob": "x" * 4000}) for _ in range(50)]
    with pytest.raises(StoreUnavailable, match="disk is full.*Nothing was written") as info:
        store.enqueue_many(big, T0)
    assert str(store.path) in str(info.value)
    assert not store.conn.db.in_transaction
    assert len(store.list()) == 1
    store.conn.db.execute("PRAGMA max_page_count=1073741823")
    store.enqueue_many(big, T0)
    assert len(store.list(limit=1000)) == 51


FSIZE_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    sys.path.insert(0, {root!r})
    from supervisor.store import NewTask, Store
    store = Store({path!r})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
    limit = os.path.getsize({path!r} + "-wal") + 8192
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        store.enqueue_many([NewTask("t", json.dumps({{"blob": "x" * 8000}})) for _ in range(100)],
                           1800000000.0)
        print(json.dumps({{"error": None}}))
    except Exception as exc:
        print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
""")


@pytest.mark.timeout(60)
def test_a_write_refused_by_the_file_system_gives_store_unavailable(db_path):
    Store(db_path).close()
    out = subprocess.run([sys.executable, "-c", FSIZE_CHILD.format(root=ROOT, path=str(db_path))],
                         capture_output=True, text=True, timeout=50, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["error"] == "StoreUnavailable", report
    assert str(db_path) in report["message"]
    store = Store(db_path)
    try:
        assert store.list() == []
        assert pragma(store, "integrity_check") == "ok"
    finally:
        store.close()


@contextlib.contextmanager
def unwritable(folder):
    """Make `folder` refuse new files, for root too (mode bits do not stop root)."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a folder unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_new_database_in_an_unwritable_folder_gives_store_unavailable(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    with unwritable(folder), pytest.raises(StoreUnavailable, match="cannot create the database") as info:
        Store(folder / "taskvisor.db")
    assert str(folder / "taskvisor.db") in str(info.value)
    assert not (folder / "taskvisor.db").exists()


def test_existing_database_in_a_folder_that_became_unwritable_gives_store_unavailable(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    path = folder / "taskvisor.db"
    store = Store(path)
    store.enqueue(new(), T0)
    store.close()  # the last close checkpoints and removes -wal and -shm
    assert not os.path.exists(f"{path}-wal")
    # WAL mode must create -wal and -shm beside the file: it cannot.
    with unwritable(folder), pytest.raises(StoreUnavailable) as info:
        Store(path)
    assert str(path) in str(info.value)


def test_missing_parent_folder_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(StoreUnavailable, match="does not exist") as info:
        Store(missing / "taskvisor.db")
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_missing_database_without_create_says_so(db_path):
    with pytest.raises(StoreUnavailable, match="no such database"):
        Store(db_path, create=False)
    assert not db_path.exists()


def test_path_that_is_a_folder_gives_store_unavailable(tmp_path):
    with pytest.raises(StoreUnavailable, match="cannot open"):
        Store(tmp_path)


def test_file_that_is_not_sqlite_gives_store_unavailable(db_path):
    db_path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    with pytest.raises(StoreUnavailable, match="not a healthy SQLite database"):
        Store(db_path)
