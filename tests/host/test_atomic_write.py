"""`replace_file`: atomic, through a spare that is reused, never through a foreign file."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from supervisor.host import atomic_write
from supervisor.host.atomic_write import replace_file, spare_path

PRECIOUS = b"precious contents\n"


def names(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def test_first_write_leaves_no_spare(tmp_path: Path) -> None:
    path = tmp_path / "runtime.json"
    replace_file(path, b"one\n", mode=0o640)
    assert path.read_bytes() == b"one\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert names(tmp_path) == ["runtime.json"]


def test_the_spare_keeps_the_previous_version_and_is_written_again(tmp_path: Path) -> None:
    path = tmp_path / "runtime.json"
    spare = spare_path(path)
    replace_file(path, b"one\n", mode=0o640)
    replace_file(path, b"two, longer\n", mode=0o640)
    assert path.read_bytes() == b"two, longer\n"
    assert spare.read_bytes() == b"one\n"
    held = os.open(spare, os.O_RDONLY)  # an inode held open is never reused for another
    try:
        replace_file(path, b"3\n", mode=0o640)
        # The spare was written and swapped in: no file is created or removed once both
        # exist.
        assert os.path.samestat(os.fstat(held), path.stat())
        assert os.fstat(held).st_nlink == 1
    finally:
        os.close(held)
    assert path.read_bytes() == b"3\n"  # the longer contents before are cut off
    assert spare.read_bytes() == b"two, longer\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert names(tmp_path) == [".runtime.json.spare", "runtime.json"]


def test_a_symlink_is_never_written_through(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_bytes(PRECIOUS)
    path = tmp_path / "runtime.json"
    path.symlink_to(precious)
    replace_file(path, b"one\n", mode=0o640)  # the swap puts the symlink at the spare's name
    assert not path.is_symlink()
    assert spare_path(path).is_symlink()
    replace_file(path, b"two\n", mode=0o640)
    assert not spare_path(path).is_symlink()
    assert path.read_bytes() == b"two\n"
    assert spare_path(path).read_bytes() == b"one\n"
    spare_path(path).unlink()
    spare_path(path).symlink_to(precious)
    replace_file(path, b"three\n", mode=0o640)
    assert path.read_bytes() == b"three\n"
    assert precious.read_bytes() == PRECIOUS


def test_a_spare_with_another_link_is_replaced_not_written(tmp_path: Path) -> None:
    path = tmp_path / "runtime.json"
    replace_file(path, b"one\n", mode=0o640)
    replace_file(path, b"two\n", mode=0o640)
    other = tmp_path / "other"
    os.link(spare_path(path), other)
    replace_file(path, b"three\n", mode=0o640)
    assert path.read_bytes() == b"three\n"
    assert other.read_bytes() == b"one\n"


def test_without_name_exchange_the_spare_is_renamed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_exchange(*args: object) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1

    path = tmp_path / "runtime.json"
    replace_file(path, b"one\n", mode=0o640)
    monkeypatch.setattr(atomic_write, "_renameat2", no_exchange)
    replace_file(path, b"two\n", mode=0o640)
    assert path.read_bytes() == b"two\n"
    assert names(tmp_path) == ["runtime.json"]


def test_a_failed_write_keeps_the_old_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "runtime.json"
    replace_file(path, b"one\n", mode=0o640)
    replace_file(path, b"two\n", mode=0o640)

    def broken_fchmod(fd: int, mode: int) -> None:  # fails once the new data is written
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fchmod", broken_fchmod)
    with pytest.raises(OSError, match="Input/output error"):
        replace_file(path, b"three\n", mode=0o640)
    assert path.read_bytes() == b"two\n"


def test_concurrent_writes_of_one_file_never_mix(tmp_path: Path) -> None:
    """Two threads save the same file at once (as two worker threads could): after each
    round, the file and its spare each hold one version whole."""
    path = tmp_path / "runtime.json"
    versions = (b"a" * 10, b"b" * 20000)
    for _ in range(60):
        writers = [
            threading.Thread(
                target=lambda data=data: [replace_file(path, data, mode=0o640) for _ in range(25)]
            )
            for data in versions
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        assert path.read_bytes() in versions
        assert spare_path(path).read_bytes() in versions
