"""Chroot dirs: created empty, removed when empty, quarantined when not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.host.chroot import create_chroot, remove_chroot
from supervisor.host.statedir import StateDir


def test_create_and_remove_an_empty_chroot(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    chroot = state.instance("vm1").chroot
    old_umask = os.umask(0o077)
    try:
        create_chroot(chroot)
    finally:
        os.umask(old_umask)
    assert chroot.stat().st_mode & 0o777 == 0o700
    assert list(chroot.iterdir()) == []
    create_chroot(chroot)
    assert remove_chroot(chroot, quarantine_dir=state.quarantine_dir, name="vm1") is None
    assert not chroot.exists()
    assert not state.quarantine_dir.exists()


def test_a_missing_chroot_is_fine(tmp_path: Path) -> None:
    assert remove_chroot(tmp_path / "gone", quarantine_dir=tmp_path / "q", name="vm1") is None


def test_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "vm1").write_text("")
    with pytest.raises(FileExistsError):
        create_chroot(tmp_path / "vm1")
    with pytest.raises(NotADirectoryError):
        remove_chroot(tmp_path / "vm1", quarantine_dir=tmp_path / "q", name="vm1")


def test_a_chroot_that_is_not_empty_is_quarantined(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    moved: list[Path] = []
    for round_ in range(2):
        chroot = state.instance("vm1").chroot
        create_chroot(chroot)
        (chroot / "dropped").write_text(f"round {round_}")
        destination = remove_chroot(chroot, quarantine_dir=state.quarantine_dir, name="vm1")
        assert destination is not None
        assert not chroot.exists()
        assert destination.parent == state.quarantine_dir
        assert destination.name.startswith("vm1-20")
        assert (destination / "dropped").read_text() == f"round {round_}"
        moved.append(destination)
    # Two quarantines within the same second do not collide.
    assert moved[0] != moved[1]
    assert state.quarantine_dir.stat().st_mode & 0o777 == 0o700
