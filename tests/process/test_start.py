"""`taskvisor run`'s start-up contract for launchers and newcomers: the ready file (the
machine-readable "ready" the test harness waits for), and preload modules found beside
the config file or a failure that says how to fix it."""

from __future__ import annotations

import json
import stat
import urllib.request

import pytest

from tests.process.conftest import BASE
from tests.support.launcher import SupervisorProcess, merge

BESIDE = '''
from workers import task

@task("beside.ok")
def ok(payload, ctx):
    return {"found": __file__}
'''


@pytest.mark.timeout(60)
def test_ready_file_names_the_pid_and_http_url_and_goes_at_a_clean_stop(tmp_path):
    settings = merge(BASE, {"supervisor": {"preload": []}, "http": {"listen": "127.0.0.1:0"}})
    with SupervisorProcess(tmp_path, settings) as sup:
        info = json.loads(sup.ready_path.read_text())
        assert info["pid"] == sup.pid and info["owner"].split(":")[1] == str(sup.pid)
        assert info["http"].startswith("http://127.0.0.1:") and info["http"].endswith("/")
        assert stat.S_IMODE(sup.ready_path.stat().st_mode) == 0o600
        # ready means served: the URL answers at once
        with urllib.request.urlopen(info["http"] + "healthz", timeout=10) as res:
            assert res.status == 200
        assert sup.stop() == 0
        assert not sup.ready_path.exists(), "a clean exit removes the ready file"


@pytest.mark.timeout(60)
def test_ready_file_without_http_and_after_a_restart(tmp_path):
    with SupervisorProcess(tmp_path, merge(BASE, {"supervisor": {"preload": []}})) as sup:
        first = sup.pid
        assert sup.ready_info["http"] is None
        sup.kill9()
        assert sup.ready_path.exists()  # a killed supervisor leaves it: the pid says whose
        sup.restart()
        assert sup.ready_info["pid"] == sup.pid != first


@pytest.mark.timeout(60)
def test_preload_module_beside_the_config_file_is_found_from_another_folder(tmp_path):
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    (etc / "tvp_beside.py").write_text(BESIDE)
    settings = merge(BASE, {"supervisor": {"preload": ["tvp_beside"]}})
    # cwd is `elsewhere`, PYTHONPATH holds only the checkout: only the config's folder has it
    with SupervisorProcess(elsewhere, settings, config_path=etc / "taskvisor.toml") as sup:
        task = sup.wait(sup.queue.enqueue("beside.ok"), timeout=20)
        assert task.status == "succeeded", task.error
        assert task.result["found"] == str(etc / "tvp_beside.py")


@pytest.mark.timeout(60)
def test_a_preload_module_not_found_says_where_it_was_looked_for(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    settings = merge(BASE, {"supervisor": {"preload": ["tvp_nowhere_to_be_found"]}})
    sup = SupervisorProcess(tmp_path, settings, config_path=etc / "taskvisor.toml")
    try:
        sup.start(wait_ready=False)
        assert sup.wait_exit(30) == 3
        log = sup.log()
        assert "No module named 'tvp_nowhere_to_be_found'" in log
        assert f"the working directory ({tmp_path})" in log
        assert f"the config file's folder ({etc})" in log
        assert "PYTHONPATH" in log
    finally:
        sup.close()
