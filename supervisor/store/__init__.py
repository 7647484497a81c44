"""The store: taskvisor's only owner of SQL and of the database file.

`Store(path)` opens (and migrates) a database; its methods are the operations, each one
transaction. Rows come back as frozen dataclasses; failures as StoreError subclasses.
Nothing outside this package writes SQL.
"""

from supervisor.store.connection import Connection, check_sqlite_version
from supervisor.store.ids import new_id
from supervisor.store.migrate import current_version, latest_version, migrate
from supervisor.store.rows import (
    FINAL, UNFINISHED, Attempt, AttemptEnd, Lease, NewTask, Outcome, Stats, Status, Task, iso)
from supervisor.store.tasks import Store

__all__ = [
    "Attempt", "AttemptEnd", "Connection", "FINAL", "Lease", "NewTask", "Outcome", "Stats",
    "Status", "Store", "Task", "UNFINISHED", "check_sqlite_version", "current_version", "iso",
    "latest_version", "migrate", "new_id",
]
