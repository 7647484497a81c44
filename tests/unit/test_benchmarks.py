"""Benchmarks that rot: every `benchmarks/*_bench.py` answers `--help`, and every
taskvisor-side helper module imports, with the project's own dependencies only.

CI's virtualenv (.ci/run: the project with its test and embed extras) has none of the peer
queues the benchmarks compare with (benchmarks/requirements-peers.txt, and arq): a
benchmark imports a peer inside the function that runs it, and only the peer-side modules
below (the peers' own worker modules, imported in the peer's process) import one at module
level. The subprocesses here refuse every peer import even where one is installed, so a
rename in taskvisor that breaks a benchmark, or a peer imported too early, fails here.
Every `from supervisor|workers|tests… import NAME` in benchmarks/, inside functions too,
must name something that exists. Reads files and runs `python` with `--help` only: no
benchmark runs.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
# Worker modules of the peers themselves, imported only in a peer's own process.
PEER_SIDE = {"celery_app", "inflight_arq", "inflight_celery", "inflight_dramatiq", "rq_jobs"}
SCRIPTS = sorted(p.name for p in BENCH.glob("*_bench.py"))
HELPERS = sorted(p.stem for p in BENCH.glob("*.py")
                 if not p.name.endswith("_bench.py") and p.stem not in PEER_SIDE)

# Runs in the subprocess: a finder that refuses the peers, then argv[2:] as a script or as
# modules to import.
NO_PEERS = r'''
import importlib, importlib.abc, json, runpy, sys
PEERS = set(sys.argv[1].split(","))

class NoPeers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in PEERS:
            raise ModuleNotFoundError(f"No module named {name!r} (a peer queue: CI's venv "
                                      "has none; import it in the function that runs it)",
                                      name=name)
        return None

sys.meta_path.insert(0, NoPeers())
bench = sys.argv[2]
if sys.argv[3] == "--script":
    sys.path.insert(0, bench)   # what `python benchmarks/X_bench.py` puts first
    sys.argv = [sys.argv[4], "--help"]
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    sys.path[:0] = [bench, sys.argv[3]]   # a helper is imported by a script that added ROOT
    failed = {}
    for name in sys.argv[4:]:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(failed))
'''


def peers() -> set[str]:
    """Import names of the peer queues: benchmarks/requirements-peers.txt, plus arq (which
    setup-peers.sh installs into an environment of its own)."""
    names = {"arq"}
    for line in (BENCH / "requirements-peers.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)", line.split("#", 1)[0])
        if m:
            names.add(m.group(1).lower().replace("-", "_"))
    return names


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_PEERS, ",".join(sorted(peers())),
                           str(BENCH), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_the_peer_list_is_read():
    assert {"celery", "redis", "huey", "rq", "dramatiq", "arq"} <= peers()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help_without_the_peers(script):
    res = run("--script", str(BENCH / script))
    code, out, err = res.returncode, res.stdout, res.stderr
    assert code == 0 and "usage:" in out, (
        f"benchmarks/{script} --help exited {code}:\n{err[-3000:]}")


def test_every_taskvisor_side_helper_imports_without_the_peers():
    assert HELPERS, "no helper modules found in benchmarks/"
    res = run(str(ROOT), *HELPERS)
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"benchmarks/{m}.py: {e}" for m, e in failed.items())


def test_every_project_name_a_benchmark_imports_exists():
    """Imports inside functions too (they run only when a benchmark runs): every
    `from supervisor|workers|tests.… import NAME` in benchmarks/ names something that is
    there, so a rename fails here and not in the next person's benchmark run."""
    missing = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.partition(".")[0] in ("supervisor", "workers", "tests")):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                missing.append(f"benchmarks/{path.name}:{node.lineno}: {exc}")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:  # a submodule: `from supervisor import start`
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"benchmarks/{path.name}:{node.lineno}: "
                                       f"{node.module} has no {alias.name}")
    assert not missing, "\n".join(missing)


def test_peer_side_modules_are_the_peers_own():
    """A module is left out of the import check only if it is a peer's worker module: it
    imports a peer at module level (else it belongs with the helpers above)."""
    known = peers()
    for name in sorted(PEER_SIDE):
        path = BENCH / f"{name}.py"
        assert path.exists(), f"benchmarks/{name}.py is gone: drop it from PEER_SIDE"
        top = {a.name.partition(".")[0] for node in ast.parse(path.read_text()).body
               if isinstance(node, ast.Import) for a in node.names}
        top |= {(node.module or "").partition(".")[0] for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.ImportFrom)}
        assert top & known, f"benchmarks/{name}.py imports no peer: check it with the helpers"
