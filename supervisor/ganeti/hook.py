"""Plug the driver into Ganeti without editing Ganeti: its ``kvm`` entry, at import.

Ganeti looks up the class of a hypervisor in ``ganeti.hypervisor._HYPERVISOR_MAP`` on
every call. `install` (run by the ``.pth`` file `kvm-supervisor ganeti-install` puts in
the user site-packages of Ganeti's processes) makes that dict map ``kvm`` to
`KvmSupervisorHypervisor` as soon as ``ganeti.hypervisor`` is imported, and costs
nothing to a process that never imports it: the driver is loaded by then, not before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Final

TARGET: Final = "ganeti.hypervisor"
HYPERVISOR: Final = "kvm"


def plug_into(module: ModuleType) -> None:
    """Make `module` (``ganeti.hypervisor``) hand ``kvm`` to the kvm-supervisor driver."""
    from supervisor.ganeti.hypervisor import KvmSupervisorHypervisor

    module._HYPERVISOR_MAP[HYPERVISOR] = KvmSupervisorHypervisor


class _PatchingLoader(importlib.abc.Loader):
    """Ganeti's own loader of ``ganeti.hypervisor``, then `plug_into`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        plug_into(module)

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_package, get_resource_reader, ...) is the real loader's.
        return getattr(self._loader, name)


class _HypervisorFinder(importlib.abc.MetaPathFinder):
    """Finds ``ganeti.hypervisor`` where Python would, with `_PatchingLoader` around it."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Plug the driver in now if Ganeti's hypervisors are loaded, else when they are."""
    loaded = sys.modules.get(TARGET)
    if loaded is not None:
        plug_into(loaded)
    elif not any(isinstance(finder, _HypervisorFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HypervisorFinder())
