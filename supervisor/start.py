"""Start-up order of `taskvisor run`: everything before the loop, in the order that keeps
forks safe.

Owns that order: logging; cgroup v2 detection (which moves this process into a leaf
cgroup, so it must precede the fork server); the child-subreaper flag; the preload search
path (the config file's folder joins PYTHONPATH); the model-call relay (supervisor.relay:
its socket named in the environment the fork server inherits, stopped last); the fork
server (started before the database is opened or any thread exists, so it inherits
neither); then the Supervisor,
which opens the database (then its identity is taken and a registration written beside
it: supervisor.dbfile), and, when [http] listen is set, the metrics sink and the HTTP
server (which makes its token file private, mode 0600, as the database), bound from the
Supervisor's on_ready hook (an address that cannot be used leaves HTTP off with an error
in the log; tasks still run), then the ready file. A preload that
fails to import ends here with its traceback, a hint when the module was not found, and
exit code 3. It never claims or records tasks itself.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from supervisor import capacity, logs, service
from supervisor.forkserver import ForkServerError, launch
from supervisor.relay import launch as start_relay
from supervisor.config import Config
from supervisor.errors import StoreError
from workers.limits import delegated_cgroup
from workers.pdeathsig import set_child_subreaper

log = logging.getLogger("taskvisor.supervisor")
EXIT_PRELOAD_FAILED = 3
EXIT_STORE_FAILED = 2
EXIT_MACHINE_LIMITS = 2  # pool_size does not fit the descriptors or processes allowed
EXIT_DATABASE_GONE = 4  # the database file was deleted or replaced while it ran


def run(config: Config, *, events=None, ready_file: str | None = None) -> int:
    """Run the supervisor in this process until it is stopped; returns the exit code.
    `ready_file`: where to write the ready file (supervisor.service) once ready."""
    logs.setup(config.log.level, config.log.format)
    cgroup_dir, cgroup_note = delegated_cgroup()
    log.info("memory limits: %s", cgroup_note)
    set_child_subreaper()
    soft, _ = capacity.raise_open_files()
    limits = capacity.problems(config.supervisor.pool_size)
    if limits:
        for line in limits:
            sys.stderr.write(f"taskvisor: error: {line}\n")
        sys.stderr.flush()
        return EXIT_MACHINE_LIMITS
    log.info("open files: up to %d", soft)
    from supervisor.lease import new_owner
    owner = new_owner(socket.gethostname())
    add_config_folder_to_path(config)
    from supervisor import handlercode
    code = handlercode.stamp(config)  # before the launch: a later edit is seen by a reload
    relays = start_relay(config, owner=owner)  # names its socket to the fork server's tasks
    try:
        return _run(config, owner, code, relays, cgroup_dir, events, ready_file)
    finally:
        if relays is not None:
            relays.stop()


def _run(config: Config, owner: str, code, relays, cgroup_dir, events, ready_file) -> int:
    """From the fork server's launch to the loop's end (run() stops the relays after it)."""
    try:
        server = launch(config, owner=owner)
    except ForkServerError as exc:
        sys.stderr.write(f"taskvisor: error: {exc}\n{exc.detail}{preload_hint(config, exc.detail)}")
        sys.stderr.flush()
        return EXIT_PRELOAD_FAILED
    log.info("fork server %d ready: preload=%s types=%s", server.pid,
             list(config.supervisor.preload), server.types)
    from supervisor.loop import Supervisor  # imported after the fork server started
    http = None
    if config.http.listen:
        from supervisor.http import HttpServer
        from supervisor.metrics import Metrics, fanout
        metrics = Metrics()
        http = HttpServer(config, metrics)
        events = fanout(metrics, events)
    supervisor = Supervisor(config, server, events=events, owner=owner)
    if relays is not None:
        supervisor.relays = relays
        relays.attach(supervisor)
        # Listening by the first claim: waited for once the database is open (it started
        # beside the fork server, and imports while the store opens).
        supervisor.on_ready.insert(0, lambda sup: relays.first.wait_ready())
    supervisor.cgroup_dir = cgroup_dir
    supervisor.handler_code.remember(server.pid, code)
    supervisor.on_ready.append(_track_database)
    if http is not None:
        supervisor.on_ready.append(http.start)
        supervisor.on_shutdown.append(http.stop)
    if ready_file:  # after http.start: the file names the bound URL
        supervisor.on_ready.append(lambda sup: service.write_ready_file(
            ready_file, owner=sup.owner, http_url=http.url if http is not None else None))
        supervisor.on_shutdown.append(lambda sup: service.remove_ready_file(ready_file))
    try:
        code = supervisor.run()
    except StoreError as exc:
        server.kill()
        sys.stderr.write(f"taskvisor: error: {exc}\n")
        return EXIT_STORE_FAILED
    finally:
        if supervisor.dbfile is not None:
            supervisor.dbfile.unregister()
    if supervisor.database_problem:
        sys.stderr.write(f"taskvisor: error: {supervisor.database_problem}\n")
        return EXIT_DATABASE_GONE
    return code


def _track_database(supervisor) -> None:
    """on_ready: remember which file the database is, and register beside it (a client
    then refuses to create a new file there while this process lives)."""
    from supervisor.dbfile import DatabaseFile
    try:
        dbfile = DatabaseFile(supervisor.config.supervisor.database)
    except OSError as exc:
        log.error("cannot stat the database file: %s", exc)
        return
    supervisor.dbfile = dbfile
    try:
        dbfile.register()
    except OSError as exc:
        log.warning("cannot write the registration %s (%s): a client will not know that "
                    "this supervisor serves the database", dbfile.registration, exc.strerror)


def add_config_folder_to_path(config: Config) -> None:
    """Let the fork server (and every later one, after a reload) import preload modules
    that sit beside the config file, as well as from the working directory and PYTHONPATH:
    `taskvisor run --config /etc/x/taskvisor.toml` from any folder finds /etc/x/myhandlers.py."""
    if config.path is None:
        return
    folder = str(Path(config.path).resolve().parent)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join(parts + [folder])
    if folder not in sys.path:  # where supervisor.handlercode looks for their files (no import)
        sys.path.append(folder)


def preload_hint(config: Config, detail: str) -> str:
    """How to fix a preload module that was not found (empty for any other failure)."""
    if "ModuleNotFoundError" not in (detail or ""):
        return ""
    places = [f"the working directory ({os.getcwd()})"]
    if config.path is not None:
        places.append(f"the config file's folder ({Path(config.path).resolve().parent})")
    return (f"hint: preload modules are imported from {' and '.join(places)} and PYTHONPATH; "
            "put the module file there, install its package into this Python, or add its "
            "folder to PYTHONPATH.\n")

