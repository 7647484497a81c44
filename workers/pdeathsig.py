"""The parent-death signal (Linux prctl PR_SET_PDEATHSIG) through ctypes, and the two
other prctl calls the process tree needs (child subreaper, process name).

Owns these calls. Elsewhere it does nothing and callers rely on their getppid() checks.
It fires when the creating thread exits and is cleared by fork, so set it in the child
and then re-check getppid() (the parent may have died before the call).
"""

from __future__ import annotations

import ctypes
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

_libc = None
_prctl = None  # typed: PR_SET_NAME's argument is a pointer
_prctl_ints = None  # untyped, for small ints: what a task process calls, bound here
if sys.platform.startswith("linux"):
    try:
        # The running program's own symbols (libc's among them), not ctypes.util's
        # find_library: that imports subprocess, tempfile and random into the fork
        # server, and random's after-fork hook reseeds in every task process.
        _libc = ctypes.CDLL(None, use_errno=True)
        # Resolved now, in the fork server. The calls a task process makes pass small
        # ints only, untyped: argtypes' conversions (a ctypes object per argument) cost
        # more page faults, 12 in a child that makes only this call, 3 in a task process
        # (2026-12-04). Only PR_SET_NAME's pointer needs the typed one.
        _prctl_ints = _libc["prctl"]  # a function object of its own (not the cached one)
        _prctl = _libc.prctl
        _prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        _prctl.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc = _prctl = _prctl_ints = None


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits."""
    if _prctl_ints is None:
        return False
    return _prctl_ints(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def set_child_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init, so it can
    reap them (a task's grandchild that outlives it must not become a zombie of init)."""
    if _prctl_ints is None:
        return False
    return _prctl_ints(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def set_process_name(name: bytes) -> bool:
    """Set this process's name as `ps` and /proc/PID/comm show it (15 bytes at most)."""
    if _prctl is None:
        return False
    buf = ctypes.create_string_buffer(name[:15])
    return _prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0) == 0
