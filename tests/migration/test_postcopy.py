"""Postcopy migration: the source switches over after a few dirty-sync passes and the
target pulls the rest of the guest's memory as the guest touches it."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from core.conftest import guest_spec

from supervisor.control.migrate import migrate
from supervisor.host.userfaultfd import userfaultfd_refusal
from supervisor.model.api import MigrationStatus
from supervisor.model.config import Config

from .conftest import two_daemons
from .dirtying import console_of, dirtying_goes_on, guest_console, start_dirtying

pytestmark = [pytest.mark.anyio, pytest.mark.guest]

#: Without the switch to postcopy, this guest's migration would go on for ever.
MIGRATION_TIMEOUT_S = 300


async def test_postcopy_migration_of_a_guest_dirtying_memory_completes(
    configs: tuple[Config, Config],
) -> None:
    spec = guest_spec("vm", memory_mib=256, hvparams={"migration_caps": "postcopy-ram"})
    async with two_daemons(configs) as (source, target):
        await source.sup.start(spec)
        async with guest_console(source.sup, "vm") as console:
            await start_dirtying(console, 32)
        seen: list[MigrationStatus] = []
        with anyio.fail_after(MIGRATION_TIMEOUT_S):
            result = await migrate(source.client, target.client, "vm", on_progress=seen.append)
        assert result.status.status == "completed"
        statuses = [status.status for status in seen]
        assert "postcopy-active" in statuses
        # The switch came once QEMU had made the configured number of passes.
        first = statuses.index("postcopy-active")
        before = [s.dirty_sync_count or 0 for s in seen[:first]]
        assert max(before) >= configs[0].migration_postcopy_after_passes
        # The guest runs on at the target, its loop still rewriting its memory.
        async with console_of(target.sup, "vm") as console:
            await dirtying_goes_on(console)
        await target.sup.stop("vm", force=True)


@pytest.mark.parametrize(
    ("sysctl", "root", "refused"),
    [("0\n", True, False), ("1\n", False, False), ("0\n", False, True), (None, True, True)],
)
def test_userfaultfd_refusal_says_why(
    tmp_path: Path, sysctl: str | None, root: bool, refused: bool
) -> None:
    path = tmp_path / "unprivileged_userfaultfd"
    if sysctl is not None:
        path.write_text(sysctl)
    refusal = userfaultfd_refusal(runs_as_root=root, sysctl=path)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert "userfaultfd" in refusal
