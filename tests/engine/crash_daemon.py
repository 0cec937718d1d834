"""``kvm-supervisor`` that kills itself with SIGKILL at one chosen point of a start.

Fault injection for the restart tests: ``python crash_daemon.py POINT serve --config F``.
The daemon dies exactly as under ``kill -9`` (no clean-up code runs), at:

- ``pid-record``: when the runtime record that first carries QEMU's pid is about to be
  saved, i.e. QEMU is spawned and nothing on disk names its pid yet;
- ``startup-steps``: when the start-up steps begin (CPU pinning), i.e. QEMU is spawned
  and still in ``-S``, never continued;
- ``migrate-incoming``: when ``migration.accept`` is about to send ``migrate-incoming``,
  i.e. the incoming QEMU is started (``incoming``) and listens nowhere yet;
- ``accept-end``: when ``migration.accept`` is about to send its last command (``cont``),
  i.e. the incoming QEMU listens and nobody got its port.
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


def _crash_at_migration_command(name: str) -> None:
    """Crash where the migration engine is about to send QMP command `name`."""
    from supervisor.engine import migration

    execute = migration._execute

    async def crashing_execute(client: Any, command: str, arguments: Any = None) -> Any:
        if command == name:
            _die()
        return await execute(client, command, arguments)

    migration._execute = crashing_execute


POINTS = {
    "pid-record": _crash_at_pid_record,
    "startup-steps": _crash_at_startup_steps,
    "migrate-incoming": lambda: _crash_at_migration_command("migrate-incoming"),
    # The target daemon runs nothing but the accept: its only `cont` is the accept's.
    "accept-end": lambda: _crash_at_migration_command("cont"),
}

if __name__ == "__main__":
    POINTS[sys.argv[1]]()
    from supervisor.cli.main import main

    raise SystemExit(main(sys.argv[2:]))
