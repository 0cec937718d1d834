"""Network interfaces of this host's network namespace, asked over netlink (pyroute2).

pyroute2's `AsyncIPRoute` runs on asyncio only, and its blocking `IPRoute` refuses to
run inside a running asyncio loop: under asyncio the lookup uses `AsyncIPRoute` on the
caller's loop (no thread); under trio it runs `IPRoute` in one of anyio's worker threads
(``anyio.to_thread``), the only thread the library ever uses.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterable
from typing import Any, Final

import anyio
from pyroute2 import AsyncIPRoute, IPRoute  # type: ignore[import-untyped]

__all__ = ["interface_addresses"]

#: ``IFA_F_SECONDARY``: an IPv4 address added after the interface's primary one.
_IFA_F_SECONDARY: Final = 0x01
#: ``RT_SCOPE_LINK``: an IPv6 link-local address, unusable without a zone index.
_RT_SCOPE_LINK: Final = 253


async def interface_addresses(name: str) -> tuple[list[str], list[str]]:
    """The IPv4 and IPv6 addresses of interface `name` that a server can bind to.

    IPv4: the primary address first, then the secondary ones. IPv6: the addresses of
    global (and host) scope; link-local ones need a zone index and are left out. Either
    list may be empty. Raises OSError (``ENODEV``) when there is no such interface.
    On cancellation under trio the lookup finishes in its thread and is discarded.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return await anyio.to_thread.run_sync(_blocking_lookup, name)
    async with AsyncIPRoute() as netlink:
        index = _only_index(name, await netlink.link_lookup(ifname=name))
        return _addresses([message async for message in await netlink.get_addr(index=index)])


def _blocking_lookup(name: str) -> tuple[list[str], list[str]]:
    with IPRoute() as netlink:
        index = _only_index(name, netlink.link_lookup(ifname=name))
        return _addresses(netlink.get_addr(index=index))


def _only_index(name: str, indexes: list[int]) -> int:
    if not indexes:
        raise OSError(errno.ENODEV, f"no network interface {name!r}")
    return indexes[0]


def _addresses(messages: Iterable[Any]) -> tuple[list[str], list[str]]:
    primary: list[str] = []
    secondary: list[str] = []
    ipv6: list[str] = []
    for message in messages:
        # IFA_LOCAL is the interface's own address; on a point-to-point link IFA_ADDRESS
        # is the peer's.
        address = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
        if address is None:
            continue
        if message["family"] == socket.AF_INET:
            secondary_flag = message["flags"] & _IFA_F_SECONDARY
            (secondary if secondary_flag else primary).append(str(address))
        elif message["family"] == socket.AF_INET6 and message["scope"] != _RT_SCOPE_LINK:
            ipv6.append(str(address))
    return primary + secondary, ipv6
