"""A full disk while the supervisor records: outcomes wait in memory, nothing is lost.

The database lives on a small tmpfs of its own (`mount -t tmpfs -o size=...`, as root;
else a loop-mounted ext2 image; the test skips, saying why, only if neither works). Under
load the test truncates the WAL (so every later commit must grow it) and fills the rest of
the filesystem with a filler file; writes then fail with SQLITE_FULL. Tasks keep ending
while the disk is full, and their outcomes are neither recorded nor lost: the tasks read
`running` in the store. After the filler is deleted, every outcome is recorded, and each
task ran exactly once (the run log lives on another filesystem, tmp_path).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import apsw
import pytest

from tests.soak.harness import read_runs
from tests.support import wait_until

SIZE_MB = 8
LOW, HIGH = 0.3, 1.2


def mount_small_disk(where: Path) -> str:
    """Mount a SIZE_MB filesystem at `where`; returns how. Skips if the sandbox allows none."""
    where.mkdir()
    tries = []
    if shutil.which("mount"):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0700", "tmpfs",
                            str(where)], capture_output=True, text=True)
        if r.returncode == 0:
            return "tmpfs"
        tries.append(f"mount -t tmpfs: {r.stderr.strip() or r.returncode}")
        image = where.parent / "disk.img"
        mkfs = shutil.which("mkfs.ext2") or shutil.which("mke2fs")
        if mkfs:
            with open(image, "wb") as f:
                f.truncate(SIZE_MB << 20)
            made = subprocess.run([mkfs, "-q", "-F", str(image)], capture_output=True, text=True)
            r = subprocess.run(["mount", "-o", "loop", str(image), str(where)],
                               capture_output=True, text=True)
            if made.returncode == 0 and r.returncode == 0:
                return "loop ext2"
            tries.append(f"mount -o loop: {made.stderr.strip() or r.stderr.strip()}")
        else:
            tries.append("no mkfs.ext2 for a loop-mounted image")
    else:
        tries.append("no mount command")
    pytest.skip("cannot make a small filesystem to fill: " + "; ".join(tries))


def fill(folder: Path) -> int:
    """Write a filler file until the filesystem says ENOSPC; returns its size in bytes."""
    size = 0
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 512, 1):
            block = b"\xff" * chunk
            while True:
                try:
                    size += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return size


def truncate_wal(db_path: Path) -> None:
    """Checkpoint the WAL and cut it to zero bytes, so the next commit has to grow it."""
    db = apsw.Connection(str(db_path))
    try:
        db.set_busy_timeout(2000)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        db.close()


@pytest.mark.timeout(900)
def test_full_disk_while_recording_loses_nothing(soak, scale, tmp_path):
    disk = tmp_path / "disk"
    how = mount_small_disk(disk)
    try:
        run_full_disk(soak, scale, disk, how)
    finally:
        for sup in soak.sups:
            sup.cleanup()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def run_full_disk(soak, scale, disk: Path, how: str) -> None:
    n_tasks, rounds = (400, 6) if scale.long else (60, 2)
    sup = soak.supervisor(supervisor={"pool_size": 4, "lease_s": 30,
                                      "database": str(disk / "t.db"), "busy_timeout_s": 1},
                          defaults={"max_attempts": 3})
    soak.enqueue(sup, n_tasks, LOW, HIGH, max_attempts=3)
    held_total, catch_up = 0, 0.0
    for _ in range(rounds):
        wait_until(lambda: len(read_runs(soak.dir)) >= 4, timeout=30)
        truncate_wal(sup.db_path)
        filled = fill(disk)
        full_at = time.time()
        soak.last_disruption = time.monotonic()
        # Runs end while the disk is full; their tasks must still read `running`.
        def held():
            ended = [r for r in read_runs(soak.dir) if r.end is not None and r.end > full_at + 0.2]
            return ended if len(ended) >= 3 else None
        ended = wait_until(held, timeout=30, message="no task ended while the disk was full")
        statuses = {r.task: sup.get(r.task).status for r in ended}
        assert sup.proc.poll() is None, f"the supervisor died on a full disk:\n{sup.log()[-3000:]}"
        waiting = [t for t, s in statuses.items() if s == "running"]
        assert waiting, (f"{len(ended)} tasks ended on a full disk ({filled} bytes of filler) "
                         f"but were recorded anyway, so no write failed: {statuses}")
        held_total += len(waiting)
        os.unlink(disk / "filler")
        soak.last_disruption = freed = time.monotonic()
        wait_until(lambda: all(sup.get(t).status == "succeeded" for t in waiting), timeout=30,
                   message="outcomes held in memory were not recorded after space came back")
        catch_up = max(catch_up, time.monotonic() - freed)
    drain_s = soak.wait_drained(sup, timeout=120)
    failures = sup.log().count("database write failed")
    soak.finish(drain_s, earlier=set(),
                extra={"notes": f"{how} full x{rounds}: {held_total} outcomes held in memory, "
                                f"recorded <= {catch_up:.1f}s after space came back; "
                                f"{failures} write failure(s) logged"})
