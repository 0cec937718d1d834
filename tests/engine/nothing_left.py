"""What a failed operation must leave behind: nothing (no QEMU, no instance dir, no entry)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from supervisor import Supervisor


def qemus_of(state_dir: Path) -> list[int]:
    """Live processes but this one (zombies excluded) whose command line names `state_dir`."""
    pids = []
    needle = str(state_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle not in (proc / "cmdline").read_bytes():
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                pids.append(int(proc.name))
    return pids


def assert_nothing_left(sup: Supervisor, state_dir: Path, name: str) -> None:
    """A failed start of `name`, unknown before, left no trace."""
    assert name not in [summary.name for summary in sup.list()]
    assert not (state_dir / "instances" / name).exists()
    assert qemus_of(state_dir) == []
