"""SIGHUP after a handler module was edited, with the same preload list: the reload
starts a new fork server (the log names the changed file) and the next task runs the new
code; with nothing changed the fork server stays."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(90)
MODULE = '''from workers import task

@task("t.code")
def code(payload, ctx):
    return {{"version": {version!r}}}
'''


def _write(tmp_path, version: str) -> None:
    path = tmp_path / "tvp_code.py"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(MODULE.format(version=version))
    tmp.replace(path)  # as editors save: a new file moved in place


def _run(sup) -> str:
    task = sup.wait_status(sup.enqueue("t.code"), "succeeded", timeout=20)
    return task.result["version"]


def test_sighup_after_an_edit_runs_the_new_code(supervisor_proc, tmp_path):
    import signal
    _write(tmp_path, "one")
    sup = supervisor_proc(supervisor={"preload": ["tvp_handlers", "tvp_code"]})
    assert _run(sup) == "one"
    [first] = sup.fork_servers()

    sup.signal(signal.SIGHUP)  # nothing changed: the fork server stays
    sup.wait_log("config reloaded from")
    assert "no handler module changed since fork server" in sup.log()
    assert [p.pid for p in sup.fork_servers()] == [first.pid]

    _write(tmp_path, "two, edited")  # a new size too: Python's .pyc check uses mtime+size
    sup.signal(signal.SIGHUP)
    sup.wait_log(f"started (handler code changed: {tmp_path / 'tvp_code.py'})")
    assert _run(sup) == "two, edited"
