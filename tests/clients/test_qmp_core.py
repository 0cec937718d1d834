"""The sans-IO QMP core, fed bytes directly: no sockets, no event loop."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.qmp import (
    DEFAULT_MAX_LINE_BYTES,
    NEED_DATA,
    ConnectionClosed,
    ConnectionState,
    ErrorReply,
    Event,
    Greeting,
    LocalProtocolError,
    ProtocolError,
    QMPEvent,
    QMPProtocol,
    QMPVersion,
    ReturnReply,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}\r\n'
)


def line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


def event_line(name: str, data: dict[str, object] | None = None) -> bytes:
    message: dict[str, object] = {"event": name, "timestamp": {"seconds": 5, "microseconds": 250}}
    if data is not None:
        message["data"] = data
    return line(message)


def drain(protocol: QMPProtocol) -> list[Event]:
    events: list[Event] = []
    while (event := protocol.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def negotiated() -> QMPProtocol:
    protocol = QMPProtocol()
    protocol.receive_data(GREETING)
    drain(protocol)
    command_id, _ = protocol.send_command("qmp_capabilities", {"enable": ["oob"]})
    protocol.receive_data(line({"return": {}, "id": command_id}))
    drain(protocol)
    return protocol


def test_greeting_then_negotiation_reaches_ready() -> None:
    protocol = QMPProtocol()
    assert protocol.state is ConnectionState.AWAITING_GREETING
    assert protocol.next_event() is NEED_DATA

    protocol.receive_data(GREETING)
    assert protocol.next_event() == Greeting(
        QMPVersion(7, 2, 22, "Debian 1:7.2+dfsg-7"), capabilities=("oob",)
    )
    assert protocol.state is ConnectionState.NEGOTIATING

    command_id, data = protocol.send_command("qmp_capabilities", {"enable": ["oob"]})
    assert json.loads(data) == {
        "execute": "qmp_capabilities",
        "id": command_id,
        "arguments": {"enable": ["oob"]},
    }
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    protocol.receive_data(line({"return": {}, "id": command_id}))
    assert protocol.next_event() == ReturnReply(command_id, {})
    assert protocol.state is ConnectionState.READY


def test_only_qmp_capabilities_precedes_negotiation() -> None:
    protocol = QMPProtocol()
    with pytest.raises(LocalProtocolError, match="before capabilities negotiation"):
        protocol.send_command("query-status")
    protocol.receive_data(GREETING)
    drain(protocol)
    with pytest.raises(LocalProtocolError, match="before capabilities negotiation"):
        protocol.send_command("query-status")
    protocol.send_command("qmp_capabilities")
    with pytest.raises(LocalProtocolError, match="already in flight"):
        protocol.send_command("qmp_capabilities")


def test_refused_negotiation_may_be_retried() -> None:
    protocol = QMPProtocol()
    protocol.receive_data(GREETING)
    drain(protocol)
    first_id, _ = protocol.send_command("qmp_capabilities", {"enable": ["bogus"]})
    refusal = {"id": first_id, "error": {"class": "GenericError", "desc": "no bogus"}}
    protocol.receive_data(line(refusal))
    assert protocol.next_event() == ErrorReply(first_id, "GenericError", "no bogus")
    assert protocol.state is ConnectionState.NEGOTIATING
    second_id, _ = protocol.send_command("qmp_capabilities")
    protocol.receive_data(line({"return": {}, "id": second_id}))
    assert protocol.next_event() == ReturnReply(second_id, {})
    assert protocol.state is ConnectionState.READY


def test_commands_omit_absent_arguments_and_get_fresh_ids() -> None:
    protocol = negotiated()
    first_id, first = protocol.send_command("query-status")
    second_id, second = protocol.send_command("stop", {})
    assert json.loads(first) == {"execute": "query-status", "id": first_id}
    assert json.loads(second) == {"execute": "stop", "id": second_id, "arguments": {}}
    assert first_id != second_id


def test_unencodable_arguments_raise_type_error_and_change_nothing() -> None:
    protocol = negotiated()
    with pytest.raises(TypeError):
        protocol.send_command("set-things", {"things": object()})
    command_id, _ = protocol.send_command("query-status")
    protocol.receive_data(line({"return": {"status": "paused"}, "id": command_id}))
    assert protocol.next_event() == ReturnReply(command_id, {"status": "paused"})


def test_replies_errors_and_events_in_any_order() -> None:
    protocol = negotiated()
    first_id, _ = protocol.send_command("query-status")
    second_id, _ = protocol.send_command("nope")
    protocol.receive_data(
        event_line("STOP")
        + line({"id": second_id, "error": {"class": "CommandNotFound", "desc": "no nope"}})
        + event_line("RESUME", {"reason": "x"})
        + line({"return": [1, 2], "id": first_id})
    )
    assert drain(protocol) == [
        QMPEvent("STOP", {}, 5.00025),
        ErrorReply(second_id, "CommandNotFound", "no nope"),
        QMPEvent("RESUME", {"reason": "x"}, 5.00025),
        ReturnReply(first_id, [1, 2]),
    ]


def test_unknown_members_are_ignored() -> None:
    protocol = QMPProtocol()
    protocol.receive_data(
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "",'
        b' "future": 1}, "capabilities": [], "extra": true}, "more": null}\n'
    )
    assert isinstance(protocol.next_event(), Greeting)
    command_id, _ = protocol.send_command("qmp_capabilities")
    protocol.receive_data(line({"return": {}, "id": command_id, "trace": "abc"}))
    assert protocol.next_event() == ReturnReply(command_id, {})
    protocol.receive_data(b'{"event": "X", "timestamp": {"seconds": 1, "microseconds": 0},')
    protocol.receive_data(b' "data": {}, "origin": "iothread"}\n')
    assert protocol.next_event() == QMPEvent("X", {}, 1.0)


def test_events_before_the_greeting_are_returned() -> None:
    protocol = QMPProtocol()
    protocol.receive_data(event_line("EARLY") + GREETING)
    assert drain(protocol) == [
        QMPEvent("EARLY", {}, 5.00025),
        Greeting(QMPVersion(7, 2, 22, "Debian 1:7.2+dfsg-7"), ("oob",)),
    ]


def test_a_late_reply_is_still_recognised() -> None:
    """The core keeps expecting replies its caller gave up on: they are not errors."""
    protocol = negotiated()
    abandoned_id, _ = protocol.send_command("query-version")
    later_id, _ = protocol.send_command("query-status")
    protocol.receive_data(line({"return": {"v": 1}, "id": abandoned_id}))
    protocol.receive_data(line({"return": {"s": 1}, "id": later_id}))
    assert drain(protocol) == [
        ReturnReply(abandoned_id, {"v": 1}),
        ReturnReply(later_id, {"s": 1}),
    ]


def test_clean_end_of_file() -> None:
    protocol = negotiated()
    protocol.receive_data(b"")
    assert protocol.next_event() == ConnectionClosed()
    assert protocol.next_event() == ConnectionClosed()
    assert protocol.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError):
        protocol.send_command("query-status")
    with pytest.raises(LocalProtocolError):
        protocol.receive_data(b"{}\n")


def test_end_of_file_in_the_middle_of_a_message() -> None:
    protocol = negotiated()
    command_id, _ = protocol.send_command("query-status")
    protocol.receive_data(b'{"return": {"status": "pau", "id": %d' % command_id)
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a message"):
        protocol.next_event()
    assert protocol.state is ConnectionState.BROKEN


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"garbage\n", "malformed message"),
        (b'{"return": {"status": \n', "malformed message"),
        (b"[1, 2]\n", "malformed message"),
        (b'{"return": {}, "id": "not-ours"}\n', "malformed message"),
        (b"\n", "malformed message"),
        (b'{"hello": 1}\n', "unrecognised message"),
        (b'{"return": {}}\n', "reply without an id"),
        (b'{"return": {}, "id": 999}\n', "never sent"),
        (b'{"event": "STOP"}\n', "without a timestamp"),
        (
            b'{"error": {"class": "GenericError", "desc": "Invalid JSON syntax"}}\n',
            "without an id, QEMU could not parse our input: GenericError: Invalid JSON",
        ),
        (GREETING, "second greeting"),
    ],
)
def test_protocol_errors_break_the_connection(data: bytes, reason: str) -> None:
    protocol = negotiated()
    protocol.receive_data(data)
    with pytest.raises(ProtocolError, match=reason):
        protocol.next_event()
    assert protocol.state is ConnectionState.BROKEN
    with pytest.raises(ProtocolError, match=reason):
        protocol.next_event()
    with pytest.raises(LocalProtocolError):
        protocol.send_command("query-status")


def test_a_reply_before_the_greeting_is_a_protocol_error() -> None:
    protocol = QMPProtocol()
    protocol.receive_data(b'{"return": {}, "id": 0}\n')
    with pytest.raises(ProtocolError, match="before the greeting"):
        protocol.next_event()


def test_an_overlong_line_fails_before_its_end_arrives() -> None:
    protocol = QMPProtocol(max_line_bytes=1000)
    protocol.receive_data(b'{"QMP": "' + b"x" * 990)
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"x" * 20)
    with pytest.raises(ProtocolError, match="longer than 1000 bytes"):
        protocol.next_event()


def test_an_overlong_complete_line_is_refused() -> None:
    protocol = QMPProtocol(max_line_bytes=1000)
    protocol.receive_data(b'{"QMP": "' + b"x" * 1000 + b'"}\n')
    with pytest.raises(ProtocolError, match="longer than 1000 bytes"):
        protocol.next_event()


def test_a_line_of_the_maximum_length_is_accepted() -> None:
    protocol = negotiated()
    command_id, _ = protocol.send_command("query-qmp-schema")
    prefix = b'{"id": %d, "return": "' % command_id
    padding = DEFAULT_MAX_LINE_BYTES - len(prefix) - len(b'"}')
    protocol.receive_data(prefix + b"s" * padding + b'"}\n')
    event = protocol.next_event()
    assert isinstance(event, ReturnReply)
    assert len(event.value) == padding


# A whole session, as QEMU would send it, and the events the core must make of it.
SESSION_IDS = range(6)
SESSION = (
    event_line("BEFORE_GREETING")
    + GREETING
    + line({"return": {}, "id": 0})
    + event_line("RESUME")
    + line({"return": {"status": "running", "ünïcode": "✓"}, "id": 1})
    + line({"id": 2, "error": {"class": "CommandNotFound", "desc": "The command x"}})
    + event_line("STOP", {"nested": {"list": [1, 2.5, None, True]}})
    + line({"return": [{"name": "n" * 3000}], "id": 4})
    + line({"return": {}, "id": 3})
    + line({"return": {}, "id": 5})
)
SESSION_EVENTS: list[Event] = [
    QMPEvent("BEFORE_GREETING", {}, 5.00025),
    Greeting(QMPVersion(7, 2, 22, "Debian 1:7.2+dfsg-7"), ("oob",)),
    ReturnReply(0, {}),
    QMPEvent("RESUME", {}, 5.00025),
    ReturnReply(1, {"status": "running", "ünïcode": "✓"}),
    ErrorReply(2, "CommandNotFound", "The command x"),
    QMPEvent("STOP", {"nested": {"list": [1, 2.5, None, True]}}, 5.00025),
    ReturnReply(4, [{"name": "n" * 3000}]),
    ReturnReply(3, {}),
    ReturnReply(5, {}),
    ConnectionClosed(),
]


def run_session(chunks: list[bytes]) -> list[Event]:
    protocol = QMPProtocol()
    events: list[Event] = []
    for chunk in [*chunks, b""]:
        protocol.receive_data(chunk)
        while (event := protocol.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
            if isinstance(event, Greeting):
                assert protocol.send_command("qmp_capabilities")[0] == 0
            elif isinstance(event, ReturnReply) and event.id == 0:
                assert [protocol.send_command("x")[0] for _ in SESSION_IDS[1:]] == [1, 2, 3, 4, 5]
    return events


def test_session_fed_one_byte_at_a_time() -> None:
    assert run_session([SESSION[i : i + 1] for i in range(len(SESSION))]) == SESSION_EVENTS


def test_session_fed_whole() -> None:
    assert run_session([SESSION]) == SESSION_EVENTS


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=40))
def test_session_fed_in_random_chunks(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SESSION)]
    # b"" would mean end of file.
    chunks = [SESSION[start:end] for start, end in itertools.pairwise(bounds) if end > start]
    assert run_session(chunks) == SESSION_EVENTS
