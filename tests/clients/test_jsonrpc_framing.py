"""The control socket's line framer, fed byte at a time and in random chunks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.jsonrpc import DEFAULT_MAX_LINE_BYTES, LineFramer, Oversize


def feed_in_chunks(framer: LineFramer, data: bytes, cuts: list[int]) -> list[bytes | Oversize]:
    lines: list[bytes | Oversize] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > start:
            lines.extend(framer.feed(data[start:cut]))
            start = cut
    return lines


def test_lines_in_one_chunk() -> None:
    framer = LineFramer()
    assert framer.feed(b'{"a":1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert framer.feed(b":3}\n") == [b'{"c":3}']


def test_empty_lines_are_lines() -> None:
    assert LineFramer().feed(b"\n\r\nx\n") == [b"", b"\r", b"x"]


def test_byte_at_a_time() -> None:
    data = b'{"jsonrpc":"2.0","method":"m","id":1}\n\n[1,2]\n'
    framer = LineFramer()
    assert feed_in_chunks(framer, data, list(range(len(data)))) == [
        b'{"jsonrpc":"2.0","method":"m","id":1}',
        b"",
        b"[1,2]",
    ]


_line = st.binary(max_size=50).map(lambda data: data.replace(b"\n", b" "))


@given(
    lines=st.lists(_line, max_size=20),
    cut_fractions=st.lists(st.floats(min_value=0, max_value=1), max_size=30),
)
def test_random_chunking_gives_the_same_lines(
    lines: list[bytes], cut_fractions: list[float]
) -> None:
    data = b"".join(line + b"\n" for line in lines)
    cuts = [int(fraction * len(data)) for fraction in cut_fractions]
    assert feed_in_chunks(LineFramer(max_line_bytes=50), data, cuts) == lines


@given(
    short=st.lists(_line, max_size=5),
    long_size=st.integers(min_value=51, max_value=200),
    cut_fractions=st.lists(st.floats(min_value=0, max_value=1), max_size=30),
)
def test_random_chunking_reports_an_oversize_line_once_after_the_good_ones(
    short: list[bytes], long_size: int, cut_fractions: list[float]
) -> None:
    data = b"".join(line + b"\n" for line in short) + b"x" * long_size + b"\nlater\n"
    cuts = [int(fraction * len(data)) for fraction in cut_fractions]
    assert feed_in_chunks(LineFramer(max_line_bytes=50), data, cuts) == [*short, Oversize(50)]


def test_line_at_the_limit_passes_and_one_byte_more_does_not() -> None:
    framer = LineFramer(max_line_bytes=10)
    assert framer.feed(b"0123456789\n") == [b"0123456789"]
    assert framer.feed(b"0123456789A\n") == [Oversize(10)]


def test_oversize_is_reported_before_the_line_ends() -> None:
    framer = LineFramer(max_line_bytes=10)
    assert framer.feed(b"0123456789") == []
    assert framer.feed(b"A") == [Oversize(10)]
    # Where the next line starts is unknowable: everything after is discarded.
    assert framer.feed(b"rest\n{}\n") == []
    assert framer.feed(b"") == []


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 1024 * 1024
    framer = LineFramer()
    assert framer.feed(b"x" * DEFAULT_MAX_LINE_BYTES) == []
    assert framer.feed(b"\n") == [b"x" * DEFAULT_MAX_LINE_BYTES]
    assert framer.feed(b"y" * (DEFAULT_MAX_LINE_BYTES + 1)) == [Oversize(DEFAULT_MAX_LINE_BYTES)]


def test_end_of_stream_returns_an_unterminated_last_line() -> None:
    framer = LineFramer()
    assert framer.feed(b'{"a":1}\n{"b":') == [b'{"a":1}']
    assert framer.feed(b"2}") == []
    assert framer.feed(b"") == [b'{"b":2}']


def test_end_of_stream_after_a_complete_line_returns_nothing() -> None:
    framer = LineFramer()
    assert framer.feed(b"x\n") == [b"x"]
    assert framer.feed(b"") == []


def test_data_after_end_of_stream_is_a_caller_bug() -> None:
    framer = LineFramer()
    framer.feed(b"")
    with pytest.raises(RuntimeError):
        framer.feed(b"x")
