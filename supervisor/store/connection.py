"""Opening the SQLite file: pragmas, permissions, transactions, fork safety, error mapping.

Owns the one place a connection is set up (WAL, synchronous, busy timeout, foreign keys,
the SQLite version check, mode 0600 on the file and its -wal/-shm, tightened if looser) and the write/read transaction helpers.
It must never hold SQL about tasks (that is `queries`) and a connection it opened must
never be used or closed by a forked child: the child gets `ForkedConnection` instead,
and the inherited handle is kept alive so its destructor never runs there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import apsw

from supervisor.errors import ForkedConnection, SQLiteTooOld, StoreError, StoreUnavailable

log = logging.getLogger("taskvisor.store")
MIN_SQLITE = (3, 35, 0)  # UPDATE … RETURNING

# Page size of a new file. Every commit appends each page it changed to the WAL, whole;
# an enqueue or a claim changes a few rows of about 200 bytes in 3 or 4 b-trees, so
# 1 KiB pages write a quarter of the bytes of SQLite's default 4 KiB: more enqueues a
# second (figures in benchmarks/README.md). Larger payloads and results overflow into
# more pages, which costs little next to a commit. An existing file keeps its size.
PAGE_SIZE = 1024

# Connections this process has opened. After fork the child moves them to _inherited
# and keeps the references for its whole life: if apsw closed them there, SQLite could
# checkpoint or delete the parent's WAL under its feet.
_open: "set[Connection]" = set()
_inherited: list[apsw.Connection] = []
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    for conn in list(_open):
        _inherited.append(conn._db)
        conn._forked = True
    _open.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_sqlite_version() -> None:
    """Raise SQLiteTooOld when the linked SQLite lacks UPDATE … RETURNING."""
    version = tuple(int(p) for p in apsw.sqlite_lib_version().split(".")[:3])
    if version < MIN_SQLITE:
        raise SQLiteTooOld(
            f"SQLite {apsw.sqlite_lib_version()} is too old: taskvisor needs 3.35 or newer "
            "(for UPDATE … RETURNING). Install a newer apsw wheel: pip install -U apsw"
        )


def translate(exc: BaseException, path: str) -> StoreError:
    """Turn an apsw exception into a StoreError whose message says what to do."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, apsw.FullError):
        return StoreUnavailable(
            f"{path}: the disk is full ({exc}). Nothing was written; free space on that "
            "disk (or prune old tasks: taskvisor prune --older-than 7d) and try again"
        )
    if isinstance(exc, (apsw.BusyError, apsw.LockedError)):
        return StoreUnavailable(
            f"{path}: the database stayed locked past the busy timeout ({exc}); "
            "another process holds a long write transaction"
        )
    if isinstance(exc, (apsw.CantOpenError, apsw.PermissionsError, apsw.ReadOnlyError)):
        return StoreUnavailable(f"{path}: cannot open or write the database ({exc}); check the path and its permissions")
    if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
        return StoreUnavailable(f"{path}: the file is not a healthy SQLite database ({exc})")
    if isinstance(exc, apsw.IOError):
        return StoreUnavailable(f"{path}: I/O error ({exc}); check the disk")
    return StoreError(f"{path}: {exc.__class__.__name__}: {exc}")


class Connection:
    """One apsw connection of this process, set up the taskvisor way.

    Use from one thread at a time. `write()` is a BEGIN IMMEDIATE transaction (a deferred
    one that reads then writes would get SQLITE_BUSY_SNAPSHOT at once, ignoring the busy
    timeout); `read()` a deferred one for a consistent snapshot.
    """

    def __init__(self, path: str | os.PathLike, *, synchronous: str = "NORMAL",
                 busy_timeout_s: float = 5.0, create: bool = True, max_version: int | None = None):
        check_sqlite_version()
        self.path = str(Path(path))
        self._pid = os.getpid()
        self._forked = False
        self._depth = 0
        self._savepoints = True  # do nested writes in the open transaction use savepoints?
        if create:
            _create_private(self.path)
        elif not os.path.exists(self.path):
            raise StoreUnavailable(f"{self.path}: no such database; run `taskvisor migrate` or check --db")
        flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
        try:
            self._db = apsw.Connection(self.path, flags=flags)
            self._db.set_busy_timeout(int(busy_timeout_s * 1000))
            if max_version is not None:
                # Before anything that writes (even switching to WAL rewrites the header):
                # a file from a newer taskvisor is refused untouched.
                from supervisor.store.migrate import check_not_newer
                version = self._db.execute("PRAGMA user_version").fetchall()[0][0]
                if version > max_version:
                    self._db.close()
                    check_not_newer(version, self.path)
            # A file refused above stays untouched; the -wal and -shm that WAL mode creates
            # below take the database file's mode, so tighten it first.
            _tighten_private(self.path)
            # A no-op unless the file is still empty (must precede the switch to WAL).
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
            if mode.lower() != "wal":
                raise StoreUnavailable(f"{self.path}: cannot switch to WAL mode (got {mode}); is it on a network filesystem?")
            sync = synchronous.upper()
            if sync not in ("NORMAL", "FULL"):
                raise StoreError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
            self._db.execute(f"PRAGMA synchronous={sync}")
            self._db.execute("PRAGMA foreign_keys=ON")
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc
        with _lock:
            _open.add(self)

    @property
    def db(self) -> apsw.Connection:
        """The raw apsw connection; raises ForkedConnection in a forked child."""
        if self._forked or os.getpid() != self._pid:
            raise ForkedConnection(
                f"{self.path}: this connection was opened by process {self._pid} and "
                "inherited across fork; open a new one in this process"
            )
        return self._db

    def write(self, *, savepoint: bool = True, nested_savepoints: bool = True) -> "_Write":
        """BEGIN IMMEDIATE … COMMIT; ROLLBACK on any exception, re-raised as StoreError.

        Nested inside another write() of this connection it joins the outer transaction,
        so a caller can group several operations into one commit (the supervisor writes
        a whole pass's outcomes at once). A nested write opens a savepoint, so an
        operation that fails inside a grouped transaction leaves nothing behind even when
        the caller handles the error; `savepoint=False` skips it for an operation whose
        only write is one statement (SQLite undoes a failed statement by itself).
        `nested_savepoints=False` on the outer write skips them for every write nested
        in it: for a caller that handles no error inside, so any failure rolls the whole
        group back (two statements less per operation: the supervisor's pass).

        A class rather than @contextmanager: it runs two or three times per supervisor
        pass; the generator machinery and the claim's savepoint were about a tenth of a
        claim + complete cycle (benchmarks/store_bench.py)."""
        return _Write(self, savepoint, nested_savepoints)

    @contextlib.contextmanager
    def read(self) -> Iterator[apsw.Connection]:
        """A deferred transaction: every statement inside sees one snapshot (inside a
        write() it simply joins that transaction)."""
        db = self.db
        if self._depth:
            yield db
            return
        try:
            db.execute("BEGIN")
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc
        try:
            yield db
        except BaseException as exc:
            raise _maybe_translate(exc, self.path) from exc
        finally:
            if db.in_transaction:
                try:
                    db.execute("COMMIT")
                except apsw.Error:
                    pass

    def close(self) -> None:
        """Close in the process that opened it; in a forked child this does nothing."""
        with _lock:
            _open.discard(self)
        if self._forked or os.getpid() != self._pid:
            return
        self._db.close()


class _Write:
    """The context manager of Connection.write() (see there)."""

    __slots__ = ("conn", "savepoint", "nested_savepoints", "db", "name")

    def __init__(self, conn: Connection, savepoint: bool, nested_savepoints: bool = True):
        self.conn = conn
        self.savepoint = savepoint
        self.nested_savepoints = nested_savepoints
        self.name = None

    def __enter__(self) -> apsw.Connection:
        conn = self.conn
        if conn._depth:
            # Joining the open transaction: the pid was checked when it began; a child
            # forked in the middle of it has _forked set (and .db raises there).
            db = self.db = conn.db if conn._forked else conn._db
            conn._depth += 1
            if self.savepoint and conn._savepoints:
                self.name = f"taskvisor_{conn._depth}"
                try:
                    db.execute(f"SAVEPOINT {self.name}")
                except BaseException as exc:
                    conn._depth -= 1
                    raise _maybe_translate(exc, conn.path) from exc
            return db
        db = self.db = conn.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except apsw.Error as exc:
            raise translate(exc, conn.path) from exc
        conn._depth = 1
        conn._savepoints = self.nested_savepoints
        return db

    def __exit__(self, exc_type, exc, tb) -> bool:
        conn, db = self.conn, self.db
        if conn._depth > 1:
            try:
                if self.name is not None:
                    if exc is None:
                        try:
                            db.execute(f"RELEASE {self.name}")
                        except BaseException as err:
                            exc = err
                    if exc is not None:
                        try:
                            db.execute(f"ROLLBACK TO {self.name}")
                            db.execute(f"RELEASE {self.name}")
                        except apsw.Error:
                            pass
            finally:
                conn._depth -= 1
            if exc is None:
                return False
            if isinstance(exc, apsw.Error):
                raise translate(exc, conn.path) from exc
            if exc_type is None:  # RELEASE failed with something other than apsw.Error
                raise exc
            return False
        try:
            if exc is None:
                try:
                    db.execute("COMMIT")
                    return False
                except BaseException as err:
                    exc = err
                    if not db.in_transaction:
                        raise _maybe_translate(exc, conn.path) from exc
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except apsw.Error:
                    pass
            if isinstance(exc, apsw.Error):
                raise translate(exc, conn.path) from exc
            if exc_type is None:
                raise exc
            return False
        finally:
            conn._depth = 0


def _maybe_translate(exc: BaseException, path: str) -> BaseException:
    return translate(exc, path) if isinstance(exc, apsw.Error) else exc


def _tighten_private(path: str) -> None:
    """Set mode 0600 on an existing database file and its -wal and -shm that others may
    read (made by an older version, a copy, or a umask of 022), and log that it did.

    Task payloads and results can hold secrets. A file this process cannot chmod (owned
    by another user) is left as it is, with a warning."""
    if path == ":memory:":
        return
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except OSError:
            continue
        if not mode & 0o077:
            continue
        try:
            os.chmod(name, 0o600)
        except OSError as exc:
            log.warning("%s is readable by other users (mode %o) and could not be made "
                        "private (%s); run chmod 600 on it", name, mode, exc.strerror)
        else:
            log.warning("%s had mode %o (readable by other users); set it to 600", name, mode)


def _create_private(path: str) -> None:
    """Create the file with mode 0600 before SQLite opens it.

    SQLite gives the -wal and -shm files the mode of the database file, so all three stay
    readable by the owner alone.
    """
    if path == ":memory:" or os.path.exists(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StoreUnavailable(f"{path}: the folder {parent} does not exist; create it or choose another --db")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreUnavailable(f"{path}: cannot create the database ({exc.strerror})") from exc
