"""What the tests share besides fixtures: waiting on a condition, listening sockets, processes.

Waits poll a condition the kernel sends no notification for (a line in /proc, a process
turning into a zombie, text appended to a log file) and end with an error naming what did
not happen; nothing here waits a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from supervisor.qemu.process import process_state

T = TypeVar("T")

#: How often a condition is checked again.
POLL_INTERVAL_S = 0.01
#: Generous: five other test runs may share the machine's two cores.
LISTEN_TIMEOUT_S = 30.0
GONE_TIMEOUT_S = 30.0

_SO_ACCEPTCON = 0x10000  # /proc/net/unix's Flags column: the socket listens


def _expired(what: str, timeout_s: float) -> TimeoutError:
    return TimeoutError(f"{what}: not within {timeout_s:g} s")


def wait_until(condition: Callable[[], T], *, what: str, timeout_s: float) -> T:
    """Check `condition` until it returns a true value, and return that value.

    Raises TimeoutError naming `what` after `timeout_s`; an exception from `condition`
    (a process that died meanwhile) ends the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise _expired(what, timeout_s)
        time.sleep(POLL_INTERVAL_S)
    return value


async def await_until(condition: Callable[[], T], *, what: str, timeout_s: float) -> T:
    """`wait_until` for async tests: the event loop keeps running between checks."""
    deadline = anyio.current_time() + timeout_s
    while not (value := condition()):
        if anyio.current_time() > deadline:
            raise _expired(what, timeout_s)
        await anyio.sleep(POLL_INTERVAL_S)
    return value


# -- processes -----------------------------------------------------------------------------


def gone_or_zombie(pid: int) -> bool:
    """Whether `pid` has exited (a zombie has: only its exit status is left)."""
    state = process_state(pid)
    return state is None or state[0] in ("Z", "X")


def wait_gone(pid: int, timeout_s: float = GONE_TIMEOUT_S) -> None:
    """Wait until `pid` has exited (gone or a zombie)."""
    wait_until(lambda: gone_or_zombie(pid), what=f"process {pid} exits", timeout_s=timeout_s)


def kill_leftover_qemus(directory: Path) -> list[int]:
    """SIGKILL the QEMUs a test left behind in `directory`, wait until they are gone.

    The pids come from runtime records and pid files below `directory`; only a live
    process whose command line names `directory` is killed (a pid may have been reused).
    Returns the pids killed.
    """
    pids: set[int] = set()
    for record in directory.glob("**/runtime.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            pid = json.loads(record.read_text()).get("pid")
            if isinstance(pid, int):
                pids.add(pid)
    for pid_file in directory.glob("**/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(pid_file.read_text().strip()))
    killed = [pid for pid in sorted(pids) if kill_if_started_in(pid, directory)]
    for pid in killed:
        wait_gone(pid)
    return killed


def kill_if_started_in(pid: int, directory: Path) -> bool:
    """SIGKILL `pid` if it lives and its command line names `directory`; whether it did."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if str(directory).encode() not in cmdline or gone_or_zombie(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


# -- unix sockets --------------------------------------------------------------------------


def listening_unix_sockets() -> set[str]:
    """Paths of the unix sockets that listen (bound but not yet listening ones are not)."""
    listening = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & _SO_ACCEPTCON:
                listening.add(fields[7])
    return listening


def _listening_check(
    paths: Iterable[Path], pid: int, exit_details: Callable[[], str]
) -> Callable[[], bool]:
    wanted = {str(path) for path in paths}

    def all_listen() -> bool:
        if gone_or_zombie(pid):
            raise RuntimeError(f"process {pid} exited before listening: {exit_details()}")
        return wanted <= listening_unix_sockets()

    return all_listen


def wait_listening(
    paths: Iterable[Path],
    *,
    pid: int,
    exit_details: Callable[[], str] = lambda: "",
    timeout_s: float = LISTEN_TIMEOUT_S,
) -> None:
    """Wait until process `pid` listens on every unix socket in `paths`.

    A server's bind creates the socket file a moment before its listen: a connect in
    between is refused, so the file's existence is not enough. Raises RuntimeError (with
    `exit_details()`, e.g. the process's stderr) if the process exits first.
    """
    paths = list(paths)
    check = _listening_check(paths, pid, exit_details)
    wait_until(check, what=f"process {pid} listens on {paths}", timeout_s=timeout_s)


async def await_listening(
    paths: Iterable[Path],
    *,
    pid: int,
    exit_details: Callable[[], str] = lambda: "",
    timeout_s: float = LISTEN_TIMEOUT_S,
) -> None:
    """`wait_listening` for async tests."""
    paths = list(paths)
    check = _listening_check(paths, pid, exit_details)
    await await_until(check, what=f"process {pid} listens on {paths}", timeout_s=timeout_s)


def start_listening(
    args: list[str], paths: Iterable[Path], **popen: Any
) -> subprocess.Popen[bytes]:
    """Start a server and wait until it listens on `paths`; it is killed if it never does.

    `popen` goes to ``subprocess.Popen`` (stdin is /dev/null); with ``stderr=PIPE``, the
    error of a server that exits first quotes its stderr.
    """
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, **popen)

    def stderr() -> str:
        return proc.stderr.read().decode(errors="replace") if proc.stderr else ""

    try:
        wait_listening(paths, pid=proc.pid, exit_details=stderr)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
