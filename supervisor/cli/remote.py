"""Reaching a daemon on another host: ``--connect ssh://[user@]host[:port][/socket]``.

As ``virsh -c qemu+ssh://`` reaches a remote libvirtd, the client runs
``ssh HOST kvm-supervisor rpc-stdio [--socket PATH]`` and speaks JSON-RPC over ssh's
stdin and stdout (one end of a socketpair); on the remote host, ``rpc-stdio`` bridges
them to the local control socket, where the daemon checks the ssh user's credentials as
it checks any local peer's. ``KVM_SUPERVISOR_SSH`` replaces the ``ssh`` command (split as
a shell would, no shell run), for options such as ``-F FILE`` or ``-i KEY``.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import unquote, urlsplit

import anyio
import msgspec

from protocols.jsonrpc import RPCClient, connect_socket

__all__ = [
    "SshTarget",
    "bridge_stdio",
    "connect_ssh",
    "parse_connect",
    "run_remote_terminal",
    "ssh_command",
]

#: How long ssh may take to exit once the client has closed its end.
_SSH_EXIT_S: Final = 10.0
_CHUNK: Final = 65536


class SshTarget(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    user: str | None = None
    port: int | None = None
    #: The control socket on the remote host; None: the remote daemon's default.
    socket: str | None = None


def parse_connect(url: str) -> SshTarget:
    """`url` as an `SshTarget`; ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme != "ssh":
        raise ValueError(f"{url!r}: only ssh://[user@]host[:port][/socket] is supported")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.query or parts.fragment or parts.password:
        raise ValueError(f"{url!r}: no password, query or fragment is accepted")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number in 1..65535") from None
    path = unquote(parts.path)
    return SshTarget(
        host=parts.hostname,
        user=unquote(parts.username) if parts.username else None,
        port=port,
        socket=path if path not in ("", "/") else None,
    )


def ssh_command(target: SshTarget, remote: Sequence[str], *, terminal: bool = False) -> list[str]:
    """The ssh argv that runs `remote` (``kvm-supervisor`` arguments) on `target`."""
    ssh = shlex.split(os.environ.get("KVM_SUPERVISOR_SSH", "ssh"))
    options = ["-t" if terminal else "-T", "-o", "BatchMode=yes"]
    if target.port is not None:
        options += ["-p", str(target.port)]
    if target.user is not None:
        options += ["-l", target.user]
    socket_option = [] if target.socket is None else ["--socket", target.socket]
    command = shlex.join(["kvm-supervisor", *remote, *socket_option])
    return [*ssh, *options, "--", target.host, command]


@asynccontextmanager
async def connect_ssh(target: SshTarget) -> AsyncIterator[RPCClient]:
    """A JSON-RPC client of the daemon on `target`, through ``ssh ... rpc-stdio``.

    ssh's errors go to this process's stderr. Leaving closes the client's end: ssh sees
    its stdin end and exits (killed after `_SSH_EXIT_S`).
    """
    ours, theirs = socket.socketpair()
    try:
        process = await anyio.open_process(
            ssh_command(target, ["rpc-stdio"]),
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=None,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        async with connect_socket(ours) as client:
            yield client
    finally:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_SSH_EXIT_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def bridge_stdio(stream: anyio.abc.ByteStream) -> None:
    """Copy stdin to `stream` and `stream` to stdout until the daemon's side ends.

    stdin's end is passed on as a half-close, so the daemon answers what it was sent
    before the bridge ends. stdin and stdout are made non-blocking while it runs.
    """
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    blocking = {fd: os.get_blocking(fd) for fd in (stdin, stdout)}
    try:
        for fd in blocking:
            os.set_blocking(fd, False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_copy_stdin, stdin, stream)
            async for data in stream:
                await _write_all(stdout, data)
            tg.cancel_scope.cancel()
    finally:
        for fd, was_blocking in blocking.items():
            os.set_blocking(fd, was_blocking)


async def _copy_stdin(stdin: int, stream: anyio.abc.ByteStream) -> None:
    while True:
        try:
            data = os.read(stdin, _CHUNK)
        except BlockingIOError:
            await anyio.wait_readable(stdin)
            continue
        if not data:
            await stream.send_eof()
            return
        await stream.send(data)


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await anyio.wait_writable(fd)


def run_remote_terminal(target: SshTarget, remote: Sequence[str]) -> int:
    """Run ``kvm-supervisor REMOTE...`` on `target` with a terminal (the console)."""
    return subprocess.call(ssh_command(target, remote, terminal=True))
