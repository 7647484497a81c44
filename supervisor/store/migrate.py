"""Schema migrations: numbered, forward-only `migrations/NNNN_name.sql` files.

Owns `PRAGMA user_version`: applies every pending file in one IMMEDIATE transaction, so a
crash leaves the old version intact. It must never touch a database whose version is
newer than the newest file here (that file belongs to a newer taskvisor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from supervisor.errors import SchemaTooNew
from supervisor.store.connection import Connection


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with this code, in order; versions are 1, 2, 3, …"""
    found = []
    for entry in resources.files("supervisor.store").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise RuntimeError(f"migration numbering has a gap at {expected:04d}")
    return found


def latest_version() -> int:
    return len(migrations())


def current_version(conn: Connection) -> int:
    return conn.db.execute("PRAGMA user_version").fetchall()[0][0]


def check_not_newer(version: int, path: str) -> None:
    newest = latest_version()
    if version > newest:
        raise SchemaTooNew(
            f"{path}: the database has schema version {version}, newer than this taskvisor "
            f"knows ({newest}); it was written by a newer release. Upgrade taskvisor "
            "(pip install -U taskvisor); the file was not changed"
        )


def migrate(conn: Connection, *, target: int | None = None) -> tuple[int, int]:
    """Bring the schema to `target` (default: the newest). Returns (from, to) versions.

    Raises SchemaTooNew, untouched, when the file is newer than this code.
    """
    all_migrations = migrations()
    target = len(all_migrations) if target is None else target
    check_not_newer(current_version(conn), conn.path)
    with conn.write() as db:
        # Read again inside the lock: another process may have migrated meanwhile.
        start = db.execute("PRAGMA user_version").fetchall()[0][0]
        check_not_newer(start, conn.path)
        for mig in all_migrations[start:target]:
            db.execute(mig.sql)
            db.execute(f"PRAGMA user_version={mig.version}")
        end = max(start, target)
    return start, end
