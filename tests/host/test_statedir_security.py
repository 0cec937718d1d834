"""The state dir cannot be used to make the daemon (root) write or read through a symlink.

The state dir is created 0750 (group: the control group), and one owned by another user
or writable by group or others is refused at start. The lock file, QEMU's logs and the
runtime records are never opened through a symlink planted in their place; the instance
dirs have no HMP socket (the daemon talks HMP through QMP).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cmdline.test_runtime import make_record
from conftest import QEMU
from core.conftest import kill_leftover_qemus

from supervisor import Supervisor
from supervisor.host.statedir import StateDir
from supervisor.model.config import Config
from supervisor.model.errors import HypervisorError, InvalidConfigError
from supervisor.model.spec import decode_spec
from supervisor.qemu.process import launch
from supervisor.qemu.runtime import RuntimeRecordError, load_record, save_record

NOGROUP = 65534
NOBODY = 65534
PRECIOUS = b"precious contents\n"


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """A file that must come out of every test unchanged: the target of planted symlinks."""
    path = tmp_path / "precious"
    path.write_bytes(PRECIOUS)
    return path


def test_a_new_state_dir_is_0750_with_the_control_group(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        with StateDir(tmp_path / "a" / "state", group_id=NOGROUP) as state:
            info = state.path.stat()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(info.st_mode) == 0o750
    assert info.st_gid == NOGROUP


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o757])
def test_a_state_dir_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(mode)
    state = StateDir(path)
    with pytest.raises(InvalidConfigError, match="writable by group or others") as refused:
        state.acquire()
    assert refused.value.path == "state_dir"
    assert str(path) in str(refused.value)
    assert not state.locked
    assert not state.lock_file.exists()


def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOGROUP)
    with pytest.raises(InvalidConfigError, match=f"owned by uid {NOBODY}") as refused:
        StateDir(path).acquire()
    assert refused.value.path == "state_dir"


def test_an_existing_private_state_dir_is_accepted(tmp_path: Path) -> None:
    for mode in (0o700, 0o750, 0o755):
        path = tmp_path / f"state-{mode:o}"
        path.mkdir()
        path.chmod(mode)
        with StateDir(path) as state:
            assert state.locked
        assert stat.S_IMODE(path.stat().st_mode) == mode  # an admin's choice is kept


def test_the_lock_file_is_not_opened_through_a_symlink(tmp_path: Path, precious: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.path.mkdir(mode=0o700)
    state.lock_file.symlink_to(precious)
    with pytest.raises(InvalidConfigError, match="symbolic link") as refused:
        state.acquire()
    assert str(state.lock_file) in str(refused.value)
    assert precious.read_bytes() == PRECIOUS


@pytest.mark.parametrize("planted", ["instances", "instances/vm1"])
def test_instance_dirs_are_not_followed_through_a_symlink(tmp_path: Path, planted: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = StateDir(tmp_path / "state")
    link = state.path / planted
    link.parent.mkdir(parents=True, mode=0o755)
    link.symlink_to(elsewhere)
    with pytest.raises(InvalidConfigError, match="symbolic link"):
        state.create_instance_dir("vm1")
    assert list(elsewhere.iterdir()) == []


def test_an_instance_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    directory = state.create_instance_dir("vm1").directory
    directory.chmod(0o777)
    with pytest.raises(InvalidConfigError, match="writable by group or others"):
        state.create_instance_dir("vm1")


def test_the_qemu_log_is_not_truncated_through_a_symlink(tmp_path: Path, precious: Path) -> None:
    log = tmp_path / "qemu.log"
    log.symlink_to(precious)
    with pytest.raises(OSError, match="symbolic link"):
        launch(["/bin/true"], log_path=log)
    assert precious.read_bytes() == PRECIOUS


def test_a_record_is_neither_written_nor_read_through_a_symlink(
    tmp_path: Path, precious: Path
) -> None:
    record_path = tmp_path / "runtime.json"
    record_path.symlink_to(precious)
    with pytest.raises(RuntimeRecordError, match="symbolic link"):
        load_record(record_path)
    record = make_record(tmp_path)
    save_record(record_path, record)
    assert precious.read_bytes() == PRECIOUS
    assert not record_path.is_symlink()
    assert stat.S_IMODE(record_path.stat().st_mode) == 0o640
    assert load_record(record_path) == record


@pytest.fixture
def qemu_state_dir(short_tmp: Path) -> Iterator[Path]:
    """A state dir for tests that start QEMU; any QEMU left in it is killed by pid."""
    state_dir = short_tmp / "state"
    try:
        yield state_dir
    finally:
        kill_leftover_qemus(state_dir)


def _config(state_dir: Path) -> Config:
    # shutdown_on_exit: a QEMU started by mistake ends with the test.
    return Config(
        state_dir=str(state_dir),
        instances_dir=str(state_dir / "defs"),
        hvparams={"kvm_path": QEMU},
        shutdown_on_exit=True,
    )


@pytest.mark.anyio
@pytest.mark.qemu
@pytest.mark.parametrize("log", ["qemu_log", "serial_log"])
async def test_a_start_refuses_logs_planted_as_symlinks(
    qemu_state_dir: Path, precious: Path, log: str
) -> None:
    config = _config(qemu_state_dir)
    async with Supervisor(config) as sup:
        paths = sup.state_dir.create_instance_dir("planted")
        getattr(paths, log).symlink_to(precious)
        with pytest.raises(HypervisorError, match="symbolic link") as refused:
            await sup.start(decode_spec({"name": "planted", "memory_mib": 64}), paused=True)
        assert str(getattr(paths, log)) in str(refused.value)
    assert precious.read_bytes() == PRECIOUS


@pytest.mark.anyio
@pytest.mark.qemu
async def test_instance_dirs_hold_no_hmp_socket(qemu_state_dir: Path) -> None:
    config = _config(qemu_state_dir)
    async with Supervisor(config) as sup:
        await sup.start(decode_spec({"name": "nohmp", "memory_mib": 64}), paused=True)
        try:
            record = sup.instance("nohmp").record
            assert record is not None
            assert "-monitor" not in record.argv
            assert sorted(p.name for p in record.paths.directory.glob("*.sock")) == [
                "qmp.sock",
                "serial.sock",
            ]
            assert await sup.monitor("nohmp", "info status") == "VM status: paused (prelaunch)"
        finally:
            await sup.stop("nohmp", force=True)


def test_planted_instance_dirs_are_refused_at_start_and_never_adopted(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "vm2").mkdir(parents=True)
    state = StateDir(tmp_path / "state")
    state.create_instance_dir("vm1")
    (state.instances_root / "vm2").symlink_to(elsewhere / "vm2")
    assert state.instance_names() == ["vm1"]
    state.instances_root.chmod(0o777)
    with pytest.raises(InvalidConfigError, match="writable by group or others"):
        state.acquire()
