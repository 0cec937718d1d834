"""The netlink interface in this process, on both backends: read-only lookups, nothing
changes in the host's namespace."""

from __future__ import annotations

import pytest

from supervisor.net.netlink import Device, Netlink, devices


@pytest.mark.anyio
async def test_lookups_on_one_socket() -> None:
    async with Netlink() as netlink:
        loopback = await netlink.link("lo")
        missing = await netlink.link("no-such-if0")
    assert loopback is not None
    assert (loopback.index, loopback.name, loopback.kind, loopback.master) == (1, "lo", None, None)
    assert missing is None
    assert Device(index=1, name="lo") in devices()
