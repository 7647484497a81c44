"""The one way tests start a real supervisor: `taskvisor run` as a subprocess.

Owns the config writer (`render_config` from {section: {key: value}}), the environment a
supervisor gets (no TASKVISOR_* or systemd variables of the caller; the checkout and the
test's handler folders on PYTHONPATH), the launch (`python -m supervisor run --config …
--ready-file …` in a session of its own, its output appended to one log file per
supervisor, one "==== life N ====" marker per start) and readiness: a supervisor is ready
when its ready file names the pid of this life (written once the database is migrated and
HTTP is bound; it also gives the bound HTTP URL). Never read readiness from log lines.

`stop()` / `close()` SIGTERM, then kill every life's process tree, so nothing outlives a
test. The process tests (tests/process/conftest.py), the soak tests (tests/soak/harness.py),
the HTTP tests (tests/e2e/http_support.py) and the built-in handler tests all build on
this class.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.support import kill_tree, wait_until

ROOT = Path(__file__).resolve().parents[2]


# Sections made of named tables: [types."NAME"] (and the [limits."NAME"] and
# [schedules."NAME"] of flow control).
NAMED = ("types", "limits", "schedules")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, os.PathLike)):
        return json.dumps(str(v))  # a TOML basic string is a JSON string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_value(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def render_config(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """{section: {key: value}} plus {"types" | "limits" | "schedules": {name: {key: value}}}
    -> TOML text."""
    lines = []
    for section, table in settings.items():
        if section in NAMED:
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    for section in NAMED:
        for name, table in settings.get(section, {}).items():
            lines.append(f'[{section}."{name}"]')
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            lines.append("")
    return "\n".join(lines)


def merge(base: Mapping, over: Mapping) -> dict:
    """`over`'s keys replace `base`'s, section by section (a named-tables section such as
    "types" is replaced whole)."""
    out = {k: dict(v) for k, v in base.items()}
    for section, table in over.items():
        if section in NAMED:
            out[section] = {n: dict(t) for n, t in table.items()}
        else:
            out.setdefault(section, {}).update(table)
    return out


def supervisor_env(pythonpath: Iterable[str | os.PathLike] = (),
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without TASKVISOR_* and systemd variables, with the
    checkout and `pythonpath` on PYTHONPATH, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TASKVISOR_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(str(p) for p in pythonpath)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class SupervisorProcess:
    """One supervisor on a config file in `folder`: start / wait_ready / stop / kill9 /
    restart, its log, and a `Queue` on its config. One life runs at a time; `lives` keeps
    every Popen. Use as a context manager, or call `close()`. A subclass changes what runs
    by overriding `argv()` and `env()`, never by reading the log for readiness.

    `config`: TOML text, or settings for `render_config`, or None when the file exists."""

    def __init__(self, folder: str | os.PathLike, config: str | Mapping | None = None, *,
                 env: Mapping[str, str] | None = None,
                 pythonpath: Iterable[str | os.PathLike] = (), name: str = "taskvisor",
                 config_path: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, ready_timeout: float = 60.0,
                 args: Iterable[str] = ()):
        self.dir = Path(folder)
        self.args = list(args)  # more `taskvisor run` options (--pidfile P)
        self.ready_timeout = ready_timeout
        self.name = name
        self.config_path = Path(config_path) if config_path else self.dir / f"{name}.toml"
        self.log_path = Path(log_path) if log_path else self.dir / f"{name}.log"
        self.ready_path = self.dir / f"{name}.ready.json"
        if config is not None:
            self.write_config_text(config if isinstance(config, str) else render_config(config))
        self.pythonpath = list(pythonpath)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.lives: list[subprocess.Popen] = []
        self.ready_info: dict = {}
        self.born = time.time()
        self._queue = None

    # -- configuration -------------------------------------------------------------------

    def write_config_text(self, text: str) -> None:
        """Replace the config file atomically (a reload must never read half a file)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    # -- life cycle ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The supervisor's environment (a subclass may add to it)."""
        return supervisor_env(self.pythonpath, self.extra_env)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "supervisor", "run", "--config", str(self.config_path),
                "--ready-file", str(self.ready_path), *self.args]

    def start(self, wait_ready: bool = True, timeout: float | None = None) -> "SupervisorProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        try:
            self.ready_path.unlink()  # a killed life leaves its file behind
        except FileNotFoundError:
            pass
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== life {len(self.lives) + 1} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(), cwd=self.dir, env=self.env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.lives.append(self.proc)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Wait until this life's ready file exists; returns its content. Fails at once
        (with the log) if the supervisor exits first."""
        proc = self.proc
        timeout = self.ready_timeout if timeout is None else timeout

        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"supervisor exited with {proc.returncode} before it was "
                                   f"ready:\n{self.log()[-6000:]}")
            try:
                info = json.loads(self.ready_path.read_text())
            except (FileNotFoundError, ValueError):
                return None
            return info if info.get("pid") == proc.pid else None
        self.ready_info = wait_until(ready, timeout=timeout, interval=0.02, message=(
            f"supervisor {proc.pid} wrote no ready file within {timeout}s"))
        return self.ready_info

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def http_url(self) -> str | None:
        """The bound HTTP base URL ("http://127.0.0.1:PORT/"), None when HTTP is off."""
        return self.ready_info.get("http")

    @property
    def port(self) -> int:
        url = self.http_url
        assert url, "HTTP is off for this supervisor"
        return int(url.rstrip("/").rsplit(":", 1)[1])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor did not exit within {timeout}s:\n"
                                 f"{self.log()[-6000:]}") from None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the graceful drain) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill9(self) -> float:
        """SIGKILL the supervisor process alone (its fork server and tasks must follow it
        through their parent-death signals); returns the time of the kill."""
        at = time.time()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return at

    def restart(self) -> "SupervisorProcess":
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 10) -> None:
        """For tests about what the log says (not for readiness)."""
        wait_until(lambda: self.log().count(text) >= count, timeout=timeout,
                   message=f"log never said {text!r} ({count}x):\n{self.log()[-4000:]}")

    # -- the database --------------------------------------------------------------------

    @property
    def queue(self):
        """A client Queue on the config file as it was first read."""
        if self._queue is None:
            from supervisor.client import Queue
            self._queue = Queue(str(self.config_path))
        return self._queue

    def wait(self, task_id: str, timeout: float = 30.0):
        """The finished task (Queue.wait), or an AssertionError with the log's tail."""
        try:
            return self.queue.wait(task_id, timeout=timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- supervisor log ---\n{self.log()[-6000:]}") from None

    # -- clean-up ------------------------------------------------------------------------

    def close(self, graceful_s: float = 15.0) -> None:
        """SIGTERM the running life (wait up to `graceful_s`), then SIGKILL every life's
        process group and tree."""
        if self.proc is not None and self.proc.poll() is None and graceful_s > 0:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=graceful_s)
            except subprocess.TimeoutExpired:
                pass
        for proc in self.lives:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kill_tree(proc.pid)
            proc.wait(10)
        if self._queue is not None:
            try:
                self._queue.close()
            except Exception:
                pass
            self._queue = None

    def __enter__(self) -> "SupervisorProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def supervisor_config(preload: list[str], *, pool_size: int = 2, extra: str = "") -> str:
    """A config for e2e tests: a database in the config's folder, no HTTP, quick backoff;
    `extra` is TOML text appended as it is (more sections)."""
    return render_config({
        "supervisor": {"database": "taskvisor.db", "pool_size": pool_size,
                       "preload": list(preload), "poll_interval_s": 0.2, "lease_s": 10,
                       "shutdown_grace_s": 2, "kill_grace_s": 1},
        "defaults": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_attempts": 3},
        "http": {"listen": ""},
    }) + "\n" + extra
