"""SIGHUP: re-read the config file and apply what can change while the supervisor runs.

Owns the decision of what a reload changes now (pool size, types, limits, schedules,
[log] for this process, the fork server when its preload, handlers or handler code
changed) and what waits for a restart (each such setting is named in the log), and the
warning for a schedule whose type no handler takes. A file with errors changes nothing.
It never opens the database and never stops a running task: a replaced fork server's
tasks run on under the retiring one.
"""

from __future__ import annotations

import logging

from supervisor import capacity, handlercode, logs, policy
from supervisor.config import Config, load, start_only_changes
from supervisor.errors import ConfigError
from supervisor.forkserver import handlers_of
from supervisor.watchdog import machine_memory_mb

log = logging.getLogger("taskvisor.supervisor")


def reload(sup) -> None:
    """Re-read the config file (SIGHUP). A file with errors changes nothing: each error is
    logged and the running config stays."""
    try:
        loaded = load(sup.config.path) if sup.config.path else sup.config
        # The open database stays (a changed one is named below, as start-only).
        new = loaded.with_database(sup.config.supervisor.database,
                                   pinned=sup.config.database_pinned)
        # `run` refuses such a pool_size at start; a reload took it, and ran out of
        # descriptors or processes once that many tasks were due.
        if limits := capacity.problems(new.supervisor.pool_size):
            raise ConfigError(limits)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("reload rejected: %s", line)
        log.error("reload rejected: keeping the running config (%d error(s))", len(exc.errors))
        return
    sup.notifier.reloading()
    old = sup.config
    reload_logging(old, loaded)
    sup.config = sup.children.config = new
    sup.children.output.configure(new.supervisor.max_output_bytes, new.supervisor.max_log_bytes)
    sup.memory_budget_mb = policy.memory_budget_mb(new.supervisor.memory_budget_mb, machine_memory_mb())
    sup.claim_needed = True
    code = handlercode.stamp(new)  # before a launch: a later edit shows next time
    if (new.supervisor.preload, handlers_of(new)) != (old.supervisor.preload, handlers_of(old)):
        why = "preload or handlers changed"
    elif changed := sup.handler_code.changed(code, sup.server.pid):
        why = f"handler code changed: {', '.join(changed)}"
    else:
        why = None
        log.info("reload: no handler module changed since fork server %s started; it "
                 "stays", sup.server.pid)
    if why is not None and sup.respawn.replace_fork_server(why):
        sup.handler_code.remember(sup.server.pid, code)
    warn_unhandled_schedules(sup.config, sup.server.types)
    log.info("config reloaded from %s: pool_size=%d", new.path, new.supervisor.pool_size)
    sup.emit("reloaded", pool_size=new.supervisor.pool_size)
    sup.notifier.ready(sup.status_line())


def reload_logging(old: Config, loaded: Config) -> None:
    """Apply a changed [log] to this process's own log, and name each setting that
    waits for a restart (`loaded`: the file as read, its database included)."""
    if loaded.log != old.log:
        if logs.reconfigure(loaded.log.level, loaded.log.format):
            log.info("reload: the supervisor's log is now level=%s format=%s",
                     loaded.log.level, loaded.log.format)
        else:
            log.warning("reload: [log] changed; new tasks take it, but this process's "
                        "logging was not set up by taskvisor and stays as it is")
    for key in start_only_changes(old, loaded):
        log.warning("reload: %s changed; it applies at the next start (restart the "
                    "supervisor), the running value stays", key)


def warn_unhandled_schedules(config: Config, types) -> None:
    """Name each schedule whose type the fork server has no handler for, at start and
    at a reload: every fire of it fails, and a nightly one said so first at 02:30."""
    known = set(types)
    for name, spec in config.schedules.items():
        if spec.type not in known:
            log.warning("schedule %r enqueues type %r, which no handler here takes (not "
                        "in a [supervisor] preload module nor a [types] handler): each "
                        "fire will fail until one registers it", name, spec.type)
