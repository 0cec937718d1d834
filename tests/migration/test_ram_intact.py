"""A live migration carries a busy TCG guest's RAM over intact, page for page.

QEMU 7.2 under TCG loses guest stores during a live migration of a RAM block sized in
whole 256 KiB (`supervisor.qemu.cmdline.TCG_RAM_PAD_KIB` says why); a guest busy in its
kernel (``dd`` from ``/dev/urandom``) then arrives with a score of stale pages and
crashes on the target. Here the target's QEMU gets ``stop`` while it is incoming, which
clears QEMU's autostart: once the migration has completed neither end runs guest code,
and the two RAMs must be equal. Then the target resumes and the guest runs on. The same
holds for a migration that switches to postcopy (its discard of pages dirtied since they
were sent reads the same dirty bitmap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from core.conftest import guest_spec, wait_for_serial
from net_guest.conftest import SHELL_READY
from serial_console import connect_console

from protocols import qmp
from supervisor.model.config import Config
from supervisor.qemu.migration_progress import FINISHED

from .conftest import counts_on_across, progress_until, serial_output, two_daemons

pytestmark = [pytest.mark.anyio, pytest.mark.guest]

PAGE = 4096
#: A pc machine's RAM below 4 GiB, less the legacy VGA and ROM hole (640 KiB-1 MiB).
LOW_RAM_END, HIGH_RAM_START = 0xA0000, 0x100000


async def ram_pages(client: qmp.QMPClient, directory: Path) -> dict[int, bytes]:
    """The guest's RAM, by guest-physical page address (``pmemsave``)."""
    summary = await client.execute("query-memory-size-summary")
    pages = {}
    for start, end in ((0, LOW_RAM_END), (HIGH_RAM_START, int(summary["base-memory"]))):
        path = directory / f"ram-{start:x}"
        await client.execute("pmemsave", {"val": start, "size": end - start, "filename": str(path)})
        data = path.read_bytes()
        path.unlink()
        pages |= {start + at: data[at : at + PAGE] for at in range(0, len(data), PAGE)}
    return pages


async def incoming_completed(client: qmp.QMPClient) -> str:
    """How the target's side of the migration ended (it loads the last state a moment
    after the source reports completion)."""
    async with client.events({"MIGRATION"}) as events:
        status = str((await client.execute("query-migrate")).get("status"))
        if status in FINISHED:
            return status
        async for event in events:
            if isinstance(event, qmp.QMPEvent) and event.data["status"] in FINISHED:
                return str(event.data["status"])
    raise AssertionError("the target's events ended")


#: Runs on in the guest's kernel, storing through TCG's TLB all along the migration.
URANDOM_TO_NULL = "(dd if=/dev/urandom of=/dev/null bs=4096 &)"
#: The same, rewriting 16 MiB of a tmpfs besides: no precopy pass catches up with it, so
#: a postcopy migration switches over after the configured passes (2). One long-lived dd
#: at a time (a loop of short processes would flush TCG's TLB as it switches between them).
URANDOM_TO_TMPFS = (
    "mkdir -p /dirty && mount -t tmpfs -o size=20m tmpfs /dirty &&"
    " (while :; do dd if=/dev/urandom of=/dirty/f bs=1M count=16 2>/dev/null; done &)"
)


@pytest.mark.parametrize(
    ("migration_caps", "workload"),
    [("", URANDOM_TO_NULL), ("postcopy-ram", URANDOM_TO_TMPFS)],
    ids=["precopy", "postcopy"],
)
async def test_a_busy_guest_arrives_with_every_page_as_the_source_left_it(
    configs: tuple[Config, Config], tmp_path: Path, migration_caps: str, workload: str
) -> None:
    async with two_daemons(configs) as (source, target):
        spec = guest_spec("vm", hvparams={"migration_caps": migration_caps})
        started = await source.sup.start(spec)
        source_log = Path(started.serial_log or "")
        await wait_for_serial(source_log, SHELL_READY)
        async with connect_console(started.console["socket"]) as console:
            await console.run(workload)

        info = await source.call("migration.info", name="vm")
        accepted = await target.call(
            "migration.accept", spec=info["spec"], runtime=info["runtime"], address="127.0.0.1"
        )
        # Held once it arrives: `stop` while incoming turns QEMU's autostart off.
        await target.sup.instance("vm").require_running().execute("stop")
        async with source.sup.events(instances=["vm"], kinds=["migration.progress"]) as events:
            await source.call(
                "migration.start", name="vm", target="127.0.0.1", port=accepted["port"]
            )
            statuses: list[str] = []

            def finished(data: dict[str, Any]) -> bool:
                statuses.append(data["status"])
                return data["status"] in FINISHED

            ended = await progress_until(events, finished)
        assert ended["status"] == "completed"
        assert ("postcopy-active" in statuses) == bool(migration_caps)
        target_qmp = target.sup.instance("vm").require_running()
        assert await incoming_completed(target_qmp) == "completed"
        assert (await target_qmp.execute("query-status"))["status"] == "paused"
        source_qmp = source.sup.instance("vm").require_running()
        assert (await source_qmp.execute("query-status"))["status"] == "postmigrate"
        # Final: the source's guest stopped for good (finalize_source removes its log).
        left_behind = serial_output(source_log)

        left = await ram_pages(source_qmp, tmp_path)
        arrived = await ram_pages(target_qmp, tmp_path)
        assert left.keys() == arrived.keys()
        stale = [f"{address:#x}" for address in sorted(left) if left[address] != arrived[address]]
        assert stale == [], f"{len(stale)} of {len(left)} pages differ on the target"

        finalized = await target.call(
            "migration.finalize_target", name="vm", runtime=info["runtime"], success=True
        )
        assert finalized["state"] == "running"
        await source.call("migration.finalize_source", name="vm", success=True)
        target_log = target.sup.instance("vm").paths.serial_log
        await counts_on_across(left_behind, target_log)
        await target.sup.stop("vm", force=True)
