"""Security models with real QEMU: run as a given user, and uids leased from a pool."""

from __future__ import annotations

import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from helpers import await_until

from supervisor import Supervisor
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError

from .conftest import guest_spec

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]

TEST_USER = "kvs-test-user"


@pytest.fixture
def test_user() -> Iterator[pwd.struct_passwd]:
    """A system user made for the test and deleted after it."""
    # A run killed before its clean-up may have left the user behind.
    subprocess.run(["userdel", TEST_USER], check=False, capture_output=True)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
        check=True,
    )
    try:
        yield pwd.getpwnam(TEST_USER)
    finally:
        subprocess.run(["userdel", TEST_USER], check=False)


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for process {pid}")


async def process_uid(pid: int) -> int:
    """The real uid of `pid` once QEMU has dropped root (it does so during start-up)."""
    return await await_until(lambda: real_uid(pid), what=f"process {pid} drops root", timeout_s=30)


async def test_security_model_user_runs_qemu_as_that_user(
    config: Config, test_user: pwd.struct_passwd
) -> None:
    async with Supervisor(config) as sup:
        spec = guest_spec(
            "sec-user", hvparams={"security_model": "user", "security_domain": TEST_USER}
        )
        info = await sup.start(spec, paused=True)
        assert info.pid is not None
        assert await process_uid(info.pid) == test_user.pw_uid
        await sup.stop("sec-user", force=True)


async def test_security_model_user_needs_an_existing_user(config: Config) -> None:
    async with Supervisor(config) as sup:
        spec = guest_spec(
            "sec-nouser", hvparams={"security_model": "user", "security_domain": "no-such-user"}
        )
        with pytest.raises(InvalidConfigError) as error:
            await sup.start(spec)
        assert error.value.path == "spec.hvparams.security_domain"


async def test_uid_pool_leases_distinct_uids_and_releases_them(config: Config) -> None:
    config = msgspec.structs.replace(config, uid_pool=["64000-64001"])
    pool_params = {"security_model": "pool"}
    async with Supervisor(config) as sup:
        first = await sup.start(guest_spec("pool-a", hvparams=pool_params), paused=True)
        second = await sup.start(guest_spec("pool-b", hvparams=pool_params), paused=True)
        assert first.pid is not None and second.pid is not None
        uids = {await process_uid(first.pid), await process_uid(second.pid)}
        assert uids == {64000, 64001}
        with pytest.raises(InvalidConfigError) as error:
            await sup.start(guest_spec("pool-c", hvparams=pool_params), paused=True)
        assert error.value.path == "uid_pool"

        await sup.stop("pool-a", force=True)
        third = await sup.start(guest_spec("pool-c", hvparams=pool_params), paused=True)
        assert third.pid is not None
        assert await process_uid(third.pid) in uids
        for name in ("pool-b", "pool-c"):
            await sup.stop(name, force=True)
        leases = Path(config.state_dir) / "uid-leases"
        assert [p.name for p in leases.iterdir() if not p.name.startswith(".")] == []


async def test_chroot_is_removed_after_stop_or_quarantined_when_not_empty(
    config: Config,
) -> None:
    async with Supervisor(config) as sup:
        spec = guest_spec("jail", hvparams={"use_chroot": True})
        await sup.start(spec, paused=True)
        chroot = sup.instance("jail").paths.chroot
        assert chroot.is_dir()
        await sup.stop("jail", force=True)
        assert not chroot.exists()

        await sup.start(spec, paused=True)
        (chroot / "left-behind").write_text("evidence")
        await sup.stop("jail", force=True)
        assert not chroot.exists()
        quarantined = list((Path(config.state_dir) / "quarantine").iterdir())
        assert [p.name.startswith("jail-") for p in quarantined] == [True]
        assert (quarantined[0] / "left-behind").read_text() == "evidence"


async def test_leases_of_vms_gone_during_a_daemon_crash_are_released(config: Config) -> None:
    from supervisor.host.uidpool import UidPool

    config = msgspec.structs.replace(config, uid_pool=["64000-64001"])
    leases = Path(config.state_dir) / "uid-leases"
    UidPool(leases, config.uid_ranges()).request("ghost")
    async with Supervisor(config) as sup:
        assert sup.list() == []
        assert UidPool(leases, config.uid_ranges()).leases() == []
