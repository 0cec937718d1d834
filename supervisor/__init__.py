"""kvm-supervisor: an event-driven supervisor for KVM/QEMU virtual machines.

``from supervisor import Supervisor, load_config`` is the embedding API (API.md §6);
``from supervisor import migrate`` runs a migration between two daemons.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# Silent until the host program configures logging (see `supervisor.log`): without a
# handler of ours, logging's last resort would print warnings on stderr.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["Supervisor", "__version__", "load_config", "migrate"]

if TYPE_CHECKING:
    from supervisor.control.migrate import migrate
    from supervisor.engine.supervisor import Supervisor
    from supervisor.model.config import load_config


def __getattr__(name: str) -> Any:
    # Lazy, so that `import supervisor.model.spec` (or the CLI's start-up) does not load the
    # whole daemon.
    if name == "Supervisor":
        from supervisor.engine.supervisor import Supervisor

        return Supervisor
    if name == "load_config":
        from supervisor.model.config import load_config

        return load_config
    if name == "migrate":
        from supervisor.control.migrate import migrate

        return migrate
    raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
