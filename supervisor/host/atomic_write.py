"""Replacing a small file's contents atomically, through a spare file kept beside it.

The usual atomic write creates a temporary file and renames it over the old one. On
ext4 both halves cost: creating an inode, and dropping the replaced one inside the
rename (each 0.1-0.3 ms of kernel time on a loaded host, measured on the runtime records
of this project's migrations). A runtime record is saved several times on the way of
every start and migration, so the temporary file is kept: beside ``NAME`` lives
``.NAME.spare``. A save overwrites the spare in place (its blocks are reused), then
swaps the two names with one ``renameat2(RENAME_EXCHANGE)``: a reader, or a process
killed at any point, sees the old contents or the new ones, and the spare holds the
previous version until the next save overwrites it. (So a reader that opened the file
before one save and still reads it when the next begins would see that save's bytes:
the runtime records are read by the daemon alone, at its start, when nothing saves
them.)

The spare is only ever written through a descriptor of a regular file that this process
owns with one link: anything else found under its name (a symlink, a hard link, a file
of another user) is removed and a new spare created (``O_EXCL``). Where the file system
cannot exchange names, or the file does not exist yet, the spare is renamed onto the
file instead, and the next save makes a new one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from pathlib import Path
from typing import Final

from supervisor.host.statedir import open_no_follow

__all__ = ["replace_file", "spare_path"]

_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2
#: What ``renameat2`` answers where the kernel or the file system cannot exchange names.
_NO_EXCHANGE: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)

#: Saves run in worker threads: two saves of one file must not write its spare at once.
#: Striped by path, so the number of locks is fixed whatever the number of files.
_LOCKS: Final = tuple(threading.Lock() for _ in range(16))


def spare_path(path: Path) -> Path:
    """Where the spare of `path` lives."""
    return path.with_name(f".{path.name}.spare")


def replace_file(path: Path, data: bytes, *, mode: int) -> None:
    """Give `path` the contents `data` and permission bits `mode`, atomically.

    Nothing is written through a symlink at `path` (the swap replaces one) or at its
    spare. Raises OSError; the file then keeps its old contents.
    """
    spare = spare_path(path)
    with _LOCKS[hash(path) % len(_LOCKS)]:
        fd = _open_spare(spare, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.ftruncate(fd, len(data))
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        if not _exchange(spare, path):
            os.rename(spare, path)


def _open_spare(spare: Path, mode: int) -> int:
    """A descriptor to write the spare through: the one there if it is a regular file of
    ours with one link, else a new one."""
    try:
        fd = open_no_follow(spare, os.O_WRONLY)
    except FileNotFoundError:
        pass
    except OSError:
        spare.unlink()  # a symlink, or a file we may not write: not ours to write through
    else:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == os.geteuid():
            return fd
        os.close(fd)
        spare.unlink()
    return open_no_follow(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)


def _exchange(spare: Path, path: Path) -> bool:
    """Swap the names `spare` and `path`; False when that cannot be done here (`path`
    does not exist, or the file system cannot exchange names)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(spare), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE):
        code = ctypes.get_errno()
        if code == errno.ENOENT or code in _NO_EXCHANGE:
            return False
        raise OSError(code, os.strerror(code), str(spare), None, str(path))
    return True
