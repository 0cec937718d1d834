"""``kvm-supervisor migrate NAME --to TARGET``: a migration with its progress on show.

On a terminal, one line redrawn at every ``migration.progress`` figure (percent, MiB
sent, throughput, what remains, the expected downtime); with ``--json``, one JSON object
per figure and one for the outcome; otherwise just the outcome. Ctrl-C cancels: the
guest keeps running on the source and the target is cleaned up.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Final, TextIO

import anyio
import msgspec

from protocols.groups import ungrouped
from protocols.jsonrpc import RPCClient
from supervisor.control.migrate import MigrationResult, migrate
from supervisor.model.api import MigrationStatus

__all__ = ["run_migrate"]

#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_CANCELLED: Final = 130

_MEGABIT: Final = 1_000_000 / 8 / (1024 * 1024)  # MiB per megabit


class _Progress:
    """Shows each figure: a redrawn line on a terminal, JSON lines with ``--json``."""

    def __init__(self, name: str, out: TextIO, *, as_json: bool) -> None:
        self.name = name
        self.out = out
        self.as_json = as_json
        self.terminal = out.isatty() and not as_json
        self.drawn = False

    def show(self, status: MigrationStatus) -> None:
        if self.as_json:
            self.out.write(msgspec.json.encode(status).decode() + "\n")
        elif self.terminal:
            self.out.write(f"\r{self.line(status)}\x1b[K")
            self.drawn = True
        else:
            return
        self.out.flush()

    def line(self, status: MigrationStatus) -> str:
        parts = [
            self.name,
            status.status,
            f"{status.percent:5.1f}%",
            f"{status.transferred_mib:.1f} MiB sent",
        ]
        if status.mbps is not None:
            parts.append(f"{status.mbps * _MEGABIT:.1f} MiB/s")
        parts.append(f"{status.remaining_mib:.1f} MiB to go")
        if status.expected_downtime_ms is not None:
            parts.append(f"expected downtime {status.expected_downtime_ms} ms")
        return "  ".join(parts)

    def end_line(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False

    def outcome(self, result: MigrationResult, target: str) -> None:
        self.end_line()
        if self.as_json:
            value: dict[str, Any] = {"outcome": "completed", **msgspec.to_builtins(result)}
            self.out.write(msgspec.json.encode(value).decode() + "\n")
        else:
            downtime = result.status.downtime_ms
            shown = "unknown" if downtime is None else f"{downtime} ms"
            self.out.write(
                f"{self.name} migrated to {target} in {result.total_s:.2f} s (downtime {shown})\n"
            )
        self.out.flush()


async def _cancel_on_sigint(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def run_migrate(args: argparse.Namespace, source: RPCClient, target: RPCClient) -> int:
    """Run the verb between the clients of both daemons; returns the exit status (the
    daemons' errors are raised)."""
    progress = _Progress(args.name, sys.stdout, as_json=args.json)
    result = None
    try:
        # The daemons' errors leave bare, for the CLI to report.
        with ungrouped():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_sigint, tg.cancel_scope)
                result = await migrate(
                    source,
                    target,
                    args.name,
                    address=args.address or "127.0.0.1",
                    port=args.port,
                    live=args.live,
                    bandwidth_mib_s=args.bandwidth,
                    downtime_ms=args.downtime,
                    on_progress=progress.show,
                )
                tg.cancel_scope.cancel()
    finally:
        progress.end_line()
    if result is None:
        print(
            f"kvm-supervisor: migration of {args.name!r} cancelled: it runs on the source",
            file=sys.stderr,
        )
        return EXIT_CANCELLED
    progress.outcome(result, args.to)
    return 0
