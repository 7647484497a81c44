"""supervisor.handlercode: handler module files found without importing them, and the
fingerprints a SIGHUP reload compares (edits, files moved in place, copies that keep an
old modification time)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from supervisor import config as _config, handlercode


@pytest.fixture
def code_dir(tmp_path, monkeypatch):
    pkg = tmp_path / "hc_pkg"
    pkg.mkdir()
    # Importing the package would fail loudly: finding a module must run no user code.
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "jobs.py").write_text("X = 1\n")
    (tmp_path / "hc_mod.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _config_for(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[supervisor]\npreload = ["hc_mod"]\n'
                    '[types."t"]\nhandler = "hc_pkg.jobs:run"\n')
    return _config.load(path, env={})


def test_module_files_are_found_without_importing(code_dir):
    assert handlercode.module_file("hc_pkg.jobs") == str(code_dir / "hc_pkg" / "jobs.py")
    assert handlercode.module_file("hc_mod") == str(code_dir / "hc_mod.py")
    assert handlercode.module_file("hc_mod.nothing") is None
    assert handlercode.module_file("no_such_module_at_all") is None
    assert "hc_pkg" not in sys.modules


def test_changes_are_seen_and_nothing_else(code_dir):
    cfg = _config_for(code_dir)
    code = handlercode.HandlerCode()
    code.remember(1234, handlercode.stamp(cfg))
    assert code.changed(handlercode.stamp(cfg), 1234) == []
    jobs = code_dir / "hc_pkg" / "jobs.py"
    old = os.stat(jobs)
    jobs.write_text("X = 2\n")
    os.utime(jobs, ns=(old.st_atime_ns, old.st_mtime_ns))  # as cp -p or rsync -t leave it
    assert code.changed(handlercode.stamp(cfg), 1234) == [str(jobs)]
    mod = code_dir / "hc_mod.py"
    (code_dir / "new.py").write_text("Y = 2\n")
    os.replace(code_dir / "new.py", mod)  # an editor's save
    assert code.changed(handlercode.stamp(cfg), 1234) == [str(mod), str(jobs)]


def test_a_server_without_a_fingerprint_compares_with_its_start_time(code_dir):
    cfg = _config_for(code_dir)
    code = handlercode.HandlerCode()
    # This process started before the files were written: both count as changed.
    assert sorted(code.changed(handlercode.stamp(cfg), os.getpid())) == sorted(
        [str(code_dir / "hc_mod.py"), str(code_dir / "hc_pkg" / "jobs.py")])
    long_ago = time.time() - 3600
    for f in (code_dir / "hc_mod.py", code_dir / "hc_pkg" / "jobs.py"):
        os.utime(f, (long_ago, long_ago))
    # ctime still says "just now": a copy with an old mtime is not mistaken for old code.
    assert len(code.changed(handlercode.stamp(cfg), os.getpid())) == 2
