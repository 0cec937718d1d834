"""``kvm-supervisor`` that kills itself with SIGKILL at one chosen point of a start.

Fault injection for the restart tests: ``python crash_daemon.py POINT serve --config F``.
The daemon dies exactly as under ``kill -9`` (no clean-up code runs), at:

- ``pid-record``: when the runtime record that first carries QEMU's pid is about to be
  saved, i.e. QEMU is spawned and nothing on disk names its pid yet;
- ``startup-steps``: when the start-up steps begin (CPU pinning), i.e. QEMU is spawned
  and still in ``-S``, never continued;
- ``migrate-incoming``: when ``migration.accept`` is about to send ``migrate-incoming``,
  i.e. the incoming QEMU is started (``incoming``) and listens nowhere yet;
- ``accept-end``: once QEMU has answered ``migrate-incoming`` and the commands sent with
  it, before ``migration.accept`` saves the record that completes it, i.e. the incoming
  QEMU listens and nobody got its port;
- ``migrate``: when ``migration.start`` is about to send ``migrate``, i.e. the source's
  QEMU holds the stream's connection to the target (``getfd``) and migrates nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_at_pid_record() -> None:
    from supervisor.engine import launcher
    from supervisor.qemu import runtime

    save_record = runtime.save_record

    def crashing_save(path: Any, record: Any) -> None:
        if record.pid is not None:
            _die()
        save_record(path, record)

    runtime.save_record = crashing_save  # type: ignore[assignment]
    if hasattr(launcher, "save_record"):
        launcher.save_record = crashing_save


def _crash_at_startup_steps() -> None:
    from supervisor.engine import launcher

    async def crashing_pin(*args: Any) -> None:
        _die()

    launcher.pin_vcpus = crashing_pin  # type: ignore[assignment]


def _crash_around_migration_command(name: str, *, after: bool) -> None:
    """Crash where the migration engine is about to send QMP command `name` (with the
    commands sent at once with it), or, `after`, once QEMU has answered them."""
    from supervisor.engine import migration

    execute_in_order = migration._execute_in_order

    async def crashing_execute_in_order(client: Any, *commands: Any, **kwargs: Any) -> Any:
        named = any(command == name for command, _ in commands)
        if named and not after:
            _die()
        results = await execute_in_order(client, *commands, **kwargs)
        if named:
            _die()
        return results

    migration._execute_in_order = crashing_execute_in_order


def _crash_before_migrate() -> None:
    """Crash as ``migrate`` is about to be sent: alone, or after ``getfd`` in one write
    (a migration ``migration.prepare`` set up)."""
    from supervisor.engine import migration

    execute = migration._execute
    execute_in_order = migration._execute_in_order

    async def crashing_execute(client: Any, command: str, *args: Any, **kwargs: Any) -> Any:
        if command == "migrate":
            _die()
        return await execute(client, command, *args, **kwargs)

    async def crashing_execute_in_order(client: Any, *commands: Any, **kwargs: Any) -> Any:
        if any(command == "migrate" for command, _ in commands):
            _die()
        return await execute_in_order(client, *commands, **kwargs)

    migration._execute = crashing_execute
    migration._execute_in_order = crashing_execute_in_order


POINTS = {
    "pid-record": _crash_at_pid_record,
    "startup-steps": _crash_at_startup_steps,
    "migrate-incoming": lambda: _crash_around_migration_command("migrate-incoming", after=False),
    "accept-end": lambda: _crash_around_migration_command("migrate-incoming", after=True),
    "migrate": _crash_before_migrate,
}

if __name__ == "__main__":
    POINTS[sys.argv[1]]()
    from supervisor.cli.main import main

    raise SystemExit(main(sys.argv[2:]))
