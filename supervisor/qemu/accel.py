"""Which accelerator an instance gets: KVM when it can run the guest, TCG otherwise.

KVM is usable for stock guests when ``/dev/kvm`` opens and is a real hardware
implementation. A host with the ``kvm_pvm`` module (``/sys/module/kvm_pvm``) has a
``/dev/kvm`` that opens, but its paravirtual KVM boots only PVM-enabled guest kernels,
so it counts as not usable for stock guests.

`resolve_accelerator` maps ``kvm_flag`` onto that: ``enabled`` always means KVM (an
error only when ``/dev/kvm`` cannot be opened, a warning on a PVM host), ``disabled``
always means TCG, and the default ``""`` means KVM when usable for stock guests, else
TCG with a warning. The accelerator always appears in the argv, so a binary named
``kvm`` (which changes QEMU's default) never decides silently.
"""

from __future__ import annotations

import enum
import os
from typing import Final

import msgspec

from supervisor.log import get_logger
from supervisor.model.errors import InvalidConfigError

__all__ = [
    "KVM_DEVICE",
    "PVM_MODULE",
    "Accelerator",
    "KvmAvailability",
    "probe_kvm",
    "resolve_accelerator",
]

_log = get_logger(__name__)

KVM_DEVICE: Final = "/dev/kvm"
#: Present when the paravirtual KVM implementation is loaded.
PVM_MODULE: Final = "/sys/module/kvm_pvm"


class Accelerator(enum.StrEnum):
    """QEMU's ``accel=`` value."""

    KVM = "kvm"
    TCG = "tcg"


class KvmAvailability(msgspec.Struct, frozen=True, kw_only=True):
    """What this host's KVM can do; `probe_kvm` reads it."""

    #: ``/dev/kvm`` opened read-write.
    device_openable: bool
    #: The kvm_pvm module is loaded: KVM runs only PVM-enabled guest kernels.
    pvm_host: bool
    #: Why KVM is not usable for stock guests (empty when it is).
    reason: str = ""

    @property
    def usable_for_stock_guests(self) -> bool:
        """Whether an unmodified guest kernel runs under KVM here."""
        return self.device_openable and not self.pvm_host


def probe_kvm(device: str = KVM_DEVICE, pvm_module: str = PVM_MODULE) -> KvmAvailability:
    """Look at this host's KVM: open `device`, look for `pvm_module`."""
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        return KvmAvailability(
            device_openable=False,
            pvm_host=os.path.exists(pvm_module),
            reason=f"{device} cannot be opened: {error.strerror}",
        )
    if os.path.exists(pvm_module):
        return KvmAvailability(
            device_openable=True,
            pvm_host=True,
            reason=f"this is a kvm_pvm host ({pvm_module}): KVM boots only PVM-enabled kernels",
        )
    return KvmAvailability(device_openable=True, pvm_host=False)


def resolve_accelerator(kvm_flag: str, kvm: KvmAvailability, *, instance: str) -> Accelerator:
    """The accelerator for an instance whose ``kvm_flag`` is `kvm_flag`.

    Logs a warning (bound to `instance`) whenever the choice may surprise: KVM on a PVM
    host, or TCG because KVM is not usable. Raises `InvalidConfigError` on
    ``spec.hvparams.kvm_flag`` when KVM is demanded and ``/dev/kvm`` cannot be opened.
    """
    log = _log.bind(instance=instance)
    if kvm_flag == "disabled":
        return Accelerator.TCG
    if kvm_flag == "enabled":
        if not kvm.device_openable:
            raise InvalidConfigError("spec.hvparams.kvm_flag", f"enabled, but {kvm.reason}")
        if kvm.pvm_host:
            log.warning(
                "KVM as requested; only a PVM-enabled guest kernel will boot", reason=kvm.reason
            )
        return Accelerator.KVM
    if kvm.usable_for_stock_guests:
        return Accelerator.KVM
    log.warning("KVM is not usable for stock guests: using TCG (slow)", reason=kvm.reason)
    return Accelerator.TCG
