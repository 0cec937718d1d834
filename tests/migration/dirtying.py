"""A test guest that keeps dirtying its memory while it migrates.

A busybox loop on the guest's shell (its serial console) rewrites a file in a tmpfs
over and over, in place and with the same bytes (``dd conv=notrunc`` of the file onto
itself): every pass of QEMU over the guest's memory finds those pages dirty again,
while their content stays what QEMU sent before (which xbzrle can tell). A counter file
says how far the loop got, so a test can see it go on after the migration, on the
target.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from helpers import await_until
from serial_console import SerialConsole, connect_console

from supervisor import Supervisor

SHELL_READY = re.compile(rb"KVS-GUEST-READY.*?# ", re.DOTALL)
#: A TCG boot takes seconds on an idle machine; test runs share two cores here.
BOOT_TIMEOUT_S = 120.0
_PASSES = re.compile(rb"PASSES (\d+)")


@asynccontextmanager
async def guest_console(sup: Supervisor, name: str) -> AsyncIterator[SerialConsole]:
    """The serial console of `name`'s guest booted here, once its shell reads it."""
    instance = sup.instance(name)
    log = instance.paths.serial_log
    await await_until(
        lambda: log.exists() and SHELL_READY.search(log.read_bytes()) is not None,
        what=f"the shell of {name}",
        timeout_s=BOOT_TIMEOUT_S,
    )
    async with console_of(sup, name) as console:
        yield console


def console_of(sup: Supervisor, name: str) -> AbstractAsyncContextManager[SerialConsole]:
    """The serial console of `name`'s guest (one that migrated here: it does not boot)."""
    return connect_console(Path(sup.info(name).console["socket"]))


async def start_dirtying(console: SerialConsole, mib: int, *, rest_s: float = 0.0) -> None:
    """Have the guest rewrite `mib` MiB of a tmpfs, in place, in a loop, from now on;
    with `rest_s`, it rests that long after each pass."""
    rest = f" sleep {rest_s};" if rest_s else ""
    await console.run(f"mkdir -p /dirty && mount -t tmpfs -o size={mib + 4}m tmpfs /dirty")
    await console.run(f"dd if=/dev/urandom of=/dirty/data bs=1M count={mib} 2>/dev/null")
    await console.run(
        "(n=0; while :; do"
        " dd if=/dirty/data of=/dirty/data bs=1M conv=notrunc 2>/dev/null;"
        f" n=$((n + 1)); echo $n > /dirty/passes;{rest} done) > /dev/null 2>&1 & :"
    )
    await dirtying_goes_on(console)


async def dirtying_goes_on(console: SerialConsole) -> int:
    """Wait (in the guest) for the loop to finish one more pass; the passes made."""
    printed = await console.run(
        'n=$(cat /dirty/passes 2>/dev/null); while [ "$(cat /dirty/passes 2>/dev/null)" = "$n" ];'
        " do :; done; echo PASSES $(cat /dirty/passes)"
    )
    match = _PASSES.search(printed.encode())
    assert match is not None, printed
    return int(match.group(1))
