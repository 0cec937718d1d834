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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from protocols import qmp
from protocols.groups import sole_exception, ungrouped
from protocols.hmp import HMPCommandError, HMPError, HMPTimeoutError, QMPHumanMonitor
from supervisor.engine.events import EventBus, make_event
from supervisor.engine.monitor_commands import (
    SECRET_HMP,
    SECRET_QMP,
    hmp_command_name,
    hmp_refusal,
    qmp_refusal,
)
from supervisor.host.statedir import InstancePaths
from supervisor.log import get_logger
from supervisor.model.api import ConsoleInfo, InstanceInfo, NicInfo
from supervisor.model.config import Config
from supervisor.model.errors import (
    Busy,
    HypervisorError,
    InstanceNotRunning,
    InvalidConfigError,
    InvalidParams,
    MigrationError,
    MonitorError,
    OperationTimeout,
    SupervisorError,
)
from supervisor.model.spec import InstanceSpec
from supervisor.model.states import (
    ALIVE,
    TERMINAL,
    InstanceState,
    can_transition,
    exit_for_shutdown,
    state_for_qemu_status,
)
from supervisor.qemu.process import ExitStatus, QemuProcess
from supervisor.qemu.runtime import RuntimeRecord

S = InstanceState

#: QEMU run states in which ``cont`` must not be sent, and why.
NOT_RESUMABLE = {
    # QEMU would run a guest that now lives on the migration target: two copies.
    "postmigrate": "it was migrated away and runs on the target now",
    "finish-migrate": "it is finishing a migration",
    "inmigrate": "it waits for an incoming migration",
}

MIB = 1024 * 1024

#: In place of QEMU's message when a command with a secret argument fails.
_WITHHELD = "failed (QEMU's message is withheld: it may quote an argument)"

#: How soon a lost monitor connection to a live QEMU is tried again.
MONITOR_RETRY_S = 2.0

#: How long an exit waits for QEMU's last events (the SHUTDOWN that says why).
DRAIN_S = 2.0

#: How long an operation waits for the one in progress before it gets `Busy`.
BUSY_WAIT_S = 5.0

#: How long a killed QEMU may take to disappear before we report it as stuck.
KILL_WAIT_S = 10.0

#: Why an instance stopped whose QEMU waited for a migration that did not complete: its
#: guest never ran here (the source still has it), so this is no crash and no restart.
MIGRATION_FAILED = "migration-failed"

#: QEMU run states in which `stop` kills at once: a guest that never ran has nothing to
#: shut down, and pressing the power button of a migrated one would need a ``cont``.
KILLED_ON_STOP = frozenset({*NOT_RESUMABLE, "prelaunch"})

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
        on_exit: Callable[[Instance], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        #: Gives back what a run held (leases, sockets, NICs); runs, shielded, before the
        #: exit is reported, so whoever reacts to it (a start, a reboot) finds it all free.
        self.on_exit = on_exit
        self.paths = paths
        self.bus = bus
        self.config = config
        self.log = get_logger(__name__).bind(instance=name)
        self.definition: InstanceSpec | None = None
        self.record: RuntimeRecord | None = None
        self._state = S.STOPPED
        self.reason: str | None = None
        self.process: QemuProcess | None = None
        self.qmp: qmp.QMPClient | None = None
        self.qemu_status: str | None = None
        #: The status of QEMU's last ``MIGRATION`` event this run, as the monitor saw it.
        self.migration_event_status: str | None = None
        #: The migration capabilities this daemon turned on in this run's QEMU for an
        #: incoming migration; None when unknown (an adopted QEMU) or when a client's QMP
        #: command was passed through since (it may have changed them).
        self.incoming_capabilities: tuple[str, ...] | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.crash_history: list[float] = []
        #: Memory (the balloon's actual size) and vCPUs as QEMU reported them this run.
        self.memory_seen_mib: int | None = None
        self.vcpus_seen: int | None = None
        self._operation: str | None = None
        self._operation_lock = anyio.Lock()
        #: What holds the instance beyond one call (its outgoing migration); see `held_by`.
        self.hold: str | None = None
        #: QMP commands of clients passed through so far (`qmp_passthrough`): a count
        #: that moved means QEMU's settings may not be the daemon's any more.
        self.passthroughs = 0
        #: The current run's task group: tasks that live as long as this QEMU does.
        self._run_tasks: anyio.abc.TaskGroup | None = None
        self._exited = anyio.Event()
        self._exited.set()
        #: Set once this run's monitor has answered (state, sizes known).
        self.monitor_ready = anyio.Event()
        self._exit_reason: str | None = None
        self._shutdown_cause: str | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> InstanceState:
        """The current state; it changes only through `set_state`."""
        return self._state

    def set_state(self, new: InstanceState, reason: str, **details: Any) -> None:
        """Change state as the table allows and publish ``instance.state``.

        Setting the current state again does nothing; a move the table does not list is
        refused and logged as an error (a bug: the table or the caller is wrong).
        """
        previous = self._state
        if new == previous:
            return
        if not can_transition(previous, new):
            self.log.error(
                "illegal state change refused",
                previous=str(previous),
                state=str(new),
                reason=reason,
            )
            return
        self._state = new
        self.reason = reason
        data = {"state": str(new), "previous": str(previous), "reason": reason, **details}
        self.log.info("state", **data)
        self.bus.publish(make_event(self.name, "instance.state", data))

    @property
    def alive(self) -> bool:
        return self.state in ALIVE

    @property
    def held_by(self) -> str | None:
        """What holds the instance beyond one call, if anything: a migration.

        An outgoing one sets `hold` while it runs; an incoming one holds the instance
        from ``migration.accept`` to ``migration.finalize_target`` (its record says so,
        so the hold survives a daemon restart).
        """
        if self.hold is not None:
            return self.hold
        record = self.record
        if record is not None and record.incoming and self.alive:
            return "an incoming migration (until migration.finalize_target)"
        return None

    @contextlib.asynccontextmanager
    async def operation(self, what: str, *, holder: bool = False) -> AsyncIterator[None]:
        """Run one operation at a time on this instance.

        A second operation waits up to `BUSY_WAIT_S` for the first (so back-to-back
        calls just queue), then gets `Busy` and holds nothing. Ownership is what
        ``acquire`` returned, never guessed from the lock's state afterwards: the lock
        may have passed to a third task that has not run yet. While something holds
        the instance (`held_by`), only the `holder`'s own operations run; the others
        get `Busy` naming it at once.
        """
        if not holder and self.held_by is not None:
            raise Busy(self.name, self.held_by)
        acquired = False
        with anyio.move_on_after(BUSY_WAIT_S):
            await self._operation_lock.acquire()
            acquired = True
        if not acquired:
            raise Busy(self.name, self._operation or "another operation")
        if not holder and self.held_by is not None:
            self._operation_lock.release()
            raise Busy(self.name, self.held_by)
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
        `MONITOR_RETRY_S`; the exit is noticed through the pidfd all the while. Tasks
        started with `start_task` (a migration's) run beside it, until the exit is
        reported. On cancellation (the daemon is leaving) QEMU is left running.
        """
        self.process = process
        self._exited = anyio.Event()
        self.monitor_ready = anyio.Event()
        self._exit_reason = None
        self._shutdown_cause = None
        self.migration_event_status = None
        self.incoming_capabilities = None
        # The run's own tasks (`start_task`) never raise: an error of ours leaves bare.
        with ungrouped():
            async with anyio.create_task_group() as run_tasks:
                self._run_tasks = run_tasks
                try:
                    exited = await self._first_session(process, startup, task_status)
                    while not exited:  # the monitor went away, QEMU did not
                        status = None
                        with anyio.move_on_after(MONITOR_RETRY_S):
                            status = await process.wait_exit()
                        if status is not None:
                            with anyio.CancelScope(shield=True):
                                await self._handle_exit(status)
                            break
                        exited = await self._monitor_session(process, startup=None)
                finally:
                    self._run_tasks = None
                    run_tasks.cancel_scope.cancel()
        return process.exit_status or ExitStatus(code=None, signal=None)

    async def start_task(
        self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any
    ) -> Any:
        """Start ``function(*args, task_status=...)`` beside the run's liveness watcher.

        It lives as long as this QEMU: it is cancelled once QEMU's exit is reported (or
        the daemon leaves), and must never raise after it has started. Returns what it
        passes to ``task_status.started()``; what it raises before that, this raises.
        Raises `InstanceNotRunning` when no QEMU runs.
        """
        if self._run_tasks is None:
            raise InstanceNotRunning(self.name, str(self.state))
        return await self._run_tasks.start(function, *args)

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
            process, OperationTimeout(f"start of {self.name!r} (start_timeout_s)", limit)
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
            with ungrouped():
                async with (
                    qmp.connect(self.paths.qmp_socket, timeout=self.config.qmp_timeout_s) as client,
                    client.events(max_buffer=self.config.event_queue_size) as qmp_events,
                    anyio.create_task_group() as tg,
                ):
                    self.qmp = session = client
                    pumped = anyio.Event()
                    tg.start_soon(self._pump_events, qmp_events, pumped)
                    if startup is not None:
                        await startup(client)
                    else:
                        await self.refresh_status()
                    if self.state != S.INCOMING:
                        # An incoming guest's sizes come with it (`read_sizes` then).
                        await self.read_sizes(client)
                    if start_scope is not None:
                        start_scope.deadline = math.inf
                    started = True
                    self.monitor_ready.set()
                    task_status.started()
                    # Returns when QEMU exits, or when the monitor is lost first.
                    async with anyio.create_task_group() as watch:
                        watch.start_soon(self._cancel_on_monitor_loss, client, watch.cancel_scope)
                        # Report the exit before the QMP connection is torn down, and
                        # after QEMU's last events (SHUTDOWN says why it went): they are
                        # read up to the connection's end, which comes with the exit.
                        status = await process.wait_exit()
                        with anyio.CancelScope(shield=True):
                            with anyio.move_on_after(DRAIN_S):
                                await pumped.wait()
                            await self._handle_exit(status)
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
        """Kill a QEMU whose start failed and raise the `SupervisorError` saying why.

        QEMU's errors are `MonitorError` (5), its silence `OperationTimeout` (6), a
        field at fault `InvalidConfigError` (7), and anything else, QEMU's death
        included, `HypervisorError` (4) with the tail of its output.
        """
        with anyio.CancelScope(shield=True):
            if process.is_alive():
                process.kill()
            with anyio.move_on_after(KILL_WAIT_S):
                await process.wait_exit()
            self._exit_reason = "start-failed"
            await self._handle_exit(process.exit_status or ExitStatus(code=None, signal=None))
        error = sole_exception(error)
        if isinstance(error, SupervisorError):
            raise error
        during = f"during the start of {self.name!r}"
        if isinstance(error, qmp.ExecuteError):
            detail = _execute_error_text(error)
            raise MonitorError(error.error_class, f"{detail} ({during})") from error
        if isinstance(error, qmp.QMPTimeoutError):
            what = "QMP handshake" if error.command is None else error.command
            raise OperationTimeout(f"{what} {during}", error.timeout) from error
        status = process.exit_status
        raise HypervisorError(
            f"QEMU of {self.name!r} failed to start: {str(error) or type(error).__name__}",
            stderr=process.stderr_tail(),
            exit_status=None if status is None else status.code,
        ) from error

    async def _pump_events(self, events: qmp.EventSubscription, done: anyio.Event) -> None:
        """Feed QEMU's events to the state machine and the bus; `done` once they end."""
        try:
            async for item in events:
                if isinstance(item, qmp.EventsDropped):
                    self.log.warning("qmp events dropped", count=item.count)
                    continue
                try:
                    self._on_qmp_event(item)
                except (KeyError, TypeError, ValueError):
                    self.log.exception("unexpected QMP event data", qmp_event=item.name)
        except qmp.ConnectionLostError:
            # QEMU closed the monitor: its exit shows through the pidfd.
            self.log.debug("qmp connection lost")
        finally:
            done.set()

    def _on_qmp_event(self, event: qmp.QMPEvent) -> None:
        self.bus.publish(make_event(self.name, f"qmp.{event.name}", event.data))
        if event.name == "STOP":
            self.qemu_status = "paused"
            if self.state == S.RUNNING:
                self.set_state(S.PAUSED, "paused")
        elif event.name == "RESUME":
            self.qemu_status = "running"
            if self.state in (S.PAUSED, S.STARTING, S.INCOMING):
                reason = {S.PAUSED: "resumed", S.INCOMING: "migrated"}.get(self.state, "started")
                self.set_state(S.RUNNING, reason)
        elif event.name == "MIGRATION":
            self.migration_event_status = str(event.data["status"])
        elif event.name == "SHUTDOWN":
            self.qemu_status = "shutdown"
            self._shutdown_cause = str(event.data.get("reason"))
        elif event.name == "BALLOON_CHANGE":
            self.memory_seen_mib = int(event.data["actual"]) // MIB
        elif event.name == "GUEST_PANICKED":
            self.log.error("guest panicked", **event.data)

    async def read_sizes(self, client: qmp.QMPClient) -> None:
        """Memory and vCPUs as QEMU reports them; BALLOON_CHANGE events keep memory current.

        Both questions go out in one write (a round trip less on a start's path); a QEMU
        without a balloon device is asked again, for its base memory.
        """
        try:
            cpus, balloon = await client.execute_in_order(
                (("query-cpus-fast", None), ("query-balloon", None))
            )
            memory = int(balloon["actual"])
        except qmp.ExecuteError as error:
            if error.command != "query-balloon":
                raise
            cpus, summary = await client.execute_in_order(
                (("query-cpus-fast", None), ("query-memory-size-summary", None))
            )
            memory = int(summary["base-memory"])
        self.vcpus_seen = len(cpus)
        self.memory_seen_mib = memory // MIB

    async def refresh_status(self) -> str:
        """Ask QEMU its run state and align ours with it."""
        client = self.require_running() if self.qmp is None else self.qmp
        result = await client.execute("query-status")
        self.qemu_status = str(result["status"])
        if self.state == S.STOPPING:
            return self.qemu_status  # the stop in progress decides what comes next
        if self.state in TERMINAL:
            self.set_state(S.STARTING, "adopted")
        self.set_state(state_for_qemu_status(self.qemu_status), "adopted")
        return self.qemu_status

    async def _handle_exit(self, status: ExitStatus) -> None:
        """Turn QEMU's exit into the final state and its reason (call it shielded)."""
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
        elif self.state == S.INCOMING:
            new, reason = S.STOPPED, MIGRATION_FAILED
        elif self._shutdown_cause is not None:
            new, reason = exit_for_shutdown(self._shutdown_cause)
            details["qemu_reason"] = self._shutdown_cause
        else:
            new, reason = S.CRASHED, "crashed"
            if not status.known:
                details["exit_status"] = None
        if new == S.CRASHED:
            self.crash_history.append(time.monotonic())
        if self.on_exit is not None:
            try:
                await self.on_exit(self)
            except OSError:
                self.log.exception("clean-up after exit failed")
        self.set_state(new, reason, **details)
        self._exited.set()
        self.monitor_ready.set()  # nobody need wait for the monitor of a QEMU that is gone

    async def wait_exited(self) -> None:
        await self._exited.wait()

    # -- operations --------------------------------------------------------------------

    async def stop(self, *, force: bool, timeout_s: float, reason: str = "killed") -> None:
        """ACPI power-down, then a kill after `timeout_s`; `force` kills at once.

        Returns once QEMU has exited and the instance is stopped, with `reason` if QEMU
        was killed. A paused guest is resumed after the power button is pressed, since
        only a running guest can act on it. A crashed instance becomes stopped (no
        restart follows). If the call is cancelled before QEMU exits, the instance
        returns to QEMU's state.
        """
        if self.state == S.CRASHED:
            self.set_state(S.STOPPED, "stop requested")
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
                self._exit_reason = reason
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
                self.set_state(S.RUNNING if running else S.PAUSED, "stop abandoned")

    async def pause(self) -> None:
        client = self.require_running()
        await self._execute(client, "stop")
        self.qemu_status = "paused"
        self.set_state(S.PAUSED, "paused")

    async def resume(self) -> None:
        """``cont``, unless QEMU's guest is (being) migrated: `MigrationError` then."""
        client = self.require_running()
        status = str((await self._execute(client, "query-status"))["status"])
        if status in NOT_RESUMABLE:
            raise MigrationError(
                f"instance {self.name!r} cannot be resumed: {NOT_RESUMABLE[status]} "
                f"(QEMU status {status})",
                name=self.name,
                qemu_status=status,
            )
        await self._execute(client, "cont")
        self.qemu_status = "running"
        self.set_state(S.RUNNING, "resumed")

    async def balloon(self, memory_mib: int) -> None:
        client = self.require_running()
        await self._execute(client, "balloon", {"value": memory_mib * MIB})

    async def qmp_passthrough(self, command: str, arguments: dict[str, Any] | None) -> Any:
        """Run a QMP command for a client (`monitor_commands.REFUSED_QMP` are refused)."""
        refusal = qmp_refusal(command)
        if refusal is not None:
            raise InvalidConfigError("command", refusal)
        client = self.require_running()
        self.passthroughs += 1
        self.incoming_capabilities = None
        return await self._execute(client, command, arguments)

    async def human_monitor(self, command: str) -> str:
        """Run an HMP command line for a client (`monitor_commands.REFUSED_HMP` are refused).

        Errors never quote the command line: it may hold a password.
        """
        refusal = hmp_refusal(command)
        if refusal is not None:
            raise InvalidConfigError("command", refusal)
        client = self.require_running()
        try:
            output: str = await QMPHumanMonitor(client).command(command)
        except ValueError:
            raise InvalidParams(
                "command",
                "holds a control character, or is longer than QEMU's line editor takes",
            ) from None
        except HMPTimeoutError:
            timeout = self.config.qmp_timeout_s
            raise OperationTimeout(f"monitor command on {self.name!r}", timeout) from None
        except HMPCommandError as error:
            name, _ = hmp_command_name(command)
            detail = _WITHHELD if name in SECRET_HMP else error.output
            raise MonitorError("HMPError", f"{name}: {detail}") from None
        except HMPError as error:
            raise MonitorError(type(error).__name__, "the monitor failed") from None
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
            return MonitorError(error.error_class, _execute_error_text(error))
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
                msgspec.convert(nic, NicInfo, from_attributes=True)
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


def _execute_error_text(error: qmp.ExecuteError) -> str:
    """``command: QEMU's description``; the description withheld for `SECRET_QMP` commands."""
    return f"{error.command}: {_WITHHELD if error.command in SECRET_QMP else error.desc}"


def backoff_delay(crashes: int) -> float:
    """Seconds to wait before restart number `crashes` (1, 2, 4, ... capped at 60)."""
    return float(min(60, 2 ** max(0, crashes - 1)))


def recent_crashes(history: list[float], window_s: float) -> int:
    now = time.monotonic()
    return sum(1 for at in history if now - at <= window_s)
