"""A private sshd on 127.0.0.1 for the tests: its own host and client keys, config and
port, started in a mount namespace of its own (a tmpfs on /run holds the /run/sshd it
insists on, so the host's /run is untouched) and ended by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import wait_until

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Sshd:
    port: int
    directory: Path

    @property
    def ssh_command(self) -> str:
        """What ``KVM_SUPERVISOR_SSH`` is set to: ssh with this server's client config."""
        return f"ssh -F {self.directory / 'ssh_config'}"

    def url(self, socket_path: Path | str) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{socket_path}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def private_sshd() -> Iterator[Sshd]:
    if not Path(SSHD).exists():
        raise AssertionError(f"{SSHD} is missing: run `make deps` (openssh-server)")
    directory = Path(tempfile.mkdtemp(prefix="kvs-ssh-", dir="/tmp"))
    process = None
    try:
        for key in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)],
                check=True,
            )
        shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
        port = _free_port()
        host_key = (directory / "host_key.pub").read_text().split()
        (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        # The remote `kvm-supervisor` is this checkout's (the venv's entry point).
        path = f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"
        (directory / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPidFile none\n"
            "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"SetEnv PATH={path} PYTHONPATH={os.environ.get('PYTHONPATH', '')}\n"
        )
        (directory / "ssh_config").write_text(
            f"IdentityFile {directory / 'client_key'}\nIdentitiesOnly yes\n"
            f"UserKnownHostsFile {directory / 'known_hosts'}\nStrictHostKeyChecking yes\n"
            "GlobalKnownHostsFile /dev/null\nLogLevel ERROR\n"
        )
        launch = f"mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec {SSHD} -D -e -f "
        with (directory / "sshd.log").open("wb") as log:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 launch + str(directory / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        wait_until(lambda: _listening(port), what=f"sshd on port {port}", timeout_s=30)
        yield Sshd(port, directory)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)
