"""The sans-IO HMP framing, fed bytes the way QEMU 7.2's monitor writes them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.hmp import (
    MAX_COMMAND_BYTES,
    NEED_DATA,
    Banner,
    Closed,
    Event,
    HMPConnection,
    HMPProtocolError,
    Reply,
    clean_output,
    encode_command,
    is_error_output,
)

BANNER = b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "


def echo(command: str) -> bytes:
    """What QEMU's line editor prints while reading ``command\\n``: a redraw per byte."""
    data = command.encode()
    redraws = [b"\x1b[D" * index + data[: index + 1] + b"\x1b[K" for index in range(len(data))]
    return b"".join(redraws) + b"\r\n"


def reply(command: str, output: str) -> bytes:
    """The monitor's bytes for one command: echo, output (CRLF line ends), prompt."""
    body = "".join(f"{line}\r\n" for line in output.split("\n")) if output else ""
    return echo(command) + body.encode() + b"(qemu) "


def events(connection: HMPConnection) -> list[Event]:
    found: list[Event] = []
    while (event := connection.next_event()) is not NEED_DATA:
        found.append(event)
        if isinstance(event, Closed):
            break
    return found


def connected() -> HMPConnection:
    connection = HMPConnection()
    connection.receive_data(BANNER)
    assert events(connection) == [Banner("QEMU 7.2.22 monitor - type 'help' for more information")]
    return connection


def test_banner_then_reply() -> None:
    connection = connected()
    assert connection.send_command("info status") == b"info status\n"
    assert connection.replies_pending == 1
    assert events(connection) == []
    connection.receive_data(reply("info status", "VM status: paused (prelaunch)"))
    assert events(connection) == [Reply("info status", "VM status: paused (prelaunch)")]
    assert connection.replies_pending == 0


def test_real_capture_of_info_status() -> None:
    """Bytes captured from QEMU 7.2.22's monitor socket, verbatim."""
    captured = (
        b"i\x1b[K\x1b[Din\x1b[K\x1b[D\x1b[Dinf\x1b[K\x1b[D\x1b[D\x1b[Dinfo\x1b[K\x1b[D\x1b[D"
        b"\x1b[D\x1b[Dinfo \x1b[K\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dinfo s\x1b[K\x1b[D\x1b[D\x1b[D"
        b"\x1b[D\x1b[D\x1b[Dinfo st\x1b[K\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dinfo sta"
        b"\x1b[K\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dinfo stat\x1b[K\x1b[D\x1b[D"
        b"\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dinfo statu\x1b[K\x1b[D\x1b[D\x1b[D\x1b[D"
        b"\x1b[D\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dinfo status\x1b[K\r\n"
        b"VM status: paused (prelaunch)\r\n(qemu) "
    )
    assert captured == reply("info status", "VM status: paused (prelaunch)")


def test_command_without_output() -> None:
    connection = connected()
    connection.send_command("stop")
    connection.receive_data(reply("stop", ""))
    assert events(connection) == [Reply("stop", "")]


def test_empty_command() -> None:
    connection = connected()
    assert connection.send_command("") == b"\n"
    connection.receive_data(b"\r\n(qemu) ")
    assert events(connection) == [Reply("", "")]


def test_multiline_output_keeps_lines_and_drops_final_newline() -> None:
    connection = connected()
    connection.send_command("info migrate")
    connection.receive_data(reply("info migrate", "globals:\nstore-global-state: on"))
    assert events(connection) == [Reply("info migrate", "globals:\nstore-global-state: on")]


def test_prompt_inside_a_line_is_output() -> None:
    """The monitor quotes what it was sent, so a command can put the prompt mid-line."""
    connection = connected()
    command = "x(qemu) y"
    connection.send_command(command)
    connection.receive_data(reply(command, "unknown command: 'x(qemu) y'"))
    assert events(connection) == [Reply(command, "unknown command: 'x(qemu) y'")]


def test_pipelined_commands_are_answered_in_order() -> None:
    connection = connected()
    connection.send_command("info status")
    connection.send_command("print 2")
    connection.receive_data(reply("info status", "VM status: running") + reply("print 2", "0x2"))
    assert events(connection) == [
        Reply("info status", "VM status: running"),
        Reply("print 2", "0x2"),
    ]


def test_abandoned_reply_is_marked_not_given_to_the_next_command() -> None:
    connection = connected()
    connection.send_command("info status")
    connection.abandon_pending()
    assert connection.abandoned_pending
    connection.send_command("info cpus")
    assert not events(connection)
    connection.receive_data(reply("info status", "VM status: paused"))
    assert events(connection) == [Reply("info status", "VM status: paused", abandoned=True)]
    assert not connection.abandoned_pending
    connection.receive_data(reply("info cpus", "* CPU #0: thread_id=1"))
    assert events(connection) == [Reply("info cpus", "* CPU #0: thread_id=1")]


def test_bytes_received_while_idle_are_not_taken_for_the_next_reply() -> None:
    connection = connected()
    connection.receive_data(b"something unasked\r\n")
    assert events(connection) == []
    connection.send_command("print 1")
    connection.receive_data(reply("print 1", "0x1"))
    assert events(connection) == [Reply("print 1", "0x1")]


def test_echo_is_never_buffered() -> None:
    """The echo of a long command is quadratic (33 MB for 4095 bytes): it must not count
    against the reply limit."""
    connection = HMPConnection(max_reply_bytes=100)
    connection.receive_data(BANNER)
    events(connection)
    command = "print " + "1" * 200
    connection.send_command(command)
    connection.receive_data(reply(command, "0x1"))
    assert events(connection) == [Reply(command, "0x1")]


def test_reply_over_the_limit_is_a_protocol_error_for_good() -> None:
    connection = HMPConnection(max_reply_bytes=100)
    connection.receive_data(BANNER)
    events(connection)
    connection.send_command("help")
    # 106 bytes could still be 99 of output and a prompt: not yet known to be too long.
    connection.receive_data(echo("help") + b"x" * 106)
    assert connection.next_event() is NEED_DATA
    connection.receive_data(b"x")
    with pytest.raises(HMPProtocolError, match="exceeds 100 bytes"):
        connection.next_event()
    with pytest.raises(HMPProtocolError):
        connection.next_event()


def test_complete_reply_over_the_limit_is_refused_too() -> None:
    connection = HMPConnection(max_reply_bytes=100)
    connection.receive_data(BANNER)
    events(connection)
    connection.send_command("help")
    connection.receive_data(reply("help", "y" * 99))
    with pytest.raises(HMPProtocolError, match="exceeds 100 bytes"):
        connection.next_event()


def test_reply_at_the_limit_is_accepted() -> None:
    connection = HMPConnection(max_reply_bytes=100)
    connection.receive_data(BANNER)
    events(connection)
    connection.send_command("help")
    output = "y" * 98
    connection.receive_data(reply("help", output))
    assert events(connection) == [Reply("help", output)]


@given(
    lines=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6),
    cut_fractions=st.lists(st.floats(min_value=0, max_value=1), max_size=20),
)
def test_the_limit_does_not_depend_on_chunking(
    lines: list[int], cut_fractions: list[float]
) -> None:
    output = "\n".join("z" * size for size in lines)
    data = BANNER + reply("info mtree", output)
    output_bytes = len(reply("info mtree", output)) - len(echo("info mtree")) - len(b"(qemu) ")
    connection = HMPConnection(max_reply_bytes=60)
    connection.send_command("info mtree")
    cuts = [int(fraction * len(data)) for fraction in cut_fractions]
    if output_bytes > 60:
        with pytest.raises(HMPProtocolError):
            feed_in_chunks(connection, data, cuts)
    else:
        assert feed_in_chunks(connection, data, cuts)[1:] == [Reply("info mtree", output)]


@pytest.mark.parametrize(
    "greeting", [b'{"QMP": {"version": {}}}\r\n', b"(qemu) ", b"SSH-2.0-OpenSSH_9.2\r\n"]
)
def test_peer_that_is_not_a_monitor_is_refused(greeting: bytes) -> None:
    connection = HMPConnection()
    connection.receive_data(greeting)
    with pytest.raises(HMPProtocolError, match="not a QEMU human monitor"):
        connection.next_event()


def test_peer_is_refused_at_its_first_byte_off_the_banner() -> None:
    connection = HMPConnection()
    connection.receive_data(b"QE")
    assert connection.next_event() is NEED_DATA
    connection.receive_data(b"MP")
    with pytest.raises(HMPProtocolError, match="'QEMP'"):
        connection.next_event()


def test_end_of_stream_after_the_replies() -> None:
    connection = connected()
    connection.send_command("quit")
    connection.receive_data(echo("quit"))
    connection.receive_data(b"")
    assert events(connection) == [Closed()]
    assert connection.replies_pending == 1
    assert connection.next_event() == Closed()


def test_end_of_stream_before_the_banner() -> None:
    connection = HMPConnection()
    connection.receive_data(b"QEMU 7.2")
    connection.receive_data(b"")
    assert events(connection) == [Closed()]


def test_data_after_end_of_stream_is_a_caller_bug() -> None:
    connection = HMPConnection()
    connection.receive_data(b"")
    with pytest.raises(RuntimeError):
        connection.receive_data(b"x")


@pytest.mark.parametrize(
    "command", ["info\nstatus", "info status\r", "info\tst", "a\x1b[A", "\x7f"]
)
def test_control_characters_are_refused(command: str) -> None:
    connection = connected()
    with pytest.raises(ValueError, match="control character"):
        connection.send_command(command)
    assert connection.replies_pending == 0


def test_commands_longer_than_the_line_editor_are_refused() -> None:
    assert encode_command("p" * MAX_COMMAND_BYTES) == b"p" * MAX_COMMAND_BYTES + b"\n"
    with pytest.raises(ValueError, match="4096 bytes long"):
        encode_command("p" * (MAX_COMMAND_BYTES + 1))
    with pytest.raises(ValueError, match="bytes long"):
        encode_command("é" * (MAX_COMMAND_BYTES // 2 + 1))


def test_clean_output_removes_terminal_controls() -> None:
    assert clean_output(b"a\x1b[K\x1b[Db\x1b7\tc\r\nd\x07\r\n") == "ab\tc\nd"
    assert clean_output(b"caf\xc3\xa9 \xff\r\n") == "café \ufffd"


@pytest.mark.parametrize(
    "output",
    [
        "unknown command: 'foo'",
        "unknown command: 'info blah'",
        "Error: 'foo' is not a valid device model name",
        "Error: Parameter 'downtime-limit' expects a number\nOptional suffix k, M, G",
        'unexpected end of expression\nTry "help balloon" for more information',
        "Device 'x' not found",
        "Could not open '/nonexistent': No such file or directory",
        "invalid parameter: nokey",
    ],
)
def test_error_messages_are_recognised(output: str) -> None:
    assert is_error_output(output)


@pytest.mark.parametrize(
    "output",
    [
        "",
        "VM status: paused (prelaunch)",
        "* CPU #0: thread_id=7087",
        "info status  -- show the current VM status (running|paused)",
        "0x1",
        "globals:\nstore-global-state: on\nError: is not at the start",
    ],
)
def test_ordinary_output_is_not_an_error(output: str) -> None:
    assert not is_error_output(output)


def feed_in_chunks(connection: HMPConnection, data: bytes, cuts: list[int]) -> list[Event]:
    found: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > start:
            connection.receive_data(data[start:cut])
            found.extend(events(connection))
            start = cut
    return found


_printable = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("é(qemu) "),
    max_size=30,
)
# Only the monitor starts a line with its prompt.
_output_line = _printable.filter(lambda line: not line.startswith("(qemu) "))


@given(
    exchanges=st.lists(
        st.tuples(_printable, st.lists(_output_line, max_size=4).map("\n".join)), max_size=6
    ),
    cut_fractions=st.lists(st.floats(min_value=0, max_value=1), max_size=40),
)
def test_random_chunking_gives_the_same_replies(
    exchanges: list[tuple[str, str]], cut_fractions: list[float]
) -> None:
    connection = HMPConnection()
    data = BANNER
    for command, _ in exchanges:
        connection.send_command(command)
    for command, output in exchanges:
        data += reply(command, output)
    cuts = [int(fraction * len(data)) for fraction in cut_fractions]
    found = feed_in_chunks(connection, data, cuts)
    assert found[0] == Banner("QEMU 7.2.22 monitor - type 'help' for more information")
    assert found[1:] == [Reply(command, output) for command, output in exchanges]


def test_byte_at_a_time() -> None:
    exchanges = [("info status", "VM status: running"), ("", ""), ("print 7", "0x7")]
    connection = HMPConnection()
    data = BANNER
    for command, output in exchanges:
        connection.send_command(command)
        data += reply(command, output)
    found = feed_in_chunks(connection, data, list(range(len(data))))
    assert found[1:] == [Reply(command, output) for command, output in exchanges]
