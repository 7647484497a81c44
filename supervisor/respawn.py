"""The fork servers' lives, seen from the supervisor loop: a dead or broken one noticed,
the current one restarted with backoff, and a new one started on reload.

Owns what the loop does when a fork server ends or must be replaced: unregister and
close it, hand its children's fates to `supervisor.children`, schedule the restart
(`ForkServers` keeps the backoff), register the new one and give it the execution fence.
A retiring fork server stays until its last task ended. It never spawns a task and never
touches the database.
"""

from __future__ import annotations

import logging
import selectors
from typing import TYPE_CHECKING

from supervisor.forkserver import ForkServerError

if TYPE_CHECKING:
    from supervisor.loop import Supervisor

log = logging.getLogger("taskvisor.supervisor")


class Respawn:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup

    def tend_fork_servers(self, mono: float) -> None:
        """Notice a dead or broken fork server; restart the current one with backoff."""
        sup = self.sup
        servers = sup.servers
        for server in servers.all():
            if server.broken and not server.exited:
                log.error("fork server %s broke the protocol (%s); killed", server.pid, server.broken)
                server.exited = True
            if not server.exited:
                continue
            if server.sock is not None:
                sup.selector.unregister(server)
                server.close()
            orphans = sup.children.server_died(server, mono)
            if server is not servers.current:
                if not orphans:
                    servers.retiring.remove(server)
            elif servers.restart_at is None:
                delay = servers.schedule_restart(mono, died=True)
                log.error("fork server %s died; restarting in %.1fs", server.pid, delay)
        if not sup.stopping and servers.take_due_restart(mono):
            if self.replace_fork_server("the previous one died"):
                sup.claim_needed = True
                sup.emit("forkserver_restarted", pid=servers.current.pid)
            else:
                servers.schedule_restart(mono, died=False)

    def replace_fork_server(self, why: str) -> bool:
        """Start a new fork server for new tasks; the old one stays until its tasks end."""
        sup = self.sup
        try:
            new = sup.servers.launch(sup.config)
        except ForkServerError as exc:
            log.error("new fork server failed (%s), keeping the old one: %s\n%s", why, exc, exc.detail)
            return False
        sup.servers.replace(new)
        sup.selector.register(new, selectors.EVENT_READ, ("server", new))
        if sup.children.fence_mono is not None:
            new.fence(sup.children.fence_mono)
        log.info("fork server %d started (%s); %d retiring", new.pid, why, len(sup.servers.retiring))
        return True
