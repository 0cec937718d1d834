"""Network interfaces of this host's network namespace, asked over netlink."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Final

from protocols.netlink import route

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
    async with route.route_socket() as netlink:
        replies = await netlink.request(route.address_dump(index), dump=True)
    return _addresses(route.parse_address(reply) for reply in replies)


def _addresses(messages: Iterable[route.AddressReply]) -> tuple[list[str], list[str]]:
    primary: list[str] = []
    secondary: list[str] = []
    ipv6: list[str] = []
    for message in messages:
        # IFA_LOCAL is the interface's own address; on a point-to-point link IFA_ADDRESS
        # is the peer's.
        address = message.local or message.address
        if address is None:
            continue
        if message.family == socket.AF_INET:
            (secondary if message.flags & _IFA_F_SECONDARY else primary).append(address)
        elif message.family == socket.AF_INET6 and message.scope != _RT_SCOPE_LINK:
            ipv6.append(address)
    return primary + secondary, ipv6
