"""What the HTTP and metrics threads may read about the supervisor loop.

Owns `Snapshot`: published by the loop at the end of every pass (`Supervisor.publish`), a
frozen value, so another thread never reads a live loop object (`Supervisor`, `Child`)
while the loop changes it. It never reads the database and is never written by another
thread.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from supervisor.config import Config

if TYPE_CHECKING:
    from supervisor.loop import Supervisor


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the HTTP and metrics threads read: published by the loop every pass, never
    live loop objects. `running` is {task id: (peak RSS bytes, timeout_s)}, refreshed at
    most every SNAPSHOT_RUNNING_S."""
    owner: str
    host: str
    pool_size: int
    busy: int
    memory_budget_mb: float
    last_loop_at: float
    stopping: bool
    store_ok: bool
    running: dict
    config: Config

    @classmethod
    def of(cls, sup: "Supervisor", running: dict) -> "Snapshot":
        return cls(owner=sup.owner, host=sup.host, pool_size=sup.config.supervisor.pool_size,
                   busy=len(sup.children), memory_budget_mb=sup.memory_budget_mb,
                   last_loop_at=sup.last_loop_at, stopping=sup.stopping, store_ok=sup.store_ok,
                   running=running, config=sup.config)
