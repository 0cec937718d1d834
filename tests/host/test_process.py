"""QEMU process launch, pidfd watching, adoption and orphan reaping, with real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import QEMU, PausedQemu, start_paused_qemu
from helpers import await_listening, await_until

from protocols.qmp import connect
from supervisor.qemu.process import (
    ExitStatus,
    QemuProcess,
    adopt,
    is_child_subreaper,
    launch,
    process_state,
    reap_orphans,
    set_child_subreaper,
)

pytestmark = pytest.mark.anyio

Launcher = Callable[..., QemuProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Launcher]:
    """`launch` with a log in tmp_path; every process is killed and reaped afterwards."""
    launched: list[QemuProcess] = []

    def spawn_one(argv: list[str], **kwargs: Any) -> QemuProcess:
        proc = launch(argv, log_path=tmp_path / f"{len(launched)}.log", **kwargs)
        launched.append(proc)
        return proc

    yield spawn_one
    for proc in launched:
        with contextlib.suppress(ValueError):  # the test closed the pidfd itself
            if proc.exit_status is None:
                proc.kill()
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PIDFD, proc.pidfd, os.WEXITED)
            proc.close()


async def wait_until_zombie(pid: int) -> None:
    """Wait until `pid` exits (its own pidfd turns readable) without reaping it."""
    pidfd = os.pidfd_open(pid)
    try:
        with anyio.fail_after(30):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    assert process_state(pid) == ("Z", os.getsid(pid))


async def test_the_exit_wakes_the_watcher_and_reports_the_signal(spawn: Launcher) -> None:
    proc = spawn(["sleep", "30"])
    result: list[ExitStatus] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            result.append(await proc.wait_exit())

        tg.start_soon(watch)
        await anyio.wait_all_tasks_blocked()
        assert not result
        os.kill(proc.pid, signal.SIGKILL)
    [status] = result
    assert status == ExitStatus(signal=signal.SIGKILL)
    assert status.describe() == "killed by signal 9 (SIGKILL)"
    assert process_state(proc.pid) is None, "the child was not reaped"
    assert not proc.is_alive()


async def test_exit_code(spawn: Launcher) -> None:
    proc = spawn(["sh", "-c", "exit 3"])
    status = await proc.wait_exit()
    assert status == ExitStatus(code=3)
    assert status.known
    assert status.describe() == "exited with code 3"
    assert await proc.wait_exit() is status


async def test_runs_in_its_own_session_with_stdin_on_dev_null(spawn: Launcher) -> None:
    proc = spawn(["sleep", "30"])
    assert os.getsid(proc.pid) == proc.pid
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"
    assert proc.log_path is not None
    assert os.readlink(f"/proc/{proc.pid}/fd/1") == str(proc.log_path)
    assert os.readlink(f"/proc/{proc.pid}/fd/2") == str(proc.log_path)


async def test_only_pass_fds_are_inherited(spawn: Launcher) -> None:
    passed_read, passed_write = os.pipe()
    kept_read, kept_write = os.pipe()
    try:
        script = (
            f"import os\nos.write({passed_write}, b'passed')\n"
            f"try: os.write({kept_write}, b'kept')\nexcept OSError: raise SystemExit(7)"
        )
        proc = spawn([sys.executable, "-c", script], pass_fds=[passed_write])
        status = await proc.wait_exit()
        os.close(passed_write)
        os.close(kept_write)
        assert os.read(passed_read, 100) == b"passed"
        assert os.read(kept_read, 100) == b""
        assert status == ExitStatus(code=7)
    finally:
        for fd in (passed_read, passed_write, kept_read, kept_write):
            with contextlib.suppress(OSError):
                os.close(fd)


async def test_cwd_and_env(spawn: Launcher, tmp_path: Path) -> None:
    proc = spawn(["sh", "-c", 'echo "$PWD $MARK"'], cwd=tmp_path, env={"MARK": "set"})
    await proc.wait_exit()
    assert proc.stderr_tail() == f"{tmp_path} set\n"


async def test_stderr_tail(spawn: Launcher) -> None:
    proc = spawn(["sh", "-c", "echo early; echo boom >&2; exit 1"])
    assert await proc.wait_exit() == ExitStatus(code=1)
    assert proc.stderr_tail() == "early\nboom\n"
    assert proc.stderr_tail(5) == "boom\n"


async def test_qemu_errors_show_in_the_stderr_tail(spawn: Launcher) -> None:
    proc = spawn([QEMU, "-nodefaults", "-display", "none", "-no-such-option"])
    assert await proc.wait_exit() == ExitStatus(code=1)
    assert "-no-such-option" in proc.stderr_tail()


async def test_a_real_qemu(spawn: Launcher, short_tmp: Path) -> None:
    qmp_path = short_tmp / "qmp.sock"
    proc = spawn(
        [QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "accel=tcg", "-m", "64",
         "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    )  # fmt: skip
    await await_listening([qmp_path], pid=proc.pid, exit_details=proc.stderr_tail)
    assert os.getsid(proc.pid) == proc.pid
    async with connect(qmp_path) as qmp:
        # Once QMP answers, QEMU's main loop runs and handles SIGTERM as a clean shutdown.
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == ExitStatus(code=0)
    assert "terminating on signal 15" in proc.stderr_tail()


async def test_missing_program(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        launch([str(tmp_path / "missing")], log_path=tmp_path / "log")


async def test_a_zombie_counts_as_dead(spawn: Launcher) -> None:
    proc = spawn(["true"])
    await wait_until_zombie(proc.pid)
    assert process_state(proc.pid) == ("Z", proc.pid)
    assert not proc.is_alive()
    assert await proc.wait_exit() == ExitStatus(code=0)
    assert process_state(proc.pid) is None


async def test_wait_exit_is_cancellable(spawn: Launcher) -> None:
    proc = spawn(["sleep", "30"])
    with anyio.move_on_after(0.1) as scope:
        await proc.wait_exit()
    assert scope.cancelled_caught
    assert proc.is_alive()
    assert proc.exit_status is None
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait_exit() == ExitStatus(signal=signal.SIGTERM)


async def test_many_waiters_get_the_same_status(spawn: Launcher) -> None:
    proc = spawn(["sleep", "30"])
    results: list[ExitStatus] = []

    async def watch() -> None:
        results.append(await proc.wait_exit())

    async def cancel_once_all_wait(scope: anyio.CancelScope) -> None:
        await anyio.wait_all_tasks_blocked()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        # This task watches the pidfd first (the others start after it waits); once it is
        # cancelled, another one must take over the pidfd.
        with anyio.CancelScope() as first_watcher:
            tg.start_soon(cancel_once_all_wait, first_watcher)
            for _ in range(3):
                tg.start_soon(watch)
            await proc.wait_exit()
        assert first_watcher.cancelled_caught
        proc.kill()
    assert results == [ExitStatus(signal=signal.SIGKILL)] * 3


async def test_signals_after_the_exit(spawn: Launcher) -> None:
    proc = spawn(["true"])
    await proc.wait_exit()
    with pytest.raises(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    proc.kill()


def test_closed_pidfd(spawn: Launcher) -> None:
    proc = spawn(["sleep", "30"])
    pid = proc.pid
    proc.close()
    with pytest.raises(ValueError, match="closed"):
        proc.is_alive()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_describe_unknown_and_unnamed_signals() -> None:
    assert not ExitStatus().known
    assert "unknown" in ExitStatus().describe()
    assert ExitStatus(signal=77).describe() == "killed by signal 77"


def stop_qemu(qemu: PausedQemu) -> None:
    qemu.kill()
    if qemu.proc.stderr is not None:
        qemu.proc.stderr.close()


@pytest.fixture
def named_qemu(short_tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real QEMU started -S with a -name and -uuid (killed afterwards)."""
    instance_uuid = str(uuid.uuid4())
    qemu = start_paused_qemu(
        short_tmp, ["-name", "guest=vm1,debug-threads=on", "-uuid", instance_uuid]
    )
    try:
        yield qemu.proc, instance_uuid
    finally:
        stop_qemu(qemu)


async def test_adopt_accepts_its_qemu(
    named_qemu: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    popen, instance_uuid = named_qemu
    proc = adopt(popen.pid, "vm1", instance_uuid.upper(), log_path=tmp_path / "qemu.log")
    assert proc is not None
    try:
        assert proc.is_alive()
        proc.kill()
        # The QEMU is a child of this test process, so its status is known.
        assert await proc.wait_exit() == ExitStatus(signal=signal.SIGKILL)
        assert proc.stderr_tail() == ""
    finally:
        proc.close()


async def test_adopt_refuses_another_instance(
    named_qemu: tuple[subprocess.Popen[bytes], str],
) -> None:
    popen, instance_uuid = named_qemu
    assert adopt(popen.pid, "vm1", str(uuid.uuid4())) is None
    assert adopt(popen.pid, "vm2", instance_uuid) is None


async def test_adopt_refuses_a_plain_name(short_tmp: Path) -> None:
    instance_uuid = str(uuid.uuid4())
    qemu = start_paused_qemu(short_tmp, ["-name", "vm1", "-uuid", instance_uuid])
    try:
        proc = adopt(qemu.pid, "vm1", instance_uuid)
        assert proc is not None
        proc.close()
        assert adopt(qemu.pid, "vm", instance_uuid) is None
    finally:
        stop_qemu(qemu)


async def test_adopt_refuses_non_qemu_gone_and_zombie_pids(spawn: Launcher) -> None:
    sleeper = spawn(["sleep", "30"])
    assert adopt(sleeper.pid, "vm1", str(uuid.uuid4())) is None
    zombie = spawn([sys.executable, "-c", "", "-name", "vm1", "-uuid", "u1"])
    await wait_until_zombie(zombie.pid)
    assert adopt(zombie.pid, "vm1", "u1") is None
    await zombie.wait_exit()
    assert adopt(zombie.pid, "vm1", "u1") is None


async def test_an_adopted_non_child_has_an_unknown_status(spawn: Launcher) -> None:
    # The shell exits at once, so the python grandchild is reparented away from us.
    script = "import time; time.sleep(30)"
    shell = spawn(["sh", "-c", f'"{sys.executable}" -c "{script}" -name vm1 -uuid u1 & echo $!'])
    await shell.wait_exit()
    orphan_pid = int(shell.stderr_tail())
    # As a separate argument: the forked shell's own command line holds "-uuid" too.
    await await_until(
        lambda: b"\0-uuid\0" in Path(f"/proc/{orphan_pid}/cmdline").read_bytes(),
        what="the forked shell execs python",
        timeout_s=30,
    )
    proc = adopt(orphan_pid, "vm1", "u1")
    assert proc is not None
    try:
        proc.kill()
        status = await proc.wait_exit()
    finally:
        proc.close()
    assert status == ExitStatus()
    assert "unknown" in status.describe()


@pytest.fixture
def subreaper() -> Iterator[None]:
    set_child_subreaper()
    try:
        yield
    finally:
        set_child_subreaper(False)


@pytest.fixture
def orphans() -> Iterator[list[int]]:
    """Pids of orphans the test expects to become our children; killed and reaped after."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


async def test_reap_orphans_collects_reparented_descendants(
    subreaper: None, spawn: Launcher, orphans: list[int]
) -> None:
    assert is_child_subreaper()
    read_end, write_end = os.pipe()
    try:
        # The orphan lives until it reads the end of the pipe: after its shell has exited.
        shell = spawn(
            ["sh", "-c", f"cat /dev/fd/{read_end} >/dev/null & echo $!"], pass_fds=[read_end]
        )
        assert await shell.wait_exit() == ExitStatus(code=0)
        orphan_pid = int(shell.stderr_tail())
        orphans.append(orphan_pid)
    finally:
        os.close(read_end)
        os.close(write_end)
    await wait_until_zombie(orphan_pid)
    stat = await anyio.Path(f"/proc/{orphan_pid}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()
    assert reap_orphans() == {orphan_pid: ExitStatus(code=0)}
    assert process_state(orphan_pid) is None


@pytest.fixture
def own_session_child() -> Iterator[subprocess.Popen[bytes]]:
    """A child in our own session, as ``subprocess`` or ``anyio.run_process`` spawn them."""
    child = subprocess.Popen(["true"])
    try:
        yield child
    finally:
        assert child.wait() == 0


async def test_reap_orphans_leaves_watched_and_own_session_children(
    subreaper: None, spawn: Launcher, own_session_child: subprocess.Popen[bytes]
) -> None:
    watched = spawn(["true"])
    await wait_until_zombie(watched.pid)
    await wait_until_zombie(own_session_child.pid)
    assert reap_orphans() == {}
    assert await watched.wait_exit() == ExitStatus(code=0)


async def test_reap_orphans_collects_a_closed_process(spawn: Launcher) -> None:
    proc = spawn(["sh", "-c", "exit 4"])
    pid = proc.pid
    proc.close()
    await wait_until_zombie(pid)
    assert reap_orphans() == {pid: ExitStatus(code=4)}
