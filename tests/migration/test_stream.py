"""The connection of the migration stream, which the source daemon opens for its QEMU
(`supervisor.qemu.migration_stream`): ``TCP_NODELAY`` on the socket QEMU sends
through, QEMU's own connections with ``multifd``, a target nobody listens on refused
before anything changes, and `connect_stream` itself on both anyio backends."""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from core.conftest import guest_spec

from protocols.jsonrpc import RPCError
from supervisor.control.migrate import migrate
from supervisor.model.config import Config
from supervisor.qemu.migration_stream import connect_stream, opens_own_stream

from .conftest import SLOW_MIB_S, Daemon, progress_until, two_daemons

pytestmark = pytest.mark.anyio

MIGRATION_ERROR = 8
SYS_PIDFD_GETFD = 438  # x86-64
both_backends = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@contextmanager
def sockets_to_port(pid: int, port: int) -> Iterator[list[socket.socket]]:
    """Copies (``pidfd_getfd``) of the TCP sockets of process `pid` connected to `port`."""
    found: list[socket.socket] = []
    pidfd = os.pidfd_open(pid)
    try:
        for entry in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                    continue
            except OSError:
                continue
            copy = _libc().syscall(SYS_PIDFD_GETFD, pidfd, int(entry), 0)
            if copy < 0:
                continue
            sock = socket.socket(fileno=copy)
            try:
                peer = (
                    sock.getpeername() if sock.family in (socket.AF_INET, socket.AF_INET6) else None
                )
            except OSError:
                peer = None
            if peer is not None and peer[1] == port:
                found.append(sock)
            else:
                sock.close()
        yield found
    finally:
        os.close(pidfd)
        for sock in found:
            sock.close()


def nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def accept_vm(source: Daemon, target: Daemon) -> tuple[str, int]:
    """The first two steps of a migration of "vm": its payload and the target's port."""
    info = await source.call("migration.info", name="vm")
    accepted = await target.call(
        "migration.accept", spec=info["spec"], runtime=info["runtime"], address="127.0.0.1"
    )
    return info["runtime"], int(accepted["port"])


async def start_slow_migration(source: Daemon, target: Daemon) -> tuple[str, int]:
    """The first three steps of a migration of "vm" at `SLOW_MIB_S`: its payload and port."""
    runtime, port = await accept_vm(source, target)
    await source.call(
        "migration.start", name="vm", target="127.0.0.1", port=port, bandwidth_mib_s=SLOW_MIB_S
    )
    return runtime, port


@pytest.mark.qemu
@pytest.mark.guest
async def test_the_source_qemu_sends_through_a_socket_without_nagle(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        async with source.sup.events(instances=["vm"], kinds=["migration.progress"]) as progress:
            runtime, port = await start_slow_migration(source, target)
            await progress_until(progress, lambda s: s["transferred_mib"] > 0)
            pid = source.sup.info("vm").pid
            assert pid is not None
            with sockets_to_port(pid, port) as streams:
                assert len(streams) == 1
                assert nodelay(streams[0])
            await source.call("migration.cancel", name="vm")
        await source.call("migration.finalize_source", name="vm", success=False)
        await target.call("migration.finalize_target", name="vm", runtime=runtime, success=False)
        assert source.sup.info("vm").state == "running"
        await source.sup.stop("vm", force=True)


@pytest.mark.qemu
async def test_with_multifd_qemu_opens_its_own_connections(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        result = await migrate(source.client, target.client, "vm", capabilities=["multifd"])
        assert result.status.status == "completed"
        assert target.sup.info("vm").state == "paused"  # as it was on the source
        await target.sup.stop("vm", force=True)


@pytest.mark.qemu
@both_backends
async def test_a_target_nobody_listens_on_is_refused_before_anything_changes(
    configs: tuple[Config, Config],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with two_daemons(configs) as (source, _):
        await source.sup.start(guest_spec("vm"), paused=True)
        with pytest.raises(RPCError) as refused:
            await source.call("migration.start", name="vm", target="127.0.0.1", port=closed_port)
        assert refused.value.code == MIGRATION_ERROR
        assert f"cannot connect to the target at tcp:127.0.0.1:{closed_port}" in (
            refused.value.message
        )
        assert "refused" in refused.value.message
        assert source.sup.info("vm").state == "paused"
        assert (await source.call("migration.status", name="vm"))["status"] == "none"
        capabilities = await source.sup.qmp("vm", "query-migrate-capabilities")
        assert not any(c["state"] for c in capabilities)
        await source.call("instance.resume", name="vm")  # not held
        await source.sup.stop("vm", force=True)


@pytest.mark.qemu
async def test_a_migrate_qemu_refuses_gives_the_stream_back_and_lets_the_target_go(
    configs: tuple[Config, Config],
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        _, port = await accept_vm(source, target)
        target_pid = target.sup.info("vm").pid
        assert target_pid is not None
        # A real migration blocker: ivshmem's peer mode (master=off, the default).
        await source.sup.qmp(
            "vm", "object-add", {"qom-type": "memory-backend-ram", "id": "shm", "size": 1 << 20}
        )
        await source.sup.qmp("vm", "device_add", {"driver": "ivshmem-plain", "memdev": "shm"})
        with pytest.raises(RPCError) as refused:
            await source.call("migration.start", name="vm", target="127.0.0.1", port=port)
        assert refused.value.code == MIGRATION_ERROR
        assert "migrate: " in refused.value.message and "ivshmem" in refused.value.message
        pid = source.sup.info("vm").pid
        assert pid is not None
        with sockets_to_port(pid, port) as streams:
            assert streams == []  # closefd: QEMU's copy is gone
        # The target's QEMU saw the stream end: its incoming migration failed, and its
        # daemon removed it.
        with anyio.fail_after(30):
            while any(item.name == "vm" for item in target.sup.list()):
                await anyio.sleep(0.05)
        assert not Path(f"/proc/{target_pid}").exists()
        assert source.sup.info("vm").state == "paused"
        await source.sup.stop("vm", force=True)


@both_backends
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # a name goes to the resolver
async def test_connect_stream_gives_a_blocking_socket_without_nagle(host: str) -> None:
    with socket.create_server((host, 0)) as listener:
        stream = await connect_stream(host, listener.getsockname()[1], timeout_s=5)
        with stream:
            assert nodelay(stream)
            assert stream.getblocking()
            accepted, _ = listener.accept()
            with accepted:
                stream.sendall(b"migration")
                assert accepted.recv(16) == b"migration"


@both_backends
async def test_connect_stream_to_a_closed_port_raises() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        await connect_stream("127.0.0.1", port, timeout_s=5)


@both_backends
async def test_connect_stream_gives_up_after_its_timeout() -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, the connect waits.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        address = listener.getsockname()
        with (
            socket.create_connection(address),  # the one the queue holds
            anyio.fail_after(10),
            pytest.raises(TimeoutError),
        ):
            await connect_stream(*address, timeout_s=0.3)


def test_qemu_connects_itself_for_capabilities_with_channels_of_their_own() -> None:
    assert opens_own_stream(["xbzrle", "multifd"])
    assert opens_own_stream(["postcopy-ram", "postcopy-preempt"])
    assert not opens_own_stream(["events", "return-path", "xbzrle", "auto-converge"])
