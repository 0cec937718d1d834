"""kvm-supervisor: an event-driven supervisor for KVM/QEMU virtual machines.

``from supervisor import Supervisor, load_config`` is the embedding API (API.md §6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Supervisor", "__version__", "load_config"]

if TYPE_CHECKING:
    from supervisor.config import load_config
    from supervisor.core import Supervisor


def __getattr__(name: str) -> Any:
    # Lazy, so that `import supervisor.spec` (or the CLI's start-up) does not load the
    # whole daemon.
    if name == "Supervisor":
        from supervisor.core import Supervisor

        return Supervisor
    if name == "load_config":
        from supervisor.config import load_config

        return load_config
    raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
