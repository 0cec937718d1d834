"""Attach the terminal to an instance's serial console socket (replaces socat).

The terminal is put in raw mode so every key reaches the guest; Ctrl-] detaches
and the terminal settings are restored whatever happens.
"""

from __future__ import annotations

import os
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
from anyio.abc import SocketStream

DETACH_BYTE = b"\x1d"  # Ctrl-]


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on `fd` while the block runs, when `fd` is a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        # Not tty's default TCSAFLUSH: that would drop what was typed in the meantime.
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _copy_input(stream: SocketStream, input_fd: int) -> None:
    while True:
        await anyio.wait_readable(input_fd)
        data = os.read(input_fd, 4096)
        if not data:
            return
        detach_at = data.find(DETACH_BYTE)
        if detach_at >= 0:
            if detach_at:
                await stream.send(data[:detach_at])
            return
        await stream.send(data)


async def _copy_output(stream: SocketStream, output_fd: int) -> None:
    while True:
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return
        view = memoryview(data)
        while view:
            await anyio.wait_writable(output_fd)
            written = os.write(output_fd, view)
            view = view[written:]


async def attach(
    socket_path: Path, input_fd: int | None = None, output_fd: int | None = None
) -> None:
    """Copy between the terminal and the console socket until Ctrl-] or the socket closes."""
    input_fd = sys.stdin.fileno() if input_fd is None else input_fd
    output_fd = sys.stdout.fileno() if output_fd is None else output_fd
    stream = await anyio.connect_unix(socket_path)
    async with stream, anyio.create_task_group() as tg:
        with raw_terminal(input_fd):
            # Said once typing reaches the guest: connected, the terminal already raw.
            if os.isatty(input_fd):
                sys.stderr.write(f"attached to {socket_path}; Ctrl-] detaches\r\n")

            async def copy_output_then_stop() -> None:
                await _copy_output(stream, output_fd)
                tg.cancel_scope.cancel()

            tg.start_soon(copy_output_then_stop)
            await _copy_input(stream, input_fd)
            tg.cancel_scope.cancel()
