"""Hostile input and host faults on the control socket: every request gets its answer, the
connection and the daemon live on, and a broken socket path is one clear line."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from core.test_daemon import CLI

from protocols import jsonrpc
from supervisor.control import connection, server
from supervisor.control.methods import METHODS
from supervisor.model import api
from supervisor.model.config import Config, load_config
from supervisor.model.errors import InvalidParams
from supervisor.model.spec import decode_spec

from .conftest import AsyncPeer, Daemon, Peer, served, wait_for, wait_until

REQUEST = b'{"jsonrpc":"2.0","id":%d,"method":"%s","params":%s}\n'


def request(request_id: int, method: str, params: bytes) -> bytes:
    return REQUEST % (request_id, method.encode(), params)


# -- hostile input, answered on a connection that lives on --------------------------------


@pytest.mark.anyio
async def test_deep_nesting_is_a_parse_error_and_the_connection_lives(
    control_config: Config,
) -> None:
    async with served(control_config) as path, AsyncPeer.connect(path) as peer:
        await peer.send(b"[" * 100_000 + b"\n")
        nested = await peer.message()
        assert (nested["id"], nested["error"]["code"]) == (None, -32700)
        deep_params = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
        await peer.send(request(2, "instance.info", deep_params))
        assert (await peer.message())["error"]["code"] == -32700
        assert (await peer.call("supervisor.ping", request_id=3))["result"]["version"]


@pytest.mark.anyio
async def test_invalid_utf8_in_params_is_invalid_params(control_config: Config) -> None:
    async with served(control_config) as path, AsyncPeer.connect(path) as peer:
        await peer.send(request(4, "instance.info", b'{"name":"\xff\xfe"}'))
        reply = await peer.message()
        assert reply["id"] == 4
        assert reply["error"]["code"] == -32602
        assert "UTF-8" in reply["error"]["message"]
        assert (await peer.call("supervisor.ping", request_id=5))["result"]["version"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "params", "path"),
    [
        ("instance.info", {"name": "vm\n"}, "name"),
        ("instance.start", {"spec": {"name": "vm\n"}}, "spec.name"),
    ],
)
async def test_a_name_ending_in_a_newline_is_invalid_params(
    control_config: Config, method: str, params: dict[str, Any], path: str
) -> None:
    async with served(control_config) as socket_path, AsyncPeer.connect(socket_path) as peer:
        error = (await peer.call(method, params))["error"]
        assert (error["code"], error["data"]["path"]) == (-32602, path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "vm\n"),
        ("uuid", "00000000-0000-0000-0000-000000000000\n"),
        ("nics", [{"mac": "52:54:00:00:00:01\n"}]),
    ],
)
def test_spec_patterns_do_not_accept_a_trailing_newline(field: str, value: Any) -> None:
    with pytest.raises(InvalidParams):
        decode_spec({"name": "vm", field: value})


def test_api_names_do_not_accept_a_trailing_newline() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "vm\n"}, api.NameParams)


def test_uid_pool_entries_do_not_accept_a_trailing_newline(tmp_path: Path) -> None:
    config = tmp_path / "supervisor.toml"
    config.write_text('uid_pool = ["5000\\n"]\n')
    with pytest.raises(InvalidParams, match="uid_pool"):
        load_config(config)


@pytest.mark.anyio
async def test_a_crashing_request_gets_internal_error_and_the_connection_lives(
    control_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash(*_: object) -> Any:
        raise RuntimeError("boom")

    async def unencodable(*_: object) -> Any:
        return {"set": {1, 2}, "object": object()}

    ping = METHODS["supervisor.ping"]
    info = METHODS["supervisor.info"]
    monkeypatch.setitem(METHODS, ping.name, msgspec.structs.replace(ping, handler=crash))
    monkeypatch.setitem(METHODS, info.name, msgspec.structs.replace(info, handler=unencodable))
    async with served(control_config) as path, AsyncPeer.connect(path) as peer:
        for request_id, method in enumerate(("supervisor.ping", "supervisor.info")):
            reply = await peer.call(method, request_id=request_id)
            assert (reply["id"], reply["error"]["code"]) == (request_id, -32603)
        await peer.send(
            b'[{"jsonrpc":"2.0","id":7,"method":"supervisor.info"},'
            b'{"jsonrpc":"2.0","id":8,"method":"instance.list"}]\n'
        )
        batch = {reply["id"]: reply for reply in await peer.message()}
        assert batch[7]["error"]["code"] == -32603 and batch[8]["result"] == []
        assert (await peer.call("instance.list", request_id=9))["result"] == []


@pytest.mark.anyio
async def test_a_line_that_crashes_the_decoder_gets_internal_error(
    control_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode = jsonrpc.decode_incoming

    def crash_on_marker(line: bytes, **kwargs: Any) -> jsonrpc.IncomingLine:
        if b"crash-me" in line:
            raise RuntimeError("decoder bug")
        return decode(line, **kwargs)

    monkeypatch.setattr(jsonrpc, "decode_incoming", crash_on_marker)
    async with served(control_config) as path, AsyncPeer.connect(path) as peer:
        await peer.send(b'{"crash-me":1}\n')
        reply = await peer.message()
        assert (reply["id"], reply["error"]["code"]) == (None, -32603)
        assert (await peer.call("instance.list"))["result"] == []


@pytest.mark.anyio
@pytest.mark.parametrize("batch", [False, True])
async def test_the_end_of_input_ends_the_connection_even_with_a_subscription_in_flight(
    control_config: Config, batch: bool
) -> None:
    subscribe = b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}'
    async with served(control_config) as path, AsyncPeer.connect(path) as peer:
        await peer.send((b"[" + subscribe + b"]" if batch else subscribe) + b"\n")
        await peer.stream.send_eof()
        answer = await peer.message()
        assert (answer[0] if batch else answer)["id"] == 1
        with anyio.fail_after(30), pytest.raises(anyio.IncompleteRead):
            await peer.message()


# -- the peer-credential check ------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.anyio
@pytest.mark.parametrize("failing", ["peer_uid_gid", "peer_allowed"])
async def test_a_failing_peer_check_closes_the_connection(
    control_config: Config, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def fail(*_: object) -> Any:
        raise OSError(errno.EIO, "injected")

    async with served(control_config) as path:
        idle = _fd_count()
        monkeypatch.setattr(connection, failing, fail)
        for _ in range(5):
            async with AsyncPeer.connect(path) as peer:
                # Closed unanswered: at the send, or at the read (end of stream or reset).
                with pytest.raises((anyio.IncompleteRead, anyio.BrokenResourceError)):
                    await peer.send(b'{"jsonrpc":"2.0","id":1,"method":"supervisor.ping"}\n')
                    await peer.message()
        await wait_for(lambda: _fd_count() == idle, "the refused connections' descriptors")
        monkeypatch.undo()
        async with AsyncPeer.connect(path) as peer:
            assert (await peer.call("supervisor.ping"))["result"]["version"]


# -- the socket path ----------------------------------------------------------------------


def _served(daemon: Daemon) -> bool:
    try:
        with Peer(daemon.socket) as peer:
            return bool(peer.call("supervisor.ping")["result"]["version"])
    except (FileNotFoundError, ConnectionRefusedError):
        return False


def test_a_deleted_control_socket_is_recreated(daemon: Daemon) -> None:
    daemon.start()
    with Peer(daemon.socket) as old:
        for round_ in range(2):
            daemon.socket.unlink()
            wait_until(lambda: _served(daemon), "the control socket to come back")
            assert oct(daemon.socket.stat().st_mode & 0o777) == oct(0o660)
            verify = old.call("supervisor.verify", request_id=round_)["result"]
            assert not [p for p in verify["problems"] if "control socket" in p]
    assert b"control socket was deleted" in daemon.log.read_bytes()


def test_a_foreign_control_socket_is_reported_and_left_alone(daemon: Daemon) -> None:
    daemon.start()
    foreign_path = daemon.state_dir / "foreign.sock"
    with Peer(daemon.socket) as old, socket.socket(socket.AF_UNIX) as foreign:
        foreign.bind(str(foreign_path))
        foreign.listen()
        foreign_inode = foreign_path.stat().st_ino
        os.rename(foreign_path, daemon.socket)

        def reported() -> bool:
            problems = old.call("supervisor.verify")["result"]["problems"]
            return any("not this daemon's" in problem for problem in problems)

        wait_until(reported, "verify to report the foreign socket")
        assert daemon.socket.stat().st_ino == foreign_inode
        assert b"control socket was replaced" in daemon.log.read_bytes()
        daemon.socket.unlink()
        wait_until(lambda: _served(daemon), "the daemon's own socket to come back")
        assert old.call("supervisor.verify")["result"]["problems"] == []


@pytest.mark.anyio
async def test_verify_reports_a_missing_control_socket(
    control_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cannot_listen(*_: object) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    async with served(control_config) as path, AsyncPeer.connect(path) as peer:
        monkeypatch.setattr(server, "_listen", cannot_listen)
        path.unlink()

        async def missing_reported() -> bool:
            problems = (await peer.call("supervisor.verify"))["result"]["problems"]
            return any("is missing" in problem for problem in problems)

        with anyio.fail_after(30):
            while not await missing_reported():
                await anyio.sleep(0.05)


def _serve(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "serve", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_serve_refuses_a_non_socket_at_the_socket_path(daemon: Daemon, kind: str) -> None:
    if kind == "file":
        daemon.socket.write_text("precious\n")
    elif kind == "directory":
        daemon.socket.mkdir()
    else:
        daemon.socket.symlink_to(daemon.config)
    result = _serve(daemon)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("kvm-supervisor: ")
        and f"{daemon.socket} exists and is not a socket" in last
    )
    if kind == "file":
        assert daemon.socket.read_text() == "precious\n"
    assert daemon.socket.is_symlink() or daemon.socket.exists()


def test_serve_reports_a_bind_failure_in_one_line(daemon: Daemon) -> None:
    deep = daemon.state_dir / ("d" * 100)  # a socket path past AF_UNIX's 108 bytes
    deep.mkdir()
    daemon.state_dir = deep
    daemon.write_config()
    result = _serve(daemon)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kvm-supervisor: control socket {deep / 'control.sock'}")


def test_serve_reports_a_read_only_state_dir_in_one_line(daemon: Daemon) -> None:
    # A read-only tmpfs over the state dir, in a mount namespace that ends with the daemon.
    state = daemon.state_dir / "state"
    state.mkdir()
    daemon.state_dir = state
    daemon.write_config()
    serve = " ".join([*CLI, "serve", "--config", str(daemon.config)])
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o ro,mode=0700 tmpfs {state} && exec {serve}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kvm-supervisor: ") and "Read-only file system" in last
