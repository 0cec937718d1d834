"""Tests of capability probing, the accelerator choice, the command line and the runtime record.

Shared here: where the Ganeti data lives, and capabilities that do not depend on this
machine's QEMU (for the pure tests and the golden argv files).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import msgspec
import pytest
from helpers import wait_listening

from supervisor.qemu.capabilities import MachineType, QemuCapabilities, parse_capabilities

DATA = Path(__file__).resolve().parent.parent / "data"
GANETI = DATA / "ganeti"
GOLDEN = DATA / "golden"

_MACHINES = (
    MachineType(
        name="pc", description="Standard PC (i440FX + PIIX, 1996)", alias_of="pc-i440fx-7.2"
    ),
    MachineType(
        name="pc-i440fx-7.2", description="Standard PC (i440FX + PIIX, 1996)", is_default=True
    ),
    MachineType(name="pc-i440fx-6.2", description="Standard PC (i440FX + PIIX, 1996)"),
    MachineType(name="q35", description="Standard PC (Q35 + ICH9, 2009)", alias_of="pc-q35-7.2"),
    MachineType(name="pc-q35-7.2", description="Standard PC (Q35 + ICH9, 2009)"),
    MachineType(name="microvm", description="microvm (i386)"),
)

_DEVICES = frozenset(
    {
        "AC97",
        "ES1370",
        "VGA",
        "e1000",
        "hda-duplex",
        "i82551",
        "ide-cd",
        "ide-hd",
        "intel-hda",
        "lsi53c895a",
        "megasas",
        "ne2k_isa",
        "ne2k_pci",
        "pcnet",
        "qxl-vga",
        "rtl8139",
        "sb16",
        "scsi-block",
        "scsi-cd",
        "scsi-generic",
        "scsi-hd",
        "usb-kbd",
        "usb-mouse",
        "usb-tablet",
        "virtio-balloon-pci",
        "virtio-blk-pci",
        "virtio-net-pci",
        "virtio-scsi-pci",
        "virtio-serial-pci",
        "virtserialport",
    }
)


#: Set (to anything but "" or "0") to rewrite the golden files that differ.
UPDATE_GOLDEN = "KVS_UPDATE_GOLDEN"


def _switched_on(variable: str) -> bool:
    return os.environ.get(variable, "").lower() not in ("", "0", "false")


def check_golden(golden: Path, actual: str) -> None:
    """Fail unless `golden` holds `actual`.

    With ``KVS_UPDATE_GOLDEN`` set, a golden file that differs (or is missing) is
    rewritten and the test still fails, saying so: a rewritten file is something to
    review, never a pass. Under CI (``CI=true``) the switch is refused and nothing is
    written.
    """
    expected = golden.read_text() if golden.exists() else None
    if actual == expected:
        return
    if _switched_on(UPDATE_GOLDEN):
        if _switched_on("CI"):
            pytest.fail(f"{UPDATE_GOLDEN} is refused under CI: {golden} differs and is kept")
        golden.write_text(actual)
        pytest.fail(f"rewrote {golden}: review the diff, then run without {UPDATE_GOLDEN}")
    if expected is None:
        pytest.fail(f"{golden} is missing: run with {UPDATE_GOLDEN}=1 to write it")
    assert actual == expected, f"differs from {golden}"


def modern_caps(**changes: Any) -> QemuCapabilities:
    """A fixed QEMU 7.2 as seen by the probe, whatever QEMU this machine has."""
    caps = QemuCapabilities(
        path="/usr/bin/qemu-system-x86_64",
        version=(7, 2, 0),
        version_text="7.2.0 (fixed test capabilities)",
        qmp=True,
        spice=True,
        vhost_net=True,
        multiqueue_tap=True,
        enable_kvm=True,
        netdev=True,
        display=True,
        machine_option=True,
        drive_boot_flag=False,
        uuid=True,
        name_debug_threads=True,
        run_with=False,
        runas=True,
        chroot=True,
        audio=True,
        audiodev=True,
        soundhw=False,
        no_acpi_option=True,
        machine_acpi=True,
        rtc=True,
        localtime_option=False,
        balloon_option=False,
        on_off_booleans=True,
        chardev_logfile=True,
        boot_order_option=True,
        usbdevice=True,
        object_option=True,
        migrate_set_parameters=True,
        migrate_set_speed=False,
        machines=_MACHINES,
        default_machine="pc-i440fx-7.2",
        devices=_DEVICES,
        fingerprint="7.2.0-fixed",
    )
    return msgspec.structs.replace(caps, **changes)


def ganeti_caps(help_file: str, *, devices: str = "") -> QemuCapabilities:
    """Capabilities parsed from one of Ganeti's help texts, with a one-machine list."""
    help_text = (GANETI / help_file).read_text()
    machine_text = "Supported machines are:\npc         Standard PC (default)\n"
    return parse_capabilities("/usr/bin/kvm", help_text, machine_text, devices)


def _qmp(sock: socket.socket, reader: Any, command: str) -> Any:
    sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
    while True:
        message = json.loads(reader.readline())
        if "event" not in message:
            return message


def run_paused(argv: list[str], qmp_socket: Path, pass_fds: list[int]) -> str:
    """Start QEMU with -S, check it over QMP, quit it; return its stderr."""
    with tempfile.TemporaryFile() as stderr, ExitStack() as stack:
        process = subprocess.Popen(
            [*argv, "-S"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=pass_fds,
        )
        try:
            wait_listening([qmp_socket], pid=process.pid, exit_details=lambda: _read(stderr))
            sock = socket.socket(socket.AF_UNIX)
            stack.callback(sock.close)
            sock.connect(str(qmp_socket))
            sock.settimeout(10)
            reader = stack.enter_context(sock.makefile("r"))
            assert "QMP" in json.loads(reader.readline())
            assert _qmp(sock, reader, "qmp_capabilities") == {"return": {}}
            status = _qmp(sock, reader, "query-status")["return"]
            assert status["status"] == "prelaunch", status
            assert _qmp(sock, reader, "quit") == {"return": {}}
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        return _read(stderr)


def _read(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")
