"""supervisor.store.migrate: forward-only numbered migrations tracked by user_version.

The central test migrates a database stopped at every earlier version up to the newest
and checks it ends with exactly the schema of a fresh one (Oban, River). A file written by
a newer taskvisor must be refused and left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

import apsw
import pytest

from supervisor.errors import SchemaTooNew, StoreError
from supervisor.store import Connection, Store, current_version, latest_version, migrate
from supervisor.store.migrate import Migration, migrations
from tests.store.factory import T0, new

# `supervisor.store.migrate` the attribute is the function; this is the module.
migrate_module = sys.modules["supervisor.store.migrate"]


def schema(conn: Connection) -> list[tuple[str, str, str, str]]:
    """sqlite_master as (type, name, table, sql) with whitespace and comments normalised."""
    rows = conn.db.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
    return [(t, n, tbl, _normalise(sql)) for t, n, tbl, sql in rows]


def _normalise(sql: str | None) -> str:
    if sql is None:
        return ""
    sql = re.sub(r"--[^\n]*", "", sql)
    return re.sub(r"\s+", " ", sql).replace("( ", "(").replace(" )", ")").strip()


def tables(conn: Connection) -> set[str]:
    return {r[0] for r in conn.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def companions(path) -> list[str]:
    """The -wal, -shm and -journal files present beside the database."""
    return [s for s in ("-wal", "-shm", "-journal") if os.path.exists(f"{path}{s}")]


def open_fds_on(path) -> list[str]:
    path = os.path.realpath(path)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(path):
            found.append(target)
    return found


@pytest.fixture
def fresh_schema(tmp_path):
    conn = Connection(tmp_path / "fresh.db")
    try:
        migrate(conn)
        return schema(conn)
    finally:
        conn.close()


# -- the numbered files ------------------------------------------------------------------

def test_migration_files_are_numbered_from_one_without_gaps():
    found = migrations()
    assert found, "no migration shipped"
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert latest_version() == len(found)
    assert all(m.sql.strip() and re.fullmatch(r"\w+", m.name) for m in found)


def test_fresh_database_reaches_the_latest_version(db_path):
    conn = Connection(db_path)
    try:
        assert current_version(conn) == 0
        assert migrate(conn) == (0, latest_version())
        assert current_version(conn) == latest_version()
        assert {"tasks", "task_deps", "attempts", "supervisors"} <= tables(conn)
    finally:
        conn.close()


def test_store_migrates_on_open(db_path):
    store = Store(db_path)
    try:
        assert current_version(store.conn) == latest_version()
    finally:
        store.close()


# -- from every earlier version ------------------------------------------------------------

def _insert_sample_row(conn: Connection) -> str | None:
    """Put one task (and one finished attempt of it) in, if the schema at this version
    has the tables."""
    if "tasks" not in tables(conn):
        return None
    with conn.write() as db:
        db.execute("INSERT INTO tasks (id, type, payload, status, created_at, run_after, attempts) "
                   "VALUES ('01OLDTASK', 'old', '{\"k\": 1}', 'queued', ?, ?, 1)", (T0, T0))
        if "attempts" in tables(conn):
            db.execute("INSERT INTO attempts (task_id, attempt, owner, started_at, ended_at, "
                       "outcome, reason) VALUES ('01OLDTASK', 1, 'old-sup', ?, ?, 'lost', 'old')",
                       (T0, T0 + 1))
    return "01OLDTASK"


@pytest.mark.parametrize("start", range(latest_version()))
def test_migrates_from_every_earlier_version(tmp_path, fresh_schema, start):
    path = tmp_path / f"at-{start}.db"
    conn = Connection(path)
    try:
        assert migrate(conn, target=start) == (0, start)
        assert current_version(conn) == start
        row_id = _insert_sample_row(conn)
        assert migrate(conn) == (start, latest_version())
        assert current_version(conn) == latest_version()
        assert schema(conn) == fresh_schema
    finally:
        conn.close()
    store = Store(path)
    try:
        if row_id:  # the data written at the old version is still there and usable
            old = store.get(row_id)
            assert old.payload == {"k": 1}
            assert [(a.attempt, a.outcome, a.ended_at) for a in old.history] == [(1, "lost", T0 + 1)]
            assert store.stats(T0).counts == {"queued": {"old": 1}}
            assert store.claim("o", T0, lease_s=30).id == row_id
            assert store.stats(T0).counts == {"running": {"old": 1}}
        store.enqueue(new(), T0)
    finally:
        store.close()


def test_migrate_is_idempotent(db_path, fresh_schema):
    conn = Connection(db_path)
    try:
        migrate(conn)
        latest = latest_version()
        assert migrate(conn) == (latest, latest)
        assert migrate(conn, target=0) == (latest, latest)  # forward only: never down
        assert current_version(conn) == latest
        assert schema(conn) == fresh_schema
    finally:
        conn.close()
    # Opening the store again (which migrates) changes nothing either.
    for _ in range(2):
        Store(db_path).close()
    conn = Connection(db_path)
    try:
        assert schema(conn) == fresh_schema
    finally:
        conn.close()


def test_a_failing_migration_leaves_the_previous_version_whole(db_path, monkeypatch):
    shipped = migrations()
    broken = Migration(len(shipped) + 1, "broken",
                       "CREATE TABLE half_done (x); INSERT INTO no_such_table VALUES (1);")
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*shipped, broken])
    conn = Connection(db_path)
    try:
        migrate(conn, target=len(shipped))
        before = schema(conn)
        with pytest.raises(StoreError, match="no_such_table"):
            migrate(conn)
        assert current_version(conn) == len(shipped)
        assert schema(conn) == before  # half_done rolled back with the rest
        assert not conn.db.in_transaction
    finally:
        conn.close()


# -- a database from the future ------------------------------------------------------------

def _newer_database(path, *, wal: bool) -> None:
    """A file as a newer taskvisor would leave it: user_version past ours, some data."""
    db = apsw.Connection(str(path))
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, shiny_new_column BLOB)")
    db.execute("INSERT INTO tasks VALUES ('01FUTURE', x'00ff')")
    db.execute(f"PRAGMA user_version={latest_version() + 1}")
    db.close()


@pytest.mark.parametrize("migrate_on_open", [True, False])
def test_newer_schema_is_refused_and_the_file_is_untouched(db_path, migrate_on_open):
    _newer_database(db_path, wal=True)
    before = digest(db_path)
    with pytest.raises(SchemaTooNew, match=rf"schema version {latest_version() + 1}.*Upgrade taskvisor"):
        Store(db_path, migrate=migrate_on_open)
    assert digest(db_path) == before
    db = apsw.Connection(str(db_path))  # the data of the newer release is all there
    try:
        assert db.execute("SELECT * FROM tasks").fetchall() == [("01FUTURE", b"\x00\xff")]
        assert db.execute("PRAGMA user_version").fetchall()[0][0] == latest_version() + 1
    finally:
        db.close()


def test_newer_schema_is_refused_by_migrate_itself(db_path):
    _newer_database(db_path, wal=True)
    conn = Connection(db_path)
    try:
        with pytest.raises(SchemaTooNew, match="the file was not changed"):
            migrate(conn)
        assert current_version(conn) == latest_version() + 1
    finally:
        conn.close()


def test_newer_schema_in_rollback_journal_mode_is_not_switched_to_wal(db_path):
    """Refused before anything writes to it: switching to WAL alone would rewrite the
    header (bytes 18-19 go 1 -> 2, and the change counter moves)."""
    _newer_database(db_path, wal=False)
    before = digest(db_path)
    with pytest.raises(SchemaTooNew):
        Store(db_path)
    assert digest(db_path) == before


def test_refused_newer_database_is_not_left_open(db_path):
    """A refused file is closed again: no descriptor on it, no -wal/-shm left behind
    (a Connection registered in the module's `_open` set would live forever)."""
    _newer_database(db_path, wal=True)
    with pytest.raises(SchemaTooNew):
        Store(db_path)
    assert open_fds_on(db_path) == []
    assert companions(db_path) == []
