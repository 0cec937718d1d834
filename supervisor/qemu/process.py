"""QEMU processes: launched in their own session, watched through pidfds, adopted after a restart.

A `QemuProcess` holds a pidfd, so signals and exit notifications always reach the process it
was opened for, never a later process that reused the pid. An exit is noticed at once (a
pidfd becomes readable when its process exits) whether QEMU is our child or was adopted from
a previous daemon.

Reaping. A child's exit status is collected with ``waitid(P_PIDFD)`` by `QemuProcess.wait_exit`.
An adopted QEMU that is not our child cannot be waited for: its exit status is reported as
unknown and its zombie is reaped by its own parent (PID 1 or a subreaper).

Subreaper. `set_child_subreaper` (called by ``kvm-supervisor serve`` only, never by the library)
makes orphaned *descendants* of the daemon its children instead of PID 1's: a helper forked by
a QEMU we launched, or a QEMU whose intermediate parent exits, is then reaped by the daemon at
once with its exit status, rather than lingering as a zombie for the 1-2 s PID 1 takes on
these machines. It does nothing for QEMUs started by a previous daemon: they were never our
descendants. Such orphans are not tracked by any `QemuProcess`; `reap_orphans` collects them.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import select
import signal
import subprocess
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import anyio
import msgspec

from supervisor.host.statedir import open_no_follow
from supervisor.log import get_logger
from supervisor.model.errors import HypervisorError

__all__ = [
    "ExitStatus",
    "QemuProcess",
    "adopt",
    "is_child_subreaper",
    "launch",
    "pids_by_option",
    "process_state",
    "reap_orphans",
    "run_captured",
    "set_child_subreaper",
]

_log = get_logger(__name__)

#: What `run_captured` keeps of a child's stdout, and of its stderr: QEMU 7.2's longest
#: answer (``-device help``) is about 30 KiB.
MAX_CAPTURED_BYTES: Final = 4 * 1024 * 1024
#: How long a child that `run_captured` killed may take to exit before it is left alone.
_KILL_WAIT_S: Final = 10.0

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

# QemuProcess objects by pid, so that `reap_orphans` never takes an exit status that a watcher
# is about to collect. Weak, so a forgotten QemuProcess stops protecting its pid.
_tracked: weakref.WeakValueDictionary[int, QemuProcess] = weakref.WeakValueDictionary()


class ExitStatus(msgspec.Struct, frozen=True, kw_only=True):
    """How a process ended: an exit `code`, a `signal`, or neither when it is unknown.

    The status is unknown for a process that was not our child (a QEMU adopted from a
    previous daemon), since only a parent can collect it.
    """

    code: int | None = None
    signal: int | None = None

    @property
    def known(self) -> bool:
        """Whether the exit code or signal is known."""
        return self.code is not None or self.signal is not None

    def describe(self) -> str:
        """A short human description, e.g. ``killed by signal 9 (SIGKILL)``."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                return f"killed by signal {self.signal}"
            return f"killed by signal {self.signal} ({name})"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "exit status unknown (the process was not a child of this daemon)"


def _status_from_waitid(result: os.waitid_result | None) -> ExitStatus:
    if result is None:
        return ExitStatus()
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(code=result.si_status)
    if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return ExitStatus(signal=result.si_status)
    return ExitStatus()


class QemuProcess:
    """A process watched through a pidfd; built by `launch` or `adopt`.

    The pidfd is closed by `close` (or when the object is garbage-collected). Closing it
    does not touch the process: a QEMU keeps running when the daemon lets go of it.
    """

    def __init__(self, pid: int, pidfd: int, *, log_path: Path | None) -> None:
        self.pid = pid
        self.log_path = log_path
        self._pidfd = pidfd
        self._exit_status: ExitStatus | None = None
        self._watcher_done: anyio.Event | None = None
        self._close_pidfd = weakref.finalize(self, os.close, pidfd)
        _tracked[pid] = self

    def __repr__(self) -> str:
        return f"<QemuProcess pid={self.pid} exit_status={self._exit_status!r}>"

    @property
    def pidfd(self) -> int:
        """The process's pidfd (readable once the process has exited)."""
        if not self._close_pidfd.alive:
            raise ValueError(f"the pidfd of process {self.pid} is closed")
        return self._pidfd

    @property
    def exit_status(self) -> ExitStatus | None:
        """The exit status once `wait_exit` has seen the process exit, else None."""
        return self._exit_status

    async def wait_exit(self) -> ExitStatus:
        """Wait until the process exits, reap it if it is our child, and return its status.

        Any number of tasks may wait at once; all get the same status, and later calls return
        it at once. On cancellation the process is left untouched and not reaped; waiting
        again later works.
        """
        while self._exit_status is None:
            if self._watcher_done is not None:
                # Another task watches the pidfd (two tasks cannot wait on one fd); when it
                # finishes or is cancelled, loop to take its result or its place.
                await self._watcher_done.wait()
                continue
            self._watcher_done = done = anyio.Event()
            try:
                await anyio.wait_readable(self.pidfd)
                self._exit_status = self._collect_exit_status()
            finally:
                self._watcher_done = None
                done.set()
        return self._exit_status

    def _collect_exit_status(self) -> ExitStatus:
        try:
            result = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not our child (adopted), or already reaped by someone else.
            result = None
        self._untrack()
        status = _status_from_waitid(result)
        _log.debug("process exited", pid=self.pid, status=status.describe())
        return status

    def is_alive(self) -> bool:
        """Whether the process is still running.

        A zombie counts as dead: a pidfd polls readable as soon as its process exits,
        reaped or not. Never fooled by pid reuse.
        """
        if self._exit_status is not None:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def send_signal(self, sig: int) -> None:
        """Send `sig` through the pidfd.

        Raises ProcessLookupError if the process has exited and been reaped.
        """
        signal.pidfd_send_signal(self.pidfd, sig)

    def kill(self) -> None:
        """Send SIGKILL; does nothing if the process is already gone."""
        with contextlib.suppress(ProcessLookupError):
            self.send_signal(signal.SIGKILL)

    def stderr_tail(self, n_bytes: int = 4096) -> str:
        """The last `n_bytes` QEMU wrote to stdout/stderr since its launch (empty if unknown)."""
        if self.log_path is None:
            return ""
        try:
            with os.fdopen(open_no_follow(self.log_path, os.O_RDONLY), "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - n_bytes))
                return log.read().decode(errors="replace")
        except OSError:  # gone, or replaced by a symlink: nothing of QEMU's to quote
            return ""

    def close(self) -> None:
        """Close the pidfd; the process itself is not touched.

        Must not be called while a task is in `wait_exit`.
        """
        self._untrack()
        self._close_pidfd()

    def _untrack(self) -> None:
        if _tracked.get(self.pid) is self:
            del _tracked[self.pid]


def launch(
    argv: Sequence[str],
    *,
    log_path: Path,
    pass_fds: Sequence[int] = (),
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> QemuProcess:
    """Start `argv` (no shell) in a new session, with stdin on /dev/null.

    The new session means a signal to the daemon's process group (Ctrl-C in a terminal)
    never reaches the VM. stdout and stderr go to `log_path` (truncated), so QEMU never
    blocks on a pipe nobody reads and `QemuProcess.stderr_tail` can quote its errors. Only
    the descriptors in `pass_fds` are inherited. The process is not tied to the caller: it
    keeps running when the daemon exits.

    Raises OSError when the program cannot be executed or `log_path` cannot be opened (a
    symlink there is refused, never followed).
    """
    log_fd = open_no_follow(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=tuple(pass_fds),
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
    # The child cannot have been reaped yet (nobody waits for it), so the pid is still its own.
    pidfd = os.pidfd_open(popen.pid)
    # Popen would reap the child itself when polled, and warn and queue it for reaping when
    # garbage-collected while it runs; the pidfd watcher owns reaping, so tell Popen it is done.
    popen.returncode = 0
    _log.debug("launched", pid=popen.pid, program=argv[0])
    return QemuProcess(popen.pid, pidfd, log_path=log_path)


async def run_captured(
    argv: Sequence[str], *, max_output_bytes: int = MAX_CAPTURED_BYTES
) -> tuple[ExitStatus, bytes, bytes]:
    """Run `argv` (no shell, stdin on /dev/null) to its end: its exit status, stdout, stderr.

    For the short commands the library runs (``qemu --help``). The child is spawned from
    the caller's thread and waited for through a pidfd, as QEMU itself is, so no thread
    is started on either backend (``anyio.run_process`` starts one per child under
    asyncio on Python 3.11, and trio spawns children from a worker thread).

    Raises OSError when `argv` cannot be executed, and `HypervisorError` when the child
    writes more than `max_output_bytes` to stdout or to stderr (it is killed then). On
    cancellation the child is killed and reaped.
    """
    process, read_ends = _spawn_piped(argv)
    outputs = (bytearray(), bytearray())
    try:
        async with anyio.create_task_group() as tg:
            for read_end, output in zip(read_ends, outputs, strict=True):
                tg.start_soon(_drain, read_end, output, max_output_bytes, process, tg.cancel_scope)
        status = await process.wait_exit()
    except BaseException:
        process.kill()
        with anyio.CancelScope(shield=True), anyio.move_on_after(_KILL_WAIT_S):
            await process.wait_exit()
        raise
    finally:
        process.close()
        for read_end in read_ends:
            os.close(read_end)
    if any(len(output) > max_output_bytes for output in outputs):
        raise HypervisorError(f"{argv[0]} wrote more than {max_output_bytes} bytes")
    return status, bytes(outputs[0]), bytes(outputs[1])


def _spawn_piped(argv: Sequence[str]) -> tuple[QemuProcess, tuple[int, int]]:
    """Spawn `argv` with stdout and stderr on pipes; the pipes' non-blocking read ends."""
    stdout, stderr = os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
    try:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=stdout[1], stderr=stderr[1]
        )
    except BaseException:
        os.close(stdout[0])
        os.close(stderr[0])
        raise
    finally:
        os.close(stdout[1])
        os.close(stderr[1])
    process = QemuProcess(popen.pid, os.pidfd_open(popen.pid), log_path=None)
    popen.returncode = 0  # the pidfd watcher reaps it, as in `launch`
    for read_end in (stdout[0], stderr[0]):
        os.set_blocking(read_end, False)
    return process, (stdout[0], stderr[0])


async def _drain(
    fd: int, into: bytearray, limit: int, process: QemuProcess, readers: anyio.CancelScope
) -> None:
    """Read `fd` to its end into `into`; past `limit` bytes, kill `process` and stop reading
    both pipes (a descendant of the process may still hold them open)."""
    while len(into) <= limit:
        await anyio.wait_readable(fd)
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not data:
            return
        into += data
    process.kill()
    readers.cancel()


def _option_value(args: Sequence[str], option: str) -> str | None:
    """The argument after the last ``-option`` or ``--option`` in `args`, if any."""
    value = None
    for flag, argument in itertools.pairwise(args):
        if flag in (f"-{option}", f"--{option}"):
            value = argument
    return value


def _guest_name(name_option: str) -> str:
    """The guest name from QEMU's ``-name`` value: ``NAME[,...]`` or ``guest=NAME[,...]``."""
    parts = name_option.split(",")
    for part in parts:
        if part.startswith("guest="):
            return part.removeprefix("guest=")
    return parts[0]


def _refusal(pidfd: int, pid: int, expected_name: str, expected_uuid: str) -> str | None:
    """Why `pid` is not the expected QEMU, or None if it is."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        raw = b""
    # The pidfd pins the identity: if the process is still alive after its cmdline was
    # read, that cmdline was its own and not a pid reuser's.
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if poller.poll(0):
        return "the process has exited"
    args = raw.decode(errors="replace").split("\0")
    name = _option_value(args, "name")
    if name is None or _guest_name(name) != expected_name:
        return f"its -name is {name!r}"
    uuid = _option_value(args, "uuid")
    if uuid is None or uuid.lower() != expected_uuid.lower():
        return f"its -uuid is {uuid!r}"
    return None


def adopt(
    pid: int, expected_name: str, expected_uuid: str, *, log_path: Path | None = None
) -> QemuProcess | None:
    """Watch a QEMU started earlier (by a previous daemon), if `pid` is still that QEMU.

    The process must be alive (not a zombie) and its command line must carry
    ``-name`` `expected_name` (plain or ``guest=``) and ``-uuid`` `expected_uuid`. Returns
    None otherwise: the instance's QEMU is gone and the pid may now belong to anyone.
    `log_path` is the file the QEMU writes its output to, for `QemuProcess.stderr_tail`.
    """
    log = _log.bind(pid=pid, instance=expected_name)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        log.info("not adopted: no such process")
        return None
    try:
        refusal = _refusal(pidfd, pid, expected_name, expected_uuid)
    except BaseException:
        os.close(pidfd)
        raise
    if refusal is not None:
        os.close(pidfd)
        log.info("not adopted", reason=refusal)
        return None
    log.debug("adopted")
    return QemuProcess(pid, pidfd, log_path=log_path)


def pids_by_option(option: str, value_prefix: str) -> dict[str, list[int]]:
    """Live processes whose last ``-option`` value starts with `value_prefix`, by that value.

    How a restarted daemon finds every QEMU its state dir started (``-pidfile`` under
    the instances dir), whatever its records say. Zombies, and processes that exit
    during the scan, are left out. Reads every ``/proc/<pid>/cmdline``: run it in a
    worker thread.
    """
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        value = _option_value(args, option)
        if value is None or not value.startswith(value_prefix):
            continue
        state = process_state(int(entry.name))
        if state is not None and state[0] != "Z":
            found.setdefault(value, []).append(int(entry.name))
    return found


def process_state(pid: int) -> tuple[str, int] | None:
    """``(state, session id)`` of `pid` from ``/proc/<pid>/stat`` (``Z`` for a zombie).

    None when there is no such process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[3])


def _child_pids() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(pid) for pid in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return pids


def reap_orphans() -> dict[int, ExitStatus]:
    """Reap exited children that no `QemuProcess` watches; returns their statuses by pid.

    These are orphans reparented to a subreaper daemon (see the module docstring), and
    QEMUs whose `QemuProcess` was closed before they exited. Children in the daemon's own
    session are left alone: they were spawned by other code (``anyio.run_process``,
    ``subprocess``), which waits for them itself; so a child started in a new session must
    be watched by a `QemuProcess` (use `launch`). Call it after a watched QEMU exits (its
    helpers become orphans then) and now and then from the daemon. Never blocks.
    """
    own_session = os.getsid(0)
    reaped: dict[int, ExitStatus] = {}
    for pid in sorted(_child_pids()):
        if pid in _tracked:
            continue
        state = process_state(pid)
        if state is None or state[0] != "Z" or state[1] == own_session:
            continue
        try:
            result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            continue
        if result is not None:
            reaped[pid] = _status_from_waitid(result)
            _log.info("reaped orphan", pid=pid, status=reaped[pid].describe())
    return reaped


def _prctl(option: int, arg: int | ctypes._Pointer[ctypes.c_int]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_child_subreaper(enabled: bool = True) -> None:
    """Make this process the reaper of its orphaned descendants (see the module docstring).

    A process-wide setting: only ``kvm-supervisor serve`` calls it, never the library.
    """
    _prctl(_PR_SET_CHILD_SUBREAPER, int(enabled))


def is_child_subreaper() -> bool:
    """Whether this process is a child subreaper."""
    flag = ctypes.c_int(0)
    _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.pointer(flag))
    return bool(flag.value)
