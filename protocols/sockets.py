"""Reads and whole-message writes on a non-blocking socket, shared by the protocol clients
and the control server.

They use the raw socket rather than anyio's socket stream: on asyncio, cancelling the
stream's receive or send as the socket becomes ready makes anyio log an
InvalidStateError, and these sockets see many cancellations (deadlines, cut peers).
Waiting before every read also keeps a flooding peer from starving the other tasks.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import anyio

__all__ = ["receive_some", "send_message"]


async def send_message(
    sock: socket.socket, data: bytes, *, cut_short: Callable[[], None] | None = None
) -> None:
    """Send all of `data`; raises OSError when the peer is gone.

    When cancellation stops the message after part of it went out, `cut_short` is
    called before the cancellation goes on: the peer would read the message's rest
    glued to the next one, so its connection must end.
    """
    view = memoryview(data)
    while view:
        with contextlib.suppress(BlockingIOError):
            # MSG_NOSIGNAL: an embedding program may not ignore SIGPIPE as Python does.
            view = view[sock.send(view, socket.MSG_NOSIGNAL) :]
        if view:
            try:
                await anyio.wait_writable(sock)
            except BaseException:
                if cut_short is not None and len(view) < len(data):
                    cut_short()
                raise


async def receive_some(sock: socket.socket, max_bytes: int) -> bytes:
    """Wait for data and return what arrived (``b""`` at the end of the stream).

    :raises OSError: the peer reset the connection, or the socket failed.
    """
    while True:
        await anyio.wait_readable(sock)
        try:
            return sock.recv(max_bytes)
        except BlockingIOError:
            continue
