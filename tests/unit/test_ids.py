"""workers.ids (used by the store and by ctx.spawn): 26 Crockford base32 digits, time-ordered, unique within a ms."""

from __future__ import annotations

import os
import re

import pytest

from workers import ids
from tests.store.forking import reap

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def decode(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 32 + CROCKFORD.index(ch)
    return value


@pytest.fixture(autouse=True)
def fresh_sequence():
    """Other tests made ids at other times: start from no last millisecond."""
    ids._reset_after_fork()
    yield
    ids._reset_after_fork()


def test_an_id_is_26_crockford_digits_with_its_millisecond_in_the_top_48_bits():
    now = 1_795_000_000.1234
    text = ids.new_id(now)
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", text)
    assert decode(text) >> 80 == int(now * 1000)
    assert decode(text) < 1 << 128


def test_ids_sort_in_the_order_they_were_made_even_within_one_millisecond():
    made = [ids.new_id(1_795_000_000.0) for _ in range(1000)]  # one ms: counts up
    made += [ids.new_id(1_795_000_000.0 + i / 7) for i in range(1, 1000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_a_clock_that_steps_back_does_not_break_the_order():
    first = ids.new_id(1_795_000_010.0)
    assert ids.new_id(1_795_000_000.0) > first


def test_a_forked_child_starts_its_own_random_sequence():
    parent = ids.new_id(1_795_100_000.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # leaves with os._exit whatever happens, so pytest never runs here
        try:
            os.write(w, ids.new_id(1_795_100_000.0).encode())
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    assert reap(pid) == 0
    # Same millisecond: the child did not continue the parent's counter (parent + 1).
    assert child[:10] == parent[:10]
    assert decode(child) != decode(parent) + 1


def test_is_task_id_accepts_what_new_id_makes_and_nothing_else():
    made = [ids.new_id(1.7e9 + i / 7) for i in range(200)]
    assert all(ids.is_task_id(i) for i in made)
    for text in ("", "zzz", made[0].lower(), made[0][:-1], made[0] + "0", made[0][:-1] + "U",
                 made[0][:-1] + "I", made[0][:-1] + "\n", " " + made[0][1:], None, 5):
        assert not ids.is_task_id(text), text
