"""Network interfaces of this host's network namespace, asked over netlink
(`RouteSocket`)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any, Final

from pyroute2.netlink.rtnl import RTM_GETADDR  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # type: ignore[import-untyped]

from .rtnetlink import RouteSocket

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
    """
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise OSError(errno.ENODEV, f"no network interface {name!r}") from None
    request = ifaddrmsg()
    request["index"] = index  # the kernel dumps this interface's addresses only
    async with RouteSocket() as netlink:
        return _addresses(await netlink.dump(RTM_GETADDR, request))


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
