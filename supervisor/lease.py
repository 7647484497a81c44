"""The leases of one supervisor: renewing them, the execution fence that follows them, and
rescuing the leases other supervisors let expire.

Owns when leases are renewed (one statement for all, every lease_s / 3), the fence each
renewal moves (the moment past which the fork servers kill this supervisor's task
processes: the leases' expiry minus a margin, from a clock read taken before the write),
stopping a child whose lease another supervisor took, and the rescue of expired leases
(only once they expired more than the margin ago, so the owner's fork server has already
killed the attempt) and of dead supervisors' tasks. The rules (margin, interval, backoff)
are in `supervisor.policy`; the statements in the store. It never forks and never reads
a report.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING

from supervisor import policy
from supervisor.errors import StoreError
from supervisor.recovery import Recovery
from supervisor.store import Outcome

if TYPE_CHECKING:
    from supervisor.loop import Supervisor

log = logging.getLogger("taskvisor.supervisor")


class Leases:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.recovery = Recovery(sup.host, sup.owner)

    def rescue(self, now: float) -> None:
        """Requeue tasks of dead supervisors on this host, and leases that expired more
        than the fence margin ago (by then their fork server has killed them)."""
        sup = self.sup
        margin = policy.fence_margin_s(sup.config.supervisor.lease_s)
        rescued = self.recovery.rescue(sup.store, now, sup.backoff, expired_before=now - margin)
        for task in rescued:
            sup.emit("expired", task=task)
        if rescued:
            sup.claim_needed = True

    def expire(self, now: float, mono: float) -> None:
        """The periodic rescue, every lease_s / 2."""
        timers = self.sup.timers
        if mono < timers.expire:
            return
        timers.expire = mono + max(0.5, self.sup.config.supervisor.lease_s / 2)
        try:
            self.rescue(now)
        except StoreError as exc:
            log.error("lease rescue failed: %s", exc)

    def extend(self, now: float, mono: float) -> None:
        """One statement renews every lease; then the fence moves up to the new expiry
        (minus the margin). A child whose lease was not renewed was rescued: stop it."""
        sup = self.sup
        if mono < sup.timers.extend:
            return
        lease_s = sup.config.supervisor.lease_s
        sup.timers.extend = mono + policy.renew_interval_s(lease_s)
        try:
            held = sup.store.extend(sup.owner, now, lease_s)
            sup.register()
        except StoreError as exc:
            log.error("lease extension failed: %s", exc)
            return
        self.advance_fence(mono)
        children = sup.children
        if len(held) >= len(children):
            return
        recording = {c.key for c, _ in children.pending}
        for child in children:
            if child.task.id not in held and child.stop is None and child.key not in recording:
                children.stop(child, Outcome.LOST, "the lease was lost: another supervisor "
                              "rescued this task", mono, grace=0)

    def advance_fence(self, mono: float) -> None:
        """Leases written at `mono` (a reading taken before the write) reach mono + lease_s:
        task processes may run until that minus the margin, and no longer."""
        sup = self.sup
        lease_s = sup.config.supervisor.lease_s
        fence = mono + lease_s - policy.fence_margin_s(lease_s)
        children = sup.children
        if children.fence_mono is None or fence > children.fence_mono:
            children.fence_mono = fence
            for server in sup.servers.all():
                if not server.exited:
                    server.fence(fence)
            for relay in sup.relays.all if sup.relays else ():  # the attempts they host
                relay.fence(fence)


def new_owner(host: str) -> str:
    """A lease owner token: host, pid and a random part (unique across restarts)."""
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
