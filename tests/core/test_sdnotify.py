"""sd_notify: delivers to a listening socket, and never fails when nobody listens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from supervisor.cli.sdnotify import sd_notify


def test_delivers_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert listener.recv(64) == b"READY=1"


def test_no_socket_or_a_gone_listener_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sd_notify("STOPPING=1")
