"""The service-manager contract: sd_notify datagrams (READY, STATUS, WATCHDOG, RELOADING,
STOPPING) on $NOTIFY_SOCKET, and JSON log lines that carry the task id.

A real supervisor process, a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from tests.support import wait_until


class FakeSystemd:
    """Collects what a Type=notify service sends to $NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def seen(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for m in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def with_env(sup, **extra):
    base = sup.env
    sup.env = lambda: {**base(), **extra}
    return sup


@pytest.mark.timeout(60)
def test_notify_ready_status_watchdog_reloading_stopping(supervisor_proc, systemd):
    sup = with_env(supervisor_proc(start=False, supervisor={"pool_size": 1}),
                   NOTIFY_SOCKET=systemd.path, WATCHDOG_USEC="400000")
    sup.start()
    wait_until(lambda: systemd.seen("READY", "1"), timeout=15, message="no READY=1")
    ready = next(m for m in systemd.messages if m.get("READY") == "1")
    assert ready["MAINPID"] == str(sup.pid)
    assert ready["STATUS"].startswith("0/1 slots busy")
    # WATCHDOG=1 comes from the main loop at least every half interval (0.2 s here).
    wait_until(lambda: sum("WATCHDOG" in m for m in systemd.drain()) >= 3, timeout=10,
               message="fewer than 3 WATCHDOG=1 pings")

    task_id = sup.enqueue("t.log", {"s": 3})
    wait_until(lambda: systemd.seen("STATUS", "1/1 slots busy"), timeout=15)

    sup.signal(signal.SIGHUP)
    wait_until(lambda: systemd.seen("RELOADING", "1"), timeout=10, message="no RELOADING=1")
    reloading = next(m for m in systemd.messages if m.get("RELOADING") == "1")
    assert int(reloading["MONOTONIC_USEC"]) > 0

    sup.signal(signal.SIGTERM)
    wait_until(lambda: systemd.seen("STOPPING", "1"), timeout=10, message="no STOPPING=1")
    assert sup.wait_exit(30) == 0
    assert sup.get(task_id).status == "succeeded"  # drained, not interrupted


@pytest.mark.timeout(60)
def test_no_watchdog_pings_when_watchdog_usec_names_another_pid(supervisor_proc, systemd):
    sup = with_env(supervisor_proc(start=False), NOTIFY_SOCKET=systemd.path,
                   WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    sup.start()
    wait_until(lambda: systemd.seen("READY", "1"), timeout=15)
    sup.enqueue("t.ok")  # a few loop passes
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
    assert not any("WATCHDOG" in m for m in systemd.drain())


@pytest.mark.timeout(60)
def test_json_logs_carry_the_task_id(supervisor_proc):
    sup = supervisor_proc(log={"level": "INFO", "format": "json"})
    task_id = sup.enqueue("t.progress")
    sup.wait_task_log(task_id, "hello from the handler of")
    (sup.dir / "release").touch()
    sup.wait_status(task_id, "succeeded")
    sup.wait_log(f'"task_id": "{task_id}"', count=1)
    # The supervisor's lines about the task, then the task's own (its log, issue 14).
    lines = [ln for ln in (sup.log() + sup.task_log(task_id)).splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]  # every JSON-looking line parses
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    about_task = [r for r in records if task_id in r["msg"] or r.get("task_id") == task_id]
    assert about_task and all(r.get("task_id") == task_id for r in about_task)
    handler_line = next(r for r in records if "hello from the handler of" in r["msg"])
    assert handler_line["task_type"] == "t.progress"
    # one vocabulary: the supervisor's lines about the task name its type the same way
    assert any(r.get("task_type") == "t.progress" and r["logger"].startswith("taskvisor.")
               and not r["logger"].startswith("taskvisor.task") for r in about_task), about_task
