"""Per-instance chroot dirs (``use_chroot``), quarantined at cleanup when not empty.

QEMU chroots into an empty dir after opening everything it needs, so the dir should still
be empty when the instance is cleaned up. If it is not, something wrote into it (a guest
exploit, a misconfiguration): as Ganeti does (``_RemoveInstanceRuntimeFiles``), the dir is
moved to the quarantine dir for an operator to inspect instead of being deleted.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from supervisor.log import get_logger

__all__ = ["create_chroot", "remove_chroot"]

_log = get_logger(__name__)


def create_chroot(path: Path) -> None:
    """Create the empty chroot dir `path` (0700, parents as needed); keep an existing one."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, 0o700)


def remove_chroot(path: Path, *, quarantine_dir: Path, name: str) -> Path | None:
    """Remove the chroot dir `path` of instance `name`, or quarantine it if it is not empty.

    A dir that is not empty moves to ``<quarantine_dir>/<name>-<timestamp>-<random>/``, which
    is returned; None is returned when the dir was removed or did not exist.
    """
    try:
        path.rmdir()
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno != errno.ENOTEMPTY:
            raise
    else:
        return None
    quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    timestamp = time.strftime("%Y-%m-%d_%H_%M_%S")
    # mkdtemp makes the name unique; the rename then replaces that empty dir atomically.
    destination = Path(tempfile.mkdtemp(prefix=f"{name}-{timestamp}-", dir=quarantine_dir))
    path.rename(destination)
    _log.warning(
        "the chroot dir was not empty: moved to the quarantine, inspect and remove it by hand",
        instance=name,
        quarantined=str(destination),
    )
    return destination
