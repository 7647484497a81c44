"""Task ids: 26-character, time-ordered (ULID-style, Crockford base32), so id order is
enqueue order and the claim index can use the id for FIFO. Used by the store and, for
ctx.spawn, by task processes (so a spawn returns its id at once). Owns the id's form
(`is_task_id`, what the supervisor checks ids from a task or a client against) and
nothing else."""

from __future__ import annotations

import os
import _thread

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DIGITS = frozenset(_ALPHABET)
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # every 10-bit value as 2 digits
_SHIFTS = tuple(range(120, -1, -10))
_lock = _thread.allocate_lock()  # not threading: the fork server stays lean
_last = [0, 0]  # last millisecond, last 80-bit random part (monotonic within a ms)


def new_id(now: float) -> str:
    """A fresh id for a task enqueued at `now` (epoch seconds)."""
    ms = int(now * 1000)
    with _lock:
        if ms <= _last[0]:
            ms = _last[0]
            rand = _last[1] + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to count up
        _last[0], _last[1] = ms, rand
    value = (ms << 80) | (rand & ((1 << 80) - 1))
    # 130 bits (the top two zero), ten at a time: 13 lookups instead of 26 (a single
    # enqueue spends a few percent of its time here).
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def is_task_id(text) -> bool:
    """True when `text` has the form new_id makes: 26 Crockford base32 digits, upper case."""
    return isinstance(text, str) and len(text) == 26 and _DIGITS.issuperset(text)


def _reset_after_fork() -> None:
    # A forked child must not continue the parent's sequence with the same random part.
    _last[0], _last[1] = 0, 0


os.register_at_fork(after_in_child=_reset_after_fork)
