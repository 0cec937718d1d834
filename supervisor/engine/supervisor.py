"""The supervisor: every instance of one state dir, in the caller's event loop.

``async with Supervisor(config) as sup:`` takes the state dir's lock, registers every
runtime record, adopts the QEMUs a previous daemon left running (the monitors answer
in the background, each instance's adoption under its operation lock) and starts the
instances marked ``autostart`` in the background, `AUTOSTART_CONCURRENCY` at a time.
The control socket is another layer's (`supervisor.control.server.serve_control`).
Leaving the block cancels the supervisor's tasks and leaves the VMs running (unless
``shutdown_on_exit``). The library changes no process-wide setting: no signal
handlers, no logging set-up, no umask or cwd change. It starts no threads of its own:
blocking file-system work runs in anyio's worker threads (`anyio.to_thread`), as does
an interface lookup under trio (`supervisor.host.interfaces`).

Errors: operations raise `supervisor.model.errors.SupervisorError` subclasses (never
exception groups).
"""

from __future__ import annotations

import grp
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec

from protocols.groups import ungrouped
from supervisor import __version__
from supervisor.engine.events import EventBus, Subscription
from supervisor.engine.instance import (
    MIGRATION_FAILED,
    Instance,
    StartupSteps,
    backoff_delay,
    recent_crashes,
)
from supervisor.engine.launcher import Launcher
from supervisor.engine.migration import Migrations
from supervisor.host.statedir import StateDir
from supervisor.log import get_logger
from supervisor.model.api import InstanceInfo, InstanceSummary
from supervisor.model.config import Config, instance_file, instance_files, load_instance_file
from supervisor.model.errors import (
    Busy,
    HypervisorError,
    InstanceExists,
    InstanceNotFound,
    InstanceNotRunning,
    InvalidConfigError,
    SupervisorError,
    host_io_errors,
)
from supervisor.model.spec import InstanceSpec, decode_spec
from supervisor.model.states import InstanceState
from supervisor.qemu.process import QemuProcess, adopt, pids_by_option
from supervisor.qemu.runtime import RuntimeRecord, load_record, store_record

S = InstanceState

#: Restart policy ``on-crash``: at most this many crashes in `RESTART_WINDOW_S`.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 600.0

#: How many ``autostart`` instances start at once when the supervisor starts.
AUTOSTART_CONCURRENCY = 4


class Supervisor(anyio.AsyncContextManagerMixin):
    """Supervises the instances of ``config.state_dir``; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._group_id = _group_id(config.control_group)
        self.state_dir = StateDir(config.state_dir, group_id=self._group_id)
        self.bus = EventBus(config.event_queue_size)
        self.started_monotonic = time.monotonic()
        self._instances: dict[str, Instance] = {}
        self._definition_mtimes: dict[str, float] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        #: Instance dirs moved into the trash so far, and whether a task empties it.
        self._trash_discards = 0
        self._emptying_trash = False
        self.launcher = Launcher(config, self.state_dir, group_id=self._group_id)
        #: The ``migration.*`` operations (`supervisor.engine.migration`).
        self.migrations = Migrations(self)
        self.log = get_logger(__name__)

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Supervisor, None]:
        self.state_dir.acquire()
        try:
            # The supervisor's own tasks never raise: an error of the body leaves bare.
            with ungrouped():
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    self._empty_trash_soon()  # what a daemon killed meanwhile left there
                    self._load_definitions()
                    await self._adopt_all()
                    self._recover_uid_leases()
                    autostart, autostart_done = anyio.CancelScope(), anyio.Event()
                    tg.start_soon(self._autostart, autostart, autostart_done)
                    try:
                        yield self
                    finally:
                        with anyio.CancelScope(shield=True):
                            # A start under way completes or rolls back (`_launch`) first.
                            autostart.cancel()
                            await autostart_done.wait()
                            if self.config.shutdown_on_exit:
                                await self._stop_all()
                        self.bus.close_all()
                        tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self.state_dir.release()

    # -- registry --------------------------------------------------------------------

    def _instance(self, name: str, *, create: bool = False) -> Instance:
        instance = self._instances.get(name)
        if instance is None and not create:
            self._load_definitions()
            instance = self._instances.get(name)
        if instance is None:
            if not create:
                raise InstanceNotFound(name)
            instance = Instance(
                name,
                paths=self.state_dir.instance(name),
                bus=self.bus,
                config=self.config,
                on_exit=self.launcher.release,
            )
            self._instances[name] = instance
        return instance

    def _load_definitions(self) -> None:
        """Follow the instances dir: new and changed files are read, removed ones dropped.

        Called whenever instances are listed or looked up, so a file added or removed
        while the daemon runs shows at once; unchanged files are not read again.
        """
        seen: dict[str, float] = {}
        for path in instance_files(self.config.instances_dir):
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            seen[path.stem] = mtime
            if self._definition_mtimes.get(path.stem) == mtime:
                continue
            self._definition_mtimes[path.stem] = mtime
            try:
                spec = load_instance_file(path)
            except SupervisorError as error:
                self.log.error("instance file ignored", file=str(path), error=str(error))
                continue
            self._instance(spec.name, create=True).definition = spec
        for name in set(self._definition_mtimes) - set(seen):
            del self._definition_mtimes[name]
            instance = self._instances.get(name)
            if instance is None:
                continue
            instance.definition = None
            if instance.record is None and not instance.alive:
                del self._instances[name]

    def _reload_definition(self, instance: Instance) -> InstanceSpec | None:
        path = instance_file(self.config.instances_dir, instance.name)
        if path.exists():
            instance.definition = load_instance_file(path)
        return instance.definition

    async def _adopt_all(self) -> None:
        """Register every runtime record; adopt, in the background, the QEMUs still running.

        Returns once each instance whose QEMU lives is `starting` (alive) and its
        adoption task holds the instance's operation lock: an operation arriving later
        waits for the adoption, and a `start` finds the instance running. The QEMUs
        are found by their records' pids and by their command lines (``-pidfile``
        under this state dir), so a QEMU spawned just before the previous daemon died,
        before its pid was saved, is found too.
        """
        assert self._tg is not None
        instances_root = self.state_dir.instances_root
        scanned = await anyio.to_thread.run_sync(pids_by_option, "pidfile", f"{instances_root}/")
        running: dict[str, list[int]] = {}
        for pid_file, pids in scanned.items():
            path = Path(pid_file)
            ours = path.parent.parent == instances_root and path.name == "qemu.pid"
            running.setdefault(path.parent.name if ours else pid_file, []).extend(pids)
        for name in self.state_dir.instance_names():
            pids = running.pop(name, [])
            try:
                record = load_record(self.state_dir.instance(name).runtime_record)
            except FileNotFoundError:
                record = None  # a dir without a record (`cmdline` makes those): nothing ran
            except SupervisorError as error:
                self.log.error("runtime record unreadable", instance=name, error=str(error))
                record = None
            if record is None:
                if pids:
                    self.log.error("QEMU without a runtime record: not supervised", pids=pids)
                continue
            instance = self._instance(name, create=True)
            instance.record = record
            process = self._find_qemu(instance, record, pids)
            if process is None:
                instance.log.info("not running after restart: cleaned", pid=record.pid)
                await self.launcher.release(instance)
                if record.incoming:
                    await self._forget_incoming(instance)
                continue
            if record.pid != process.pid:  # spawned, and its daemon died before saving this
                record = msgspec.structs.replace(record, pid=process.pid)
                instance.record = record
                try:
                    await store_record(instance.paths.runtime_record, record)
                except OSError as error:
                    instance.log.error("runtime record not updated", error=str(error))
            instance.started_at = record.started_at
            await self._tg.start(self._adopt, instance, process)
        for name, pids in running.items():
            self.log.error("QEMU without an instance dir: not supervised", name=name, pids=pids)

    async def _forget_incoming(self, instance: Instance) -> None:
        """Remove the runtime of an incoming QEMU that exited while no daemon ran: its
        guest never ran here, so nothing of it may be started again on this host."""
        try:
            await self._clean_up(instance)
        except SupervisorError as error:
            instance.log.error("runtime of a failed incoming migration left", error=str(error))

    def _find_qemu(
        self, instance: Instance, record: RuntimeRecord, pids: list[int]
    ) -> QemuProcess | None:
        """The live QEMU of `record`: its pid, else one found with its ``-pidfile``."""
        found = None
        candidates = ([record.pid] if record.pid is not None else []) + pids
        for pid in dict.fromkeys(candidates):
            found = adopt(pid, record.name, record.uuid, log_path=instance.paths.qemu_log)
            if found is not None:
                break
        for pid in pids:
            if found is None or pid != found.pid:
                instance.log.error("a QEMU with this instance's files: not supervised", pid=pid)
        return found

    async def _adopt(
        self,
        instance: Instance,
        process: QemuProcess,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Adopt one live QEMU under the instance's operation lock.

        Started (``task_status``) once the lock is held and the instance is alive. A
        start the previous daemon had not finished (``start_completed`` false: QEMU
        may still be in ``-S``) is finished: the start-up steps run again, then
        ``cont`` unless that start asked for a paused guest; if they fail, QEMU is
        killed and the instance left stopped. Otherwise the lock is held until the
        monitor has answered, at most ``qmp_timeout_s``. Then a migration the QEMU was
        in is picked up (`Migrations.adopt`), still under the lock.
        """
        record = instance.record
        assert record is not None and self._tg is not None
        started = False
        try:
            async with instance.operation("adopt"):
                if record.start_completed:
                    await self._tg.start(self._run, instance, process, None)
                    task_status.started()
                    started = True
                    with anyio.move_on_after(self.config.qmp_timeout_s):
                        await instance.monitor_ready.wait()
                else:
                    instance.set_state(
                        S.STARTING, "finishing an interrupted start", pid=process.pid
                    )
                    task_status.started()
                    started = True
                    startup = self.launcher.startup_steps(
                        instance, paused=record.start_paused, nics_connected=False
                    )
                    await self._tg.start(self._run, instance, process, startup)
                # A migration this QEMU was in is picked up (or ended) before anything else.
                await self.migrations.adopt(instance)
        except SupervisorError as error:
            instance.log.error("interrupted start failed", error=str(error))
        except Exception:  # a bug must not take the other instances down
            instance.log.exception("adoption failed")
        finally:
            if not started:
                task_status.started()

    def _recover_uid_leases(self) -> None:
        """Release the leases of instances whose QEMU did not survive a daemon crash."""
        if self.launcher.uid_pool is None:
            return
        live = {name for name, instance in self._instances.items() if instance.alive}
        for lease in self.launcher.uid_pool.recover(live):
            self.log.info("uid lease released", uid=lease.uid, instance=lease.owner)

    async def _autostart(self, scope: anyio.CancelScope, done: anyio.Event) -> None:
        """Start the ``autostart`` instances that do not run, `AUTOSTART_CONCURRENCY` at once."""
        try:
            with scope:
                slots = anyio.Semaphore(AUTOSTART_CONCURRENCY)
                async with anyio.create_task_group() as tg:
                    for instance in list(self._instances.values()):
                        definition = instance.definition
                        if definition is not None and definition.autostart and not instance.alive:
                            tg.start_soon(self._autostart_one, instance, slots)
        finally:
            done.set()

    async def _autostart_one(self, instance: Instance, slots: anyio.Semaphore) -> None:
        async with slots:
            try:
                await self.start(name=instance.name)
            except InstanceExists:
                instance.log.info("autostart: already started")
            except SupervisorError as error:
                instance.log.error("autostart failed", error=str(error))
            except Exception:  # a bug must not take the other instances down
                instance.log.exception("autostart failed")

    async def _stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for instance in self._instances.values():
                if instance.alive:
                    tg.start_soon(self._stop_quietly, instance)

    async def _stop_quietly(self, instance: Instance) -> None:
        try:
            await self.stop(instance.name)
        except SupervisorError as error:
            instance.log.error("stop on exit failed", error=str(error))

    # -- one QEMU run, with the restart policy -------------------------------------------

    async def _run(
        self,
        instance: Instance,
        process: QemuProcess,
        startup: StartupSteps | None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await instance.supervise(process, startup=startup, task_status=task_status)
        if instance.reason == MIGRATION_FAILED:
            await self.migrations.forget_failed_incoming(instance)
            return
        if not self._should_restart(instance):
            return
        delay = backoff_delay(recent_crashes(instance.crash_history, RESTART_WINDOW_S))
        instance.log.info("restarting after crash", delay_s=delay)
        await anyio.sleep(delay)
        if instance.state != S.CRASHED or instance.record is None:
            return  # started or cleaned up by someone else meanwhile
        try:
            async with instance.operation("restart"):
                if instance.state != S.CRASHED or instance.record is None:
                    return  # ... or while this waited for the lock
                record = await self.launcher.renew(instance.record)
                instance.restarts += 1
                # The new run gets a task of its own; this one ends here.
                await self._launch(instance, record, paused=False)
        except SupervisorError as error:
            instance.log.error("restart failed", error=str(error))
        except Exception:  # a bug must not take the other instances down
            instance.log.exception("restart failed")

    def _should_restart(self, instance: Instance) -> bool:
        spec = instance.spec()
        return (
            instance.state == S.CRASHED
            and spec is not None
            and spec.restart == "on-crash"
            and recent_crashes(instance.crash_history, RESTART_WINDOW_S) <= RESTART_LIMIT
        )

    async def _launch(self, instance: Instance, record: RuntimeRecord, *, paused: bool) -> None:
        """Spawn QEMU and wait until it runs; on failure nothing is left behind.

        Shielded: once QEMU is spawned the start completes or rolls back (within
        ``start_timeout_s``) even if the caller goes away, so no QEMU is orphaned.
        """
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            try:
                process = await self.launcher.launch(instance, record, paused=paused)
            except InstanceExists:
                raise  # the leases under its name are the live run's
            except BaseException:
                self.launcher.release_record(record)
                raise
            startup = self.launcher.startup_steps(instance, paused=paused, nics_connected=True)
            try:
                with ungrouped():
                    await self._tg.start(self._run, instance, process, startup)
            except SupervisorError:
                raise
            except Exception as error:  # a bug must not take the daemon down
                self.log.exception("start failed", instance=instance.name)
                raise HypervisorError(f"start of {instance.name!r} failed: {error}") from error

    # -- operations (API.md §3) ----------------------------------------------------------

    async def start(
        self,
        spec: InstanceSpec | Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        paused: bool = False,
    ) -> InstanceInfo:
        """Start an instance from `spec`, or the defined instance `name`.

        `spec` is an `InstanceSpec` or a plain mapping of its fields (parsed JSON or
        TOML), decoded as ``instance.start`` decodes its ``spec``: `InvalidParams`
        names the field (``spec.disks[1].path``). Returns once QEMU runs (or is
        paused). Raises `InstanceExists` when it is already running,
        `InvalidConfigError` for a bad spec, `MonitorError`, `OperationTimeout` or
        `HypervisorError` when QEMU fails to start (everything is rolled back).
        """
        if (spec is None) == (name is None):
            raise InvalidConfigError("spec", "give exactly one of spec or name")
        if spec is not None:
            if not isinstance(spec, InstanceSpec):
                spec = decode_spec(spec)
            name = spec.name
        assert name is not None
        if spec is None and name not in self._instances:
            path = instance_file(self.config.instances_dir, name)
            if not path.exists():
                raise InstanceNotFound(name)
        instance = self._instance(name, create=True)
        async with instance.operation("start"):
            # Only the holder of the lock reads or rolls back anything: a caller that gets
            # `Busy` touches nothing. A failed start may have dropped the instance while
            # this one waited: it is known again now.
            if self._instances.setdefault(name, instance) is not instance:
                raise Busy(name, "start")
            previous_record = instance.record
            try:
                with host_io_errors(f"start of {name!r}", instance.paths.directory):
                    if instance.alive:
                        raise InstanceExists(name, "is already running")
                    if spec is None:
                        spec = self._reload_definition(instance)
                        if spec is None and previous_record is not None:
                            spec = previous_record.spec
                        if spec is None:
                            raise InstanceNotFound(name)
                    known_uuid = previous_record.spec.uuid if previous_record else None
                    record = await self.launcher.prepare(
                        instance, spec, known_uuid=known_uuid, macs_in_use=self._macs_in_use()
                    )
                    await self._launch(instance, record, paused=paused)
            except SupervisorError:
                if not instance.alive:
                    await self._roll_back_start(instance, previous_record)
                raise
        return instance.info()

    def _macs_in_use(self) -> dict[str, str]:
        """The MACs of the NICs of every running instance, and whose they are."""
        return {
            nic.mac: name
            for name, instance in self._instances.items()
            if instance.alive and instance.record is not None
            for nic in instance.record.nics
        }

    async def _roll_back_start(self, instance: Instance, previous: RuntimeRecord | None) -> None:
        """Leave no trace of a failed start: the earlier record, or no instance at all.

        Runs while the start's error is on its way to the caller: a host failure here
        (the disk that made the start fail) is logged, never raised in its place.
        """
        instance.record = previous
        try:
            if previous is not None:
                await store_record(instance.paths.runtime_record, previous)
            else:
                self._forget(instance)
        except OSError as error:
            instance.log.error("roll-back of a failed start incomplete", error=str(error))
        known = previous is not None or instance.definition is not None
        if not known and self._instances.get(instance.name) is instance:
            del self._instances[instance.name]

    async def stop(
        self, name: str, *, force: bool = False, timeout_s: float | None = None
    ) -> InstanceInfo:
        instance = self._instance(name)
        async with instance.operation("stop"):
            await instance.stop(
                force=force,
                timeout_s=self.config.stop_timeout_s if timeout_s is None else timeout_s,
            )
        return instance.info()

    async def reboot(self, name: str) -> InstanceInfo:
        """Stop, then start again from the saved runtime record (same uuid, same argv)."""
        instance = self._instance(name)
        async with instance.operation("reboot"):
            # Read under the lock: a stop that ran first has the last word.
            record = instance.record
            if record is None or not instance.alive:
                raise InstanceNotRunning(name, str(instance.state))
            paused = instance.state == S.PAUSED
            await instance.stop(force=False, timeout_s=self.config.stop_timeout_s)
            with host_io_errors(f"reboot of {name!r}", instance.paths.directory):
                record = await self.launcher.renew(record)
                await self._launch(instance, record, paused=paused)
        return instance.info()

    async def pause(self, name: str) -> InstanceInfo:
        instance = self._instance(name)
        async with instance.operation("pause"):
            await instance.pause()
        return instance.info()

    async def resume(self, name: str) -> InstanceInfo:
        instance = self._instance(name)
        async with instance.operation("resume"):
            await instance.resume()
        return instance.info()

    async def balloon(self, name: str, memory_mib: int) -> InstanceInfo:
        instance = self._instance(name)
        spec = instance.spec()
        if spec is not None and memory_mib > spec.memory_mib:
            raise InvalidConfigError(
                "memory_mib", f"{memory_mib} is above the instance's memory ({spec.memory_mib})"
            )
        async with instance.operation("balloon"):
            await instance.balloon(memory_mib)
        return instance.info()

    async def cleanup(self, name: str) -> None:
        """Remove runtime files, uid lease and chroot; forget an instance with no file."""
        instance = self._instance(name)
        async with instance.operation("cleanup"):
            await self._clean_up(instance)

    async def _clean_up(self, instance: Instance) -> None:
        """`cleanup` of an instance whose operation lock the caller holds."""
        name = instance.name
        if instance.alive:
            raise InstanceExists(name, "is running: stop it first")
        with host_io_errors(f"cleanup of {name!r}", instance.paths.directory):
            await self.launcher.release(instance)
            self._forget(instance)
        instance.record = None
        defined = instance_file(self.config.instances_dir, name).exists()
        if not defined and self._instances.get(name) is instance:
            del self._instances[name]

    def _forget(self, instance: Instance) -> None:
        """Remove the instance's runtime dir: at once from where it was, then from the
        trash beside whatever runs next."""
        if self.launcher.forget(instance):
            self._empty_trash_soon()

    def _empty_trash_soon(self) -> None:
        """Have the trash emptied in a worker thread. One task at most: a dir discarded
        while it runs is removed by its next pass."""
        self._trash_discards += 1
        if self._tg is None or self._emptying_trash:
            return  # the next daemon's start empties it
        self._emptying_trash = True
        self._tg.start_soon(self._empty_trash)

    async def _empty_trash(self) -> None:
        try:
            while True:
                discards = self._trash_discards
                left = await anyio.to_thread.run_sync(self.state_dir.empty_trash)
                if left:
                    self.log.error("trash not removed", paths=[str(path) for path in left])
                if discards == self._trash_discards:
                    return
        finally:
            self._emptying_trash = False

    def list(self) -> list[InstanceSummary]:
        self._load_definitions()
        return [
            InstanceSummary(
                name=name,
                state=str(instance.state),
                pid=instance.process.pid if instance.process else None,
            )
            for name, instance in sorted(self._instances.items())
        ]

    def info(self, name: str) -> InstanceInfo:
        """`name`'s state; memory and vCPUs as QEMU reported them (kept current by events)."""
        return self._instance(name).info()

    def console(self, name: str) -> dict[str, Any]:
        return self._instance(name)._console_dict()

    async def monitor(self, name: str, command: str) -> str:
        return await self._instance(name).human_monitor(command)

    async def qmp(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self._instance(name).qmp_passthrough(command, arguments)

    def instance(self, name: str) -> Instance:
        """The `Instance` object of `name` (for embedding programs and tests)."""
        return self._instance(name)

    @asynccontextmanager
    async def events(
        self,
        *,
        instances: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
        max_buffer: int | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to events: ``async with sup.events() as events: async for e in events``."""
        async with self.bus.subscribe(
            instances=instances, kinds=kinds, max_buffer=max_buffer
        ) as subscription:
            yield subscription

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def version(self) -> str:
        return __version__


def _group_id(name: str) -> int | None:
    """The gid of the control group, or None for root (nothing to change)."""
    if name == "root":
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidConfigError("control_group", f"no group named {name!r}") from None
