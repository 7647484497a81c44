"""The exception tree of taskvisor.

Owns every exception type the supervisor side raises; never imports anything else
from the package, so every module may import it. (The HTTP server's own error answer,
`supervisor.api.ErrorAnswer`, never leaves the server: a client gets `ApiError`.)

    TaskvisorError
     ├── ConfigError          bad config: carries every error found, each naming key and file
     ├── InputError           bad input from a user or program (payload, option, id)
     │    ├── NotFound        an unknown task id
     │    ├── DependencyError depends_on names a missing task or makes a cycle
     │    └── ApiError        the HTTP API refused a request (supervisor.apiclient)
     └── StoreError           the database refused or failed
          ├── StoreUnavailable  cannot be opened / disk full / I/O error / locked too long
          ├── SchemaTooNew      the file was written by a newer taskvisor
          ├── SQLiteTooOld      the SQLite library lacks what we need (RETURNING)
          ├── ForkedConnection  a connection inherited across fork() was used
          └── LeaseLost         a fenced write matched no row: another owner has the task
"""

from __future__ import annotations


class TaskvisorError(Exception):
    """Base of every error taskvisor raises on purpose."""


class ConfigError(TaskvisorError):
    """The config is invalid; ``errors`` lists every problem, each a full sentence."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


class InputError(TaskvisorError):
    """Bad input: the message says what is wrong and what to do. ``field`` names the field."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class NotFound(InputError):
    """No task has this id."""


class DependencyError(InputError):
    """A dependency names an unknown task or would make a cycle."""


class ApiError(InputError):
    """The supervisor refused an API request (`supervisor.apiclient.ApiClient`); the message
    is its answer, ``status`` the HTTP status and ``field`` the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"the supervisor answered HTTP {status}: {message}", field=field)
        self.status = status


class StoreError(TaskvisorError):
    """The database failed; the message says what to do."""


class StoreUnavailable(StoreError):
    """The database cannot be used right now (missing, locked, disk full, I/O error)."""


class SchemaTooNew(StoreError):
    """The database schema is newer than this code: upgrade taskvisor, never downgrade the file."""


class SQLiteTooOld(StoreError):
    """The linked SQLite lacks a feature taskvisor needs."""


class ForkedConnection(StoreError):
    """A connection opened by another process (before fork) was used in this one."""


class LeaseLost(StoreError):
    """A write fenced by (id, attempt, owner) changed nothing: the lease is gone."""
