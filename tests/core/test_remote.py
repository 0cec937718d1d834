"""`--connect ssh://...` and `rpc-stdio`: the CLI reaching a daemon through a real sshd."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from supervisor.cli.remote import SshTarget, parse_connect

from .sshd import Sshd, private_sshd
from .test_daemon import CLI, Daemon, daemon, write_instance

__all__ = ["daemon"]  # the fixture, used by name


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    with private_sshd() as server:
        yield server


def remote(sshd: Sshd, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--connect", url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "KVM_SUPERVISOR_SSH": sshd.ssh_command},
    )


def test_verbs_through_ssh(daemon: Daemon, sshd: Sshd) -> None:
    write_instance(daemon, "alpha")
    daemon.start()
    url = sshd.url(daemon.socket)
    ping = remote(sshd, url, "ping", "--json")
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["version"]
    started = remote(sshd, url, "start", "alpha", "--paused", "--json")
    assert json.loads(started.stdout)["state"] == "paused", started.stderr
    listed = remote(sshd, url, "list")
    assert "alpha" in listed.stdout and "paused" in listed.stdout
    stopped = remote(sshd, url, "stop", "alpha", "--force", "--json")
    assert json.loads(stopped.stdout)["state"] == "stopped"
    # The daemon's errors come back as they do locally.
    missing = remote(sshd, url, "show", "nope")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_no_daemon_behind_ssh_is_unreachable(daemon: Daemon, sshd: Sshd) -> None:
    unreachable = remote(sshd, sshd.url(daemon.socket), "ping")
    assert unreachable.returncode == 3, unreachable.stderr
    # rpc-stdio's own message, through ssh's stderr, names the remote socket.
    assert f"no control socket at {daemon.socket}" in unreachable.stderr
    refused = remote(sshd, "ssh://root@127.0.0.1:1/x", "ping")
    assert refused.returncode == 3


def test_rpc_stdio_bridges_stdin_and_stdout(daemon: Daemon) -> None:
    daemon.start()
    requests = (
        b'{"jsonrpc":"2.0","id":1,"method":"supervisor.ping"}\n'
        b'{"jsonrpc":"2.0","id":2,"method":"instance.list"}\n'
    )
    # stdin's end is passed on: the daemon answers both, then the bridge ends.
    bridged = subprocess.run(
        [*CLI, "rpc-stdio", "--socket", str(daemon.socket)],
        input=requests,
        capture_output=True,
        timeout=60,
    )
    assert bridged.returncode == 0, bridged.stderr
    answers = [json.loads(line) for line in bridged.stdout.splitlines()]
    assert [answer["id"] for answer in answers] == [1, 2]
    assert answers[0]["result"]["version"]


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("ssh://node2", SshTarget(host="node2")),
        (
            "ssh://admin@node2:2222/run/kvs.sock",
            SshTarget(host="node2", user="admin", port=2222, socket="/run/kvs.sock"),
        ),
    ],
)
def test_connect_urls(url: str, target: SshTarget) -> None:
    assert parse_connect(url) == target


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("tcp://node2", "only ssh://"),
        ("ssh:///x.sock", "names no host"),
        ("ssh://node2:99999", "port"),
        ("ssh://a:pw@node2", "no password"),
    ],
)
def test_bad_connect_urls_are_usage_errors(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_connect(url)
    result = subprocess.run([*CLI, "--connect", url, "ping"], capture_output=True, text=True)
    assert result.returncode == 2 and reason in result.stderr


def test_local_verbs_refuse_connect() -> None:
    result = subprocess.run(
        [*CLI, "--connect", "ssh://node2", "serve"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "no --connect" in result.stderr
