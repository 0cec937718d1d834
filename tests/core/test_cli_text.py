"""The CLI as a person meets it: `python -m supervisor`, what it says when no daemon
answers, dates and dotted versions in text output, and a long stop shown on a terminal."""

from __future__ import annotations

import datetime
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from .test_daemon import CLI, Daemon, daemon, wait_for_guest_ready, write_instance

__all__ = ["daemon"]  # the fixture, used by name


def test_python_m_supervisor_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("kvm-supervisor ")


def test_an_unreachable_daemon_is_named_with_what_to_do(daemon: Daemon, tmp_path: Path) -> None:
    missing = daemon.cli("ping")
    assert (missing.returncode, missing.stdout) == (3, "")
    assert f"no control socket at {daemon.socket}" in missing.stderr
    assert "kvm-supervisor serve" in missing.stderr
    dead = tmp_path / "dead.sock"
    # A socket file nobody listens on: what a killed daemon leaves.
    import socket

    with socket.socket(socket.AF_UNIX) as leftover:
        leftover.bind(str(dead))
    refused = daemon.cli("ping", "--socket", str(dead))
    assert refused.returncode == 3
    assert f"nothing listens on {dead} (connection refused)" in refused.stderr


def test_text_output_shows_dates_and_dotted_versions(daemon: Daemon) -> None:
    write_instance(daemon, "alpha")
    daemon.start()
    started = daemon.cli_json("start", "alpha", "--paused")
    assert isinstance(started["started_at"], float)
    shown = daemon.cli("show", "alpha", check=True).stdout
    local = datetime.datetime.fromtimestamp(started["started_at"]).astimezone()
    assert f"started_at: {local.isoformat(sep=' ', timespec='seconds')}" in shown
    info = daemon.cli_json("info")
    major, minor, micro = info["node"]["hv_version"]
    assert f"hv_version: {major}.{minor}.{micro}\n" in daemon.cli("info", check=True).stdout
    daemon.cli("stop", "alpha", "--force", check=True)


def test_a_stop_awaiting_the_guest_shows_on_a_terminal(daemon: Daemon) -> None:
    # No kernel and no disk: the firmware finds nothing to boot and ignores the power
    # button, as a hung guest does.
    deaf = daemon.state_dir / "defs" / "deaf.toml"
    deaf.write_text('memory_mib = 64\n[hvparams]\nkernel_path = ""\ninitrd_path = ""\n')
    daemon.start()
    daemon.cli("start", "deaf", check=True)
    controller, terminal = pty.openpty()
    try:
        with subprocess.Popen(
            [*CLI, "stop", "deaf", "--timeout", "3", "--config", str(daemon.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
        ) as stop:
            os.close(terminal)
            shown = b""
            deadline = time.monotonic() + 60
            while stop.poll() is None and time.monotonic() < deadline:
                if select.select([controller], [], [], 1)[0]:
                    try:
                        shown += os.read(controller, 4096)
                    except OSError:  # the terminal's other end closed
                        break
            assert stop.wait(timeout=60) == 0
            assert stop.stdout is not None
            assert "state: stopped" in stop.stdout.read().decode()
    finally:
        os.close(controller)
    text = shown.decode()
    assert re.search(
        r"deaf: waiting for the guest to power off \(ACPI power button\): 1 s / 3 s", text
    )
    assert "(--force kills at once)" in text
    assert text.endswith("\r\x1b[K")  # the line is cleared before the result is printed


def test_a_line_typed_before_the_console_attaches_reaches_the_guest(daemon: Daemon) -> None:
    """Typed ahead on a terminal (a user quick on the keys, or one ssh hop late), a line
    must not be lost when the console switches the terminal to raw mode."""
    write_instance(daemon, "alpha")
    daemon.start()
    shown = daemon.cli_json("start", "alpha")
    wait_for_guest_ready(Path(shown["serial_log"]))
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"echo typed-$((6*7))\n")
        with subprocess.Popen(
            [*CLI, "console", "alpha", "--config", str(daemon.config)],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
        ) as console:
            os.close(terminal)
            seen = b""
            deadline = time.monotonic() + 60
            while b"typed-42" not in seen and time.monotonic() < deadline:
                if select.select([controller], [], [], 1)[0]:
                    seen += os.read(controller, 4096)
            os.write(controller, b"\x1d")
            assert console.wait(timeout=30) == 0
        assert b"typed-42" in seen, seen[-2000:]
        assert b"attached to" in seen
    finally:
        os.close(controller)
        daemon.cli("stop", "alpha", "--force")
