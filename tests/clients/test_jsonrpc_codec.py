"""The JSON-RPC 2.0 codec without sockets: every error path, batches, params, encoding."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import pytest

from protocols.jsonrpc import (
    ErrorCode,
    ErrorObject,
    ErrorResponse,
    EventParams,
    IncomingLine,
    Notification,
    ProtocolError,
    Request,
    Response,
    RPCError,
    decode_incoming,
    decode_params,
    decode_server_line,
    encode_batch,
    encode_message,
    encode_notification,
    error_response,
    field_path,
    oversize_response,
    result_response,
)


class Nic(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mac: Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")] | None = None
    mode: Literal["bridged", "routed", "openvswitch"]
    mtu: int | None = None


class Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
    memory_mib: int = 128
    nics: list[Nic] = []
    hvparams: dict[str, str] = {}


class StartParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    spec: Spec
    paused: bool = False


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    pass


def single(line: bytes) -> Request | ErrorResponse:
    incoming = decode_incoming(line)
    assert not incoming.is_batch
    assert len(incoming.items) == 1
    return incoming.items[0]


def error_of(item: Request | ErrorResponse) -> tuple[int, Any]:
    assert isinstance(item, ErrorResponse)
    return item.error.code, item.id


# -- requests ------------------------------------------------------------------------


def test_request_with_params_and_id() -> None:
    request = single(b'{"jsonrpc":"2.0","method":"instance.info","params":{"name":"vm1"},"id":7}')
    assert isinstance(request, Request)
    assert request.method == "instance.info"
    assert request.id == 7
    assert not request.is_notification
    assert bytes(request.params) == b'{"name":"vm1"}'  # type: ignore[arg-type]


@pytest.mark.parametrize("request_id", [0, -3, "abc", "", None])
def test_every_kind_of_id(request_id: Any) -> None:
    line = msgspec.json.encode({"jsonrpc": "2.0", "method": "m", "id": request_id})
    request = single(line)
    assert isinstance(request, Request)
    assert request.id == request_id
    assert not request.is_notification


def test_notification_has_no_id() -> None:
    request = single(b'{"jsonrpc": "2.0", "method": "supervisor.ping"}')
    assert isinstance(request, Request)
    assert request.is_notification
    assert request.params is msgspec.UNSET


def test_whitespace_and_crlf_are_tolerated() -> None:
    request = single(b' { "jsonrpc" : "2.0" , "method" : "m" , "id" : 1 } \r')
    assert isinstance(request, Request)


@pytest.mark.parametrize("line", [b"", b"   ", b"\r", b"\t "])
def test_blank_line_holds_nothing(line: bytes) -> None:
    assert decode_incoming(line) == IncomingLine([], is_batch=False)


# -- parse errors and invalid requests -----------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"garbage",
        b"{",
        b'{"jsonrpc": "2.0", "method": "m", "id": 1',
        b'{"jsonrpc": 1, garbage',
        b'[{"jsonrpc": "2.0", "method": "m", "id": 1}, {"jsonrpc"',
        b'{"jsonrpc":"2.0","method":"m","id":1} trailing',
        b"\xff\xfe",
    ],
)
def test_malformed_json_is_a_parse_error_with_null_id(line: bytes) -> None:
    item = single(line)
    assert error_of(item) == (ErrorCode.PARSE_ERROR, None)
    assert isinstance(item, ErrorResponse)
    assert item.error.message.startswith("Parse error: ")
    assert item.error.data == {"reason": item.error.message.removeprefix("Parse error: ")}


@pytest.mark.parametrize(
    ("line", "request_id", "reason"),
    [
        (b"1", None, "Expected `object | array`, got `int`"),
        (b'"ping"', None, "Expected `object | array`, got `str`"),
        (b"null", None, "Expected `object | array`, got `null`"),
        (b'{"foo": "boo"}', None, "Object contains unknown field `foo`"),
        (b'{"method": "m", "id": 4}', 4, "Object missing required field `jsonrpc`"),
        (b'{"jsonrpc": "1.0", "method": "m", "id": "a"}', "a", "Invalid enum value '1.0'"),
        (b'{"jsonrpc": "2.0", "id": 5}', 5, "Object missing required field `method`"),
        (b'{"jsonrpc": "2.0", "method": 1, "id": 6}', 6, "Expected `str`, got `int`"),
        (b'{"jsonrpc": "2.0", "method": "m", "id": 1.5}', None, "Expected `int | str | null`"),
        (b'{"jsonrpc": "2.0", "method": "m", "id": true}', None, "got `bool`"),
        (b'{"jsonrpc": "2.0", "method": "m", "id": 8, "x": 1}', 8, "unknown field `x`"),
        (b'{"jsonrpc": "2.0", "method": "m", "params": 3, "id": 9}', 9, "must be an object"),
        (b'{"jsonrpc": "2.0", "method": "m", "params": "s"}', None, "must be an object"),
        (b'{"jsonrpc": "2.0", "method": "m", "params": null, "id": 2}', 2, "must be an object"),
    ],
)
def test_invalid_request(line: bytes, request_id: Any, reason: str) -> None:
    item = single(line)
    assert error_of(item) == (ErrorCode.INVALID_REQUEST, request_id)
    assert isinstance(item, ErrorResponse)
    assert reason in item.error.message
    assert reason in item.error.data["reason"]


def test_array_params_are_a_valid_request() -> None:
    request = single(b'{"jsonrpc": "2.0", "method": "m", "params": [1, 2], "id": 1}')
    assert isinstance(request, Request)


# -- batches ---------------------------------------------------------------------------


def test_empty_batch_is_one_invalid_request_not_a_batch() -> None:
    incoming = decode_incoming(b"[]")
    assert not incoming.is_batch
    assert [error_of(item) for item in incoming.items] == [(ErrorCode.INVALID_REQUEST, None)]


def test_batch_of_non_objects_gets_one_error_each() -> None:
    incoming = decode_incoming(b"[1, 2, 3]")
    assert incoming.is_batch
    assert [error_of(item) for item in incoming.items] == [(ErrorCode.INVALID_REQUEST, None)] * 3


def test_mixed_batch_keeps_order_and_ids() -> None:
    incoming = decode_incoming(
        b"["
        b'{"jsonrpc": "2.0", "method": "sum", "params": [1, 2, 4], "id": "1"},'
        b'{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
        b'{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": "2"},'
        b'{"foo": "boo"},'
        b'{"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},'
        b'{"jsonrpc": "2.0", "method": "m", "id": 1.5},'
        b'"text",'
        b'{"jsonrpc": "2.0", "method": "get_data", "id": "9"}'
        b"]"
    )
    assert incoming.is_batch
    items = incoming.items
    assert [type(item) for item in items] == [
        Request,
        Request,
        Request,
        ErrorResponse,
        Request,
        ErrorResponse,
        ErrorResponse,
        Request,
    ]
    requests = [item for item in items if isinstance(item, Request)]
    assert [request.method for request in requests] == [
        "sum",
        "notify_hello",
        "subtract",
        "foo.get",
        "get_data",
    ]
    assert [request.is_notification for request in requests] == [False, True, False, False, False]
    assert [error_of(item)[1] for item in items if isinstance(item, ErrorResponse)] == [None] * 3


def test_batch_of_notifications_owes_nothing() -> None:
    incoming = decode_incoming(
        b'[{"jsonrpc": "2.0", "method": "a"}, {"jsonrpc": "2.0", "method": "b", "params": {}}]'
    )
    assert incoming.is_batch
    responses = [
        result_response(item.id, None)
        for item in incoming.items
        if isinstance(item, Request) and not item.is_notification
    ]
    assert encode_batch(responses) is None


def test_nested_batch_member_is_invalid() -> None:
    incoming = decode_incoming(b'[[{"jsonrpc": "2.0", "method": "a", "id": 1}]]')
    assert incoming.is_batch
    assert [error_of(item) for item in incoming.items] == [(ErrorCode.INVALID_REQUEST, None)]


# -- params ----------------------------------------------------------------------------


def start_request(params: bytes) -> Request:
    request = single(b'{"jsonrpc":"2.0","method":"instance.start","params":' + params + b',"id":1}')
    assert isinstance(request, Request)
    return request


def test_params_decode_into_the_methods_struct() -> None:
    request = start_request(
        b'{"spec": {"name": "vm1", "nics": [{"mode": "routed", "mac": "52:54:00:12:34:56"}]},'
        b' "paused": true}'
    )
    params = decode_params(request, StartParams)
    assert params == StartParams(
        spec=Spec(name="vm1", nics=[Nic(mode="routed", mac="52:54:00:12:34:56")]), paused=True
    )


def test_absent_params_decode_as_an_empty_object() -> None:
    request = single(b'{"jsonrpc": "2.0", "method": "supervisor.ping", "id": 1}')
    assert isinstance(request, Request)
    assert decode_params(request, NoParams) == NoParams()
    with pytest.raises(RPCError) as caught:
        decode_params(request, StartParams)
    assert caught.value.data == {"path": "spec", "reason": "Object missing required field `spec`"}


@pytest.mark.parametrize(
    ("params", "path", "reason"),
    [
        (
            b'{"spec": {"name": "vm1", "nics": [{"mode": "routed"}, {"mode": "routed",'
            b' "mac": "zz"}]}}',
            "spec.nics[1].mac",
            "Expected `str` matching regex",
        ),
        (
            b'{"spec": {"name": "vm1", "nics": [{"mode": "routed", "mtu": "9000"}]}}',
            "spec.nics[0].mtu",
            "Expected `int | null`, got `str`",
        ),
        (
            b'{"spec": {"name": "vm1", "nics": [{"mode": "tunnel"}]}}',
            "spec.nics[0].mode",
            "Invalid enum value 'tunnel'",
        ),
        (b'{"spec": {"name": "../x"}}', "spec.name", "Expected `str` matching regex"),
        (
            b'{"spec": {"name": "vm1", "color": "red"}}',
            "spec.color",
            "Object contains unknown field `color`",
        ),
        (b'{"spec": {"memory_mib": 1}}', "spec.name", "Object missing required field `name`"),
        (b'{"spec": {"name": "a"}, "force": true}', "force", "Object contains unknown field"),
        (
            b'{"spec": {"name": "a", "hvparams": {"kernel_path": 1}}}',
            "spec.hvparams[...]",
            "Expected `str`, got `int`",
        ),
        (b"[1, 2]", "", "Expected `object`, got `array`"),
        (b'{"spec": [], "paused": 1}', "spec", "Expected `object`, got `array`"),
    ],
)
def test_invalid_params_name_the_field(params: bytes, path: str, reason: str) -> None:
    with pytest.raises(RPCError) as caught:
        decode_params(start_request(params), StartParams)
    error = caught.value
    assert error.code == ErrorCode.INVALID_PARAMS
    assert error.data["path"] == path
    assert error.data["reason"].startswith(reason)
    assert " - at " not in error.data["reason"]
    assert error.message.startswith(f"Invalid params: {reason}")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Expected `int`, got `str` - at `$.spec.nics[1].mtu`",
            ("spec.nics[1].mtu", "Expected `int`, got `str`"),
        ),
        ("Expected `object`, got `array`", ("", "Expected `object`, got `array`")),
        ("Expected `int`, got `str` - at `$[0]`", ("[0]", "Expected `int`, got `str`")),
        ("Object missing required field `name`", ("name", "Object missing required field `name`")),
        (
            "Object contains unknown field `x` - at `$.a[2]`",
            ("a[2].x", "Object contains unknown field `x`"),
        ),
        ("not - at `$` ok - at `$.b`", ("b", "not - at `$` ok")),
    ],
)
def test_field_path(message: str, expected: tuple[str, str]) -> None:
    assert field_path(message) == expected


# -- errors ------------------------------------------------------------------------------


def test_error_codes_match_the_api() -> None:
    assert {code.name.lower(): int(code) for code in ErrorCode} == {
        "parse_error": -32700,
        "invalid_request": -32600,
        "method_not_found": -32601,
        "invalid_params": -32602,
        "internal_error": -32603,
        "instance_not_found": 1,
        "instance_exists": 2,
        "instance_not_running": 3,
        "hypervisor_error": 4,
        "monitor_error": 5,
        "timeout": 6,
        "invalid_config": 7,
        "migration_error": 8,
        "busy": 9,
        "network_error": 10,
    }


def test_rpc_error_keeps_known_codes_as_enum_and_others_as_int() -> None:
    known = RPCError(9, "busy", {"operation": "stop"})
    assert known.code is ErrorCode.BUSY
    assert str(known) == "busy"
    assert known.data == {"operation": "stop"}
    unknown = RPCError(-32000, "server error")
    assert unknown.code == -32000
    assert not isinstance(unknown.code, ErrorCode)
    assert unknown.data is None
    assert repr(unknown) == "RPCError(-32000, 'server error', None)"


# -- encoding ----------------------------------------------------------------------------


def test_result_response_encodes_compact_with_newline() -> None:
    line = encode_message(result_response(3, {"version": "0.1.0", "note": "a\nb"}))
    assert line == b'{"jsonrpc":"2.0","result":{"version":"0.1.0","note":"a\\nb"},"id":3}\n'
    assert line.count(b"\n") == 1


def test_null_result_is_kept() -> None:
    assert (
        encode_message(result_response("x", None)) == b'{"jsonrpc":"2.0","result":null,"id":"x"}\n'
    )


def test_structs_encode_inside_results() -> None:
    line = encode_message(result_response(1, Spec(name="vm1")))
    assert msgspec.json.decode(line)["result"] == {
        "name": "vm1",
        "memory_mib": 128,
        "nics": [],
        "hvparams": {},
    }


def test_error_response_leaves_out_absent_data() -> None:
    assert encode_message(error_response(1, ErrorCode.INSTANCE_NOT_FOUND, "no vm1")) == (
        b'{"jsonrpc":"2.0","error":{"code":1,"message":"no vm1"},"id":1}\n'
    )
    assert encode_message(error_response(None, 4, "died", {"exit_status": 1})) == (
        b'{"jsonrpc":"2.0","error":{"code":4,"message":"died","data":{"exit_status":1}},'
        b'"id":null}\n'
    )


def test_responses_built_for_a_notification_carry_a_null_id() -> None:
    request = single(b'{"jsonrpc": "2.0", "method": "m"}')
    assert isinstance(request, Request)
    assert result_response(request.id, 1).id is None
    assert error_response(request.id, 5, "failed").id is None


def test_oversize_response() -> None:
    response = oversize_response(1024)
    assert response.id is None
    assert response.error.code == ErrorCode.INVALID_REQUEST
    assert response.error.data == {"max_bytes": 1024}
    assert "1024 bytes" in response.error.message


def test_batch_encodes_as_one_array_line() -> None:
    line = encode_batch([result_response(1, 2), error_response(2, -32601, "no such method")])
    assert line == (
        b'[{"jsonrpc":"2.0","result":2,"id":1},'
        b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"no such method"},"id":2}]\n'
    )


def test_event_notification() -> None:
    params = EventParams(
        subscription=1,
        instance="vm1",
        kind="instance.state",
        timestamp=1700000000.5,
        data={"state": "running", "previous": "starting", "reason": "started"},
    )
    line = encode_notification("event", params)
    assert line == (
        b'{"jsonrpc":"2.0","method":"event","params":{"subscription":1,"instance":"vm1",'
        b'"kind":"instance.state","timestamp":1700000000.5,"data":{"state":"running",'
        b'"previous":"starting","reason":"started"}}}\n'
    )
    [notification] = decode_server_line(line.rstrip(b"\n"))
    assert isinstance(notification, Notification)
    assert msgspec.convert(notification.params, EventParams) == params


def test_unencodable_result_raises() -> None:
    with pytest.raises(TypeError):
        encode_message(result_response(1, object()))


# -- round trips through the client side ---------------------------------------------


def test_request_round_trip() -> None:
    request = Request(
        jsonrpc="2.0", method="instance.stop", params=msgspec.Raw(b'{"name":"vm1"}'), id=12
    )
    line = encode_message(request)
    assert line == b'{"jsonrpc":"2.0","method":"instance.stop","params":{"name":"vm1"},"id":12}\n'
    decoded = single(line)
    assert isinstance(decoded, Request)
    assert (decoded.method, decoded.id, bytes(decoded.params)) == (  # type: ignore[arg-type]
        "instance.stop",
        12,
        b'{"name":"vm1"}',
    )


def test_notification_request_round_trip_leaves_out_id_and_params() -> None:
    line = encode_message(Request(jsonrpc="2.0", method="supervisor.ping"))
    assert line == b'{"jsonrpc":"2.0","method":"supervisor.ping"}\n'
    decoded = single(line)
    assert isinstance(decoded, Request)
    assert decoded.is_notification


@pytest.mark.parametrize(
    "message",
    [
        Response(result={"a": [1, 2]}, id=1),
        Response(result=None, id="x"),
        ErrorResponse(error=ErrorObject(code=6, message="late", data={"timeout_s": 3.5}), id=2),
        ErrorResponse(error=ErrorObject(code=-32700, message="Parse error"), id=None),
        Notification(method="event", params={"kind": "qmp.STOP"}),
        Notification(method="bare"),
    ],
)
def test_server_message_round_trip(message: Response | ErrorResponse | Notification) -> None:
    assert decode_server_line(encode_message(message)) == [message]


def test_server_batch_round_trip() -> None:
    messages: list[Response | ErrorResponse] = [
        result_response(1, True),
        error_response(2, 1, "no such instance"),
    ]
    line = encode_batch(messages)
    assert line is not None
    assert decode_server_line(line) == messages


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"nonsense", "invalid line"),
        (b'{"jsonrpc": "1.0", "result": 1, "id": 1}', "invalid line"),
        (b'{"jsonrpc": "2.0", "method": "m", "id": 1}', "a request"),
        (b'{"jsonrpc": "2.0", "result": 1}', "without an id"),
        (b'{"jsonrpc": "2.0", "id": 1}', "neither result nor error"),
        (
            b'{"jsonrpc": "2.0", "result": 1, "error": {"code": 1, "message": "m"}, "id": 1}',
            "both result and error",
        ),
        (b'{"jsonrpc": "2.0", "error": {"code": "x", "message": "m"}, "id": 1}', "invalid line"),
    ],
)
def test_invalid_server_lines(line: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_server_line(line)
