"""The codec's answers to hostile lines: too deep, not UTF-8, too many, too slow."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from protocols.jsonrpc import (
    ErrorCode,
    ErrorResponse,
    LineFramer,
    Request,
    RPCError,
    decode_incoming,
    decode_params,
    line_timeout_response,
)


class NameParams(msgspec.Struct, forbid_unknown_fields=True):
    name: Any = None


def only_error(line: bytes, **kwargs: int) -> ErrorResponse:
    incoming = decode_incoming(line, **kwargs)
    assert not incoming.is_batch and len(incoming.items) == 1
    item = incoming.items[0]
    assert isinstance(item, ErrorResponse)
    return item


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000,
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"jsonrpc":"1.0","id":1,"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"[1," + b"[" * 50_000 + b"]" * 50_000 + b"]",
    ],
)
def test_nesting_too_deep_is_a_parse_error(line: bytes) -> None:
    error = only_error(line)
    assert (error.id, error.error.code) == (None, ErrorCode.PARSE_ERROR)
    assert error.error.message == "Parse error: JSON nested too deeply"


def test_a_batch_over_the_limit_is_one_invalid_request() -> None:
    member = b'{"jsonrpc":"2.0","id":1,"method":"m"}'
    error = only_error(b"[" + b",".join([member] * 11) + b"]", max_batch=10)
    assert (error.id, error.error.code) == (None, ErrorCode.INVALID_REQUEST)
    assert error.error.data == {"max_batch": 10}
    within = decode_incoming(b"[" + b",".join([member] * 10) + b"]", max_batch=10)
    assert within.is_batch and len(within.items) == 10


@pytest.mark.parametrize(
    "params", [b'{"name":"\xff"}', b'{"name":' + b"[" * 50_000 + b"]" * 50_000 + b"}"]
)
def test_undecodable_params_are_invalid_params(params: bytes) -> None:
    # Built by hand: `decode_incoming` already refuses params nested this deep.
    request = Request(jsonrpc="2.0", method="m", params=msgspec.Raw(params), id=3)
    with pytest.raises(RPCError) as caught:
        decode_params(request, NameParams)
    assert caught.value.code == ErrorCode.INVALID_PARAMS
    assert caught.value.data["path"] == ""


def test_invalid_utf8_in_params_passes_the_envelope_and_fails_the_params() -> None:
    incoming = decode_incoming(b'{"jsonrpc":"2.0","id":3,"method":"m","params":{"name":"\xff"}}')
    request = incoming.items[0]
    assert isinstance(request, Request)
    with pytest.raises(RPCError, match="UTF-8") as caught:
        decode_params(request, NameParams)
    assert caught.value.code == ErrorCode.INVALID_PARAMS


def test_line_timeout_response() -> None:
    error = line_timeout_response(1.5)
    assert (error.id, error.error.code) == (None, ErrorCode.INVALID_REQUEST)
    assert error.error.data == {"timeout_s": 1.5}
    assert "1.5 s" in error.error.message


def test_the_framer_tells_whether_it_holds_part_of_a_line() -> None:
    framer = LineFramer(64)
    assert not framer.holds_partial_line
    assert framer.feed(b'{"a"') == []
    assert framer.holds_partial_line
    assert framer.feed(b':1}\n{"b"') == [b'{"a":1}']
    assert framer.holds_partial_line
    assert framer.feed(b":2}\n") == [b'{"b":2}']
    assert not framer.holds_partial_line
