"""The database file a supervisor serves: its identity, and the registration beside it.

Owns two facts. `DatabaseFile` remembers the device and inode of the file the supervisor
opened, so one `os.stat` tells whether the path still names it (a deleted or replaced
file would swallow every later write, lost at exit). The registration file
`.<name>.supervisor.<pid>` (mode 0600, JSON: pid, process start time, host, database),
written while the supervisor runs and removed at its exit, lets a client see that a live
supervisor expects the database to exist, and refuse to create an empty one in its place
(`refuse_if_served`). Its name starts with a dot so that `rm taskvisor.db*` leaves it.
It never opens the database, never signals a process and never writes task state.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psutil

from supervisor.errors import StoreUnavailable

START_TIME_SLACK_S = 0.05  # two reads of a process's start time differ by less


def registration_prefix(database: str | os.PathLike) -> Path:
    """The path every registration of `database` starts with (the pid follows)."""
    path = Path(os.path.abspath(database))
    return path.with_name(f".{path.name}.supervisor.")


def process_start_time(pid: int) -> float | None:
    """The process's start time (epoch seconds), None when it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class DatabaseFile:
    """The file this supervisor opened at `path`. Create it right after the database was
    opened; `register()` once ready, `unregister()` at exit (both in the main thread)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.abspath(path))
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)
        self.registration = Path(f"{registration_prefix(self.path)}{os.getpid()}")
        self.registered = False

    def problem(self) -> str | None:
        """None while the path still names the file that was opened; else a sentence
        naming the file and what happened to it. One stat: cheap enough every second."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (f"the database file {self.path} was deleted while this supervisor was "
                    "using it")
        except OSError as exc:
            return f"the database file {self.path} cannot be checked ({exc.strerror})"
        if (st.st_dev, st.st_ino) != self.identity:
            return (f"the database file {self.path} was replaced by another file while this "
                    "supervisor was using it")
        return None

    def register(self) -> None:
        """Write this process's registration (0600, replaced atomically); remove the
        registrations of dead supervisors of this file on this host."""
        for stale in _registrations(self.path):
            if stale.get("stale") and stale["file"] != self.registration:
                _unlink(stale["file"])
        body = {"pid": os.getpid(), "pid_started_at": process_start_time(os.getpid()),
                "host": socket.gethostname(), "database": str(self.path)}
        tmp = self.registration.with_name(self.registration.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        os.replace(tmp, self.registration)
        self.registered = True

    def unregister(self) -> None:
        if self.registered:
            _unlink(self.registration)
            self.registered = False


def live_supervisors(database: str | os.PathLike) -> list[dict]:
    """The registrations of `database` whose process is alive on this host."""
    return [r for r in _registrations(Path(os.path.abspath(database))) if not r.get("stale")]


def refuse_if_served(database: str | os.PathLike) -> None:
    """Call before creating `database` implicitly (it does not exist): raise
    StoreUnavailable when a live supervisor registered it, i.e. it was deleted under a
    running supervisor and a new file would be a second database nobody serves."""
    live = live_supervisors(database)
    if live:
        pids = ", ".join(str(r["pid"]) for r in live)
        raise StoreUnavailable(
            f"{os.path.abspath(database)}: the database file is missing, but supervisor "
            f"pid {pids} is running on it: the file was deleted under a running supervisor "
            "(it stops on its own within seconds). Restore the file if you have a copy, or "
            "stop that supervisor and create a new database with `taskvisor migrate`; "
            "nothing was written")


def _registrations(path: Path) -> list[dict]:
    prefix = registration_prefix(path)
    host = socket.gethostname()
    found = []
    try:
        names = os.listdir(prefix.parent)
    except OSError:
        return found
    for name in names:
        if not name.startswith(prefix.name) or not name[len(prefix.name):].isdigit():
            continue
        file = prefix.parent / name
        try:
            body = json.loads(file.read_text(encoding="utf-8"))
            pid, started = int(body["pid"]), body.get("pid_started_at")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written or foreign: neither proof of life nor of death
        if body.get("host") != host:
            continue  # another machine's pids mean nothing here (and it is unsupported)
        now_started = process_start_time(pid)
        alive = now_started is not None and (
            started is None or abs(now_started - float(started)) <= START_TIME_SLACK_S)
        found.append({**body, "file": file, "stale": not alive})
    return found


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
