"""The optional per-NIC hook: an operator's executable run after a NIC is set up
(``ACTION=up``) and before it is torn down (``ACTION=down``), config key ``nic_hook``.

It runs without a shell, with no arguments, stdin on /dev/null, stdout discarded, and
Ganeti's ``kvm-ifup`` environment and nothing of the daemon's::

    INSTANCE MAC MODE INTERFACE INTERFACE_INDEX TAGS [IP] [LINK] [BRIDGE] [VLAN] ACTION PATH

(the bracketed ones only when the NIC has that field; ``BRIDGE`` is the link of a bridged
or openvswitch NIC; ``TAGS`` the instance's tags joined by spaces, present even when
empty, as Ganeti's). Any failure is a `NetworkError` naming the tap: the executable
cannot be run, it exits non-zero or by a signal (the reason quotes the tail of its
stderr), or it runs past its timeout.

The hook runs from ``/`` in a session (and process group) of its own, so that a
timeout, or the caller's cancellation, kills it together with whatever it started (a
hanging ``ip`` or ``ovs-vsctl`` is the usual culprit, not the script around it). The
hook is reaped through its pidfd; the daemon's orphan reaper
(`supervisor.qemu.process.reap_orphans`) collects what it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Final, Literal

import anyio

from supervisor.log import get_logger
from supervisor.model.errors import NetworkError
from supervisor.qemu.cmdline import NicPlan
from supervisor.qemu.process import QemuProcess

__all__ = ["run_nic_hook"]

_log = get_logger(__name__)

#: The hook's PATH: the system directories, whatever the daemon's own PATH is.
HOOK_PATH: Final = "/usr/sbin:/usr/bin:/sbin:/bin"
#: What an error quotes of the hook's stderr: its last 2 KiB. Only that much is kept
#: while it runs, however much it writes.
STDERR_TAIL_BYTES: Final = 2048
#: One read from the stderr pipe: a whole default pipe buffer.
_READ_BYTES: Final = 65536
#: How long a killed hook may take to exit before it is left to the orphan reaper.
_KILL_WAIT_S: Final = 10.0


def _environment(
    action: Literal["up", "down"], instance: str, plan: NicPlan, tap: str, tags: Sequence[str]
) -> dict[str, str]:
    env = {
        "PATH": HOOK_PATH,
        "INSTANCE": instance,
        "MAC": plan.mac,
        "MODE": plan.mode,
        "INTERFACE": tap,
        "INTERFACE_INDEX": str(plan.index),
        "TAGS": " ".join(tags),
        "ACTION": action,
    }
    if plan.ip is not None:
        env["IP"] = plan.ip
    if plan.link is not None:
        env["LINK"] = plan.link
        if plan.mode in ("bridged", "openvswitch"):
            env["BRIDGE"] = plan.link
    if plan.vlan is not None:
        env["VLAN"] = str(plan.vlan)
    return env


async def run_nic_hook(
    executable: str,
    action: Literal["up", "down"],
    *,
    instance: str,
    plan: NicPlan,
    tags: Sequence[str],
    timeout_s: float,
) -> None:
    """Run the hook `executable` for `plan`'s NIC (its `tap` set) and wait for it to end.

    Raises `NetworkError` (``interface`` the tap) when it cannot be executed, exits
    non-zero or by a signal, or runs longer than `timeout_s` (it and its process group
    are killed then). On cancellation the hook and its process group are killed and the
    hook reaped, shielded, before the cancellation goes on.
    """
    if plan.tap is None:
        raise ValueError(f"NIC {plan.index} has no tap name yet")
    tap = plan.tap
    process, read_end = _spawn(executable, _environment(action, instance, plan, tap, tags), tap)
    stderr = bytearray()
    try:
        try:
            with anyio.move_on_after(timeout_s):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_read_tail, read_end, stderr)
                    await process.wait_exit()
                    # Whatever the hook left running may hold the pipe open: take what
                    # the pipe holds now rather than wait for its end.
                    _read_once(read_end, stderr)
                    tg.cancel_scope.cancel()
            status = process.exit_status
        finally:
            if process.exit_status is None:  # timed out, or cancelled
                await _kill_group(process)
    finally:
        process.close()
        os.close(read_end)
    log = _log.bind(instance=instance, interface=tap, action=action, pid=process.pid)
    if status is None:
        log.warning("NIC hook timed out", timeout_s=timeout_s)
        raise NetworkError(tap, f"NIC hook {executable} ({action}) timed out after {timeout_s:g} s")
    if status.code == 0:
        log.debug("NIC hook done")
        return
    tail = stderr.decode(errors="replace").strip()
    reason = f"NIC hook {executable} ({action}) {status.describe()}"
    log.warning("NIC hook failed", status=status.describe(), stderr=tail)
    raise NetworkError(tap, f"{reason}: {tail}" if tail else reason)


def _spawn(executable: str, env: dict[str, str], tap: str) -> tuple[QemuProcess, int]:
    """Start the hook; the process and the non-blocking read end of its stderr."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        popen = subprocess.Popen(
            [executable],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    except (OSError, ValueError) as error:
        # ValueError: a NUL byte in the environment (in a tag, say).
        os.close(read_end)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise NetworkError(tap, f"cannot run the NIC hook {executable}: {reason}") from error
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    os.set_blocking(read_end, False)
    # Tracked from before any await, so the orphan reaper never takes its exit status.
    process = QemuProcess(popen.pid, os.pidfd_open(popen.pid), log_path=None)
    # The pidfd watcher reaps it, as `supervisor.qemu.process.launch` has it for QEMU.
    popen.returncode = 0
    return process, read_end


def _read_once(fd: int, tail: bytearray) -> bool:
    """One read from non-blocking `fd`, keeping the last `STDERR_TAIL_BYTES` in `tail`;
    False at its end."""
    try:
        data = os.read(fd, _READ_BYTES)
    except BlockingIOError:
        return True
    tail += data
    del tail[:-STDERR_TAIL_BYTES]
    return bool(data)


async def _read_tail(fd: int, tail: bytearray) -> None:
    """Read `fd` to its end into `tail` (see `_read_once`)."""
    while True:
        await anyio.wait_readable(fd)
        if not _read_once(fd, tail):
            return


async def _kill_group(process: QemuProcess) -> None:
    """SIGKILL the hook's process group and reap the hook (shielded, bounded wait)."""
    # The hook leads its own session and group and is not reaped yet, so its pid is
    # still the group's id and no other process's.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with anyio.CancelScope(shield=True), anyio.move_on_after(_KILL_WAIT_S):
        await process.wait_exit()
