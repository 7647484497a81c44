"""Process helpers of the store tests: reap a forked child with a deadline."""

from __future__ import annotations

import os

from tests.support import kill_tree, wait_until


def reap(pid: int, timeout: float = 20.0) -> int:
    """Wait (polling, with a deadline) for forked child `pid`; return its exit code
    (negative: the signal that killed it). Kills the child if the deadline passes."""
    status: list[int] = []

    def exited() -> bool:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status.append(raw)
        return bool(done)

    try:
        wait_until(exited, timeout=timeout, message=f"child {pid} did not exit")
    except AssertionError:
        kill_tree(pid)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(status[0])
