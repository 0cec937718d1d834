"""Where the driver's files live on a Ganeti node, and the settings file it reads.

Everything sits in one directory of Ganeti's configuration, ``<root>/etc/ganeti/
kvm-supervisor/``, where ``<root>`` is ``$GANETI_ROOTDIR`` on a node of a virtual
cluster (Ganeti's vcluster mode: every node's files under a directory of its own) and
empty on a real node:

- ``driver.toml``: the node's daemon socket and how to run this project's CLI there;
- ``python/``: the user base (``PYTHONUSERBASE``) whose ``.pth`` plugs the driver into
  every Ganeti process (`supervisor.ganeti.hook`).

`kvm-supervisor ganeti-install` writes them; the driver only reads ``driver.toml``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Ganeti's virtual-cluster variable: the node's root directory.
ROOTDIR_VARIABLE: Final = "GANETI_ROOTDIR"
SETTINGS_NAME: Final = "driver.toml"


class SettingsError(Exception):
    """``driver.toml`` is missing, unreadable or lacks a key; the message names the file."""


def node_root(environ: Mapping[str, str] = os.environ) -> str:
    """The node's root directory: ``$GANETI_ROOTDIR`` on a virtual node, else ``""``."""
    root = environ.get(ROOTDIR_VARIABLE, "")
    return os.path.normpath(root) if root else ""


def driver_dir(root: str) -> Path:
    """``<root>/etc/ganeti/kvm-supervisor``: every file the driver's installation adds."""
    return Path(f"{root}/etc/ganeti/kvm-supervisor")


def settings_file(root: str) -> Path:
    return driver_dir(root) / SETTINGS_NAME


def user_base(root: str) -> Path:
    """The ``PYTHONUSERBASE`` Ganeti's daemons get: its site-packages holds the hook."""
    return driver_dir(root) / "python"


def defaults_file(root: str) -> Path:
    """Ganeti's ``etc/default/ganeti``: daemon-util sources it before starting a daemon."""
    return Path(f"{root}/etc/default/ganeti")


@dataclass(frozen=True)
class DriverSettings:
    """What the driver needs to know about this node's kvm-supervisor."""

    #: The control socket of this node's daemon.
    socket: str
    #: The interpreter that runs this project's CLI (for the serial console, over ssh).
    python: str
    #: The directory holding the ``supervisor`` package, put on that interpreter's path.
    project: str

    def console_command(self, socket_path: str, instance: str) -> list[str]:
        """The command that attaches to `instance`'s serial console through `socket_path`."""
        return [
            "env",
            f"PYTHONPATH={self.project}",
            self.python,
            "-m",
            "supervisor",
            "--socket",
            socket_path,
            "console",
            instance,
        ]

    def to_toml(self) -> str:
        # JSON strings are valid TOML basic strings (the same escapes).
        return (
            "# Written by `kvm-supervisor ganeti-install`; read by Ganeti's kvm driver.\n"
            f"socket = {json.dumps(self.socket)}\n"
            f"python = {json.dumps(self.python)}\n"
            f"project = {json.dumps(self.project)}\n"
        )


def load_settings(root: str | None = None) -> DriverSettings:
    """Read this node's ``driver.toml`` (`root`: `node_root()` when None)."""
    path = settings_file(node_root() if root is None else root)
    try:
        with path.open("rb") as file:
            values = tomllib.load(file)
    except FileNotFoundError:
        raise SettingsError(
            f"{path} is missing: run `kvm-supervisor ganeti-install` on this node"
        ) from None
    except OSError as error:
        raise SettingsError(f"{path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{path}: {error}") from None
    fields = {}
    for key in ("socket", "python", "project"):
        value = values.get(key)
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{path}: {key} must be a non-empty string")
        fields[key] = value
    return DriverSettings(**fields)
