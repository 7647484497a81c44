"""One owner per concern, read from the source (no fork, no disk writes), beside those
tests/unit/test_layout.py keeps (SQL, the two sides of a fork, one name per class):

- process trees: on the supervisor side only supervisor/proctree.py signals a process
  group, walks a process's descendants or measures their memory; on the task side, which
  never imports supervisor/, only the fork server (workers/zygote.py, killing its tasks'
  trees past the fence) does.
The other owners are kept elsewhere: the LLM settings' precedence by
tests/e2e/test_llm.py (the handler reads no environment of its own), the JSON log fields'
one vocabulary by tests/unit/test_logs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TREE_OWNERS = {"supervisor/proctree.py", "workers/zygote.py"}
TREE_WORK = re.compile(
    r"os\.killpg\(|\.children\(\s*recursive|memory_(full_)?info\(|/statm\b|/task/[^\"']*/children")


def sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text()
            for pkg in ("supervisor", "workers") for p in sorted((ROOT / pkg).rglob("*.py"))}


def hits(pattern: re.Pattern, skip: set[str]) -> list[str]:
    return [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for path, text in sources().items() if path not in skip
            for m in pattern.finditer(text)]


def test_process_trees_have_one_owner_per_side():
    found = hits(TREE_WORK, TREE_OWNERS)
    assert not found, f"use supervisor.proctree (kill_tree, kill_group, tree, rss_bytes): {found}"
    text = (ROOT / "supervisor" / "proctree.py").read_text()
    for name in ("def kill_tree(", "def kill_group(", "def tree(", "def rss_bytes("):
        assert name in text, name

