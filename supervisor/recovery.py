"""Recovery of attempts whose supervisor is gone: dead owners, expired leases, leftovers.

Owns deciding which lease owners are dead (a supervisor row on this host whose pid no
longer names the same process) and the order of a rescue: kill a leftover task process
first (pid plus start time, so a reused pid is never hit), then let the store end the
attempt as `lost` and requeue or fail it, so an attempt never overlaps the next one.
It never forks and never touches a task process of a live supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from supervisor import policy
from supervisor.proctree import is_same_process, kill_leftover, kill_marked
from supervisor.store import Store, Task

log = logging.getLogger("taskvisor.supervisor")


class Recovery:
    def __init__(self, host: str, owner: str):
        self.host = host
        self.owner = owner

    def dead_owners(self, store: Store) -> list[str]:
        """Owners registered on this host whose process is gone (or is another process)."""
        dead = []
        for owner, host, pid, started, *_ in store.supervisors():
            if host != self.host or owner == self.owner:
                continue
            if not is_same_process(pid, started):
                dead.append(owner)
        return dead

    def kill_leftover(self, task: Task) -> None:
        if (task.lease_owner or "").startswith(f"{self.host}:") and kill_leftover(
                task.pid, task.pid_started_at):
            log.warning("killed leftover process %d of %s", task.pid, task.id,
                        extra={"task_id": task.id})

    def rescue(self, store: Store, now: float, backoff: Callable[[str], policy.Backoff],
               expired_before: float | None = None) -> list[Task]:
        """Rescue every task of a dead owner and every lease that expired before
        `expired_before` (default `now`); returns them. Whatever a dead owner's fork server
        left running on this host (task processes, helpers that daemonized) is killed
        first, found by the owner marker in its environment."""
        dead = self.dead_owners(store)
        for owner in dead:
            killed = kill_marked(owner)
            if killed:
                log.warning("killed %d process(es) left by dead supervisor %s: %s", len(killed),
                            owner, killed)
        rescued = store.expire(now, backoff, owners=dead, before_requeue=self.kill_leftover,
                               expired_before=expired_before)
        for owner in dead:
            store.unregister_supervisor(owner)
        for task in rescued:
            log.warning("rescued %s from %s: attempt %d lost", task.id, task.lease_owner,
                        task.attempts, extra={"task_id": task.id, "task_type": task.type})
        return rescued
