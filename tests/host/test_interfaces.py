"""Interface addresses over netlink, on both backends; and inside a network namespace with
primary, secondary and link-local addresses, where a display bound by interface name
gets the right one."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_python

from supervisor.host.interfaces import interface_addresses


def _has_ipv6_loopback() -> bool:
    return socket.has_ipv6 and "lo" in Path("/proc/net/if_inet6").read_text()


@pytest.mark.anyio
async def test_loopback() -> None:
    ipv4, ipv6 = await interface_addresses("lo")
    assert ipv4 == ["127.0.0.1"]
    assert ipv6 == (["::1"] if _has_ipv6_loopback() else [])


@pytest.mark.anyio
async def test_a_missing_interface_is_enodev() -> None:
    with pytest.raises(OSError) as caught:
        await interface_addresses("no-such-if0")
    assert caught.value.errno == errno.ENODEV
    assert "no-such-if0" in str(caught.value)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with a veth pair: dummy0 has two IPv4 addresses, a global and a
    link-local IPv6 one; its peer bare0 has none (but the kernel's own link-local)."""
    name = f"kvs-test-ifaddr-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        inside = ("-n", name)
        _ip(*inside, "link", "add", "dummy0", "type", "veth", "peer", "name", "bare0")
        _ip(*inside, "address", "add", "10.200.0.1/24", "dev", "dummy0")
        _ip(*inside, "address", "add", "10.200.0.2/24", "dev", "dummy0")
        _ip(*inside, "address", "add", "fe80::1/64", "dev", "dummy0", "nodad")
        _ip(*inside, "address", "add", "fd00::1/64", "dev", "dummy0", "nodad")
        _ip(*inside, "link", "set", "dummy0", "up")
        _ip(*inside, "link", "set", "bare0", "up")
        yield name
    finally:
        _ip("netns", "delete", name)


_LOOKUPS = """
import json, sys, anyio
from supervisor.host.interfaces import interface_addresses

async def main():
    return [await interface_addresses("dummy0"), await interface_addresses("bare0")]

print(json.dumps({backend: anyio.run(main, backend=backend) for backend in ("asyncio", "trio")}))
"""


def _run_in(netns: str, code: str) -> str:
    return run_python(textwrap.dedent(code), prefix=("ip", "netns", "exec", netns)).stdout


@pytest.mark.netns
def test_addresses_inside_a_namespace(netns: str) -> None:
    found = json.loads(_run_in(netns, _LOOKUPS))
    expected = [[["10.200.0.1", "10.200.0.2"], ["fd00::1"]], [[], []]]
    assert found == {"asyncio": expected, "trio": expected}


_ARGV = """
import json, sys, anyio
from pathlib import Path
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError
from supervisor.qemu.cmdline import argv_for_spec_file

state, specs = Path(sys.argv[1]), Path(sys.argv[2])

async def argv_or_error(name):
    try:
        argv = await argv_for_spec_file(specs / f"{name}.toml", Config(state_dir=str(state)))
    except InvalidConfigError as error:
        return str(error)
    return argv[argv.index("-spice") + 1].split(",")[0]

print(json.dumps([anyio.run(argv_or_error, name) for name in ("v4", "v6", "bare")]))
"""


@pytest.mark.netns
@pytest.mark.qemu
def test_a_display_bound_by_interface_name(netns: str, short_tmp: Path, tmp_path: Path) -> None:
    (tmp_path / "v4.toml").write_text('[hvparams]\nspice_bind = "dummy0"\n')
    (tmp_path / "v6.toml").write_text('[hvparams]\nspice_bind = "dummy0"\nspice_ip_version = 6\n')
    (tmp_path / "bare.toml").write_text('[hvparams]\nspice_bind = "bare0"\n')
    code = _ARGV.replace("sys.argv[1]", repr(str(short_tmp))).replace(
        "sys.argv[2]", repr(str(tmp_path))
    )
    assert json.loads(_run_in(netns, code)) == [
        "addr=10.200.0.1",
        "addr=fd00::1",
        "spec.hvparams.spice_bind: interface bare0 has no address",
    ]
