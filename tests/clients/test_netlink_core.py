"""The sans-IO netlink core: framing, sequence numbers, acks and errors, fed bytes."""

from __future__ import annotations

import errno
import struct

import pytest

from protocols.netlink import HEADER, NLM_F_CREATE, NLM_F_REPLACE, Exchange, NetlinkError, route
from protocols.netlink import ProtocolError as NetlinkProtocolError

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
#: An ``ifinfomsg`` worth of payload: what a link request or reply starts with.
BODY = bytes(16)


def reply(seq: int, msg_type: int = RTM_NEWLINK, payload: bytes = BODY, flags: int = 0) -> bytes:
    return HEADER.pack(HEADER.size + len(payload), msg_type, flags, seq, 4242) + payload


def ack(seq: int, error: int = 0, *, tlvs: bytes = b"", capped: bool = True) -> bytes:
    """The kernel's ``NLMSG_ERROR``: the error, the request's header (and its payload
    unless capped), then the extended ack's attributes."""
    echoed = reply(seq, payload=b"" if capped else BODY)
    flags = (NLM_F_CAPPED if capped else 0) | (NLM_F_ACK_TLVS if tlvs else 0)
    return reply(seq, NLMSG_ERROR, struct.pack("=i", error) + echoed + tlvs, flags)


def text_attr(attr_type: int, text: str) -> bytes:
    """An extended ack's string attribute (``struct nlattr``, padded to 4 bytes)."""
    payload = text.encode() + b"\0"
    padding = bytes(-len(payload) % 4)
    return struct.pack("=HH", 4 + len(payload), attr_type) + payload + padding


def done(seq: int, error: int = 0) -> bytes:
    return reply(seq, NLMSG_DONE, struct.pack("=i", error), NLM_F_MULTI)


def test_a_request_gets_its_flags_and_sequence_number_stamped() -> None:
    request = route.link_request(RTM_NEWLINK, 3, mtu=1500)
    sent = Exchange(7).request(request, NLM_F_CREATE | NLM_F_REPLACE)
    length, msg_type, flags, seq, pid = HEADER.unpack_from(sent)
    assert (length, msg_type, seq, pid) == (len(request), RTM_NEWLINK, 7, 0)
    assert flags == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    assert sent[HEADER.size :] == request[HEADER.size :]
    dumped = Exchange(8, dump=True).request(request)
    assert HEADER.unpack_from(dumped)[2] == NLM_F_REQUEST | NLM_F_DUMP


def test_a_request_whose_header_lies_about_its_length_is_refused() -> None:
    with pytest.raises(ValueError, match="the header says"):
        Exchange(1).request(route.link_request(RTM_NEWLINK, 3) + b"\0\0\0\0")


def test_a_change_ends_at_its_ack_with_no_replies() -> None:
    exchange = Exchange(3)
    exchange.receive(ack(3))
    assert exchange.done
    assert exchange.result() == []


def test_a_get_keeps_its_reply_whether_the_ack_comes_with_it_or_after() -> None:
    apart = Exchange(5)
    apart.receive(reply(5))
    assert not apart.done
    apart.receive(ack(5))
    together = Exchange(5)
    together.receive(reply(5) + ack(5))
    assert apart.result() == together.result() == [reply(5)]


def test_replies_of_another_sequence_number_are_skipped() -> None:
    """What an abandoned exchange left on the socket is never read as this one's."""
    exchange = Exchange(9)
    exchange.receive(reply(8) + ack(8, -errno.EBUSY))
    assert not exchange.done
    exchange.receive(reply(9) + ack(9))
    assert exchange.result() == [reply(9)]


def test_a_refusal_is_a_netlink_error_with_the_kernels_message() -> None:
    text = text_attr(1, "Device is not a bridge")  # NLMSGERR_ATTR_MSG
    offset = struct.pack("=HHI", 8, 2, 36)  # NLMSGERR_ATTR_OFFS: read past, not needed
    exchange = Exchange(4)
    exchange.receive(ack(4, -errno.EOPNOTSUPP, tlvs=offset + text))
    with pytest.raises(NetlinkError) as caught:
        exchange.result()
    assert caught.value.errno == errno.EOPNOTSUPP
    assert caught.value.detail == "Device is not a bridge"
    assert str(caught.value) == "[Errno 95] Operation not supported (Device is not a bridge)"
    assert isinstance(caught.value, OSError)


def test_an_uncapped_error_skips_the_echoed_request_before_its_message() -> None:
    exchange = Exchange(4)
    exchange.receive(ack(4, -errno.EINVAL, tlvs=text_attr(1, "mtu too big"), capped=False))
    with pytest.raises(NetlinkError, match="mtu too big"):
        exchange.result()


def test_a_refusal_without_an_extended_ack_has_the_bare_strerror() -> None:
    exchange = Exchange(4)
    exchange.receive(ack(4, -errno.ENODEV))
    with pytest.raises(NetlinkError) as caught:
        exchange.result()
    assert (caught.value.errno, caught.value.strerror) == (errno.ENODEV, "No such device")


def test_a_dump_collects_its_parts_until_done() -> None:
    exchange = Exchange(6, dump=True)
    exchange.receive(reply(6, flags=NLM_F_MULTI) + reply(6, flags=NLM_F_MULTI))
    exchange.receive(reply(6, flags=NLM_F_MULTI))
    assert not exchange.done
    exchange.receive(done(6))
    assert len(exchange.result()) == 3


def test_a_dump_that_fails_midway_is_a_netlink_error() -> None:
    exchange = Exchange(6, dump=True)
    exchange.receive(reply(6, flags=NLM_F_MULTI) + done(6, -errno.ENOENT))
    with pytest.raises(NetlinkError) as caught:
        exchange.result()
    assert caught.value.errno == errno.ENOENT


def test_keep_filters_replies_undecoded() -> None:
    wanted = reply(6, payload=b"\x0a" + bytes(15), flags=NLM_F_MULTI)
    other = reply(6, payload=b"\x02" + bytes(15), flags=NLM_F_MULTI)
    exchange = Exchange(6, dump=True, keep=lambda m: m[HEADER.size] == 0x0A)
    exchange.receive(other + wanted + other + done(6))
    assert exchange.result() == [wanted]


def test_more_replies_than_the_bound_break_the_exchange() -> None:
    exchange = Exchange(6, dump=True, max_replies=2)
    with pytest.raises(NetlinkProtocolError) as caught:
        exchange.receive(reply(6) * 3)
    assert caught.value.errno == errno.EMSGSIZE
    with pytest.raises(NetlinkProtocolError, match="broken"):
        exchange.receive(done(6))
    with pytest.raises(NetlinkProtocolError, match="broken"):
        exchange.result()


@pytest.mark.parametrize(
    "datagram",
    [
        pytest.param(HEADER.pack(8, RTM_NEWLINK, 0, 1, 0) + bytes(8), id="shorter-than-header"),
        pytest.param(HEADER.pack(64, RTM_NEWLINK, 0, 1, 0) + bytes(8), id="overruns-datagram"),
        pytest.param(reply(1, NLMSG_ERROR, b"\0\0"), id="error-without-its-error"),
    ],
)
def test_a_malformed_reply_is_a_protocol_error(datagram: bytes) -> None:
    exchange = Exchange(1)
    with pytest.raises(NetlinkProtocolError) as caught:
        exchange.receive(datagram)
    assert caught.value.errno == errno.EPROTO
    assert not exchange.done


def test_the_result_is_not_there_before_the_end() -> None:
    exchange = Exchange(1)
    exchange.receive(reply(1))
    with pytest.raises(NetlinkProtocolError, match="waiting"):
        exchange.result()


def test_sequence_numbers_wrap_past_zero() -> None:
    assert Exchange.next_seq(0) == 1
    assert Exchange.next_seq(41) == 42
    assert Exchange.next_seq(0xFFFFFFFF) == 1


def test_the_vlan_requests_carry_what_iproute2_sends() -> None:
    """This kernel has no bridge VLAN filtering, so these two reach no kernel that takes
    them in the tests: pyroute2's encoding of our requests is checked against iproute2's
    bytes instead, captured with ``strace -e write=3``
    (for port 3 and bridge 2), but for the header's flags and sequence number."""

    def unstamped(captured: str) -> bytes:
        data = bytearray.fromhex(captured)
        data[6:12] = bytes(6)
        return bytes(data)

    # bridge vlan add dev t0 vid 10 pvid untagged
    assert route.bridge_port_vlan(3, 10, 0x2 | 0x4) == unstamped(
        "2c000000 13000500 768c116b 00000000 07000000 03000000 00000000 00000000"
        "0c001a00 08000200 06000a00"
    )
    # ip link set br0 type bridge vlan_filtering 0; iproute2's kind has no NUL
    # ("bridge", length 10), ours has one (11): the same 12 bytes once padded.
    iproute2 = unstamped(
        "3c000000 10000500 758c116b 00000000 00000000 02000000 00000000 00000000"
        "1c001200 0a000100 62726964 67650000 0c000200 05000700 00000000"
    )
    ours = route.bridge_vlan_filtering(2, 0)
    assert ours[:36] + ours[38:] == iproute2[:36] + iproute2[38:]
    assert (ours[36], iproute2[36]) == (11, 10)
