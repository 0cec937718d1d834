"""The test guest works: booted with QEMU TCG directly, no supervisor involved.

One boot checks the ready marker, heartbeats, the virtio balloon, eth0 configured from
``kvs_ip=`` and ``poweroff`` typed on the serial console; a second boot checks the ACPI
power button. The measured time to the ready marker is logged (``-o log_cli=true`` or
``--log-level=INFO`` shows it) and recorded as the ``ready_s`` property; it is a figure,
not an assertion.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from conftest import GUEST_DIR, QEMU
from helpers import await_listening
from serial_console import STEP_TIMEOUT_S, SerialConsole, connect_console

from protocols import qmp

pytestmark = [pytest.mark.guest, pytest.mark.anyio]

log = logging.getLogger(__name__)

RecordProperty = Callable[[str, object], None]  # the type of the record_property fixture

KERNEL_ARGS = "console=ttyS0 quiet tsc=reliable no_timer_check mitigations=off"
MIB = 1024 * 1024
# A 128 MiB guest has ~66 MiB free (the kernel and initramfs take the rest); a 96 MiB
# balloon target takes 32 of them. Tighter fails: 96 MiB ballooned to 64 MiB, with
# virtio-net present, gets its processes OOM-killed.
GUEST_MIB = 128
BALLOON_MIB = 96
# Generous: a boot takes ~4 s under TCG on an idle machine, and others run tests too.
READY_TIMEOUT_S = 90.0
READY_RE = re.compile(rb"KVS-GUEST-READY ([0-9.]+)")
HEARTBEAT_RE = re.compile(rb"KVS-HEARTBEAT (\d+)")


@pytest.fixture
def anyio_backend() -> str:
    """Real-guest tests run on one backend only."""
    return "asyncio"


@dataclass
class Guest:
    """A booted test guest: its QEMU process, QMP socket and serial console."""

    proc: Process
    workdir: Path
    qmp_path: Path
    console: SerialConsole
    started: float

    async def wait_exit(self) -> int:
        """Wait for QEMU to exit on its own and return its exit status."""
        with anyio.move_on_after(STEP_TIMEOUT_S):
            return await self.proc.wait()
        pytest.fail(
            f"qemu (pid {self.proc.pid}) still runs {STEP_TIMEOUT_S}s after the power-off; "
            f"console:\n{self.console.text()}"
        )


def _qemu_stderr(workdir: Path) -> Callable[[], str]:
    def stderr() -> str:
        with contextlib.suppress(OSError):
            return "qemu stderr:\n" + (workdir / "qemu.err").read_text(errors="replace")
        return ""

    return stderr


@contextlib.asynccontextmanager
async def boot_guest(
    workdir: Path, extra_args: list[str], kernel_args: str = ""
) -> AsyncIterator[Guest]:
    """Boot the test guest under TCG; QEMU is killed by pid on the way out if still up."""
    kernel = GUEST_DIR / "vmlinuz"
    initrd = GUEST_DIR / "initrd.img"
    if not (kernel.exists() and initrd.exists()):
        pytest.fail(f"the test guest is missing from {GUEST_DIR}: run `make guest`")
    qmp_path = workdir / "qmp.sock"
    serial_path = workdir / "ser.sock"
    argv = [
        QEMU,
        "-nodefaults",
        "-display", "none",
        "-machine", "accel=tcg",
        "-m", str(GUEST_MIB),
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", f"{KERNEL_ARGS} {kernel_args}".strip(),
        "-chardev",
        f"socket,id=ser,path={serial_path},server=on,wait=off,logfile={workdir / 'ser.log'}",
        "-serial", "chardev:ser",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        *extra_args,
    ]  # fmt: skip
    with (workdir / "qemu.err").open("wb") as err:
        started = time.monotonic()
        proc = await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        await await_listening(
            [qmp_path, serial_path],
            pid=proc.pid,
            exit_details=lambda: (workdir / "qemu.err").read_text(errors="replace"),
        )
        async with connect_console(serial_path, _qemu_stderr(workdir)) as console:
            yield Guest(proc, workdir, qmp_path, console, started)
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def wait_ready(guest: Guest, record_property: RecordProperty) -> int:
    """Wait for the ready marker, log the time it took; return the offset after it."""
    match = await guest.console.expect(READY_RE, wait_s=READY_TIMEOUT_S)
    ready_s = time.monotonic() - guest.started
    guest_uptime_s = float(match.group(1))
    log.info(
        "test guest ready %.2f s after qemu started (guest uptime %.2f s)", ready_s, guest_uptime_s
    )
    record_property("ready_s", round(ready_s, 3))
    record_property("guest_uptime_at_ready_s", guest_uptime_s)
    return match.end()


async def wait_shutdown(events: qmp.EventSubscription) -> qmp.QMPEvent:
    """The next SHUTDOWN event (QEMU closes the connection right after it)."""
    with anyio.move_on_after(STEP_TIMEOUT_S):
        async for event in events:
            if isinstance(event, qmp.QMPEvent) and event.name == "SHUTDOWN":
                return event
    pytest.fail(f"no SHUTDOWN event within {STEP_TIMEOUT_S}s")


async def balloon_settled(changes: qmp.EventSubscription, full: int) -> int:
    """The balloon's size once it reaches the target, or the last one seen in a step's time.

    The guest gives its pages back in steps; QEMU reports them in BALLOON_CHANGE events.
    """
    actual = full
    with anyio.move_on_after(STEP_TIMEOUT_S):
        async for event in changes:
            if isinstance(event, qmp.QMPEvent):
                actual = event.data["actual"]
                if actual <= BALLOON_MIB * MIB:
                    break
    return actual


async def test_console_heartbeat_balloon_eth0_and_typed_poweroff(
    short_tmp: Path, record_property: RecordProperty
) -> None:
    extra = [
        "-device", "virtio-balloon-pci,id=balloon0",
        "-netdev", "user,id=n0,restrict=on",
        "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    async with (
        boot_guest(short_tmp, extra, "kvs_ip=10.99.0.2/24") as guest,
        qmp.connect(guest.qmp_path, timeout=10) as monitor,
    ):
        after_ready = await wait_ready(guest, record_property)

        # Heartbeats count up one by one, starting right after the ready marker.
        beats: list[int] = []
        offset = after_ready
        for _ in range(3):
            match = await guest.console.expect(HEARTBEAT_RE, since=offset)
            beats.append(int(match.group(1)))
            offset = match.end()
        assert beats == [beats[0], beats[0] + 1, beats[0] + 2]
        assert beats[0] <= 2, f"first heartbeat after the ready marker is {beats[0]}"

        # A root shell on ttyS0, and eth0 (virtio_net) configured from kvs_ip=.
        await guest.console.expect(re.compile(rb"# "), since=after_ready)
        shown = await guest.console.run("ip -4 addr show eth0")
        assert re.search(r"inet 10\.99\.0\.2/24 .*eth0", shown), shown

        # virtio_balloon is loaded: the guest gives memory back when asked.
        full = (await monitor.execute("query-balloon"))["actual"]
        assert full == GUEST_MIB * MIB
        asked = time.monotonic()
        async with monitor.events({"BALLOON_CHANGE"}) as changes:
            await monitor.execute("balloon", {"value": BALLOON_MIB * MIB})
            actual = await balloon_settled(changes, full)
        log.info(
            "balloon: %d MiB -> %d MiB (target %d MiB) in %.2f s",
            full // MIB, actual // MIB, BALLOON_MIB, time.monotonic() - asked,
        )  # fmt: skip
        assert actual < full, f"balloon did not inflate: actual {actual} of {full} bytes"

        # The guest lives on with less memory: the shell still answers, nothing was killed.
        whoami = await guest.console.run("id")
        assert re.search(r"^uid=0 ", whoami, re.MULTILINE), whoami
        assert b"Out of memory" not in guest.console.output, guest.console.text()

        # `poweroff` typed on the console powers the machine off.
        async with monitor.events({"SHUTDOWN"}) as events:
            await guest.console.type("poweroff")
            shutdown = await wait_shutdown(events)
        assert shutdown.data.get("guest") is True, shutdown.data
        assert await guest.wait_exit() == 0


async def test_acpi_power_button_powers_off(
    short_tmp: Path, record_property: RecordProperty
) -> None:
    async with (
        boot_guest(short_tmp, []) as guest,
        qmp.connect(guest.qmp_path, timeout=10) as monitor,
    ):
        await wait_ready(guest, record_property)
        async with monitor.events({"SHUTDOWN"}) as events:
            await monitor.execute("system_powerdown")
            shutdown = await wait_shutdown(events)
        assert shutdown.data.get("guest") is True, shutdown.data
        assert await guest.wait_exit() == 0
