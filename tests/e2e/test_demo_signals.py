"""`taskvisor demo` never leaves its supervisor behind: TERM or HUP to the demo in the
middle of its run stops the supervisor (and frees the dashboard port) before the demo
exits with 128 + the signal; a kill -9 of the demo ends it too (parent-death signal)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from tests.e2e.test_demo import CODE, env, free_port, supervisors_of
from tests.support import kill_tree, wait_until


def _start_demo(tmp_path, port: int) -> tuple[subprocess.Popen, list[str]]:
    db = tmp_path / "demo.db"
    proc = subprocess.Popen([sys.executable, "-c", CODE, "--db", str(db), "--listen",
                             f"127.0.0.1:{port}"], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("enqueued "):
            break
    assert lines and lines[-1].startswith("enqueued "), "".join(lines)[-3000:]
    assert supervisors_of(db), "the demo's supervisor should be running"
    return proc, lines


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_term_or_hup_to_the_demo_stops_its_supervisor(tmp_path, sig):
    port = free_port()
    proc, lines = _start_demo(tmp_path, port)
    try:
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    assert proc.returncode == 128 + sig, "".join(lines) + rest
    assert "supervisor stopped (exit code 0)" in rest, rest
    assert not supervisors_of(tmp_path / "demo.db")
    assert _port_free(port)


@pytest.mark.timeout(90)
def test_kill_9_of_the_demo_ends_its_supervisor(tmp_path):
    port = free_port()
    proc, _ = _start_demo(tmp_path, port)
    db = tmp_path / "demo.db"
    survivors = supervisors_of(db)
    try:
        proc.kill()
        proc.wait(10)
        wait_until(lambda: not supervisors_of(db), timeout=30,
                   message="the supervisor outlived a kill -9 of its demo")
    finally:
        for p in survivors:
            kill_tree(p.pid)
    wait_until(lambda: _port_free(port), timeout=10, message="the dashboard port stayed bound")
