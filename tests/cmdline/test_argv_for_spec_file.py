"""`argv_for_spec_file`, the ``kvm-supervisor cmdline`` verb's engine: the argv it prints
runs by hand, and what this host cannot honour is refused with the field named."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError
from supervisor.qemu.accel import probe_kvm
from supervisor.qemu.cmdline import argv_for_spec_file

from . import run_paused

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    # QEMU processes dominate the time; one backend is enough (the code awaits only QEMU
    # probes and interface lookups, which their own tests run on both).
    return "asyncio"


@pytest.fixture
def image_dir() -> Iterator[Path]:
    # On a disk filesystem: cache=none (O_DIRECT) fails on tmpfs.
    directory = Path(tempfile.mkdtemp(prefix="kvs-spec-", dir="/var/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_spec(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(body)
    return path


async def test_the_argv_runs_by_hand(short_tmp: Path, image_dir: Path) -> None:
    await anyio.run_process(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image_dir / "root.qcow2"), "16M"]
    )
    spec = write_spec(
        image_dir,
        "web",
        'memory_mib = 64\ndisks = [{path = "root.qcow2", format = "qcow2"}]\n'
        '[hvparams]\nvnc_bind_address = "127.0.0.1"\nuse_chroot = true\n'
        'disk_cache = "none"\n',
    )
    config = Config(
        state_dir=str(short_tmp / "state"),
        display_port_range=(5900, 6899),
        hvparams={"kvm_flag": "disabled"},
    )
    argv = await argv_for_spec_file(spec, config)
    instance_dir = short_tmp / "state" / "instances" / "web"
    chroot = short_tmp / "state" / "chroot" / "web"
    assert instance_dir.is_dir() and list(instance_dir.iterdir()) == []
    assert chroot.is_dir() and list(chroot.iterdir()) == []
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2,accel=tcg"
    # The relative disk path was resolved against the spec file's directory.
    assert argv[argv.index("-drive") + 1].startswith(f"file={image_dir / 'root.qcow2'},")
    vnc = argv[argv.index("-vnc") + 1]
    assert vnc.startswith("127.0.0.1:")
    assert 0 <= int(vnc.split(":")[1]) <= 999
    assert "-uuid" in argv
    run_paused(argv, instance_dir / "qmp.sock", [])


async def test_nics_appear_by_fd_name(short_tmp: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "net", '[[nics]]\nlink = "br0"\n[[nics]]\nlink = "br1"\n')
    argv = await argv_for_spec_file(spec, Config(state_dir=str(short_tmp)))
    netdevs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-netdev"]
    assert netdevs == ["tap,id=net0,fd=tap0", "tap,id=net1,fd=tap1"]


async def test_vhost_net_is_refused_here(short_tmp: Path, tmp_path: Path) -> None:
    if await anyio.Path("/dev/vhost-net").exists():
        pytest.fail("this test expects a host without /dev/vhost-net")
    spec = write_spec(tmp_path, "vh", '[[nics]]\nlink = "br0"\n[hvparams]\nvhost_net = true\n')
    with pytest.raises(InvalidConfigError) as caught:
        await argv_for_spec_file(spec, Config(state_dir=str(short_tmp)))
    assert caught.value.path == "spec.hvparams.vhost_net"
    assert "/dev/vhost-net is missing" in caught.value.reason
    assert caught.value.data["file"] == str(spec)


async def test_cpu_host_needs_kvm_for_stock_guests(short_tmp: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "cpu", '[hvparams]\ncpu_type = "host"\n')
    kvm = probe_kvm()
    if kvm.usable_for_stock_guests:
        argv = await argv_for_spec_file(spec, Config(state_dir=str(short_tmp)))
        assert argv[argv.index("-cpu") + 1] == "host"
        return
    with pytest.raises(InvalidConfigError) as caught:
        await argv_for_spec_file(spec, Config(state_dir=str(short_tmp)))
    assert str(caught.value) == f"spec.hvparams.cpu_type: host needs KVM, and {kvm.reason}"


async def test_unknown_machine_is_refused(short_tmp: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "old", '[hvparams]\nmachine_version = "pc-0.9"\n')
    with pytest.raises(InvalidConfigError) as caught:
        await argv_for_spec_file(spec, Config(state_dir=str(short_tmp)))
    assert caught.value.path == "spec.hvparams.machine_version"


async def test_socket_paths_too_long_name_the_instance(tmp_path: Path) -> None:
    state_dir = tmp_path / ("s" * 80)
    name = "n" * 30
    spec = write_spec(tmp_path, name, "")
    with pytest.raises(InvalidConfigError) as caught:
        await argv_for_spec_file(spec, Config(state_dir=str(state_dir)))
    assert caught.value.path == "spec.name"
    assert caught.value.reason.startswith(f"instance {name!r}: socket {state_dir}/instances/")
    assert not state_dir.exists()


async def test_syntax_errors_come_first(short_tmp: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "bad", "[hvparams]\nserial_speed = 1234\n")
    with pytest.raises(InvalidConfigError) as caught:
        await argv_for_spec_file(spec, Config(state_dir=str(short_tmp)))
    assert caught.value.path == "spec.hvparams.serial_speed"
    assert not (short_tmp / "instances").exists()
