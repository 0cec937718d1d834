"""The daemon's state directory: one daemon per directory, and where everything lives in it.

Layout (names are short because a unix socket path must fit in 107 bytes)::

    <state_dir>/supervisor.lock      flock held by the running daemon; holds its pid
    <state_dir>/control.sock         the control socket
    <state_dir>/instances/<name>/    one dir per instance (0750): qmp.sock, serial.sock,
                                     serial.log, qemu.pid, qemu.log, runtime.json
    <state_dir>/uid-leases/<uid>     uid pool leases (`supervisor.host.uidpool`)
    <state_dir>/chroot/<name>/       chroot with ``use_chroot`` (`supervisor.host.chroot`)
    <state_dir>/quarantine/          chroots that were not empty at cleanup
    <state_dir>/trash/               instance dirs cleaned up, until their removal

The daemon (often root) writes here, so nobody else may: the state dir is created 0750
with the control group as its group (members reach the control socket through it), and
an existing one owned by another user than root or the daemon's, or writable by group or
others, is refused (`InvalidConfigError` naming ``state_dir``); so is an instance dir
that is a symlink or writable by others. Files the daemon opens here are opened with
``O_NOFOLLOW`` (`open_no_follow`): a symlink planted in place of the lock file, a log or
a runtime record is refused, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from types import TracebackType
from typing import Final

import msgspec

from supervisor.log import get_logger
from supervisor.model.errors import InvalidConfigError
from supervisor.model.spec import NAME_PATTERN

__all__ = [
    "MAX_SOCKET_PATH_BYTES",
    "InstancePaths",
    "StateDir",
    "StateDirLocked",
    "open_no_follow",
    "refuse_symlink",
]

_log = get_logger(__name__)

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107

_NAME: Final = re.compile(NAME_PATTERN)


class StateDirLocked(Exception):
    """Another daemon holds the state dir; `holder_pid` is its pid when it could be read."""

    def __init__(self, path: Path, holder_pid: int | None) -> None:
        holder = f"the daemon with pid {holder_pid}" if holder_pid else "another process"
        super().__init__(f"state dir {path} is in use by {holder}")
        self.path = path
        self.holder_pid = holder_pid


class InstancePaths(msgspec.Struct, frozen=True, kw_only=True):
    """Where one instance's runtime files live."""

    directory: Path
    qmp_socket: Path
    serial_socket: Path
    #: Every byte of serial output (QEMU's chardev ``logfile=``).
    serial_log: Path
    pid_file: Path
    #: QEMU's stdout and stderr.
    qemu_log: Path
    runtime_record: Path
    chroot: Path

    @property
    def sockets(self) -> tuple[Path, ...]:
        """The unix sockets QEMU listens on."""
        return (self.qmp_socket, self.serial_socket)


class StateDir:
    """A state dir; `acquire` (or ``with``) makes this process its only daemon.

    Path computations work without the lock; creating and removing instance files is the
    lock holder's business.
    """

    def __init__(self, path: Path | str, *, group_id: int | None = None) -> None:
        self.path = Path(path)
        #: The control group, given to the state dir and the instance dirs it creates.
        self.group_id = group_id
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"<StateDir {self.path} locked={self.locked}>"

    @property
    def lock_file(self) -> Path:
        """The flock file, holding the pid of the daemon that holds it."""
        return self.path / "supervisor.lock"

    @property
    def control_socket(self) -> Path:
        """The control socket."""
        return self.path / "control.sock"

    @property
    def instances_root(self) -> Path:
        """The parent of the per-instance dirs."""
        return self.path / "instances"

    @property
    def uid_lease_dir(self) -> Path:
        """Where the uid pool keeps its leases."""
        return self.path / "uid-leases"

    @property
    def chroot_root(self) -> Path:
        """The parent of the per-instance chroot dirs."""
        return self.path / "chroot"

    @property
    def quarantine_dir(self) -> Path:
        """Where chroots that were not empty at cleanup are moved."""
        return self.path / "quarantine"

    @property
    def trash_dir(self) -> Path:
        """Where cleaned-up instance dirs wait for their removal (`discard_instance_dir`)."""
        return self.path / "trash"

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Take the state dir: lock it, write our pid, remove a stale control socket.

        Creates the dir if needed (0750, group `group_id`). Never blocks: raises
        `StateDirLocked` naming the holder's pid when another daemon runs on it, and
        `InvalidConfigError` naming ``state_dir`` when the dir is not the daemon's alone or
        the lock file is a symlink. The lock goes away with this process (or `release`);
        the descriptor is close-on-exec, so QEMUs never inherit it.
        """
        if self._lock_fd is not None:
            raise RuntimeError(f"{self} is already locked")
        self._make_root()
        try:
            fd = open_no_follow(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise InvalidConfigError("state_dir", f"{self.lock_file}: {error.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateDirLocked(self.path, _read_pid(fd)) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._remove_stale_control_socket()
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        _log.debug("state dir locked", state_dir=str(self.path))

    def _make_root(self) -> None:
        """Create the state dir 0750 with the control group, or check the existing one
        (and its instances dir, which adoption reads before any instance dir is made)."""
        if _make_dir(self.path, 0o750, parents=True, follow=True):
            if self.group_id is not None:
                os.chown(self.path, -1, self.group_id)
        elif self.instances_root.exists() or self.instances_root.is_symlink():
            _check_private(self.instances_root, follow=False)

    def _remove_stale_control_socket(self) -> None:
        try:
            mode = self.control_socket.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{self.control_socket} exists and is not a socket")
        # We hold the lock, so no daemon listens on it: a killed predecessor left it behind.
        self.control_socket.unlink()
        _log.info("removed a stale control socket", path=str(self.control_socket))

    def release(self) -> None:
        """Give up the lock (does nothing when not held)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StateDir:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def instance(self, name: str) -> InstancePaths:
        """The paths of instance `name` (nothing is created).

        Raises InvalidConfigError for a name that is not a valid instance name (it could
        otherwise escape the state dir).
        """
        if not _NAME.fullmatch(name):
            raise InvalidConfigError("name", f"{name!r} is not a valid instance name")
        directory = self.instances_root / name
        return InstancePaths(
            directory=directory,
            qmp_socket=directory / "qmp.sock",
            serial_socket=directory / "serial.sock",
            serial_log=directory / "serial.log",
            pid_file=directory / "qemu.pid",
            qemu_log=directory / "qemu.log",
            runtime_record=directory / "runtime.json",
            chroot=self.chroot_root / name,
        )

    def create_instance_dir(self, name: str, *, group_id: int | None = None) -> InstancePaths:
        """Create the dir of instance `name` (0750; group `group_id` if given) and return its paths.

        Give the control group as `group_id` so that its members reach the serial console
        socket. Raises InvalidConfigError when a socket path would not fit in a unix socket
        address.
        """
        paths = self.instance(name)
        for socket_path in paths.sockets:
            length = len(os.fsencode(socket_path))
            if length > MAX_SOCKET_PATH_BYTES:
                raise InvalidConfigError(
                    "name",
                    f"socket path {socket_path} is {length} bytes, over the "
                    f"{MAX_SOCKET_PATH_BYTES}-byte limit of unix sockets: "
                    "use a shorter instance name or state_dir",
                )
        self._make_root()
        _make_dir(self.instances_root, 0o755)
        _make_dir(paths.directory, 0o750)
        if group_id is not None:
            os.chown(paths.directory, -1, group_id)
        return paths

    def instance_names(self) -> list[str]:
        """The instances that have a dir here, sorted."""
        try:
            entries = list(self.instances_root.iterdir())
        except FileNotFoundError:
            return []
        return sorted(
            entry.name
            for entry in entries
            if _NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
        )

    def discard_instance_dir(self, name: str) -> bool:
        """Move the dir of instance `name` into the trash, for `empty_trash`; whether
        there was one.

        One rename: the instance has no runtime from then on, and a new dir of the same
        name can be made at once. The removal itself, a large serial log's included,
        waits for `empty_trash`, away from the caller's path.
        """
        directory = self.instance(name).directory
        _make_dir(self.trash_dir, 0o700)
        while True:
            try:
                directory.rename(self.trash_dir / f"{name}.{secrets.token_hex(4)}")
            except FileNotFoundError:
                return False
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # that random name is taken: another
            return True

    def empty_trash(self) -> list[Path]:
        """Remove everything in the trash; what could not be removed.

        Blocking (it unlinks whole serial logs): run it in a worker thread.
        """
        try:
            entries = list(self.trash_dir.iterdir())
        except FileNotFoundError:
            return []
        left = []
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            if entry.exists():
                left.append(entry)
        return left


def open_no_follow(path: Path, flags: int, mode: int = 0o640) -> int:
    """``os.open`` with ``O_NOFOLLOW | O_CLOEXEC``: a symlink at `path` is an error.

    Raises OSError; for a symlink its strerror says so (rather than "Too many levels of
    symbolic links") and its filename is `path`.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _symlink_error(path) from None
        raise


def refuse_symlink(path: Path) -> None:
    """Raise OSError, as `open_no_follow` does, when `path` is a symlink.

    For files another program opens (QEMU's serial log), where ``O_NOFOLLOW`` is not ours
    to give.
    """
    if path.is_symlink():
        raise _symlink_error(path)


def _symlink_error(path: Path) -> OSError:
    return OSError(errno.ELOOP, "is a symbolic link (not followed)", str(path))


def _make_dir(path: Path, mode: int, *, parents: bool = False, follow: bool = False) -> bool:
    """Create `path` with exactly `mode` (the umask is not ours to change); True if created.

    An existing `path` is kept once `_check_private` accepts it; `follow` accepts a symlink
    to a directory (an admin may link the state dir itself elsewhere).
    """
    try:
        path.mkdir(mode, parents=parents)
    except FileExistsError:
        _check_private(path, follow=follow)
        return False
    os.chmod(path, mode)
    return True


def _check_private(path: Path, *, follow: bool) -> None:
    """Refuse a dir the daemon cannot trust: a symlink (unless `follow`), not a dir, owned
    by someone other than root or the daemon's user, or writable by group or others."""
    info = path.stat() if follow else path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise InvalidConfigError("state_dir", f"{path} is a symbolic link (not followed)")
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidConfigError("state_dir", f"{path} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise InvalidConfigError(
            "state_dir",
            f"{path} is owned by uid {info.st_uid}, neither root nor the daemon's user"
            f" ({os.geteuid()})",
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InvalidConfigError(
            "state_dir",
            f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}):"
            " only the daemon may write there",
        )


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        # The holder is between truncating and writing its pid.
        return None
