"""Changes to one directory entry, from inotify, awaited without threads or polling.

The standard library has no inotify binding; its two calls come from the C library
through ctypes, and the inotify descriptor is awaited with `anyio.wait_readable`, so a
watch costs nothing until something happens. Linux only, like the rest of the host
layer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Final

import anyio

__all__ = ["EntryWatch"]

# <sys/inotify.h>
_IN_MOVED_FROM: Final = 0x40
_IN_MOVED_TO: Final = 0x80
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_DELETE_SELF: Final = 0x400
_IN_MOVE_SELF: Final = 0x800
_IN_Q_OVERFLOW: Final = 0x4000
_IN_IGNORED: Final = 0x8000
_IN_ONLYDIR: Final = 0x1000000
#: Events about the watched directory itself rather than one of its entries.
_DIRECTORY_EVENTS: Final = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_Q_OVERFLOW | _IN_IGNORED
#: struct inotify_event: wd, mask, cookie, len, then `len` bytes of NUL-padded name.
_EVENT: Final = struct.Struct("iIII")
_READ_BYTES: Final = 64 * 1024


class EntryWatch:
    """Watches the directory entry ``path`` (which need not exist) for a change.

    ``with EntryWatch(path) as watch: await watch.changed()`` returns once the entry may
    have changed: created, deleted, renamed away, or replaced by a rename. It also
    returns when the directory itself is deleted or moved, or the kernel dropped events;
    the caller looks at the entry again in every case.

    :raises OSError: on creation, inotify is unavailable (no such call, or the per-user
        limit of instances or watches is reached) or the directory cannot be watched.
    """

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            init1 = libc.inotify_init1
            add_watch = libc.inotify_add_watch
        except AttributeError:
            raise OSError(errno.ENOSYS, "the C library has no inotify") from None
        fd = int(init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            raise _errno_error("inotify_init1", path)
        mask = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO
        mask |= _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
        if int(add_watch(fd, os.fsencode(path.parent), mask)) < 0:
            error = _errno_error("inotify_add_watch", path.parent)
            os.close(fd)
            raise error
        self._fd = fd
        self._name = os.fsencode(path.name)

    def __enter__(self) -> EntryWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        os.close(self._fd)

    async def changed(self) -> None:
        """Wait until the entry may have changed (see the class); on cancellation, events
        read so far are dropped, so look at the entry after a cancelled wait too."""
        while True:
            await anyio.wait_readable(self._fd)
            try:
                events = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                continue
            if self._concerns_entry(events):
                return

    def _concerns_entry(self, events: bytes) -> bool:
        offset = 0
        while offset + _EVENT.size <= len(events):
            _, mask, _, length = _EVENT.unpack_from(events, offset)
            offset += _EVENT.size
            name = events[offset : offset + length].rstrip(b"\0")
            offset += length
            if mask & _DIRECTORY_EVENTS or name == self._name:
                return True
        return False


def _errno_error(call: str, path: Path) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}", str(path))
