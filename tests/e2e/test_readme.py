"""The README's Quick start, run as written: its handler module and config are written to a
fresh folder, and its shell block runs in bash with `taskvisor` on PATH (the port moved to
a free one): the supervisor starts, the CLI and curl examples succeed, and the stop
command ends it cleanly. Plus: every file the "Where things live" table names exists, and
the README stays for users (one diagram, one dated table of headline figures, no
engineering notes)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.client import Queue
from tests.support import kill_tree

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_quick_start_runs_as_written(tmp_path):
    quick = section("Quick start")
    handlers = next(b for b in blocks(quick, "python") if b.startswith("# myhandlers.py"))
    config = next(b for b in blocks(quick, "toml") if b.startswith("# taskvisor.toml"))
    script = next(b for b in blocks(quick, "sh") if "taskvisor run" in b)
    port = str(free_port())
    project = tmp_path / "project"
    project.mkdir()
    (project / "myhandlers.py").write_text(handlers)
    (project / "taskvisor.toml").write_text(config.replace("9464", port))
    shim = tmp_path / "bin" / "taskvisor"  # what the venv's console script does
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m supervisor "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
    env.update(PATH=f"{shim.parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script.replace("9464", port)],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out and '"type":"files.embed"' in out, out[-4000:]
    assert "supervisor" in out and "stopped" in out.splitlines()[-1], out[-2000:]
    with Queue(project / "taskvisor.db", create=False) as q:
        tasks = q.list()
    assert len(tasks) == 2 and all(t.status == "succeeded" for t in tasks), tasks
    assert {t.result["count"] for t in tasks} == {1, 2}


def test_the_first_two_commands_stay():
    first = blocks(README[:README.index("\n## ")], "sh")[0]
    assert "taskvisor demo" in first and "bash .ci/run" in first


def test_where_things_live_answers_the_four_questions_with_files_that_exist():
    how = section("How it works")
    table = how[how.index("### Where things live"):]
    for question in ("retries decided", "lease extended", "timeout enforced",
                     "outcome written"):
        assert question in table, question
    paths = re.findall(r"`((?:supervisor|workers)/[\w/.]+)`", table)
    assert len(paths) >= 10, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the table names files that do not exist: {missing}"


def test_install_says_how_to_live_beside_supervisord():
    install = section("Install")
    assert "supervisord" in install and "venv" in install
    assert "sudo pip install" not in README.replace("refuses `sudo pip install`", "")


def test_the_readme_is_for_users():
    """One "How it works" diagram, the headline figures in one table with the date of each
    and the machine, and no engineering notes (those are in benchmarks/README.md)."""
    trees = [b for b in blocks(README, r"\w*") if "└─" in b]
    assert len(trees) == 1 and "fork server" in trees[0], trees
    assert trees[0] in section("How it works")
    figures = section("Figures")
    rows = [ln for ln in figures.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) >= 5, figures
    undated = [r for r in rows if not re.search(r"\| 20\d\d-\d\d-\d\d \|$", r)]
    assert not undated, f"each headline figure says when it was measured: {undated}"
    assert "2 cores" in figures and "Python 3.11" in figures and "benchmarks/README.md" in figures
    for note in ("LD_BIND_NOW", "page fault", "py-spy", "perf record", "moved from the README"):
        assert note not in README, f"{note!r}: an engineering note, for benchmarks/README.md"
