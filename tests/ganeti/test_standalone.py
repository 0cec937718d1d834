"""supervisor.ganeti runs in Ganeti's Python: the standard library, Ganeti, itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "supervisor" / "ganeti"


def _imported(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.append(node.module)
    return names


def test_the_driver_imports_only_the_standard_library_ganeti_and_itself() -> None:
    foreign = [
        f"{path.name}: {name}"
        for path in sorted(PACKAGE.glob("*.py"))
        for name in _imported(path)
        if name.split(".")[0] not in sys.stdlib_module_names
        and name.split(".")[0] != "ganeti"
        and not name.startswith("supervisor.ganeti")
        and name != "__future__"
    ]
    assert foreign == []
