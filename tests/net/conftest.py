"""Network namespaces for the networking tests: each test gets its own, always deleted;
the host's own namespace must come out of the suite with the links it had."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import run_python

DRIVER = Path(__file__).with_name("netdriver.py")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def host_links() -> list[str]:
    """The names of the host namespace's links, sorted."""
    return sorted(line.split(":")[1].strip() for line in ip("-o", "link").splitlines())


@pytest.fixture(scope="session", autouse=True)
def host_links_unchanged() -> Iterator[None]:
    """The tests work in namespaces of their own only: the host's links stay as they were."""
    before = host_links()
    yield
    assert host_links() == before


def namespaces() -> set[str]:
    """The names of the named network namespaces (``ip netns list``)."""
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


@contextmanager
def namespace(prefix: str) -> Iterator[str]:
    """A fresh network namespace ``<prefix>-<random>`` with ``lo`` up, deleted on the way
    out, which must leave no process in it (whatever runs there is the test's to end)."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
        assert ip("netns", "pids", name).split() == [], f"processes left in {name}"
    finally:
        ip("netns", "delete", name)
    assert name not in namespaces()


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with ``lo`` up and a bridge ``br0`` (MTU 1450, up)."""
    with namespace("kvs-net") as name:
        inside = ("-n", name)
        ip(*inside, "link", "add", "br0", "type", "bridge")
        # Set after creation, the MTU is the operator's: ports joining or leaving the
        # bridge no longer change it.
        ip(*inside, "link", "set", "br0", "mtu", "1450", "up")
        yield name


def add_ipv6_uplink(netns: str) -> None:
    """up0 (a veth) carries the namespace's IPv6 default route: the proxy NDP uplink."""
    inside = ("-n", netns)
    ip(*inside, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    ip(*inside, "link", "set", "up0", "up")
    ip(*inside, "link", "set", "up1", "up")
    ip(*inside, "-6", "address", "add", "fd00:1::1/64", "dev", "up0", "nodad")
    ip(*inside, "-6", "route", "add", "default", "via", "fd00:1::2", "dev", "up0")


def run_scenario(netns: str, scenario: str) -> dict[str, Any]:
    """Run `scenario` of netdriver.py inside `netns` on both backends: {backend: result}."""
    # Warnings are errors, ResourceWarning included: an unclosed netlink socket or event
    # loop shows on stderr ("Exception ignored in ...") and fails the test.
    code = (
        "import runpy, warnings; warnings.simplefilter('error'); "
        f"runpy.run_path({str(DRIVER)!r}, run_name='__main__')"
    )
    result = run_python(code, scenario, prefix=("ip", "netns", "exec", netns))
    assert result.stderr == ""
    found: dict[str, Any] = json.loads(result.stdout)
    return found
