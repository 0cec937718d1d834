"""A guest that keeps dirtying its memory: plain precopy never catches up with it at the
bandwidth of these tests, while auto-converge and xbzrle each make it converge.

The guest rewrites `WORKING_SET_MIB` of a tmpfs in place, at well over 60 MiB/s under
TCG here, while the migration may send `BANDWIDTH_MIB_S`: every pass of QEMU over the
guest's memory finds the whole working set dirty again. Each test first shows that (a
plain migration still under way after `CONTROL_PASSES` dirty-sync passes, then
cancelled), then migrates with the capability and checks, in QEMU's figures, that the
capability did the work (auto-converge throttled the guest's CPU; xbzrle sent the
rewritten pages as deltas), and that the guest goes on at the target where it was.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from core.conftest import guest_spec

from protocols.jsonrpc import RPCError
from supervisor.control.migrate import migrate
from supervisor.model.api import MigrationStatus
from supervisor.model.config import Config
from supervisor.qemu.migration_progress import FINISHED, parse_query_migrate

from .conftest import Daemon, counts_on_across, serial_output, two_daemons
from .dirtying import console_of, dirtying_goes_on, guest_console, start_dirtying

WORKING_SET_MIB = 16
BANDWIDTH_MIB_S = 32
DOWNTIME_MS = 30
#: Dirty-sync passes after which the plain migration is still going and is cancelled
#: (the first pass sends the whole guest; each later one finds the working set dirty).
CONTROL_PASSES = 6
#: How long the guest's loop rests after each rewrite. QEMU switches over once what is
#: left to send fits the downtime limit at the bandwidth it measured, in bytes sent; with
#: xbzrle the unchanged pages go as almost nothing, so that bandwidth is near zero and
#: only a dirty-sync pass that finds no page dirtied fits: one that falls in a rest.
#: Without one, only the moment between two `dd` runs could (a few ms): the migration
#: then took 4 to over 90 s. A plain pass over the working set takes 0.5 s at
#: `BANDWIDTH_MIB_S` and always meets a rewrite, so plain precopy still never converges.
REST_S = 0.1
#: Generous for this shared machine (see README, "Live migration", for the times seen).
MIGRATION_TIMEOUT_S = 90
PAGE_SIZE = 4096
MIB = 1024 * 1024


async def plain_precopy_goes_on(source: Daemon, target: Daemon) -> MigrationStatus:
    """Migrate without a capability until QEMU has made `CONTROL_PASSES` dirty-sync
    passes, then cancel; the figures seen at that point."""
    seen: list[MigrationStatus] = []
    enough = anyio.Event()

    def on_progress(status: MigrationStatus) -> None:
        seen.append(status)
        if (status.dirty_sync_count or 0) >= CONTROL_PASSES or status.status in FINISHED:
            enough.set()

    outcome: list[RPCError] = []

    async def run() -> None:
        try:
            await migrate(
                source.client,
                target.client,
                "vm",
                bandwidth_mib_s=BANDWIDTH_MIB_S,
                downtime_ms=DOWNTIME_MS,
                on_progress=on_progress,
            )
        except RPCError as error:
            outcome.append(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(MIGRATION_TIMEOUT_S):
            await enough.wait()
        reached = seen[-1]
        if reached.status not in FINISHED:
            await source.call("migration.cancel", name="vm")
    assert reached.status == "active", f"plain precopy did not go on: {reached}"
    [error] = outcome
    assert error.data["status"]["status"] == "cancelled"
    return reached


@pytest.mark.anyio
@pytest.mark.guest
@pytest.mark.parametrize("capability", ["auto-converge", "xbzrle"])
async def test_a_guest_dirtying_memory_converges_only_with_the_capability(
    configs: tuple[Config, Config], capability: str
) -> None:
    async with two_daemons(configs) as (source, target):
        await source.sup.start(guest_spec("vm", memory_mib=256))
        source_log = source.sup.instance("vm").paths.serial_log
        async with guest_console(source.sup, "vm") as console:
            await start_dirtying(console, WORKING_SET_MIB, rest_s=REST_S)

        reached = await plain_precopy_goes_on(source, target)
        assert reached.cpu_throttle_percentage is None and reached.xbzrle_pages is None
        info = source.sup.info("vm")
        assert (info.state, info.qemu_status) == ("running", "running")
        assert target.sup.list() == []

        seen: list[MigrationStatus] = []
        left_behind: list[bytes] = []

        def on_progress(status: MigrationStatus) -> None:
            seen.append(status)
            if status.status == "completed":
                # The source's guest is stopped now: its serial output is final.
                left_behind.append(serial_output(source_log))

        with anyio.fail_after(MIGRATION_TIMEOUT_S):
            result = await migrate(
                source.client,
                target.client,
                "vm",
                bandwidth_mib_s=BANDWIDTH_MIB_S,
                downtime_ms=DOWNTIME_MS,
                capabilities=[capability],
                on_progress=on_progress,
            )
        final = result.status
        assert final.status == "completed"
        if capability == "auto-converge":
            # QEMU slowed the guest's vCPU down (it starts at 20%) until it converged.
            assert max(s.cpu_throttle_percentage or 0 for s in seen) >= 20
            assert final.xbzrle_pages is None
        else:
            # The rewritten pages went as deltas, far smaller than the pages themselves;
            # the first time QEMU met each page it had nothing to delta against.
            assert final.xbzrle_pages and final.xbzrle_cache_miss
            assert final.xbzrle_mib is not None
            assert final.xbzrle_mib * MIB < final.xbzrle_pages * PAGE_SIZE / 4
            assert all(s.cpu_throttle_percentage is None for s in seen)

        # The guest goes on at the target where it was: no reboot, its loop still going.
        target_log = Path(target.sup.instance("vm").paths.serial_log)
        await counts_on_across(left_behind[-1], target_log)
        async with console_of(target.sup, "vm") as console:
            before = await dirtying_goes_on(console)
            assert await dirtying_goes_on(console) > before
        assert source.sup.list() == []
        await target.sup.stop("vm", force=True)


def test_the_capabilities_figures_come_from_query_migrate() -> None:
    status, _ = parse_query_migrate(
        {
            "status": "active",
            "cpu-throttle-percentage": 40,
            "xbzrle-cache": {
                "cache-size": 64 * MIB,
                "bytes": 3 * MIB,
                "pages": 20000,
                "cache-miss": 4100,
                "cache-miss-rate": 0.2,
                "encoding-rate": 15.3,
                "overflow": 12,
            },
        }
    )
    assert status.cpu_throttle_percentage == 40
    assert (status.xbzrle_pages, status.xbzrle_mib, status.xbzrle_cache_miss) == (20000, 3.0, 4100)
    # Without the capabilities QEMU sends neither.
    plain, _ = parse_query_migrate({"status": "active"})
    assert (plain.cpu_throttle_percentage, plain.xbzrle_pages) == (None, None)
