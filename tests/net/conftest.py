"""Network namespaces for the networking tests: each test gets its own, always deleted;
the host's own namespace must come out of the suite with the links it had."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_python

DRIVER = Path(__file__).with_name("netdriver.py")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _host_links() -> list[str]:
    return sorted(line.split(":")[1].strip() for line in ip("-o", "link").splitlines())


@pytest.fixture(scope="session", autouse=True)
def host_links_unchanged() -> Iterator[None]:
    """The tests work in namespaces of their own only: the host's links stay as they were."""
    before = _host_links()
    yield
    assert _host_links() == before


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with ``lo`` up and a bridge ``br0`` (MTU 1450, up)."""
    name = f"kvs-net-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        inside = ("-n", name)
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "link", "add", "br0", "type", "bridge")
        # Set after creation, the MTU is the operator's: ports joining or leaving the
        # bridge no longer change it.
        ip(*inside, "link", "set", "br0", "mtu", "1450", "up")
        yield name
    finally:
        ip("netns", "delete", name)


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
