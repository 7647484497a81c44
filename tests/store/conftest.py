"""Fixtures of the store layer: a migrated Store on a real file in tmp_path."""

from __future__ import annotations

import pytest

from supervisor.store import Store


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    yield s
    s.close()
