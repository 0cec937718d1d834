"""The control socket's bounds, against a real `kvm-supervisor serve`: memory per connection,
batch size, connection count and the deadline of a request line."""

from __future__ import annotations

import select
import socket

import pytest

from .conftest import Daemon, Peer, daemon_pid, idle_fd_count, rss_kib, wait_until

pytestmark = [pytest.mark.guest]

#: How far the daemon's RSS may grow above its idle size while one client pipelines
#: requests without reading the replies (the defaults allow 64 unanswered requests per
#: connection; an `rpc.discover` reply is about 15 KiB).
RSS_GROWTH_BOUND_KIB = 64 * 1024
#: How long the client's socket must stay unwritable for the daemon to count as having
#: stopped reading it. Only ends the sending early: every assertion holds either way.
STALL_S = 2.0

DISCOVER = b'{"jsonrpc":"2.0","id":1,"method":"rpc.discover"}\n'
PIPELINED = {
    "requests": DISCOVER * 50_000,
    "batches": (b"[" + b",".join([DISCOVER.strip()] * 50) + b"]\n") * 1_000,
}


def ping(d: Daemon) -> None:
    with Peer(d.socket) as peer:
        assert peer.call("supervisor.ping")["result"]["version"]


@pytest.mark.parametrize("kind", sorted(PIPELINED))
def test_a_client_that_never_reads_its_replies_cannot_grow_the_daemon(
    daemon: Daemon, kind: str
) -> None:
    daemon.start()
    pid = daemon_pid(daemon)
    ping(daemon)
    with Peer(daemon.socket) as warm:  # the OpenRPC document is built once, then cached
        assert warm.call("rpc.discover")["result"]["methods"]
    idle_fds = idle_fd_count(pid, daemon.socket)
    bound = rss_kib(pid) + RSS_GROWTH_BOUND_KIB

    payload = memoryview(PIPELINED[kind])
    for _ in range(2):  # the second round reuses what the first one freed
        bad = socket.socket(socket.AF_UNIX)
        try:
            bad.connect(str(daemon.socket))
            bad.setblocking(False)
            sent = 0
            while sent < len(payload):
                assert rss_kib(pid) < bound
                try:
                    sent += bad.send(payload[sent : sent + 65536])
                except BlockingIOError:
                    _, writable, _ = select.select([], [bad], [], STALL_S)
                    if not writable:
                        break
            # Backpressure: the daemon stopped reading long before the end.
            assert sent < len(payload) // 2
            for _ in range(20):
                ping(daemon)
                assert rss_kib(pid) < bound
        finally:
            bad.close()
        # The connection's tasks, replies and descriptor go with it.
        assert idle_fd_count(pid, daemon.socket) == idle_fds
        ping(daemon)
        assert rss_kib(pid) < bound
    assert b"request crashed" not in daemon.log.read_bytes()


def test_batches_count_against_the_bound(daemon: Daemon) -> None:
    daemon.write_config(max_requests_per_connection=100)
    daemon.start()
    ping_request = b'{"jsonrpc":"2.0","id":%d,"method":"supervisor.ping"}'
    with Peer(daemon.socket) as peer:
        peer.send(b"[" + b",".join(ping_request % i for i in range(10_000)) + b"]\n")
        refused = peer.message()
        assert refused["id"] is None
        assert refused["error"]["code"] == -32600
        assert refused["error"]["data"] == {"max_batch": 100}
        peer.send(b"[" + b",".join(ping_request % i for i in range(100)) + b"]\n")
        answered = peer.message()
        assert sorted(response["id"] for response in answered) == list(range(100))
        assert peer.call("supervisor.ping")["result"]["version"]


def test_connections_beyond_the_limit_are_closed(daemon: Daemon) -> None:
    daemon.write_config(max_connections=3)
    daemon.start()
    peers = [Peer(daemon.socket) for _ in range(3)]
    try:
        for peer in peers:
            assert peer.call("supervisor.ping")["result"]["version"]
        with Peer(daemon.socket) as excess:
            assert excess.messages_until_closed() == []
        assert b"too many connections" in daemon.log.read_bytes()
        for peer in peers:  # the served ones are untouched
            assert peer.call("supervisor.ping")["result"]["version"]
    finally:
        for peer in peers:
            peer.sock.close()

    def served() -> bool:
        try:
            ping(daemon)
        except (EOFError, ConnectionResetError):
            return False
        return True

    # The daemon notices the closed connections in its own time; then there is room again.
    wait_until(served, "a connection to be served again")


def test_a_request_line_that_never_ends_is_cut_but_idle_connections_are_not(
    daemon: Daemon,
) -> None:
    daemon.write_config(request_line_timeout_s=1)
    daemon.start()
    with Peer(daemon.socket) as idle, Peer(daemon.socket) as slow:
        # An events subscriber sits idle between requests for as long as it likes.
        assert idle.call("events.subscribe", {"kinds": ["instance.state"]})["result"]
        # One byte at a time, never a newline: cut at the line's deadline.
        slow.sock.settimeout(0)
        for byte in b'{"jsonrpc":"2.0","id":7,"method":"supervisor.ping","params":{}' * 3:
            try:
                slow.sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([slow.sock], [], [], 0.2)  # the client's pace
            if readable:
                break
        slow.sock.settimeout(30)
        cut = slow.messages_until_closed()
        assert len(cut) == 1, "the slow line was not cut"
        error = cut[0]["error"]
        assert error["code"] == -32600 and error["data"] == {"timeout_s": 1.0}
        # The idle connection outlived the deadline that cut the slow one.
        assert idle.call("supervisor.ping", request_id=2)["result"]["version"]
    assert b"request line not completed" in daemon.log.read_bytes()
