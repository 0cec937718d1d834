"""The state dir lock (one daemon per dir), stale socket removal and instance paths."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.host.statedir import MAX_SOCKET_PATH_BYTES, StateDir, StateDirLocked
from supervisor.model.errors import InvalidConfigError


def leave_stale_socket(path: Path) -> None:
    """A socket file as a killed daemon leaves it: bound, never unlinked."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


@pytest.fixture
def other_daemon(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding tmp_path/state; killed (as with kill -9) afterwards."""
    script = textwrap.dedent(
        f"""
        import sys
        from supervisor.host.statedir import StateDir
        StateDir({str(tmp_path / "state")!r}).acquire()
        print("locked", file=sys.stderr, flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == "locked\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.close()
        proc.stderr.close()


def test_acquire_writes_the_pid_and_excludes_a_second_holder(tmp_path: Path) -> None:
    first = StateDir(tmp_path / "state")
    second = StateDir(tmp_path / "state")
    with first:
        assert first.locked
        assert first.lock_file.read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateDirLocked, match=f"pid {os.getpid()}") as caught:
            second.acquire()
        assert caught.value.holder_pid == os.getpid()
        assert not second.locked
    assert not first.locked
    with second:
        assert second.locked


def test_acquire_twice_on_one_object(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state, pytest.raises(RuntimeError, match="already locked"):
        state.acquire()


def test_a_killed_daemon_leaves_a_lock_that_is_free_and_a_stale_socket(
    tmp_path: Path, other_daemon: subprocess.Popen[str]
) -> None:
    state = StateDir(tmp_path / "state")
    leave_stale_socket(state.control_socket)
    with pytest.raises(StateDirLocked) as caught:
        state.acquire()
    assert caught.value.holder_pid == other_daemon.pid
    assert state.control_socket.exists(), "removed a socket a live daemon may serve"
    other_daemon.send_signal(signal.SIGKILL)
    other_daemon.wait()
    with state:
        assert not state.control_socket.exists()
        assert state.lock_file.read_text() == f"{os.getpid()}\n"


def test_a_file_in_place_of_the_socket_is_not_removed(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.control_socket.write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        state.acquire()
    assert not state.locked
    assert state.control_socket.read_text() == "not a socket"
    state.control_socket.unlink()
    with StateDir(tmp_path) as again:
        assert again.locked


def test_children_do_not_inherit_the_lock(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.acquire()
    child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        fds = Path(f"/proc/{child.pid}/fd")
        assert str(state.lock_file) not in {os.readlink(fd) for fd in fds.iterdir()}
        state.release()
        with StateDir(tmp_path) as successor:
            assert successor.locked
    finally:
        state.release()
        child.kill()
        child.wait()


def test_the_state_dir_is_created_reachable(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        with StateDir(tmp_path / "a" / "state") as state:
            assert state.path.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old_umask)


def test_instance_paths(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    paths = state.instance("vm-1.example")
    directory = tmp_path / "instances" / "vm-1.example"
    assert paths.directory == directory
    assert paths.qmp_socket == directory / "qmp.sock"
    assert paths.serial_socket == directory / "serial.sock"
    assert paths.serial_log == directory / "serial.log"
    assert paths.pid_file == directory / "qemu.pid"
    assert paths.qemu_log == directory / "qemu.log"
    assert paths.runtime_record == directory / "runtime.json"
    assert paths.chroot == tmp_path / "chroot" / "vm-1.example"
    assert paths.sockets == (paths.qmp_socket, paths.serial_socket)
    assert not directory.exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 64, "a\nb"])
def test_bad_instance_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidConfigError, match="not a valid instance name"):
        StateDir(tmp_path).instance(name)


def test_create_instance_dir(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    old_umask = os.umask(0o077)
    try:
        paths = state.create_instance_dir("vm1", group_id=100)
    finally:
        os.umask(old_umask)
    info = paths.directory.stat()
    assert info.st_mode & 0o777 == 0o750
    assert info.st_gid == 100
    assert state.instances_root.stat().st_mode & 0o777 == 0o755
    assert state.create_instance_dir("vm1") == paths


def test_socket_paths_must_fit(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH_BYTES - len(str(tmp_path)) - 30))
    state = StateDir(deep)
    with pytest.raises(InvalidConfigError, match="107-byte limit") as caught:
        state.create_instance_dir("name-of-twenty-chars")
    assert caught.value.path == "name"
    assert not state.instances_root.exists()
    state.create_instance_dir("short")


def test_instance_names_and_removal(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.instance_names() == []
    for name in ("b", "a", "c"):
        state.create_instance_dir(name)
    (state.instances_root / "stray-file").write_text("")
    (state.instances_root / ".tmp").mkdir()
    (state.instance("c").qemu_log).write_text("log")
    assert state.instance_names() == ["a", "b", "c"]
    assert state.discard_instance_dir("c")
    assert not state.discard_instance_dir("missing")
    assert state.instance_names() == ["a", "b"]
    (discarded,) = state.trash_dir.iterdir()
    assert discarded.name.startswith("c.") and (discarded / "qemu.log").read_text() == "log"
    assert state.trash_dir.stat().st_mode & 0o777 == 0o700
    # A dir of the same name again, discarded again: both wait in the trash.
    state.create_instance_dir("c")
    assert state.discard_instance_dir("c")
    assert len(list(state.trash_dir.iterdir())) == 2
    (state.trash_dir / "stray-file").write_text("")
    assert state.empty_trash() == []
    assert list(state.trash_dir.iterdir()) == []
