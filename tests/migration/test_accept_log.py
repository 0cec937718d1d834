"""What ``migration.accept`` logs: the accelerator it chose for the guest, once."""

from __future__ import annotations

import logging

import pytest
from core.conftest import guest_spec

from supervisor.model.config import Config
from supervisor.qemu.accel import KvmAvailability

from .conftest import two_daemons

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]

NOT_FOR_STOCK_GUESTS = KvmAvailability(
    device_openable=True, pvm_host=True, reason="this is a kvm_pvm host"
)


async def test_the_accept_warns_once_that_kvm_is_not_usable(
    configs: tuple[Config, Config], caplog: pytest.LogCaptureFixture
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm"), paused=True)
        info = await source.call("migration.info", name="vm")
        target.sup.launcher.kvm = NOT_FOR_STOCK_GUESTS  # as on this kind of host, anywhere
        caplog.clear()  # the source's start warned too
        with caplog.at_level(logging.WARNING, logger="supervisor"):
            await target.call(
                "migration.accept", spec=info["spec"], runtime=info["runtime"], address="127.0.0.1"
            )
        warnings = [
            record.event_dict
            for record in caplog.records
            if getattr(record, "event_dict", {}).get("event", "").startswith("KVM is not usable")
        ]
        assert warnings == [
            {
                "event": "KVM is not usable for stock guests: using TCG (slow)",
                "instance": "vm",
                "reason": "this is a kvm_pvm host",
            }
        ]
        await target.call(
            "migration.finalize_target", name="vm", runtime=info["runtime"], success=False
        )
        await source.sup.stop("vm", force=True)
