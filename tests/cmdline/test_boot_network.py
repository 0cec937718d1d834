"""``boot_order = "network"``: the first NIC's ``-device`` gets ``bootindex=1`` (and
``-boot order=n`` stays); the old ``-net nic`` syntax has only ``-boot n``. Checked in
the builder's argv and on the real QEMU 7.2, which reports the NIC's bootindex over QMP."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import QEMU
from helpers import start_listening

from protocols.qmp import connect
from supervisor.host.statedir import StateDir
from supervisor.model.hvparams import resolve_hvparams
from supervisor.model.spec import assign_macs, decode_spec
from supervisor.qemu.accel import Accelerator
from supervisor.qemu.capabilities import NIC_MODELS, QemuCapabilities, probe_qemu
from supervisor.qemu.cmdline import CommandLine, LaunchResources, build_command_line

from . import ganeti_caps, modern_caps

UUID = "0b6b7f1e-5d4c-4b3a-9f8e-7d6c5b4a3f2e"
ONE_NIC = {"nics": [{"link": "br0"}]}
TWO_NICS = {"nics": [{"link": "br0"}, {"mode": "routed", "ip": "192.0.2.9"}]}


def build(
    spec: dict[str, Any],
    caps: QemuCapabilities | None = None,
    state_dir: Path = Path("/var/lib/kvm-supervisor"),
    **hvparams: Any,
) -> CommandLine:
    decoded = assign_macs(decode_spec({"name": "vm1", "uuid": UUID, **spec}))
    return build_command_line(
        decoded,
        resolve_hvparams({}, hvparams),
        caps or modern_caps(),
        StateDir(state_dir).instance(decoded.name),
        Accelerator.TCG,
        resources=LaunchResources(),
    )


def option(command: CommandLine, name: str) -> list[str]:
    return [command.argv[i + 1] for i, arg in enumerate(command.argv) if arg == name]


def nic_devices(command: CommandLine) -> list[str]:
    return [device for device in option(command, "-device") if ",netdev=net" in device]


def test_the_first_nic_device_boots() -> None:
    command = build(TWO_NICS, boot_order="network")
    first, second = nic_devices(command)
    assert first.startswith("virtio-net-pci,netdev=net0,id=nic0,")
    assert first.endswith(",bootindex=1")
    assert "bootindex" not in second
    # -boot's order still says network for whatever has no bootindex.
    assert option(command, "-boot") == ["order=n"]


def test_every_nic_type_boots_through_its_device() -> None:
    caps = modern_caps()
    caps = modern_caps(devices=caps.devices | set(NIC_MODELS.values()))
    for nic_type in NIC_MODELS:
        (device,) = nic_devices(build(ONE_NIC, caps, nic_type=nic_type, boot_order="network"))
        assert device.endswith(",bootindex=1"), nic_type


def test_no_bootindex_unless_booting_from_the_network() -> None:
    for hvparams in (
        {"boot_order": "disk"},
        # A kernel boots directly: no -boot at all, nor a NIC bootindex.
        {"boot_order": "network", "kernel_path": "/boot/vmlinuz", "root_path": "/dev/vda1"},
    ):
        command = build(TWO_NICS, **hvparams)
        assert not any("bootindex" in device for device in nic_devices(command)), hvparams


def test_old_net_nic_syntax_keeps_boot_n() -> None:
    # QEMU 0.12.5 lists no -device models here: NICs are -net nic, without a bootindex.
    command = build(TWO_NICS, ganeti_caps("kvm_0.12.5_help.txt"), boot_order="network")
    assert nic_devices(command) == []
    assert not any("bootindex" in value for value in option(command, "-net"))
    assert option(command, "-boot") == ["order=n"]
    oldest = build(TWO_NICS, ganeti_caps("kvm_0.9.1_help.txt"), boot_order="network")
    assert option(oldest, "-boot") == ["n"]


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_qemu_72_boots_the_nic_first(short_tmp: Path) -> None:
    """QEMU accepts the argv and reports bootindex 1 on the first NIC, none on the second.

    The NICs' tap backends are swapped for a hub port each (``-netdev hubport``): the
    devices and their properties are the builder's, and the hub is a QEMU-internal
    switch with nothing else on it, so no network path leaves QEMU (a real tap would
    need a network namespace, which the networking tests have; here only the device
    matters).
    """
    if not Path(QEMU).exists():
        pytest.fail(f"{QEMU} is missing: run `make deps`")
    caps = await probe_qemu(QEMU)
    command = build(TWO_NICS, caps, short_tmp, boot_order="network")
    taps = {f"tap,id={nic.netdev_id},fd={nic.fd_names[0]}": nic for nic in command.nics}
    argv = [
        f"hubport,id={taps[arg].netdev_id},hubid={taps[arg].index}" if arg in taps else arg
        for arg in command.argv
    ]
    assert len(argv) == len(command.argv) and not taps.keys() & set(argv)
    paths = StateDir(short_tmp).create_instance_dir("vm1")
    qemu = start_listening([*argv, "-S"], [paths.qmp_socket], stderr=subprocess.PIPE)
    try:
        async with connect(paths.qmp_socket) as qmp:
            bootindexes = [
                await qmp.execute(
                    "qom-get",
                    {"path": f"/machine/peripheral/{nic.device_id}", "property": "bootindex"},
                )
                for nic in command.nics
            ]
            assert bootindexes == [1, -1]
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"
    finally:
        qemu.kill()
        qemu.wait()
        if qemu.stderr is not None:
            qemu.stderr.close()
