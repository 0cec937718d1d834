"""kvm-supervisor: an event-driven supervisor for KVM/QEMU virtual machines."""

__version__ = "0.1.0"

from supervisor.config import load_config  # noqa: E402
from supervisor.core import Supervisor  # noqa: E402

__all__ = ["Supervisor", "__version__", "load_config"]
