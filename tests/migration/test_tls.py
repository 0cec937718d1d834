"""Migration over TLS (``migration_tls_x509_dir``) between two daemons on one host."""

from __future__ import annotations

from pathlib import Path

import pytest
from core.conftest import guest_spec

from protocols.jsonrpc import RPCError
from supervisor.control.migrate import migrate
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError

from .conftest import daemon_config, two_daemons, wait_heartbeat
from .pki import x509_dir

pytestmark = [pytest.mark.anyio, pytest.mark.guest]

MIGRATION_ERROR = 8
INVALID_CONFIG = 7


def tls_configs(
    state_dirs: tuple[Path, Path], source_pki: Path, target_pki: Path
) -> tuple[Config, Config]:
    return (
        daemon_config(state_dirs[0], migration_tls_x509_dir=str(source_pki)),
        daemon_config(state_dirs[1], migration_tls_x509_dir=str(target_pki)),
    )


async def test_tls_migration_completes(state_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    pki = x509_dir(tmp_path / "pki")
    async with two_daemons(tls_configs(state_dirs, pki, pki)) as (source, target):
        started = await source.sup.start(guest_spec("vm"))
        await wait_heartbeat(source.sup.instance("vm").paths.serial_log, 1)
        result = await migrate(source.client, target.client, "vm")
        assert result.status.status == "completed"
        assert result.instance.uuid == started.uuid
        # The target's QEMU took the stream with our credentials.
        parameters = await target.sup.qmp("vm", "query-migrate-parameters")
        assert parameters["tls-creds"] == "kvs-migration-tls"
        await wait_heartbeat(target.sup.instance("vm").paths.serial_log, 1)
        await target.sup.stop("vm", force=True)


async def test_tls_with_a_wrong_ca_fails_and_the_source_keeps_running(
    state_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    configs = tls_configs(state_dirs, x509_dir(tmp_path / "a"), x509_dir(tmp_path / "b"))
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"))
        with pytest.raises(RPCError) as failed:
            await migrate(source.client, target.client, "vm")
        assert failed.value.code == MIGRATION_ERROR
        status = failed.value.data["status"]
        assert status["status"] == "failed"
        assert (
            "known issuer" in status["error"]
        )  # QEMU: "The certificate hasn't got a known issuer"
        info = source.sup.info("vm")
        assert (info.state, info.qemu_status) == ("running", "running")
        assert target.sup.list() == []


async def test_an_incomplete_x509_dir_is_refused_naming_the_key(
    state_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    pki = x509_dir(tmp_path / "pki")
    (pki / "server-key.pem").unlink()
    async with two_daemons(tls_configs(state_dirs, pki, pki)) as (source, target):
        await source.sup.start(guest_spec("vm"))
        with pytest.raises(RPCError) as refused:
            await migrate(source.client, target.client, "vm")
        assert refused.value.code == INVALID_CONFIG
        assert "migration_tls_x509_dir" in refused.value.message
        assert "server-key.pem" in refused.value.message
        assert target.sup.list() == []
        assert source.sup.info("vm").state == "running"


def test_the_x509_dir_must_be_absolute() -> None:
    with pytest.raises(InvalidConfigError, match="migration_tls_x509_dir"):
        daemon_config(Path("/tmp/x"), migration_tls_x509_dir="pki")
