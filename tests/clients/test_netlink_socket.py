"""The netlink socket against the kernel (read-only requests about ``lo``), on both
backends, and its faults: a request cancelled while it waits, a datagram too long."""

from __future__ import annotations

import errno
import socket

import anyio
import pytest

from protocols.netlink import NetlinkError, NetlinkSocket, ProtocolError, route

pytestmark = pytest.mark.anyio


async def test_a_get_and_a_refusal_on_one_socket() -> None:
    async with route.route_socket() as netlink:
        (reply,) = await netlink.request(route.link_get(name="lo"))
        with pytest.raises(NetlinkError) as caught:
            await netlink.request(route.link_get(name="no-such-if0"))
        (again,) = await netlink.request(route.link_get(index=1))
    loopback = route.parse_link(reply)
    assert (loopback.index, loopback.name, loopback.kind, loopback.master) == (1, "lo", None, None)
    assert loopback.mtu >= 1280
    assert route.parse_link(again) == loopback
    assert caught.value.errno == errno.ENODEV


async def test_a_dump_filtered_by_the_kernel() -> None:
    async with route.route_socket() as netlink:
        replies = await netlink.request(route.address_dump(1), dump=True)
    addresses = [route.parse_address(reply) for reply in replies]
    assert {address.index for address in addresses} == {1}
    assert "127.0.0.1" in {address.local or address.address for address in addresses}


async def test_a_request_cancelled_while_it_waits_closes_the_socket() -> None:
    """The reply may still come: the socket goes, and the next request gets a new one."""
    netlink = route.route_socket()
    silent, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # never answers
    silent.setblocking(False)
    netlink._socket = silent  # fault injection: the kernel's socket replaced
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(netlink.request, route.link_get(name="lo"))
            await anyio.wait_readable(peer)
            assert peer.recv(4096) != b""  # the request went out, and now it waits
            tg.cancel_scope.cancel()
        assert silent.fileno() == -1
        (reply,) = await netlink.request(route.link_get(name="lo"))
        assert route.parse_link(reply).name == "lo"
    finally:
        netlink.close()
        silent.close()
        peer.close()


async def test_a_datagram_longer_than_the_buffer_is_a_protocol_error() -> None:
    async with NetlinkSocket(socket.NETLINK_ROUTE) as netlink:
        netlink._buffer = bytearray(64)  # fault injection: a link reply is ~1.5 KB
        with pytest.raises(ProtocolError) as caught:
            await netlink.request(route.link_get(name="lo"))
        assert caught.value.errno == errno.EMSGSIZE
        assert netlink._socket is None
