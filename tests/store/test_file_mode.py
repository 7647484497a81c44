"""A database file that already exists with a looser mode (0644 from an older version, a
copy or a umask of 022) is tightened to 0600 at open, with its -wal and -shm, and the log
says so; a private file is opened without a word."""

from __future__ import annotations

import logging
import os
import stat

from supervisor.store import Store
from tests.store.factory import T0, new


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_existing_0644_database_wal_and_shm_are_tightened_to_0600_and_logged(db_path, caplog):
    first = Store(db_path)
    first.enqueue(new(payload={"secret": "api-key"}), T0)
    wal, shm = f"{db_path}-wal", f"{db_path}-shm"
    for name in (db_path, wal, shm):
        assert os.path.exists(name)
        os.chmod(name, 0o644)
    try:
        with caplog.at_level(logging.INFO, logger="taskvisor.store"):
            second = Store(db_path)
        try:
            assert [mode_of(n) for n in (db_path, wal, shm)] == [0o600] * 3
            said = [r.getMessage() for r in caplog.records if r.name == "taskvisor.store"]
            for name in (db_path, wal, shm):
                assert any(str(name) in line and "644" in line and "600" in line
                           for line in said), said
            second.enqueue(new(), T0)  # still usable
        finally:
            second.close()
    finally:
        first.close()


def test_private_database_is_opened_without_a_log_line(db_path, caplog):
    Store(db_path).close()
    with caplog.at_level(logging.INFO, logger="taskvisor.store"):
        Store(db_path).close()
    assert mode_of(db_path) == 0o600
    assert not [r for r in caplog.records if r.name == "taskvisor.store"]
