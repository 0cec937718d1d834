"""The per-NIC hook run by real executables (small sh scripts) on asyncio and trio: its
environment, its failures, its timeout (the hook and what it started are killed)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.model.errors import NetworkError
from supervisor.net.hook import STDERR_TAIL_BYTES, run_nic_hook
from supervisor.qemu.cmdline import NicPlan

pytestmark = pytest.mark.anyio

TAP = "kvsabcdefghij0"


def plan(**fields: Any) -> NicPlan:
    defaults: dict[str, Any] = {
        "index": 0,
        "mac": "aa:00:00:12:34:56",
        "mode": "bridged",
        "link": "br0",
        "netdev_id": "net0",
        "device_id": "nic0",
        "model": "virtio-net-pci",
        "fd_names": ("tap0",),
        "vnet_hdr": True,
        "queues": 1,
        "vhost": False,
        "tap": TAP,
    }
    return NicPlan(**{**defaults, **fields})


def script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}")
    path.chmod(0o755)
    return str(path)


async def run(executable: str, nic: NicPlan, *, action: str = "up", **kw: Any) -> None:
    await run_nic_hook(
        executable,
        action,  # type: ignore[arg-type]
        instance=kw.get("instance", "vm1"),
        plan=nic,
        tags=kw.get("tags", ()),
        timeout_s=kw.get("timeout_s", 30),
    )


def recorded_env(path: Path) -> dict[str, str]:
    """The environment (a copy of ``/proc/<pid>/environ``) written to `path`."""
    entries = path.read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if entry)


async def _read_pids(fifo: Path) -> list[int]:
    """The pids the hook writes into `fifo`, read without blocking the event loop."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        # A FIFO no writer has opened yet polls as not readable (no hang-up).
        while not data.endswith(b"\n"):
            await anyio.wait_readable(fd)
            chunk = os.read(fd, 100)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return [int(pid) for pid in data.split()]


def _kill(pidfd: int) -> None:
    """Kill (if still there) and let go of a process this test made the hook start."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)


def _is_gone(pidfd: int) -> bool:
    """Whether the process of `pidfd` has exited (a zombie counts as gone)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


@pytest.fixture
def env_recorder(tmp_path: Path) -> tuple[str, Path]:
    """A hook that writes its environment to a file; both paths."""
    out = tmp_path / "env"
    # The environment the hook was started with: the shell adds PWD to its children's.
    return script(tmp_path / "hook", f"cat /proc/$$/environ > {out}\n"), out


async def test_bridged_nic_gets_ganetis_environment_and_nothing_else(
    env_recorder: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hook, out = env_recorder
    monkeypatch.setenv("KVS_DAEMON_SECRET", "leak")
    await run(hook, plan(vlan=100, ip="192.0.2.7"), tags=["web", "prod"])
    assert recorded_env(out) == {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "INSTANCE": "vm1",
        "MAC": "aa:00:00:12:34:56",
        "MODE": "bridged",
        "INTERFACE": TAP,
        "INTERFACE_INDEX": "0",
        "TAGS": "web prod",
        "IP": "192.0.2.7",
        "LINK": "br0",
        "BRIDGE": "br0",
        "VLAN": "100",
        "ACTION": "up",
    }


async def test_unset_fields_are_absent_and_bridge_is_for_bridges_only(
    env_recorder: tuple[str, Path],
) -> None:
    hook, out = env_recorder
    await run(hook, plan(index=3, mode="routed", link=None, ip="2001:db8::7"), action="down")
    env = recorded_env(out)
    assert env["ACTION"] == "down"
    assert env["MODE"] == "routed"
    assert env["INTERFACE_INDEX"] == "3"
    assert env["IP"] == "2001:db8::7"
    assert env["TAGS"] == ""  # always there, as Ganeti's
    assert not {"LINK", "BRIDGE", "VLAN"} & env.keys()
    await run(hook, plan(mode="routed", link="100", ip="192.0.2.7"))
    env = recorded_env(out)
    assert env["LINK"] == "100"
    assert "BRIDGE" not in env
    await run(hook, plan(mode="openvswitch", link="ovsbr", vlan=5))
    env = recorded_env(out)
    assert (env["LINK"], env["BRIDGE"], env["VLAN"]) == ("ovsbr", "ovsbr", "5")
    assert "IP" not in env


async def test_nonzero_exit_is_a_network_error_with_the_stderr_tail(tmp_path: Path) -> None:
    # More than the tail of noise first: only the last bytes are kept and quoted.
    hook = script(
        tmp_path / "failing",
        "head -c 100000 /dev/zero | tr '\\0' x >&2\necho >&2\n"
        "echo 'cannot attach to br7' >&2\necho 'to stdout' \nexit 3\n",
    )
    with pytest.raises(NetworkError) as caught:
        await run(hook, plan())
    error = caught.value
    assert error.code == 10
    assert error.interface == TAP
    prefix = f"NIC hook {hook} (up) exited with code 3: "
    assert error.reason.startswith(prefix)
    tail = error.reason.removeprefix(prefix)
    assert tail.endswith("x\ncannot attach to br7")
    assert len(tail) == STDERR_TAIL_BYTES - 1  # less the final newline, stripped
    assert "to stdout" not in error.reason


async def test_death_by_signal_is_a_network_error(tmp_path: Path) -> None:
    hook = script(tmp_path / "killed", "kill -TERM $$\n")
    with pytest.raises(NetworkError) as caught:
        await run(hook, plan())
    assert caught.value.reason == f"NIC hook {hook} (up) killed by signal 15 (SIGTERM)"


async def test_a_hook_that_cannot_be_run_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    not_executable = tmp_path / "plain"
    not_executable.write_text("#!/bin/sh\n")
    for path, why in (
        (missing, "No such file or directory"),
        (not_executable, "Permission denied"),
        (tmp_path, "Permission denied"),
    ):
        with pytest.raises(NetworkError) as caught:
            await run(str(path), plan())
        assert caught.value.interface == TAP
        assert caught.value.reason == f"cannot run the NIC hook {path}: {why}"


async def test_a_background_child_holding_stderr_does_not_block(tmp_path: Path) -> None:
    """The hook's own end is what counts: a daemon it leaves behind may keep its stderr."""
    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    hook = script(tmp_path / "forks", f"sleep 1000 &\necho $! > {fifo}\n")
    pidfds: list[int] = []
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, hook, plan())
                pidfds = [os.pidfd_open(pid) for pid in await _read_pids(fifo)]
            assert not _is_gone(pidfds[0])
    finally:
        for pidfd in pidfds:
            _kill(pidfd)


async def test_timeout_kills_the_hook_and_its_children(tmp_path: Path) -> None:
    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    # The sleep is a child of the shell, not exec'd: the process group goes, not one pid.
    hook = script(tmp_path / "slow", f"sleep 1000 &\necho $$ $! > {fifo}\nwait\n")
    pidfds: list[int] = []
    caught: list[NetworkError] = []

    async def run_hook() -> None:
        with pytest.raises(NetworkError) as raised:
            await run(hook, plan(), timeout_s=3)
        caught.append(raised.value)

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_hook)
                pids = await _read_pids(fifo)
                assert len(pids) == 2
                pidfds = [os.pidfd_open(pid) for pid in pids]
                assert not any(_is_gone(pidfd) for pidfd in pidfds)
            # The shell was our child and is reaped; the sleep, reparented, has exited.
            with pytest.raises(ProcessLookupError):
                os.pidfd_open(pids[0])
            for pidfd in pidfds[1:]:
                await anyio.wait_readable(pidfd)
        (error,) = caught
        assert error.interface == TAP
        assert error.reason == f"NIC hook {hook} (up) timed out after 3 s"
    finally:
        for pidfd in pidfds:
            _kill(pidfd)


async def test_cancellation_kills_the_hook(tmp_path: Path) -> None:
    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    hook = script(tmp_path / "slow", f"echo $$ > {fifo}\nexec sleep 1000\n")
    pidfds: list[int] = []
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, hook, plan())
                (pid,) = await _read_pids(fifo)
                pidfds.append(os.pidfd_open(pid))
                tg.cancel_scope.cancel()
            # Reaped by the time the cancellation came through.
            with pytest.raises(ProcessLookupError):
                os.pidfd_open(pid)
    finally:
        for pidfd in pidfds:
            _kill(pidfd)
