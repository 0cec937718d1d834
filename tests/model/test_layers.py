"""Imports run one way: protocols <- model <- host <- qemu <- net <- engine <- control <- cli.

`supervisor.ganeti` (the Ganeti driver, which runs in Ganeti's Python) sits lowest: it
imports none of the others (tests/ganeti/test_standalone.py holds it to the standard
library and Ganeti's modules).

Every import statement of every module counts, wherever it stands (inside a function,
under ``TYPE_CHECKING``): a lazy import upwards is still an import upwards. A module may
import its own layer and the layers below it. The package root (``supervisor`` itself,
for ``__version__``, and its plain modules such as `supervisor.log`) sits below every
layer; its ``__init__`` is the public facade and may re-export from any layer, and its
``__main__`` (``python -m supervisor``) runs the CLI.
`protocols` sits below everything and never imports `supervisor`.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The layers of `supervisor`, lowest first. A new subpackage must be placed here.
LAYERS = ("ganeti", "model", "host", "qemu", "net", "engine", "control", "cli")
PROTOCOLS_RANK = -2
ROOT_RANK = -1


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `supervisor` and `protocols`."""
    names: dict[str, Path] = {}
    for package in ("supervisor", "protocols"):
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _rank(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "protocols":
        return PROTOCOLS_RANK
    if len(parts) == 1 or parts[1] not in LAYERS:
        return ROOT_RANK
    return LAYERS.index(parts[1])


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported module) of every import of our own packages in `path`."""
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                if not is_package:
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else base))
    return [
        (line, name) for line, name in found if name.split(".")[0] in ("supervisor", "protocols")
    ]


def layering_violations(root: Path) -> list[str]:
    """Every import in the tree at `root` that goes up the layers, or to an unknown layer."""
    known = _module_names(root)
    problems: list[str] = []
    for subpackage in sorted((root / "supervisor").iterdir()):
        if (subpackage / "__init__.py").exists() and subpackage.name not in LAYERS:
            problems.append(f"supervisor/{subpackage.name} is in no layer: add it to LAYERS")
    for module, path in known.items():
        if module == "supervisor":
            continue  # the facade: ``from supervisor import Supervisor`` re-exports the engine
        if module == "supervisor.__main__":
            continue  # ``python -m supervisor``: the entry point runs the CLI
        rank = _rank(module)
        for line, imported in _imports(module, path, known):
            if _rank(imported) > rank:
                where = f"{path.relative_to(root)}:{line}"
                problems.append(f"{where}: {module} imports {imported} from a higher layer")
    return problems


def test_imports_run_one_way() -> None:
    assert layering_violations(REPO) == []


def _copy_tree(target: Path) -> None:
    for package in ("supervisor", "protocols"):
        shutil.copytree(
            REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )


def test_an_import_upwards_is_found(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    launcher = tmp_path / "supervisor" / "engine" / "launcher.py"
    launcher.write_text(
        launcher.read_text() + "\n\ndef _later() -> None:\n    from ..control import server\n"
    )
    qmp_client = tmp_path / "protocols" / "qmp" / "_client.py"
    qmp_client.write_text(qmp_client.read_text() + "\nimport supervisor.model.spec\n")
    problems = layering_violations(tmp_path)
    assert len(problems) == 2
    assert (
        "supervisor.engine.launcher imports supervisor.control.server" in problems[0] + problems[1]
    )
    assert "protocols.qmp._client imports supervisor.model.spec" in problems[0] + problems[1]


def test_a_new_subpackage_needs_a_layer(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    (tmp_path / "supervisor" / "gadgets").mkdir()
    (tmp_path / "supervisor" / "gadgets" / "__init__.py").write_text("")
    assert layering_violations(tmp_path) == ["supervisor/gadgets is in no layer: add it to LAYERS"]
