"""`kvm-supervisor serve` as a real process: CLI verbs, bad input, adoption after kill -9."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import GUEST_DIR
from helpers import gone_or_zombie, kill_leftover_qemus, wait_gone, wait_until

from .conftest import FAST_KERNEL_ARGS, GUEST_MIB, READY, serial_shows

pytestmark = [pytest.mark.guest]

CLI = [sys.executable, "-m", "supervisor.cli"]


class Daemon:
    """A `kvm-supervisor serve` child process with its own config and state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.config = state_dir / "supervisor.toml"
        self.socket = state_dir / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_message = b""
        self.log = state_dir / "daemon.log"

    def write_config(self, **extra: Any) -> None:
        defs = self.state_dir / "defs"
        defs.mkdir(exist_ok=True)
        lines = [
            f'state_dir = "{self.state_dir}"',
            f'instances_dir = "{defs}"',
            "stop_timeout_s = 30",
            *(f"{key} = {json.dumps(value)}" for key, value in extra.items()),
            "[hvparams]",
            f'kernel_path = "{GUEST_DIR / "vmlinuz"}"',
            f'initrd_path = "{GUEST_DIR / "initrd.img"}"',
            f'kernel_args = "{FAST_KERNEL_ARGS}"',
            "serial_console = true",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        """Start `serve` and wait for its READY=1 (sd_notify): adoption and autostart done."""
        notify_path = self.state_dir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(0.2)
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [*CLI, "serve", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
                try:
                    self.ready_message = notify.recv(4096)
                except TimeoutError:
                    continue
                return
        raise TimeoutError("daemon did not send READY=1")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=90)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*CLI, *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args}: {result.returncode} {result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json", check=True).stdout)


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    d = Daemon(state_dir)
    d.write_config()
    try:
        yield d
    finally:
        d.kill(signal.SIGTERM)
        kill_leftover_qemus(state_dir)


def write_instance(daemon: Daemon, name: str, **fields: Any) -> Path:
    path = daemon.state_dir / "defs" / f"{name}.toml"
    body = {"memory_mib": GUEST_MIB, **fields}
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items()))
    return path


def wait_for_guest_ready(serial_log: Path) -> None:
    wait_until(
        serial_shows(serial_log, READY), what=f"the guest ready in {serial_log}", timeout_s=90
    )


class PipeReader:
    """A child's output pipe, read as data comes (select), up to a marker or a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.fd = pipe.fileno()
        self.buffer = b""

    def wait_readable(self, timeout_s: float) -> bool:
        """Whether output is buffered or arrives within `timeout_s`."""
        return bool(self.buffer) or bool(select.select([self.fd], [], [], timeout_s)[0])

    def read_until(self, marker: bytes, timeout_s: float = 30) -> bytes:
        """The output up to and including `marker`; TimeoutError if it has not come by then."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.buffer:
            if not select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(
                    f"{marker!r} not in the output within {timeout_s} s: {self.buffer!r}"
                )
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError(f"the output ended before {marker!r}: {self.buffer!r}")
            self.buffer += chunk
        end = self.buffer.index(marker) + len(marker)
        output, self.buffer = self.buffer[:end], self.buffer[end:]
        return output


def console_session(daemon: Daemon, name: str, typed: bytes, until: bytes) -> bytes:
    """Attach with `kvm-supervisor console`, type, read until the echo, detach with Ctrl-]."""
    proc = subprocess.Popen(
        [*CLI, "console", name, "--config", str(daemon.config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"\n" + typed)
        proc.stdin.flush()
        output = PipeReader(proc.stdout).read_until(until)
        proc.stdin.write(b"\x1d")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return output


def rpc_lines(sock_path: Path, payload: bytes, *, expect: int) -> list[dict[str, Any]]:
    """Send raw bytes to the control socket and read `expect` response lines."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(sock_path))
        # An oversize line is answered and the connection closed: the answer stays readable.
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(payload)
        data = b""
        while data.count(b"\n") < expect:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_cli_verbs_against_the_daemon(daemon: Daemon) -> None:
    write_instance(daemon, "alpha")
    daemon.start()
    assert daemon.cli_json("ping")["version"]
    info = daemon.cli_json("info")
    assert info["qemu"]["version"].startswith("7.2")
    assert info["node"]["cpu_count"] == os.cpu_count()
    verify = daemon.cli_json("verify")
    assert verify["problems"] == []
    assert daemon.cli_json("list") == [{"name": "alpha", "state": "stopped", "pid": None}]

    started = daemon.cli_json("start", "alpha")
    assert started["state"] == "running"
    table = daemon.cli("list", check=True).stdout
    assert "alpha" in table and "running" in table

    shown = daemon.cli_json("show", "alpha")
    assert shown["pid"] == started["pid"]
    assert Path(shown["serial_log"]).name == "serial.log"
    assert daemon.cli_json("pause", "alpha")["state"] == "paused"
    assert daemon.cli_json("resume", "alpha")["state"] == "running"
    out = daemon.cli("monitor", "alpha", "info", "status", check=True).stdout
    assert "VM status: running" in out
    qmp = daemon.cli_json("qmp", "alpha", "query-status")
    assert qmp["return"]["status"] == "running"
    refused = daemon.cli("qmp", "alpha", "quit")
    assert refused.returncode == 1 and "instance.stop" in refused.stderr
    assert daemon.cli_json("balloon", "alpha", "80")["name"] == "alpha"
    wait_for_guest_ready(Path(shown["serial_log"]))
    assert b"console-42" in console_session(
        daemon, "alpha", b"echo console-$((6*7))\n", b"console-42"
    )
    stopped = daemon.cli_json("stop", "alpha", "--force")
    assert stopped["state"] == "stopped"
    assert daemon.cli_json("cleanup", "alpha") == {}
    missing = daemon.cli("show", "nope")
    assert missing.returncode == 1 and "not found" in missing.stderr
    usage = daemon.cli("start")
    assert usage.returncode == 2


def test_unreachable_daemon_exit_status(daemon: Daemon) -> None:
    result = daemon.cli("ping")
    assert result.returncode == 3
    assert result.stdout == ""


def test_bad_rpc_input_gets_errors_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    daemon.start()
    sock = daemon.socket
    garbage = rpc_lines(sock, b"this is not json\n", expect=1)
    assert garbage[0]["error"]["code"] == -32700
    unknown = rpc_lines(sock, b'{"jsonrpc":"2.0","id":1,"method":"no.such"}\n', expect=1)
    assert unknown[0]["error"]["code"] == -32601
    bad_params = rpc_lines(
        sock,
        b'{"jsonrpc":"2.0","id":2,"method":"instance.info","params":{"name":"../x"}}\n',
        expect=1,
    )
    assert bad_params[0]["error"]["code"] == -32602
    assert bad_params[0]["error"]["data"]["path"] == "name"
    wrong_type = rpc_lines(
        sock,
        b'{"jsonrpc":"2.0","id":3,"method":"instance.start","params":'
        b'{"spec":{"name":"x","nics":[{"mac":"zz"}]}}}\n',
        expect=1,
    )
    assert wrong_type[0]["error"]["data"]["path"] == "spec.nics[0].mac"
    not_found = rpc_lines(
        sock,
        b'{"jsonrpc":"2.0","id":4,"method":"instance.info","params":{"name":"ghost"}}\n',
        expect=1,
    )
    assert not_found[0]["error"]["code"] == 1
    semantic = rpc_lines(
        sock,
        b'{"jsonrpc":"2.0","id":5,"method":"instance.start","params":'
        b'{"spec":{"name":"x","hvparams":{"serial_speed":1234}}}}\n',
        expect=1,
    )
    assert semantic[0]["error"]["code"] == 7
    assert semantic[0]["error"]["data"]["path"] == "spec.hvparams.serial_speed"
    batch = rpc_lines(
        sock,
        b'[{"jsonrpc":"2.0","id":6,"method":"supervisor.ping"},'
        b'{"jsonrpc":"2.0","method":"supervisor.ping"},5]\n',
        expect=1,
    )
    assert sorted(str(r.get("id")) for r in batch[0]) == ["6", "None"]
    oversize = rpc_lines(sock, b"[" + b" " * (2 * 1024 * 1024) + b"]\n", expect=1)
    assert oversize[0]["error"]["code"] == -32600
    discover = rpc_lines(sock, b'{"jsonrpc":"2.0","id":7,"method":"rpc.discover"}\n', expect=1)
    names = {m["name"] for m in discover[0]["result"]["methods"]}
    assert {"instance.start", "events.subscribe"} <= names
    assert daemon.cli_json("ping")["version"]


def listed_when_started(daemon: Daemon) -> list[dict[str, Any]]:
    """`list` once no instance is `starting` (or stopped, waiting for its autostart):
    autostart and adoption go on behind READY=1."""

    def started() -> tuple[list[dict[str, Any]]] | None:
        listed: list[dict[str, Any]] = daemon.cli_json("list")
        done = all(i["state"] not in ("starting", "stopped") for i in listed)
        return (listed,) if done else None

    return wait_until(started, what="no instance starting", timeout_s=90)[0]


def test_kill_9_daemon_then_restart_adopts_running_vms(daemon: Daemon) -> None:
    for name in ("a1", "a2", "a3"):
        write_instance(daemon, name, autostart=True)
    daemon.start()
    listed = listed_when_started(daemon)
    assert [i["state"] for i in listed] == ["running"] * 3
    before = {i["name"]: i["pid"] for i in listed}
    daemon.kill(signal.SIGKILL)
    for pid in before.values():
        assert not gone_or_zombie(pid)  # the VMs outlive their daemon
    daemon.start()
    after = {i["name"]: (i["state"], i["pid"]) for i in listed_when_started(daemon)}
    assert after == {name: ("running", pid) for name, pid in before.items()}
    assert daemon.cli_json("pause", "a2")["state"] == "paused"
    stopped = daemon.cli_json("stop", "a1", "--force")
    assert stopped["state"] == "stopped"
    wait_gone(before["a1"])
    for name in ("a2", "a3"):
        daemon.cli("stop", name, "--force", check=True)


def test_sd_notify_ready_and_events_verb(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.ready_message == b"READY=1"
    assert daemon.cli_json("ping")["version"]

    write_instance(daemon, "evt")
    write_instance(daemon, "sync")
    daemon.cli_json("start", "sync", "--paused")
    events = subprocess.Popen(
        [
            *CLI,
            "events",
            "--instance",
            "evt",
            "--instance",
            "sync",
            "--kind",
            "instance.state",
            "--json",
            "--config",
            str(daemon.config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert events.stdout is not None
        stream = PipeReader(events.stdout)

        def next_event() -> dict[str, Any]:
            event: dict[str, Any] = json.loads(stream.read_until(b"\n"))
            return event

        # The verb shows nothing when its subscription lands: "sync" changes state until
        # one of its events comes through, and from then on every event does.
        toggles = itertools.cycle(["resume", "pause"])

        def change_sync_and_see_it() -> bool:
            daemon.cli_json(next(toggles), "sync")
            return stream.wait_readable(timeout_s=1)

        wait_until(change_sync_and_see_it, what="an event through the verb", timeout_s=60)
        daemon.cli_json("stop", "sync", "--force")
        daemon.cli_json("start", "evt", "--paused")
        daemon.cli_json("stop", "evt", "--force")
        states: list[str] = []
        while len(states) < 3:
            event = next_event()
            if event["instance"] == "evt":
                states.append(event["data"]["state"])
    finally:
        events.kill()
        events.wait()
        if events.stdout is not None:
            events.stdout.close()
    assert states == ["starting", "paused", "stopping"]


def test_peers_outside_root_and_the_control_group_are_refused(daemon: Daemon) -> None:
    daemon.start()
    probe = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        # The daemon may refuse before the request is even sent: that counts as refused.
        "try:\n"
        '    s.sendall(b\'{"jsonrpc":"2.0","id":1,"method":"supervisor.ping"}\\n\')\n'
        "    print('answer' if s.recv(4096) else 'closed')\n"
        "except (BrokenPipeError, ConnectionResetError):\n    print('closed')\n"
    )
    os.chmod(daemon.state_dir, 0o755)
    result = subprocess.run(
        [sys.executable, "-c", probe, str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # The socket is 0660 root:root, so the kernel already refuses nobody's connect; with
    # the mode opened up, the daemon's SO_PEERCRED check closes the connection unanswered.
    if "Permission denied" in result.stderr:
        os.chmod(daemon.socket, 0o666)
        result = subprocess.run(
            [sys.executable, "-c", probe, str(daemon.socket)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.stdout.strip() == "closed", result.stderr
    assert daemon.cli_json("ping")["version"]


def test_sigterm_leaves_vms_running_unless_shutdown_on_exit(daemon: Daemon) -> None:
    write_instance(daemon, "keep", autostart=True)
    daemon.start()
    [listed] = listed_when_started(daemon)
    pid = listed["pid"]
    daemon.kill(signal.SIGTERM)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert not gone_or_zombie(pid)

    daemon.write_config(shutdown_on_exit=True)
    daemon.start()
    assert listed_when_started(daemon) == [listed]  # adopted: same pid, running
    shown = daemon.cli_json("show", "keep")
    # The ACPI power button needs a booted guest (its acpid) to have any effect.
    wait_for_guest_ready(Path(shown["serial_log"]))
    daemon.kill(signal.SIGTERM)
    wait_gone(pid)


def test_socat_one_shot_requests_are_answered(daemon: Daemon) -> None:
    daemon.start()
    write_instance(daemon, "sc")
    # socat half-closes after stdin's EOF: requests in flight must still be answered.
    request = b'{"jsonrpc":"2.0","id":1,"method":"instance.start","params":{"name":"sc"}}\n'
    result = subprocess.run(
        ["socat", "-t", "30", "-", f"UNIX-CONNECT:{daemon.socket}"],
        input=request,
        capture_output=True,
        timeout=60,
    )
    reply = json.loads(result.stdout)
    assert reply["result"]["state"] == "running", result.stdout
    listed = subprocess.run(
        ["socat", "-", f"UNIX-CONNECT:{daemon.socket}"],
        input=b'{"jsonrpc":"2.0","id":2,"method":"instance.list"}\n',
        capture_output=True,
        timeout=60,
    )
    assert json.loads(listed.stdout)["result"] == [
        {"name": "sc", "state": "running", "pid": reply["result"]["pid"]}
    ]
    daemon.cli("stop", "sc", "--force", check=True)
