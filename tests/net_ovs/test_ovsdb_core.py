"""The sans-IO OVSDB core: stream framing in random chunks, requests, replies, echo,
errors; and the transact op builders and result checking."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import ovsdb
from protocols.ovsdb import (
    NEED_DATA,
    ConnectionClosed,
    ConnectionState,
    Echo,
    JSONStreamSplitter,
    LocalProtocolError,
    Notification,
    OVSDBProtocol,
    ProtocolError,
    Reply,
    TransactError,
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
OBJECTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)


def feed_in_chunks(splitter: JSONStreamSplitter, data: bytes, cuts: list[int]) -> list[bytes]:
    messages: list[bytes] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > start:
            messages.extend(splitter.feed(data[start:cut]))
            start = cut
    return messages


@given(
    st.lists(OBJECTS, max_size=6),
    st.lists(st.sampled_from(["", " ", "\n", "\r\n\t"]), min_size=6, max_size=6),
    st.data(),
)
def test_concatenated_objects_split_in_any_chunks(
    objects: list[dict[str, Any]], separators: list[str], data: st.DataObject
) -> None:
    # json.dumps escapes quotes and backslashes and may put brackets inside strings.
    stream = "".join(
        json.dumps(obj) + sep for obj, sep in zip(objects, separators, strict=False)
    ).encode()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    messages = feed_in_chunks(JSONStreamSplitter(), stream, cuts)
    assert [json.loads(message) for message in messages] == objects


def test_byte_at_a_time_with_brackets_and_escapes_in_strings() -> None:
    stream = b'{"a":"}{][\\"\\\\"}{"b":[{"c":"\\\\"}]}'
    splitter = JSONStreamSplitter()
    messages = feed_in_chunks(splitter, stream, list(range(len(stream))))
    assert messages == [b'{"a":"}{][\\"\\\\"}', b'{"b":[{"c":"\\\\"}]}']
    assert not splitter.holds_partial_message


@pytest.mark.parametrize("stream", [b"[1]", b"  42", b'"x"', b"{}x"])
def test_non_object_at_top_level_is_a_protocol_error(stream: bytes) -> None:
    with pytest.raises(ProtocolError, match="expected a JSON object"):
        JSONStreamSplitter().feed(stream)


def test_over_long_message_is_refused_before_it_ends() -> None:
    splitter = JSONStreamSplitter(max_message_bytes=16)
    with pytest.raises(ProtocolError, match="longer than 16 bytes"):
        splitter.feed(b'{"a":"' + b"x" * 32)


def test_request_and_reply_by_id() -> None:
    protocol = OVSDBProtocol()
    first, data = protocol.send_request("list_dbs", [])
    assert json.loads(data) == {"method": "list_dbs", "params": [], "id": first}
    second, _ = protocol.send_request("get_schema", ["Open_vSwitch"])
    assert second != first
    protocol.receive_data(b'{"id":%d,"result":{"x":1},"error":null}' % second)
    protocol.receive_data(b' {"id":%d,"result":null,"error":"unknown database"}' % first)
    assert protocol.next_event() == Reply(second, {"x": 1}, None)
    assert protocol.next_event() == Reply(first, None, "unknown database")
    assert protocol.next_event() is NEED_DATA


def test_echo_is_answered_with_its_params_and_id() -> None:
    protocol = OVSDBProtocol()
    protocol.receive_data(b'{"method":"echo","params":["x",1],"id":"echo"}')
    echo = protocol.next_event()
    assert echo == Echo("echo", ["x", 1])
    assert isinstance(echo, Echo)
    answer = json.loads(protocol.answer_echo(echo))
    assert answer == {"result": ["x", 1], "error": None, "id": "echo"}


def test_notification_has_a_null_id() -> None:
    protocol = OVSDBProtocol()
    protocol.receive_data(b'{"method":"update","params":[null,{}],"id":null}')
    assert protocol.next_event() == Notification("update", [None, {}])


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b'{"id":7,"result":1,"error":null}', "never sent"),
        (b'{"id":1,"result":1}', "without result and error"),
        (b'{"method":"lock","params":["x"],"id":3}', "unexpected request 'lock'"),
        (b'{"method":"echo","params":{},"id":3}', "params array"),
        (b'{"id":1,"result":tru}', "malformed"),
    ],
)
def test_unexpected_messages_break_the_connection(message: bytes, reason: str) -> None:
    protocol = OVSDBProtocol()
    protocol.send_request("list_dbs", [])
    protocol.receive_data(message)
    with pytest.raises(ProtocolError, match=reason):
        protocol.next_event()
    assert protocol.state is ConnectionState.BROKEN
    with pytest.raises(ProtocolError):
        protocol.next_event()


def test_a_reply_is_matched_once() -> None:
    protocol = OVSDBProtocol()
    request_id, _ = protocol.send_request("list_dbs", [])
    reply = b'{"id":%d,"result":[],"error":null}' % request_id
    protocol.receive_data(reply + reply)
    assert isinstance(protocol.next_event(), Reply)
    with pytest.raises(ProtocolError, match="never sent"):
        protocol.next_event()


def test_end_of_file() -> None:
    protocol = OVSDBProtocol()
    protocol.receive_data(b"")
    assert protocol.next_event() == ConnectionClosed()
    assert protocol.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError):
        protocol.receive_data(b"{}")
    with pytest.raises(LocalProtocolError):
        protocol.send_request("list_dbs", [])


def test_end_of_file_inside_a_message() -> None:
    protocol = OVSDBProtocol()
    protocol.receive_data(b'{"id":1,')
    protocol.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a message"):
        protocol.next_event()


def test_add_port_transaction_shape() -> None:
    ops = [
        ovsdb.wait_rows("Bridge", [("name", "==", "br0")], ["name"], [{"name": "br0"}]),
        ovsdb.insert("Interface", {"name": "tap0"}, uuid_name="iface"),
        ovsdb.insert(
            "Port",
            {"name": "tap0", "interfaces": ovsdb.named_uuid("iface"), "tag": 100},
            uuid_name="port",
        ),
        ovsdb.mutate(
            "Bridge",
            [("name", "==", "br0")],
            [("ports", "insert", ovsdb.oset([ovsdb.named_uuid("port")]))],
        ),
    ]
    assert json.loads(msgspec.json.encode(ops)) == [
        {
            "op": "wait",
            "timeout": 0,
            "table": "Bridge",
            "where": [["name", "==", "br0"]],
            "columns": ["name"],
            "until": "==",
            "rows": [{"name": "br0"}],
        },
        {"op": "insert", "table": "Interface", "row": {"name": "tap0"}, "uuid-name": "iface"},
        {
            "op": "insert",
            "table": "Port",
            "row": {"name": "tap0", "interfaces": ["named-uuid", "iface"], "tag": 100},
            "uuid-name": "port",
        },
        {
            "op": "mutate",
            "table": "Bridge",
            "where": [["name", "==", "br0"]],
            "mutations": [["ports", "insert", ["set", [["named-uuid", "port"]]]]],
        },
    ]


def test_transact_results_are_returned_when_all_succeeded() -> None:
    ops = [ovsdb.select("Port", []), ovsdb.delete("Port", [])]
    result = [{"rows": []}, {"count": 0}]
    assert ovsdb.check_transact_result(ops, result) == result


def test_failed_operation_is_named_by_index() -> None:
    ops = [ovsdb.select("Port", []), ovsdb.comment("x")]
    result = [{"error": "timed out", "details": "wait"}, None]
    with pytest.raises(TransactError, match="operation 0: timed out: wait") as caught:
        ovsdb.check_transact_result(ops, result)
    assert caught.value.op_index == 0


def test_failed_commit_has_no_index() -> None:
    ops = [ovsdb.comment("x")]
    result = [{}, {"error": "constraint violation", "details": "duplicate name"}]
    with pytest.raises(TransactError, match="commit: constraint violation") as caught:
        ovsdb.check_transact_result(ops, result)
    assert caught.value.op_index is None


@pytest.mark.parametrize("result", [{"rows": []}, [1], [{}]])
def test_malformed_transact_result(result: Any) -> None:
    with pytest.raises(ProtocolError):
        ovsdb.check_transact_result([ovsdb.comment("a"), ovsdb.comment("b")], result)
