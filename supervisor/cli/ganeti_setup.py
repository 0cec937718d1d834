"""``kvm-supervisor ganeti-install`` and ``ganeti-uninstall``: the driver on a Ganeti node.

Install writes, on the node it runs on (under ``$GANETI_ROOTDIR`` on a virtual node):

- ``etc/ganeti/kvm-supervisor/driver.toml``: the daemon's socket and how to run this
  CLI (for the serial console);
- ``etc/ganeti/kvm-supervisor/python/.../site-packages/kvm-supervisor.pth``: a line
  that makes this project importable by Ganeti's Python and calls
  `supervisor.ganeti.hook.install`;
- a marked block in ``etc/default/ganeti`` exporting ``PYTHONUSERBASE`` (that
  ``python`` directory) to every Ganeti daemon, which daemon-util sources, and through
  them to Ganeti's job processes (luxid starts those with its own ``PYTHONPATH``, so a
  ``sitecustomize`` on ``PYTHONPATH`` would miss them).

It then imports ``ganeti.hypervisor`` in Ganeti's Python, as a daemon would, and fails
unless ``kvm`` is the driver. Uninstall removes the block and the directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Final

import anyio

import supervisor
from supervisor.ganeti.settings import (
    ROOTDIR_VARIABLE,
    DriverSettings,
    defaults_file,
    driver_dir,
    settings_file,
    user_base,
)

GANETI_PYTHON: Final = "/usr/bin/python3"
#: Where Debian's Ganeti keeps its Python modules (a link to the running version's).
GANETI_LIB: Final = "/usr/share/ganeti/default"
PTH_NAME: Final = "kvm-supervisor.pth"
BLOCK_BEGIN: Final = (
    "# >>> kvm-supervisor ganeti-install (kvm-supervisor ganeti-uninstall removes this)"
)
BLOCK_END: Final = "# <<< kvm-supervisor ganeti-install"
_DRIVER_CLASS: Final = "supervisor.ganeti.hypervisor.KvmSupervisorHypervisor"


class GanetiSetupError(Exception):
    """The node cannot take the driver (Ganeti missing, a file not writable, ...)."""


def project_dir() -> Path:
    """The directory holding the ``supervisor`` package this CLI runs from."""
    return Path(supervisor.__file__).resolve().parent.parent


def _ganeti_env(base: Path) -> dict[str, str]:
    """What a Ganeti daemon of this node sees: no PYTHONPATH of ours, `base` as its user
    base, the node's vcluster variables if any."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for name in (ROOTDIR_VARIABLE, "GANETI_HOSTNAME"):
        if name in os.environ:
            env[name] = os.environ[name]
    env["PYTHONUSERBASE"] = str(base)
    return env


async def _python_output(python: str, code: str, env: dict[str, str]) -> str:
    try:
        result = await anyio.run_process([python, "-c", code], env=env, check=False)
    except OSError as error:
        raise GanetiSetupError(f"cannot run Ganeti's Python {python}: {error.strerror}") from None
    if result.returncode != 0:
        raise GanetiSetupError(f"{python} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode().strip()


def _without_block(text: str) -> str:
    lines = text.splitlines(keepends=True)
    kept: list[str] = []
    inside = False
    for line in lines:
        if line.rstrip("\n") == BLOCK_BEGIN:
            inside = True
        elif inside and line.rstrip("\n") == BLOCK_END:
            inside = False
        elif not inside:
            kept.append(line)
    return "".join(kept)


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(text)
    temporary.chmod(0o644)
    temporary.replace(path)


def _defaults_with_block(root: str, base: Path) -> tuple[Path, str]:
    """``etc/default/ganeti`` and its new text: exporting `base` as PYTHONUSERBASE."""
    path = defaults_file(root)
    try:
        text = path.read_text() if path.exists() else ""
    except OSError as error:
        raise GanetiSetupError(f"{path}: {error.strerror}") from None
    rest = _without_block(text)
    for line in rest.splitlines():
        if "PYTHONUSERBASE" in line and not line.lstrip().startswith("#"):
            raise GanetiSetupError(f"{path} sets PYTHONUSERBASE already: {line.strip()}")
    if rest and not rest.endswith("\n"):
        rest += "\n"
    return path, f"{rest}{BLOCK_BEGIN}\nexport PYTHONUSERBASE='{base}'\n{BLOCK_END}\n"


def _write_files(root: str, settings: DriverSettings, site_packages: Path) -> list[str]:
    """Write driver.toml, the .pth and the defaults block; one line per file."""
    base = user_base(root)
    defaults, defaults_text = _defaults_with_block(root, base)
    try:
        for directory in (driver_dir(root), site_packages):
            directory.mkdir(parents=True, exist_ok=True)
        # Ganeti's job processes run as gnt-masterd: every directory must be readable.
        for directory in (site_packages, *site_packages.relative_to(driver_dir(root)).parents):
            (driver_dir(root) / directory).chmod(0o755)
        _write(settings_file(root), settings.to_toml())
        pth = site_packages / PTH_NAME
        _write(
            pth,
            "# Written by `kvm-supervisor ganeti-install`: Ganeti's kvm hypervisor is"
            " kvm-supervisor's driver.\n"
            f"import sys; sys.path.append({settings.project!r}); "
            "import supervisor.ganeti.hook; supervisor.ganeti.hook.install()\n",
        )
        defaults.parent.mkdir(parents=True, exist_ok=True)
        _write(defaults, defaults_text)
    except OSError as error:
        raise GanetiSetupError(f"{error.filename}: {error.strerror}") from None
    return [
        f"wrote {settings_file(root)}: daemon socket {settings.socket}",
        f"wrote {pth}: imports the driver from {settings.project} into Ganeti's Python",
        f"wrote {defaults}: exports PYTHONUSERBASE={base} to Ganeti's daemons",
    ]


async def install(
    socket_path: Path, *, root: str, ganeti_python: str, ganeti_lib: str
) -> list[str]:
    """Write the driver's files on this node; returns one line per file written.

    Raises `GanetiSetupError` when Ganeti is missing, a file cannot be written, or
    Ganeti's Python does not end up with the driver as its ``kvm`` hypervisor.
    """
    if not await anyio.Path(ganeti_lib, "ganeti", "hypervisor").is_dir():
        raise GanetiSetupError(f"Ganeti's Python modules are not in {ganeti_lib}")
    env = _ganeti_env(user_base(root))
    site_packages = await _python_output(
        ganeti_python, "import site; print(site.getusersitepackages())", env
    )
    if not site_packages.startswith(f"{user_base(root)}/"):
        raise GanetiSetupError(f"{ganeti_python} ignores PYTHONUSERBASE ({site_packages})")
    settings = DriverSettings(
        socket=str(socket_path), python=sys.executable, project=str(project_dir())
    )
    done = _write_files(root, settings, Path(site_packages))
    check = (
        f"import sys; sys.path.insert(0, {ganeti_lib!r}); from ganeti import hypervisor; "
        "c = hypervisor.GetHypervisorClass('kvm'); print(c.__module__ + '.' + c.__qualname__)"
    )
    found = await _python_output(ganeti_python, check, env)
    if found != _DRIVER_CLASS:
        raise GanetiSetupError(f"Ganeti's kvm hypervisor is {found}, not {_DRIVER_CLASS}")
    return [
        *done,
        f"checked: {ganeti_python} loads {_DRIVER_CLASS} as Ganeti's kvm hypervisor",
        "restart Ganeti's daemons on this node for them to use it",
    ]


def uninstall(*, root: str) -> list[str]:
    """Remove what `install` wrote; returns one line per file removed."""
    done = []
    path = defaults_file(root)
    try:
        if path.exists():
            text = path.read_text()
            rest = _without_block(text)
            if rest != text:
                _write(path, rest)
                done.append(f"removed the PYTHONUSERBASE block from {path}")
        directory = driver_dir(root)
        if directory.exists():
            shutil.rmtree(directory)
            done.append(f"removed {directory} (driver.toml and the .pth hook)")
    except OSError as error:
        raise GanetiSetupError(f"{error.filename}: {error.strerror}") from None
    if not done:
        done.append(f"nothing to remove: the driver is not installed under {root or '/'}")
    else:
        done.append("restart Ganeti's daemons on this node for them to use Ganeti's own kvm")
    return done
