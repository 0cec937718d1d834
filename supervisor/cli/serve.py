"""``kvm-supervisor serve``: the daemon in the foreground.

Unlike the embeddable `Supervisor`, the daemon owns its process: it becomes a
child subreaper (so QEMUs whose parent vanished are reaped by it at once, with
their exit status, instead of lingering as zombies until PID 1's slow sweep),
handles SIGTERM/SIGINT by leaving cleanly (VMs keep running unless
``shutdown_on_exit``) and tells systemd it is ready (READY=1) once the control
socket serves: every runtime record is registered by then, while the adopted
monitors and the autostarts go on behind it.
"""

from __future__ import annotations

import signal

import anyio

from supervisor.cli.sdnotify import sd_notify
from supervisor.control.server import serve_control
from supervisor.engine.supervisor import Supervisor
from supervisor.log import get_logger
from supervisor.model.config import Config
from supervisor.qemu.process import reap_orphans, set_child_subreaper

_log = get_logger(__name__)

#: How often orphans reparented to the daemon are reaped without a SIGCHLD; they are rare
#: (QEMU's own helpers), and SIGCHLD wakes the reaper at once anyway. Each sweep wakes
#: an idle daemon: at 5 s they were all the CPU it used (tests/bench/bench_ganeti.py).
ORPHAN_SWEEP_S = 60.0


async def _reap_orphans_on_sigchld() -> None:
    with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
        while True:
            reaped = reap_orphans()
            if reaped:
                _log.debug("reaped orphans", pids=sorted(reaped))
            with anyio.move_on_after(ORPHAN_SWEEP_S):
                await signals.__anext__()


async def serve(config: Config) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    set_child_subreaper()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stop_signals:
        async with (
            Supervisor(config) as sup,
            serve_control(sup),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_reap_orphans_on_sigchld)
            _log.info(
                "serving",
                socket=str(config.control_socket),
                state_dir=config.state_dir,
                instances=len(sup.list()),
            )
            sd_notify("READY=1")
            async for signum in stop_signals:
                _log.info("stopping", signal=signal.Signals(signum).name)
                sd_notify("STOPPING=1")
                tg.cancel_scope.cancel()
                break
