"""The fork server and the start-up path: a dead fork server is restarted and its running
task is given back, a preload that fails to import stops `run` with exit 3 and the
traceback, a task process that never reports ready is killed at the boot deadline, and an
idle supervisor neither burns CPU nor delays a new task by a poll interval. The spare
task process the fork server keeps ready runs the next task, is replaced when it dies,
and leaves with the fork server."""

from __future__ import annotations

import json
import os
import select
import signal
import time

import psutil
import pytest

from tests.process.conftest import BASE, HANDLERS, assert_dead, merge
from tests.support.launcher import SupervisorProcess
from tests.support import pid_alive, wait_until


@pytest.mark.timeout(60)
def test_dead_fork_server_is_restarted_and_its_task_requeued(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 2})
    (server,) = sup.fork_servers()
    task_id = sup.enqueue("t.log", {"s": 1.5})
    wait_until(lambda: sup.runs().get(task_id), timeout=10)
    first_pid = sup.runs()[task_id][0][2]

    server.send_signal(signal.SIGKILL)
    assert_dead(first_pid, what="task process of the dead fork server")
    (new_server,) = wait_until(
        lambda: [p for p in sup.fork_servers() if p.pid != server.pid] or None, timeout=10,
        message="no new fork server")
    assert sup.proc.poll() is None

    task = sup.wait_status(task_id, "succeeded", timeout=20)
    assert [a.outcome for a in task.history] == ["interrupted", "succeeded"]
    assert task.attempts == 1  # the interrupted attempt was given back
    assert "fork server died" in task.history[0].reason
    (cut, _, _, _), (again, end, _, _) = sup.runs()[task_id]
    assert again > cut and end is not None
    # new tasks run on the new fork server
    other = sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert other.result["ppid"] == new_server.pid
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_preload_that_fails_to_import_stops_run_with_exit_3(tmp_path):
    sup = SupervisorProcess(tmp_path, merge(BASE, {"supervisor": {"preload": ["tvp_broken"]}}),
                            pythonpath=[HANDLERS])
    try:
        sup.start(wait_ready=False)
        assert sup.wait_exit(30) == 3, sup.log()
    finally:
        sup.close()
    log = sup.log()
    assert "Traceback" in log
    assert "tvp_broken" in log
    assert "RuntimeError: tvp_broken fails to import on purpose" in log
    assert "hint:" not in log  # the module was found: it failed by itself
    assert not (tmp_path / "t.db").exists()  # stopped before opening the database


@pytest.mark.timeout(60)
def test_task_process_that_never_becomes_ready_is_killed(supervisor_proc):
    """An after-fork hook installed by a preload module hangs every task process before
    taskvisor's own set-up runs, so it never reports ready."""
    sup = supervisor_proc(supervisor={"pool_size": 1, "boot_timeout_s": 1,
                                      "preload": ["tvp_handlers", "tvp_hang_at_fork"]})
    task_id = sup.enqueue("t.ok", max_attempts=1)
    task = sup.wait_status(task_id, "failed", timeout=15)
    (attempt,) = task.history
    assert attempt.outcome == "crashed"
    assert "did not become ready within 1s" in attempt.reason
    assert 0.9 < attempt.wall_s < 5
    hung = sup.recorded_pids()
    assert hung and attempt.pid in hung
    assert_dead(attempt.pid, what="task process stuck at boot")
    assert sup.proc.poll() is None


@pytest.mark.timeout(60)
def test_idle_supervisor_uses_almost_no_cpu_and_wakes_fast(supervisor_proc):
    # A long poll interval: a prompt start can only come from the wake-up datagram.
    sup = supervisor_proc(supervisor={"pool_size": 2, "poll_interval_s": 30, "lease_s": 30})
    sup.wait_status(sup.enqueue("t.ok"), "succeeded", timeout=40)  # warm: a first fork
    me = psutil.Process(sup.pid)
    servers = sup.fork_servers()
    # The finished task's process is reaped before idleness is measured; what is left is
    # the one spare the fork server keeps forked ahead of the next task.
    wait_until(lambda: [[p.name() for p in s.children()] for s in servers]
               == [["taskvisor-spare"]], timeout=10)
    spare = servers[0].children()[0]

    def cpu() -> float:
        t = me.cpu_times()
        return t.user + t.system + sum(s.cpu_times().user + s.cpu_times().system for s in servers)

    before = cpu()
    t0 = time.monotonic()
    time.sleep(3.0)  # measuring idleness: the one place a test must let time pass
    used = cpu() - before
    assert used < 0.1, f"idle supervisor used {used:.3f}s CPU in {time.monotonic() - t0:.1f}s"

    latencies = []
    for _ in range(3):
        at = time.time()
        task_id = sup.enqueue("t.log", {"s": 0})
        task = sup.wait_status(task_id, "succeeded", timeout=10)
        (run,) = sup.runs()[task_id]
        latencies.append(run[0] - at)
        assert task.attempts == 1
    assert min(latencies) < 0.5, f"enqueue-to-start latencies {latencies} (poll interval 30 s)"
    assert max(latencies) < 2.0, latencies
    assert pid_alive(sup.pid)
    # The first of those tasks ran in the spare that waited through the idle time.
    assert spare.pid in {a.pid for t in sup.store.list() for a in sup.store.get(t.id).history}


def _spares(server: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in server.children():
        try:
            # A spare that died keeps its name as a zombie until the fork server reaps
            # it (later under load): not a spare.
            if p.name() == "taskvisor-spare" and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _server_and_spare(sup) -> tuple[psutil.Process, psutil.Process]:
    """The supervisor's one fork server and, once it has forked it, its spare."""
    (server,) = sup.fork_servers()
    (spare,) = wait_until(lambda: _spares(server), timeout=10, message="no spare")
    return server, spare


@pytest.mark.timeout(60)
def test_the_spare_runs_the_next_task_and_a_new_one_is_forked_after(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1})
    server, spare = _server_and_spare(sup)
    task = sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert task.result["pid"] == spare.pid
    assert task.result["ppid"] == server.pid
    assert task.result["name"] != "taskvisor-spare"  # its own name back once it has a task
    (new_spare,) = wait_until(lambda: _spares(server), timeout=10, message="no new spare")
    assert new_spare.pid != spare.pid
    # A task whose spec is too big for one packet reaches the spare through a memfd.
    big = "x" * 200_000
    task = sup.wait_status(sup.enqueue("t.ok", {"value": big}), "succeeded")
    assert task.result["echo"] == big and task.result["pid"] == new_spare.pid
    assert sup.stop() == 0
    assert_dead(new_spare.pid, what="spare")


@pytest.mark.timeout(60)
def test_a_spare_killed_from_outside_is_replaced_and_never_counts_as_a_task(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1})
    server, spare = _server_and_spare(sup)
    spare.send_signal(signal.SIGKILL)
    assert_dead(spare.pid, what="killed spare")
    # Until a new spare is forked (a second later), a spawn forks directly.
    task = sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert task.result["pid"] != spare.pid
    (new_spare,) = wait_until(lambda: _spares(server), timeout=10, message="no new spare")
    assert new_spare.pid not in (spare.pid, task.result["pid"])
    assert [t.status for t in sup.store.list()] == ["succeeded"]  # nothing else recorded
    assert [a.outcome for a in task.history] == ["succeeded"]
    assert server.is_running() and sup.proc.poll() is None
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_a_term_to_a_waiting_spare_ends_it_and_does_not_cancel_the_next_task(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 1})
    server, spare = _server_and_spare(sup)
    spare.send_signal(signal.SIGTERM)
    assert_dead(spare.pid, what="spare sent TERM")
    (new_spare,) = wait_until(lambda: _spares(server), timeout=10, message="no new spare")
    task = sup.wait_status(sup.enqueue("t.ok"), "succeeded")
    assert task.result["pid"] == new_spare.pid
    assert [a.outcome for a in task.history] == ["succeeded"]
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_stopping_the_supervisor_ends_the_spare_with_the_fork_server(supervisor_proc):
    sup = supervisor_proc(supervisor={"pool_size": 2})
    server, spare = _server_and_spare(sup)
    assert sup.stop() == 0
    assert_dead(server.pid, what="fork server")
    assert_dead(spare.pid, what="spare")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_lean_preload_keeps_logging_out_until_a_handler_logs(supervisor_proc, fmt):
    """With a preload module that imports no logging, neither the fork server nor a task
    process has logging, threading or traceback loaded before the handler runs (each fork
    would pay for them); ctx.logger imports logging on first use, in the configured format,
    with the task id on the line; an error still reports its traceback."""
    sup = supervisor_proc(supervisor={"pool_size": 1, "preload": ["tvp_lean"]},
                          log={"level": "INFO", "format": fmt})
    task_id = sup.enqueue("lean.log")
    result = sup.wait_status(task_id, "succeeded").result
    assert result["loaded_at_start"] == []
    assert result["logging_after"] is True
    # A task's log lines go to its own log (issue 14), not to the supervisor's.
    from supervisor.store import events as live
    text = b"".join(c.data for c in live.read_log(sup.store.conn, task_id, 1)).decode()
    assert f"lean line of {task_id}" not in sup.log()
    line = next(ln for ln in text.splitlines() if f"lean line of {task_id}" in ln)
    if fmt == "json":
        record = json.loads(line)
        assert (record["task_id"], record["task_type"], record["level"]) == (task_id, "lean.log", "WARNING")
    else:
        assert f"task={task_id}" in line and "WARNING" in line

    failed = sup.wait_status(sup.enqueue("lean.fail", max_attempts=1), "failed")
    (attempt,) = failed.history
    assert attempt.outcome == "error"
    assert (attempt.error["type"], attempt.error["message"]) == ("ValueError", "lean failure")
    assert "Traceback" in attempt.error["traceback"] and "tvp_lean.py" in attempt.error["traceback"]
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_task_processes_get_their_limits_whether_forked_or_a_spare(supervisor_proc):
    """No core dumps (inherited from the fork server), the type's open-files and memory
    limits, and a report pipe that a subprocess of the handler would not inherit: the
    same in a spare (the first task after a pause) and in a process forked on demand."""
    sup = supervisor_proc(supervisor={"pool_size": 2},
                          types={"t.limits": {"open_files": 64, "memory_mb": 300, "nice": 3}})
    server, spare = _server_and_spare(sup)
    server_nice = os.getpriority(os.PRIO_PROCESS, server.pid)
    first, second = (sup.enqueue("t.limits") for _ in range(2))
    results = [sup.wait_status(t, "succeeded").result for t in (first, second)]
    assert {r["pid"] for r in results} >= {spare.pid}  # one ran in the spare ...
    assert len({r["pid"] for r in results}) == 2       # ... the other in a fresh fork
    for r in results:
        assert r["core"] == [0, 0]
        assert r["nofile"] == 64
        assert r["data"] == 300 * 1024 * 1024
        assert r["nice"] == min(server_nice + 3, 19)  # the type's nice, below its server's
        assert r["cloexec"] and all(r["cloexec"]), r  # the report pipe (and any other fd)
        # The fork server bound its symbols at load (LD_BIND_NOW at its exec); its
        # task processes, and what they run, do not inherit the setting.
        assert r["env"] == {"LD_BIND_NOW": None, "TASKVISOR_UNSET_LD_BIND_NOW": None}
    with open(f"/proc/{server.pid}/environ", "rb") as f:
        assert b"LD_BIND_NOW=1" in f.read().split(b"\0")
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_task_processes_run_below_the_supervisors_cpu_priority(supervisor_proc):
    """By default a task process runs 10 nice steps below its fork server (which runs at
    the supervisor's priority, like the event fan-out): on a busy machine the tasks yield
    the CPU to the processes that record them and deliver their events. `nice = 0` keeps
    a type at the supervisor's priority."""
    sup = supervisor_proc(supervisor={"pool_size": 2},
                          types={"t.limits": {"nice": 0}})
    base = os.getpriority(os.PRIO_PROCESS, sup.pid)
    r = sup.wait_status(sup.enqueue("t.nice"), "succeeded").result
    assert r["server"] == base
    assert r["nice"] == min(base + 10, 19)
    r = sup.wait_status(sup.enqueue("t.limits"), "succeeded").result
    assert r["nice"] == base
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_a_supervisor_waiting_to_restart_its_fork_server_does_not_spin(supervisor_proc):
    """A dead fork server is restarted after a backoff (0.5 s the first time). With a task
    waiting, the supervisor must sleep through that window, not poll in a busy loop
    (it did: a claim it could not make kept its wait at zero)."""
    sup = supervisor_proc(supervisor={"pool_size": 2})
    (server,) = sup.fork_servers()
    proc = psutil.Process(sup.pid)
    server.send_signal(signal.SIGKILL)
    wait_until(lambda: "fork server" in sup.log() and "died" in sup.log(), timeout=10,
               message="the supervisor did not notice the dead fork server")
    task_id = sup.enqueue("t.ok")  # something to claim while there is no fork server
    before = proc.cpu_times()
    time.sleep(0.3)  # inside the 0.5 s backoff: a window to measure CPU over, not a wait
    after = proc.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.1, f"the supervisor used {used:.2f} s of CPU in 0.3 s while waiting"
    assert sup.wait_status(task_id, "succeeded").result["ppid"] != server.pid
    assert sup.stop() == 0


@pytest.mark.timeout(30)
def test_a_spawn_past_its_claims_fence_is_refused_even_under_a_later_shared_fence():
    """A renewal after the claim may not cover this task (another supervisor may have
    rescued it while the request waited): the request's own start_by decides."""
    from supervisor.forkserver import ForkServer
    server = ForkServer((), {})
    server.start()
    try:
        server.fence(time.monotonic() + 60)
        fds = []
        for key, start_by in (("01LATE:1", time.monotonic() - 0.01), ("01OK:1", time.monotonic() + 30)):
            fds += server.spawn(key, b'{"task":{"id":"x","type":"none","payload":{},"attempt":1,'
                                b'"max_attempts":1}}', start_by)
        got = {}

        def answered():
            for msg in server.events():
                got[msg.get("key")] = msg
            return len(got) >= 2
        wait_until(answered, timeout=10)
        assert got["01LATE:1"]["op"] == "spawn_failed" and "fenced" in got["01LATE:1"]["error"]
        assert got["01OK:1"]["op"] == "spawned"
    finally:
        server.kill()
        server.wait()
        server.close()
        for fd in fds:
            os.close(fd)


@pytest.mark.timeout(60)
def test_requests_sent_at_once_are_each_answered_and_each_task_holds_only_its_own_channel():
    """The fork server reads every waiting request, then forks back to back: a bad spec
    or a late request among them fails alone, every other one starts, and each task
    process ends up holding only its own report socket (a sibling's copy would keep the
    supervisor from seeing that channel close)."""
    from supervisor.forkserver import ForkServer
    server = ForkServer((), {})
    server.start()
    ends = {}
    try:
        server.fence(time.monotonic() + 60)
        spec = (b'{"task":{"id":"x","type":"none","payload":{},"attempt":1,'
                b'"max_attempts":1}}')
        for i in range(12):
            ends[f"01OK{i}:1"] = server.spawn(f"01OK{i}:1", spec, time.monotonic() + 30)
        ends["01BAD:1"] = server.spawn("01BAD:1", b'{"task": nope', time.monotonic() + 30)
        ends["01LATE:1"] = server.spawn("01LATE:1", spec, time.monotonic() - 0.01)
        got = {}

        def answered():
            for msg in server.events():
                if msg.get("key"):
                    got[msg["key"]] = msg
            return len(got) >= len(ends)
        wait_until(answered, timeout=20)
        assert got["01BAD:1"]["op"] == "spawn_failed" and "bad spec" in got["01BAD:1"]["error"]
        assert got["01LATE:1"]["op"] == "spawn_failed" and "fenced" in got["01LATE:1"]["error"]
        assert all(got[k]["op"] == "spawned" for k in ends if k.startswith("01OK")), got
        for key in (k for k in ends if k.startswith("01OK")):
            report = ends[key][0]
            deadline = time.monotonic() + 10
            while True:  # the task's words, then end of file once no process holds it
                ready, _, _ = select.select([report], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"{key}: its report channel is still held open"
                if not os.read(report, 65536):
                    break
    finally:
        server.kill()
        server.wait()
        server.close()
        for fds in ends.values():
            for fd in fds:
                os.close(fd)


@pytest.mark.timeout(60)
def test_warm_ups_run_once_in_the_fork_server_and_a_failing_one_is_a_warning(supervisor_proc, tmp_path):
    """@warm_up functions run after the preload, in the fork server only: not in the
    supervisor, not in any task process. One that raises is logged and changes nothing
    else."""
    sup = supervisor_proc(supervisor={"pool_size": 2, "preload": ["tvp_handlers", "tvp_warm"]})
    (server,) = sup.fork_servers()
    done = [sup.wait_status(sup.enqueue("t.warm"), "succeeded") for _ in range(3)]
    assert {t.result["ppid"] for t in done} == {server.pid}
    pids = (tmp_path / "warm.pids").read_text().split()
    assert pids == [str(server.pid)]  # once, in the fork server; no task ran it again
    log = sup.log()
    assert "warm-up tvp_warm.fails failed: ValueError: tvp_warm fails to warm up on purpose" in log
    assert sup.stop() == 0


def test_the_fork_server_hands_its_freed_heap_back_after_the_preload():
    """What every fork copies the page tables of is what the fork server has mapped: the
    helper its boot calls after the preload (glibc's malloc_trim) gives the heap's freed
    holes back, here ~40 MB freed below blocks that stay."""
    import platform

    from workers.zygote import _trim_heap
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")

    def anon_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    blocks = [bytes(2000) + bytes([i % 256]) for i in range(20000)]  # malloc's, ~40 MB
    kept = blocks[::20]  # every 20th stays: the heap cannot shrink from its top
    del blocks
    before = anon_kib()
    assert _trim_heap() is True
    after = anon_kib()
    assert after < before - 20_000, (before, after)  # the freed holes went back
    del kept  # alive until here
