"""What a start takes from the host (display port, pool uid, interface addresses): the
``cmdline`` verb and the daemon compute it the same way."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from supervisor.host.statedir import StateDir
from supervisor.host.uidpool import UidPool
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError
from supervisor.qemu.cmdline import argv_for_spec_file

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]

# High uids no process on a test machine runs as.
BASE = 3_900_000_100


@pytest.fixture
def anyio_backend() -> str:
    # QEMU probing dominates; the capability tests run the probe on both backends.
    return "asyncio"


def _pool_config(state_dir: Path) -> Config:
    return Config(state_dir=str(state_dir), uid_pool=[f"{BASE}-{BASE + 1}"])


async def test_the_verb_skips_uids_leased_by_the_daemon(short_tmp: Path, tmp_path: Path) -> None:
    config = _pool_config(short_tmp)
    pool = UidPool(StateDir(config.state_dir).uid_lease_dir, config.uid_ranges())
    pool.request("running-elsewhere")
    spec = tmp_path / "pooled.toml"
    spec.write_text('[hvparams]\nsecurity_model = "pool"\n')
    argv = await argv_for_spec_file(spec, config)
    assert argv[argv.index("-runas") + 1] == f"{BASE + 1}:{BASE + 1}"
    # Only looked: the daemon's lease is untouched and nothing new is leased.
    assert [lease.owner for lease in pool.leases()] == ["running-elsewhere"]


async def test_the_verb_names_the_pool_when_it_is_full(short_tmp: Path, tmp_path: Path) -> None:
    config = _pool_config(short_tmp)
    pool = UidPool(StateDir(config.state_dir).uid_lease_dir, config.uid_ranges())
    pool.request("a")
    pool.request("b")
    spec = tmp_path / "pooled.toml"
    spec.write_text('[hvparams]\nsecurity_model = "pool"\n')
    with pytest.raises(InvalidConfigError) as caught:
        await argv_for_spec_file(spec, config)
    assert caught.value.path == "uid_pool"
    assert caught.value.reason.startswith(f"no free uid in the pool {BASE}-{BASE + 1}: 2 of 2")


async def test_a_display_on_an_interface_gets_its_address(short_tmp: Path, tmp_path: Path) -> None:
    spec = tmp_path / "lo.toml"
    spec.write_text('[hvparams]\nspice_bind = "lo"\nspice_ip_version = 4\n')
    argv = await argv_for_spec_file(spec, Config(state_dir=str(short_tmp)))
    assert argv[argv.index("-spice") + 1].startswith("addr=127.0.0.1,")
    assert await anyio.Path(short_tmp / "instances" / "lo").is_dir()
