"""One instance under supervision: its QEMU process, its QMP connection and its state.

While QEMU runs, one task (`Instance.supervise`) owns it: it holds the single
persistent QMP connection, pumps QEMU's events into the event bus and the state
machine, and waits on the process's pidfd, so an exit is noticed at once whether
QEMU was started by this daemon or adopted from a previous one. Operations from
clients (`stop`, `pause`, ...) run in the caller's task and talk to QEMU through
the same connection; one operation at a time per instance (others get `Busy`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from protocols import qmp
from protocols.hmp import HMPError, HMPTimeoutError, QMPHumanMonitor
from supervisor.engine.events import EventBus, make_event
from supervisor.host.statedir import InstancePaths
from supervisor.model.api import ConsoleInfo, InstanceInfo, NicInfo
from supervisor.model.config import Config
from supervisor.model.errors import (
    Busy,
    HypervisorError,
    InstanceNotRunning,
    InvalidConfigError,
    InvalidParams,
    MonitorError,
    OperationTimeout,
)
from supervisor.model.spec import InstanceSpec
from supervisor.model.states import (
    ALIVE,
    TERMINAL,
    InstanceState,
    can_transition,
    state_for_qemu_status,
)
from supervisor.qemu.process import ExitStatus, QemuProcess
from supervisor.qemu.runtime import RuntimeRecord

S = InstanceState

#: QMP commands that would change state behind the supervisor's back, and what to use instead.
REFUSED_QMP_COMMANDS = {
    "quit": "instance.stop",
    "system_powerdown": "instance.stop",
    "stop": "instance.pause",
    "cont": "instance.resume",
    "migrate": "migration.start",
    "migrate-incoming": "migration.accept",
    "migrate_cancel": "migration.cancel",
    "balloon": "instance.balloon",
    "qmp_capabilities": "(already negotiated)",
    "human-monitor-command": "instance.monitor",
}

MIB = 1024 * 1024

#: How soon a lost monitor connection to a live QEMU is tried again.
MONITOR_RETRY_S = 2.0

#: How long an operation waits for the one in progress before it gets `Busy`.
BUSY_WAIT_S = 5.0

#: How long a killed QEMU may take to disappear before we report it as stuck.
KILL_WAIT_S = 10.0

#: QEMU run states of a guest whose state comes from, or went to, another host: it
#: must not run here (`resume` refuses them).
MIGRATION_STATUSES = frozenset({"inmigrate", "finish-migrate", "postmigrate"})

#: QEMU run states in which `stop` kills at once: a guest that never ran has nothing to
#: shut down, and pressing the power button of a migrated one would need a ``cont``.
KILLED_ON_STOP = MIGRATION_STATUSES | {"prelaunch"}

StartupSteps = Callable[[qmp.QMPClient], Awaitable[None]]


class Instance:
    """A known instance: defined by a file, by a runtime record, or both."""

    def __init__(
        self,
        name: str,
        *,
        paths: InstancePaths,
        bus: EventBus,
        config: Config,
        on_exit: Callable[[Instance], None] | None = None,
    ) -> None:
        self.name = name
        #: Gives back what a run held (leases, sockets); runs before the exit is reported,
        #: so whoever reacts to it (a start, a reboot) finds everything free.
        self.on_exit = on_exit
        self.paths = paths
        self.bus = bus
        self.config = config
        self.log = structlog.get_logger("supervisor.engine.instance").bind(instance=name)
        self.definition: InstanceSpec | None = None
        self.record: RuntimeRecord | None = None
        self.state = S.STOPPED
        self.reason: str | None = None
        self.process: QemuProcess | None = None
        self.qmp: qmp.QMPClient | None = None
        self.qemu_status: str | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.crash_history: list[float] = []
        #: Memory (the balloon's actual size) and vCPUs as QEMU reported them this run.
        self.memory_seen_mib: int | None = None
        self.vcpus_seen: int | None = None
        self._operation: str | None = None
        self._operation_lock = anyio.Lock()
        self._exited = anyio.Event()
        self._exited.set()
        #: Set once this run's monitor has answered (state, sizes known).
        self.monitor_ready = anyio.Event()
        self._exit_reason: str | None = None
        self._shutdown_reason: str | None = None

    # -- state ---------------------------------------------------------------------------

    def set_state(self, new: InstanceState, reason: str, **details: Any) -> None:
        """Change state and publish ``instance.state`` (a no-op for an illegal change)."""
        previous = self.state
        if new == previous or not can_transition(previous, new):
            return
        self.state = new
        self._publish_state(previous, reason, **details)

    def _publish_state(self, previous: InstanceState, reason: str, **details: Any) -> None:
        self.reason = reason
        data = {"state": str(self.state), "previous": str(previous), "reason": reason, **details}
        self.log.info("state", **data)
        self.bus.publish(make_event(self.name, "instance.state", data))

    @property
    def alive(self) -> bool:
        return self.state in ALIVE

    @contextlib.asynccontextmanager
    async def operation(self, what: str) -> AsyncIterator[None]:
        """Run one operation at a time on this instance.

        A second operation waits up to `BUSY_WAIT_S` for the first (so back-to-back
        calls just queue), then gets `Busy`.
        """
        with anyio.move_on_after(BUSY_WAIT_S):
            await self._operation_lock.acquire()
        if not self._operation_lock.locked() or self._operation is not None:
            raise Busy(self.name, self._operation or "another operation")
        self._operation = what
        try:
            yield
        finally:
            self._operation = None
            self._operation_lock.release()

    def require_running(self) -> qmp.QMPClient:
        """The QMP client of a live instance, or `InstanceNotRunning`."""
        if not self.alive or self.qmp is None or self.qmp.closed:
            raise InstanceNotRunning(self.name, str(self.state))
        return self.qmp

    # -- supervision of one QEMU run -------------------------------------------------------

    async def supervise(
        self,
        process: QemuProcess,
        *,
        startup: StartupSteps | None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> ExitStatus:
        """Own one QEMU run until it exits; return its exit status.

        With `startup` (a fresh start) the steps run once QMP is connected, and
        ``task_status.started()`` follows them; failures before that kill QEMU and
        raise `HypervisorError` with the tail of its output. Without (an adopted
        QEMU) the state is read from QEMU. Whenever the monitor connection is lost
        while QEMU lives on (a hung QEMU, a bug), it is retried every
        `MONITOR_RETRY_S`; the exit is noticed through the pidfd all the while. On
        cancellation (the daemon is leaving) QEMU is left running.
        """
        self.process = process
        self._exited = anyio.Event()
        self.monitor_ready = anyio.Event()
        self._exit_reason = None
        self._shutdown_reason = None
        exited = await self._first_session(process, startup, task_status)
        while not exited:  # the monitor went away, QEMU did not
            with anyio.move_on_after(MONITOR_RETRY_S):
                self._handle_exit(await process.wait_exit())
                break
            exited = await self._monitor_session(process, startup=None)
        return process.exit_status or ExitStatus(code=None, signal=None)

    async def _first_session(
        self, process: QemuProcess, startup: StartupSteps | None, task_status: TaskStatus[None]
    ) -> bool:
        """The first monitor session of a run; True once QEMU's exit was reported."""
        if startup is None:
            # Adopted: `starting` until the monitor tells QEMU's state, and started at
            # once, so a hung QEMU never holds up the daemon.
            self.set_state(S.STARTING, "adopted")
            task_status.started()
            return await self._monitor_session(process, startup=None)
        deadline = anyio.current_time() + self.config.start_timeout_s
        with anyio.CancelScope(deadline=deadline) as start_scope:
            try:
                return await self._monitor_session(process, startup, task_status, start_scope)
            except Exception as error:  # raised only before start-up completed
                await self._abort_start(process, error)
        limit = self.config.start_timeout_s
        await self._abort_start(
            process, TimeoutError(f"QEMU was not up within start_timeout_s ({limit:g} s)")
        )
        return True

    async def _monitor_session(
        self,
        process: QemuProcess,
        startup: StartupSteps | None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
        start_scope: anyio.CancelScope | None = None,
    ) -> bool:
        """One QMP connection: until QEMU exits (reported here: True) or the monitor fails.

        With `startup`, failures before start-up completes are raised; any other
        failure is logged and the caller retries. `start_scope`'s deadline is lifted
        once start-up is done.
        """
        started = exited = False
        session: qmp.QMPClient | None = None
        try:
            async with (
                qmp.connect(self.paths.qmp_socket, timeout=self.config.qmp_timeout_s) as client,
                client.events(max_buffer=self.config.event_queue_size) as qmp_events,
                anyio.create_task_group() as tg,
            ):
                self.qmp = session = client
                tg.start_soon(self._pump_events, qmp_events)
                if startup is not None:
                    await startup(client)
                else:
                    await self.refresh_status()
                await self._read_sizes(client)
                if start_scope is not None:
                    start_scope.deadline = math.inf
                started = True
                self.monitor_ready.set()
                task_status.started()
                # Returns when QEMU exits, or when the monitor is lost first.
                async with anyio.create_task_group() as watch:
                    watch.start_soon(self._cancel_on_monitor_loss, client, watch.cancel_scope)
                    # Report the exit before the QMP connection is torn down.
                    self._handle_exit(await process.wait_exit())
                    exited = True
                    watch.cancel_scope.cancel()
                tg.cancel_scope.cancel()
        except Exception:
            if startup is not None and not started:
                raise
            self.log.exception("QMP monitor lost; retrying")
        finally:
            if self.qmp is session:  # a later run may have its own connection by now
                self.qmp = None
        return exited

    async def _cancel_on_monitor_loss(
        self, client: qmp.QMPClient, scope: anyio.CancelScope
    ) -> None:
        await client.wait_closed()
        # A dying QEMU closes its monitor just before its pidfd fires: give the exit
        # the moment it needs, so it is reported with its status rather than retried.
        await anyio.sleep(MONITOR_RETRY_S)
        scope.cancel()

    async def _abort_start(self, process: QemuProcess, error: BaseException) -> None:
        """Kill a QEMU whose start failed and raise `HypervisorError` explaining why."""
        with anyio.CancelScope(shield=True):
            if process.is_alive():
                process.kill()
            with anyio.move_on_after(KILL_WAIT_S):
                await process.wait_exit()
            self._exit_reason = "start-failed"
            self._handle_exit(process.exit_status or ExitStatus(code=None, signal=None))
        if isinstance(error, HypervisorError | InvalidConfigError):
            raise error
        if isinstance(error, qmp.ExecuteError):
            cause = f"{error.command}: {error.desc}"
        else:
            cause = str(error) or type(error).__name__
        status = process.exit_status
        raise HypervisorError(
            f"QEMU of {self.name!r} failed to start: {cause}",
            stderr=process.stderr_tail(),
            exit_status=None if status is None else status.code,
        ) from error

    async def _pump_events(self, events: qmp.EventSubscription) -> None:
        try:
            async for item in events:
                if isinstance(item, qmp.EventsDropped):
                    self.log.warning("qmp events dropped", count=item.count)
                    continue
                try:
                    self._on_qmp_event(item)
                except (KeyError, TypeError, ValueError):
                    self.log.exception("unexpected QMP event data", event=item.name)
        except qmp.ConnectionLostError:
            # QEMU closed the monitor: its exit shows through the pidfd.
            self.log.debug("qmp connection lost")

    def _on_qmp_event(self, event: qmp.QMPEvent) -> None:
        self.bus.publish(make_event(self.name, f"qmp.{event.name}", event.data))
        if event.name == "STOP":
            self.qemu_status = "paused"
            if self.state == S.RUNNING:
                self.set_state(S.PAUSED, "paused")
        elif event.name == "RESUME":
            self.qemu_status = "running"
            if self.state in (S.PAUSED, S.STARTING, S.INCOMING):
                self.set_state(S.RUNNING, "resumed" if self.state == S.PAUSED else "started")
        elif event.name == "SHUTDOWN":
            self.qemu_status = "shutdown"
            guest = bool(event.data.get("guest"))
            self._shutdown_reason = "guest-shutdown" if guest else str(event.data.get("reason"))
        elif event.name == "BALLOON_CHANGE":
            self.memory_seen_mib = int(event.data["actual"]) // MIB
        elif event.name == "GUEST_PANICKED":
            self.log.error("guest panicked", **event.data)

    async def _read_sizes(self, client: qmp.QMPClient) -> None:
        """Memory and vCPUs as QEMU reports them; BALLOON_CHANGE events keep memory current."""
        self.vcpus_seen = len(await client.execute("query-cpus-fast"))
        try:
            balloon = await client.execute("query-balloon")
            self.memory_seen_mib = int(balloon["actual"]) // MIB
        except qmp.ExecuteError:  # no balloon device
            summary = await client.execute("query-memory-size-summary")
            self.memory_seen_mib = int(summary["base-memory"]) // MIB

    async def refresh_status(self) -> str:
        """Ask QEMU its run state and align ours with it."""
        client = self.require_running() if self.qmp is None else self.qmp
        result = await client.execute("query-status")
        self.qemu_status = str(result["status"])
        wanted = state_for_qemu_status(self.qemu_status)
        if self.state in TERMINAL or self.state == S.STARTING:
            self.set_state(S.STARTING, "adopted")
        self.set_state(wanted, "adopted")
        return self.qemu_status

    def _handle_exit(self, status: ExitStatus) -> None:
        """Turn QEMU's exit into the final state and its reason."""
        self.process = None
        self.qemu_status = None
        self.memory_seen_mib = self.vcpus_seen = None
        details: dict[str, Any] = {}
        if status.code is not None:
            details["exit_status"] = status.code
        if status.signal is not None:
            details["signal"] = status.signal
        if self._exit_reason is not None:
            new, reason = S.STOPPED, self._exit_reason
        elif self._shutdown_reason == "guest-shutdown":
            new, reason = S.STOPPED, "guest-shutdown"
        elif self._shutdown_reason is not None:
            # QEMU was told to quit: a monitor `quit`, a signal, its UI.
            new, reason = S.STOPPED, "host-powerdown"
            details["qemu_reason"] = self._shutdown_reason
        else:
            new, reason = S.CRASHED, "crashed"
            if not status.known:
                details["exit_status"] = None
            self.crash_history.append(time.monotonic())
        if self.on_exit is not None:
            try:
                self.on_exit(self)
            except OSError:
                self.log.exception("clean-up after exit failed")
        self.set_state(new, reason, **details)
        self._exited.set()
        self.monitor_ready.set()  # nobody need wait for the monitor of a QEMU that is gone

    async def wait_exited(self) -> None:
        await self._exited.wait()

    # -- operations --------------------------------------------------------------------

    async def stop(self, *, force: bool, timeout_s: float) -> None:
        """ACPI power-down, then a kill after `timeout_s`; `force` kills at once.

        Returns once QEMU has exited and the instance is stopped. A paused guest is
        resumed after the power button is pressed, since only a running guest can
        act on it. A crashed instance becomes stopped (no restart follows). If the
        call is cancelled before QEMU exits, the instance returns to QEMU's state.
        """
        if self.state == S.CRASHED:
            self.state, previous = S.STOPPED, self.state
            self._publish_state(previous, "stop requested")
            return
        if not self.alive or self.process is None:
            return
        process = self.process
        self.set_state(S.STOPPING, "stop requested")
        try:
            if not force and self.qmp is not None and not self.qmp.closed:
                with contextlib.suppress(qmp.QMPError):
                    status = (await self.qmp.execute("query-status"))["status"]
                    force = status in KILLED_ON_STOP
                    if not force:
                        await self.qmp.execute("system_powerdown")
                        if status != "running":
                            await self.qmp.execute("cont")
                if not force:
                    with anyio.move_on_after(timeout_s):
                        await self._exited.wait()
            if not self._exited.is_set():
                self._exit_reason = "killed"
                if process.is_alive():
                    process.send_signal(signal.SIGKILL)
                with anyio.move_on_after(KILL_WAIT_S) as scope:
                    await self._exited.wait()
                if scope.cancelled_caught:
                    raise OperationTimeout(
                        f"exit of QEMU {process.pid} of {self.name!r} after SIGKILL", KILL_WAIT_S
                    )
        finally:
            if not self._exited.is_set() and self.state == S.STOPPING:
                self._exit_reason = None
                running = self.qemu_status == "running"
                self.state = S.RUNNING if running else S.PAUSED
                self._publish_state(S.STOPPING, "stop abandoned")

    async def pause(self) -> None:
        client = self.require_running()
        await self._execute(client, "stop")
        self.qemu_status = "paused"
        self.set_state(S.PAUSED, "paused")

    async def resume(self) -> None:
        client = self.require_running()
        # Asked, not taken from our state: a migrated guest resumed would run twice.
        status = (await self._execute(client, "query-status"))["status"]
        if status in MIGRATION_STATUSES:
            raise InstanceNotRunning(self.name, f"{self.state}, QEMU {status}")
        await self._execute(client, "cont")
        self.qemu_status = "running"
        self.set_state(S.RUNNING, "resumed")

    async def balloon(self, memory_mib: int) -> None:
        client = self.require_running()
        await self._execute(client, "balloon", {"value": memory_mib * MIB})

    async def qmp_passthrough(self, command: str, arguments: dict[str, Any] | None) -> Any:
        if command in REFUSED_QMP_COMMANDS:
            raise InvalidConfigError(
                "command",
                f"{command!r} would bypass the supervisor: use {REFUSED_QMP_COMMANDS[command]}",
            )
        return await self._execute(self.require_running(), command, arguments)

    async def human_monitor(self, command: str) -> str:
        client = self.require_running()
        try:
            output: str = await QMPHumanMonitor(client).command(command)
        except ValueError as error:  # a control character, or too long for QEMU's editor
            raise InvalidParams("command", str(error)) from None
        except HMPTimeoutError:
            timeout = self.config.qmp_timeout_s
            raise OperationTimeout(f"monitor command on {self.name!r}", timeout) from None
        except HMPError as error:
            raise MonitorError("HMPError", str(error)) from None
        except qmp.QMPError as error:
            raise self._monitor_error(error) from None
        return output

    async def _execute(
        self, client: qmp.QMPClient, command: str, arguments: dict[str, Any] | None = None
    ) -> Any:
        try:
            return await client.execute(command, arguments)
        except qmp.QMPError as error:
            raise self._monitor_error(error) from None

    def _monitor_error(self, error: qmp.QMPError) -> MonitorError | OperationTimeout:
        if isinstance(error, qmp.QMPTimeoutError):
            return OperationTimeout(f"{error.command} on {self.name!r}", self.config.qmp_timeout_s)
        if isinstance(error, qmp.ExecuteError):
            return MonitorError(error.error_class, f"{error.command}: {error.desc}")
        return MonitorError(type(error).__name__, str(error))

    # -- reporting ---------------------------------------------------------------------

    def spec(self) -> InstanceSpec | None:
        """The spec of the current (or last) run, else the definition."""
        if self.record is not None:
            return self.record.spec
        return self.definition

    def console(self) -> ConsoleInfo:
        record = self.record
        if record is None or not self.alive:
            return ConsoleInfo(kind="message", message=f"instance {self.name!r} is not running")
        if record.vnc_port is not None:
            host = record.hvparams.vnc_bind_address or "127.0.0.1"
            return ConsoleInfo(
                kind="vnc", host=host, port=record.vnc_port, display=record.vnc_port - 5900
            )
        if record.spice_port is not None:
            return ConsoleInfo(
                kind="spice", host=record.hvparams.spice_bind, port=record.spice_port
            )
        if record.hvparams.serial_console:
            return ConsoleInfo(kind="serial", socket=str(self.paths.serial_socket))
        return ConsoleInfo(kind="message", message="this instance has no console")

    def info(self) -> InstanceInfo:
        spec = self.spec()
        record = self.record
        now = time.time()
        running = self.alive and self.started_at is not None
        return InstanceInfo(
            name=self.name,
            uuid=spec.uuid if spec else None,
            state=str(self.state),
            pid=self.process.pid if self.process is not None else None,
            memory_mib=self.memory_seen_mib or (spec.memory_mib if spec else 0),
            vcpus=self.vcpus_seen or (spec.vcpus if spec else 0),
            qemu_status=self.qemu_status,
            uptime_s=round(now - self.started_at, 3) if running and self.started_at else None,
            started_at=self.started_at if running else None,
            nics=[
                NicInfo(mac=nic.mac or "", tap=nic.tap, mode=nic.mode, link=nic.link)
                for nic in (record.nics if record else [])
            ],
            console=self._console_dict(),
            restarts=self.restarts,
            reason=self.reason,
            serial_log=str(self.paths.serial_log),
            accel=record.accel if record else None,
        )

    def _console_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.to_builtins(self.console())
        return result


def backoff_delay(crashes: int) -> float:
    """Seconds to wait before restart number `crashes` (1, 2, 4, ... capped at 60)."""
    return float(min(60, 2 ** max(0, crashes - 1)))


def recent_crashes(history: list[float], window_s: float) -> int:
    now = time.monotonic()
    return sum(1 for at in history if now - at <= window_s)
