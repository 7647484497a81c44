"""The house rules a newcomer relies on, read from the source (no fork, no disk writes):
only supervisor/store touches SQL or a store connection; workers/ never imports
supervisor/; no two classes share a name; every module says what it owns."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("supervisor", "workers")
SQL_MODULES = {"supervisor.store.queries", "supervisor.store.connection"}
# The HTTP threads, the event fan-out, the loop's output buffers and the live CLI commands
# read and write through Store methods, never a store's connection.
HTTP_SIDE = {"supervisor/api.py", "supervisor/http.py", "supervisor/listener.py",
             "supervisor/request.py", "supervisor/broadcast.py",
             "supervisor/output.py", "supervisor/watch.py"}


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_only_the_store_touches_sql_or_a_store_connection():
    offenders = []
    for path in modules():
        if rel(path).startswith("supervisor/store/"):
            continue
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                    node.module in SQL_MODULES or (node.module == "supervisor.store" and any(
                        f"supervisor.store.{a.name}" in SQL_MODULES for a in node.names))):
                offenders.append(f"{rel(path)}:{node.lineno} imports SQL from {node.module}")
            if (isinstance(node, ast.Attribute) and node.attr == "conn"
                    and rel(path) in HTTP_SIDE):
                offenders.append(f"{rel(path)}:{node.lineno} uses a store's .conn")
        for m in re.finditer(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b", text):
            offenders.append(f"{rel(path)}: SQL text {m.group(0)!r}")
    assert not offenders, offenders


def test_workers_never_import_supervisor():
    for path in (ROOT / "workers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "supervisor" or n.startswith("supervisor.") for n in names), (
                f"{rel(path)}:{node.lineno} imports {names}")


def test_class_names_are_unique():
    seen: dict[str, list[str]] = defaultdict(list)
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                seen[node.name].append(rel(path))
    twice = {name: where for name, where in seen.items() if len(where) > 1}
    assert not twice, f"one name, one meaning: {twice}"


def test_every_module_says_what_it_owns():
    missing = [rel(p) for p in modules()
               if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
