"""The anyio OVSDB client against a scripted server: echo keep-alives answered while a
request waits, concatenated replies, error replies, a server that goes away."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from protocols import ovsdb

Script = Callable[[SocketStream], Awaitable[None]]


async def read_message(stream: SocketStream, splitter: ovsdb.JSONStreamSplitter) -> Any:
    while True:
        messages = splitter.feed(await stream.receive())
        if messages:
            assert len(messages) == 1
            return json.loads(messages[0])


async def wait_closed(stream: SocketStream) -> None:
    """Until the client closes the connection, ignoring what it sends."""
    with pytest.raises(anyio.EndOfStream):
        while True:
            await stream.receive()


async def serve_once(path: Path, script: Script, *, task_status: Any) -> None:
    listener = await anyio.create_unix_listener(path)
    async with listener:
        task_status.started()
        stream = await listener.accept()
        async with stream:
            await script(stream)


async def run_against(
    tmp_path: Path, script: Script, body: Callable[[ovsdb.OVSDBClient], Awaitable[None]]
) -> None:
    path = tmp_path / "db.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(serve_once, path, script)
        async with ovsdb.connect(path, timeout=10) as db:
            await body(db)


@pytest.mark.anyio
async def test_echo_is_answered_while_a_request_waits(tmp_path: Path) -> None:
    async def script(stream: SocketStream) -> None:
        splitter = ovsdb.JSONStreamSplitter()
        request = await read_message(stream, splitter)
        assert request == {"method": "list_dbs", "params": [], "id": request["id"]}
        await stream.send(b'{"method":"echo","params":["ping"],"id":"echo"}')
        assert await read_message(stream, splitter) == {
            "result": ["ping"],
            "error": None,
            "id": "echo",
        }
        # Reply split across writes, glued to a notification.
        reply = json.dumps({"id": request["id"], "result": ["Open_vSwitch"], "error": None})
        await stream.send(b'{"method":"update","params":[null,{}],"id":null}' + reply[:5].encode())
        await stream.send(reply[5:].encode())
        await wait_closed(stream)

    async def body(db: ovsdb.OVSDBClient) -> None:
        assert await db.call("list_dbs", []) == ["Open_vSwitch"]

    await run_against(tmp_path, script, body)


@pytest.mark.anyio
async def test_error_reply_and_failed_transaction(tmp_path: Path) -> None:
    async def script(stream: SocketStream) -> None:
        splitter = ovsdb.JSONStreamSplitter()
        request = await read_message(stream, splitter)
        await stream.send(b'{"id":%d,"result":null,"error":"unknown database"}' % request["id"])
        request = await read_message(stream, splitter)
        answer = {"id": request["id"], "result": [{"error": "timed out"}], "error": None}
        await stream.send(json.dumps(answer).encode())
        await wait_closed(stream)

    async def body(db: ovsdb.OVSDBClient) -> None:
        with pytest.raises(ovsdb.RequestError, match="unknown database"):
            await db.get_schema("nope")
        with pytest.raises(ovsdb.TransactError, match="operation 0: timed out"):
            await db.transact("Open_vSwitch", [ovsdb.select("Bridge", [])])

    await run_against(tmp_path, script, body)


@pytest.mark.anyio
async def test_server_closing_fails_the_pending_call(tmp_path: Path) -> None:
    async def script(stream: SocketStream) -> None:
        await read_message(stream, ovsdb.JSONStreamSplitter())

    async def body(db: ovsdb.OVSDBClient) -> None:
        with pytest.raises(ovsdb.ConnectionLostError, match="closed the connection"):
            await db.call("list_dbs", [])
        with pytest.raises(ovsdb.ConnectionLostError):
            await db.call("list_dbs", [])

    await run_against(tmp_path, script, body)


@pytest.mark.anyio
async def test_garbage_from_the_server_is_the_root_cause(tmp_path: Path) -> None:
    async def script(stream: SocketStream) -> None:
        await read_message(stream, ovsdb.JSONStreamSplitter())
        await stream.send(b"[1]")
        await wait_closed(stream)

    async def body(db: ovsdb.OVSDBClient) -> None:
        with pytest.raises(ovsdb.ConnectionLostError) as caught:
            await db.call("list_dbs", [])
        assert isinstance(caught.value.__cause__, ovsdb.ProtocolError)

    await run_against(tmp_path, script, body)
