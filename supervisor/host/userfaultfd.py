"""Whether this kernel lets QEMU use userfaultfd, which the target of a postcopy
migration needs (it catches the guest's faults on pages not yet arrived).

Root (CAP_SYS_PTRACE) always may; a QEMU that runs as another user (``security_model``
``user`` or ``pool``, or a daemon that is not root) only where
``/proc/sys/vm/unprivileged_userfaultfd`` is 1. A kernel built without userfaultfd
has no such file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["UNPRIVILEGED_USERFAULTFD", "userfaultfd_refusal"]

UNPRIVILEGED_USERFAULTFD: Final = Path("/proc/sys/vm/unprivileged_userfaultfd")


def userfaultfd_refusal(
    *, runs_as_root: bool, sysctl: Path = UNPRIVILEGED_USERFAULTFD
) -> str | None:
    """Why QEMU (as root or not) cannot have userfaultfd here; None when it can."""
    try:
        allowed = sysctl.read_text().strip() == "1"
    except FileNotFoundError:
        return f"this kernel has no userfaultfd ({sysctl} is missing)"
    if runs_as_root or allowed:
        return None
    return (
        f"userfaultfd is refused to a QEMU that does not run as root ({sysctl} is 0): set it"
        " to 1, or run the instance's QEMU as root (security_model none)"
    )
