"""The source's connection for the migration stream, opened by the daemon for QEMU.

QEMU's own ``tcp:`` transport leaves Nagle's algorithm on. At the switch-over the
source sends the last pages and the device state, then waits for the target's reply on
the return path; a short last segment is then held until the target acknowledges the
one before it, and Linux delays that acknowledgement by up to 40 ms. Measured here (96
MiB guest, no bandwidth limit, 30 migrations each, QEMU 7.2): a third to a half of
QEMU's own migrations had a downtime of 43-50 ms instead of 4-10 ms; with
``TCP_NODELAY`` on the source's socket, none did (on the target's alone: no change).

So the daemon connects to the target itself, sets ``TCP_NODELAY``, and hands QEMU the
connected socket (``getfd``, then ``migrate`` with ``fd:NAME``). Capabilities that have
QEMU open further connections to the target's address (`OWN_CONNECTIONS`) need QEMU's
own ``tcp:`` URI: with those the daemon leaves the connecting to QEMU.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Sequence
from typing import Any, Final, TypeAlias

import anyio

__all__ = ["OWN_CONNECTIONS", "STREAM_FD_NAME", "connect_stream", "fd_uri", "opens_own_stream"]

_AddressInfo: TypeAlias = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]

#: The name the stream's descriptor has in QEMU (``getfd``); ``migrate`` consumes it.
STREAM_FD_NAME: Final = "kvs-migration-stream"
#: Capabilities with which QEMU connects to the target more than once (its channels).
OWN_CONNECTIONS: Final = frozenset({"multifd", "postcopy-preempt"})


def fd_uri() -> str:
    """``migrate``'s URI for the stream handed over as `STREAM_FD_NAME`."""
    return f"fd:{STREAM_FD_NAME}"


def opens_own_stream(capabilities: Collection[str]) -> bool:
    """Whether QEMU must connect to the target itself with `capabilities` on."""
    return not OWN_CONNECTIONS.isdisjoint(capabilities)


async def connect_stream(host: str, port: int, *, timeout_s: float) -> socket.socket:
    """A blocking TCP socket connected to `host`:`port`, with ``TCP_NODELAY``.

    Blocking, as QEMU's own ``tcp:`` transport leaves its socket. Raises `OSError` (a
    `TimeoutError` after `timeout_s`) when no connection is made.
    """
    with anyio.fail_after(timeout_s):
        family, kind, protocol, _, address = (await _resolve(host, port))[0]
        stream = socket.socket(family, kind, protocol)
        try:
            stream.setblocking(False)
            try:
                stream.connect(address)
            except BlockingIOError:
                await anyio.wait_writable(stream)
                error = stream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.setblocking(True)
        except BaseException:
            stream.close()
            raise
    return stream


async def _resolve(host: str, port: int) -> Sequence[_AddressInfo]:
    """`host`:`port`'s addresses; an IP address without a resolver thread (asyncio hands
    every ``getaddrinfo`` to one: a hop on the migration's path)."""
    try:
        return socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        )
    except socket.gaierror:
        return await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
