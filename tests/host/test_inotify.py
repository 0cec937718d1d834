"""Watching one directory entry with inotify, on both backends."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from supervisor.host.inotify import EntryWatch

pytestmark = pytest.mark.anyio


def _delete(path: Path) -> None:
    path.unlink()


def _replace(path: Path) -> None:
    other = path.with_name("other")
    other.write_text("foreign")
    os.rename(other, path)


def _move_away(path: Path) -> None:
    os.rename(path, path.with_name("moved"))


@pytest.mark.parametrize("change", [_delete, _replace, _move_away])
async def test_a_change_of_the_entry_wakes_the_watch(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with EntryWatch(path) as watch:
            change(path)
            with anyio.fail_after(10):
                await watch.changed()


async def test_creating_the_entry_wakes_the_watch(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with EntryWatch(path) as watch:
        (tmp_path / "unrelated").write_text("")
        path.write_text("")
        with anyio.fail_after(10):
            await watch.changed()
        assert path.exists()


async def test_removing_the_directory_wakes_the_watch(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    with EntryWatch(directory / "control.sock") as watch:
        directory.rmdir()
        with anyio.fail_after(10):
            await watch.changed()


def test_a_missing_directory_cannot_be_watched(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        EntryWatch(tmp_path / "missing" / "control.sock")


def test_the_watch_closes_its_descriptor(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with EntryWatch(tmp_path / "control.sock"):
        assert len(os.listdir("/proc/self/fd")) == before + 1
    assert len(os.listdir("/proc/self/fd")) == before
