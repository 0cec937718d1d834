"""Live migration between two daemons: the engine's half of the ``migration.*`` methods.

Four steps, as Ganeti's, driven by a third party (`supervisor.control.migrate`, a
cluster manager) over both daemons' control sockets::

    source daemon                                target daemon
    info(name) -> runtime payload  ----------->  accept(spec, runtime, address, port)
                                                   QEMU -S -incoming defer: `incoming`
                                                   capabilities, migrate-incoming, cont;
    [prepare(name): capabilities, parameters]      (beside accept: optional)
                                   <-----------    -> the port QEMU bound
    start(name, target, port)
      capabilities, parameters (unless prepared), [stop], migrate: `migrating`
      a task follows QEMU: migration.progress events, stall guard
    ...  completed, failed or cancelled  ...
                                                 finalize_target(name, runtime, success)
                                                   success: record saved, guest running
                                                   failure: QEMU stopped, runtime removed
    finalize_source(name, success)
      success: QEMU ended (`stopped`, reason `migrated`), runtime removed
      failure: the guest resumed, if it ran before

The outgoing migration holds its instance (`Instance.hold`): other operations get
`Busy` naming it while ``migration.status`` and ``migration.cancel`` get through. The
task that follows it lives in the instance's run (`Instance.start_task`): a QEMU that
exits ends it. A failed or cancelled migration, the stall guard's included, resumes the
source's guest at once (if it ran before) and clears the capabilities, whether or not
``finalize_source`` follows; a completed one leaves QEMU in ``postmigrate`` until
``finalize_source`` ends it. An incoming migration holds its instance from ``accept``
to ``finalize_target``; its QEMU exiting before (a cancel, a broken stream: QEMU exits
by itself then) stops the instance with reason ``migration-failed`` and its runtime is
removed, since its guest never ran here.

NICs: the target builds its own (its tap names, from its own state dir). Bridged and
Open vSwitch NICs come up at ``accept`` (the guest needs its switch port at the
switch-over); routed NICs at ``finalize_target`` on success, as Ganeti does: the host
route moves to the target's tap only once the guest runs there. Each end tears its NICs
down as any run that ends does (its QEMU exiting).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
from anyio.abc import TaskStatus

from protocols import qmp
from protocols.groups import ungrouped
from supervisor.engine.events import make_event
from supervisor.engine.instance import MIGRATION_FAILED, MONITOR_RETRY_S, Instance
from supervisor.host.userfaultfd import userfaultfd_refusal
from supervisor.model.api import (
    InstanceInfo,
    MigrationAcceptResult,
    MigrationInfoResult,
    MigrationStatus,
)
from supervisor.model.errors import (
    Busy,
    InstanceExists,
    InstanceNotFound,
    InstanceNotRunning,
    InvalidConfigError,
    MigrationError,
    OperationTimeout,
    SupervisorError,
    host_io_errors,
)
from supervisor.model.hvparams import HvParams
from supervisor.model.spec import InstanceSpec
from supervisor.model.states import InstanceState, state_for_qemu_status
from supervisor.model.validation import raise_first
from supervisor.net.nics import ROUTED_MODES
from supervisor.qemu.accel import resolve_accelerator
from supervisor.qemu.migration_payload import (
    MigrationPayload,
    argv_devices,
    argv_machine,
    decode_payload,
    device_layout,
    encode_payload,
    guest_spec,
    layout_problems,
    payload_for,
    payload_problems,
)
from supervisor.qemu.migration_progress import FINISHED, MigrationProgress, parse_query_migrate
from supervisor.qemu.migration_stream import (
    STREAM_FD_NAME,
    connect_stream,
    fd_uri,
    opens_own_stream,
)
from supervisor.qemu.migration_tls import (
    TLS_CREDS_ID,
    Endpoint,
    missing_x509_files,
    tls_creds_object,
)
from supervisor.qemu.runtime import OutgoingMigration, RuntimeRecord, store_record

if TYPE_CHECKING:
    from supervisor.engine.supervisor import Supervisor

__all__ = ["Migrations", "migration_uri"]

S = InstanceState
MIB: Final = 1024 * 1024

#: QEMU's events that say a migration moved on; each is followed by a ``query-migrate``.
MIGRATION_EVENTS: Final = frozenset({"MIGRATION", "MIGRATION_PASS"})
#: Events a migration task holds before it reads them (it reads each at once).
EVENT_BUFFER: Final = 64
#: How soon ``query-migrate`` is asked again for the figures of a completed migration
#: (`MigrationProgress.figures_pending`).
FIGURES_RETRY_S: Final = 0.001
#: Always on, on both ends. ``events``: without it QEMU sends no MIGRATION events.
#: ``return-path``: the target confirms it has loaded the guest before the source calls
#: the migration completed (as libvirt does); without it a stream the network absorbed
#: (socket buffers, a proxy) completes on the source while the target never got the end
#: of it, and the guest would run nowhere.
ALWAYS_ON: Final = ("events", "return-path")
#: How a guest may arrive that ``finalize_target`` resumes: paused (as a non-live
#: migration leaves it) or never started (``prelaunch``: its source ran it with ``-S``
#: and never continued it; QEMU carries that state over).
RESUMABLE: Final = frozenset({"paused", "prelaunch"})
#: The capability that has the migration switch to postcopy (after
#: ``migration_postcopy_after_passes`` dirty-sync passes).
POSTCOPY: Final = "postcopy-ram"


def migration_uri(host: str, port: int) -> str:
    """QEMU's ``tcp:`` URI of `host` (an IPv6 address goes in brackets) and `port`."""
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def _capability_list(names: Sequence[str]) -> tuple[str, ...]:
    """`ALWAYS_ON` first, then `names`, each once."""
    return tuple(dict.fromkeys((*ALWAYS_ON, *names)))


def _split_caps(hvparam: str) -> list[str]:
    return [name for name in hvparam.split(":") if name]


class _Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What an outgoing migration sets on QEMU before ``migrate``, and how it runs."""

    live: bool
    #: `ALWAYS_ON` and the chosen ones.
    capabilities: tuple[str, ...]
    #: The field an unknown capability is reported under.
    capabilities_field: str
    #: ``migrate-set-parameters`` arguments (TLS's aside).
    parameters: dict[str, int]


def _settings(
    hv: HvParams,
    *,
    live: bool | None,
    bandwidth_mib_s: int | None,
    downtime_ms: int | None,
    capabilities: Sequence[str] | None,
) -> _Settings:
    """The settings of a migration of a guest with `hv`; absent values from `hv`."""
    if capabilities is None:
        names, field = _split_caps(hv.migration_caps), "spec.hvparams.migration_caps"
    else:
        names, field = list(capabilities), "capabilities"
    bandwidth = hv.migration_bandwidth if bandwidth_mib_s is None else bandwidth_mib_s
    downtime = hv.migration_downtime if downtime_ms is None else downtime_ms
    return _Settings(
        live=hv.migration_mode == "live" if live is None else live,
        capabilities=_capability_list(names),
        capabilities_field=field,
        parameters={"max-bandwidth": bandwidth * MIB, "downtime-limit": downtime},
    )


def _migrating_from_here(instance: Instance) -> tuple[RuntimeRecord, qmp.QMPClient]:
    """The record and QMP client of a guest that may migrate away (running or paused),
    or `InstanceNotRunning`."""
    record = instance.record
    if record is None or instance.state not in (S.RUNNING, S.PAUSED):
        raise InstanceNotRunning(instance.name, str(instance.state))
    return record, instance.require_running()


class _Prepared(msgspec.Struct, frozen=True, kw_only=True):
    """Settings `Migrations.prepare` gave a QEMU (`client`'s), when no QMP command of a
    client had been passed through to it since the instance's `passthroughs`."""

    client: qmp.QMPClient
    passthroughs: int
    settings: _Settings


class _SocketAddress(msgspec.Struct):
    port: int | str


class _Listening(msgspec.Struct, rename="kebab"):
    socket_address: list[_SocketAddress] = msgspec.field(default_factory=list)


class _Capability(msgspec.Struct):
    capability: str
    state: bool


def _bound_port(reply: Any) -> int:
    """The port of QEMU's listening socket in its ``query-migrate`` reply (QEMU 7.2 sends
    it as a string)."""
    listening = msgspec.convert(reply, _Listening)
    if not listening.socket_address:
        raise MigrationError("QEMU names no socket it listens on for the migration")
    return int(listening.socket_address[0].port)


async def _execute(
    client: qmp.QMPClient,
    command: str,
    arguments: Mapping[str, Any] | None = None,
    *,
    fds: Sequence[int] = (),
) -> Any:
    """A QMP command of a migration (with `fds` for QEMU); QEMU's refusal is a
    `MigrationError` quoting it."""
    with _migration_errors(command):
        return await client.execute(command, arguments, fds=fds)


async def _execute_in_order(
    client: qmp.QMPClient,
    *commands: tuple[str, Mapping[str, Any] | None],
    fds: Sequence[int] = (),
) -> list[Any]:
    """QMP commands of a migration sent at once (`QMPClient.execute_in_order`, `fds`
    with the first): their results; the first refusal is a `MigrationError` quoting it."""
    with _migration_errors(", ".join(command for command, _ in commands)):
        return await client.execute_in_order(commands, fds=fds)


@contextlib.contextmanager
def _migration_errors(names: str) -> Iterator[None]:
    """QMP's errors for the commands `names` as `SupervisorError`s."""
    try:
        yield
    except qmp.ExecuteError as error:
        raise MigrationError(
            f"{error.command}: {error.desc}",
            command=error.command,
            **{"class": error.error_class},
        ) from None
    except qmp.QMPTimeoutError as error:
        raise OperationTimeout(f"{error.command} during a migration", error.timeout) from None
    except qmp.QMPError as error:
        raise MigrationError(f"{names}: QEMU's monitor failed: {error}") from None


async def _check_capabilities(client: qmp.QMPClient, names: Sequence[str], *, field: str) -> None:
    """`InvalidConfigError`, naming `field`, for the first of `names` this QEMU lacks.
    `ALWAYS_ON` are not checked: every QEMU we run has them (since 2.5), and asking
    costs a round trip on a migration's path."""
    if not set(names) <= set(ALWAYS_ON):
        known = msgspec.convert(
            await _execute(client, "query-migrate-capabilities"), list[_Capability]
        )
        known_names = [capability.capability for capability in known]
        for name in names:
            if name not in known_names:
                raise InvalidConfigError(
                    field,
                    f"{name!r} is not a migration capability of this QEMU"
                    f" (it knows {', '.join(known_names)})",
                )


async def _settle_and_hand_over(
    client: qmp.QMPClient,
    settings: Sequence[tuple[str, Mapping[str, Any] | None]],
    stream: socket.socket | None,
) -> None:
    """`settings` in one write and, beside them, `stream` handed to QEMU (``getfd``):
    one round trip before ``migrate``. Raises the first failure, once both are done."""
    failures: list[BaseException] = []

    async def run(call: Awaitable[Any]) -> None:
        try:
            await call
        except SupervisorError as error:
            failures.append(error)

    with ungrouped():
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, _execute_in_order(client, *settings))
            if stream is not None:
                tg.start_soon(
                    run,
                    _execute(client, "getfd", {"fdname": STREAM_FD_NAME}, fds=(stream.fileno(),)),
                )
    if failures:
        raise failures[0]


def _settings_commands(
    settings: _Settings, *, tls_creds: str, tls_hostname: str | None = None
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The QMP commands that give QEMU `settings` and TLS's (``tls_creds`` "": none)."""
    parameters: dict[str, Any] = {**settings.parameters, "tls-creds": tls_creds}
    if tls_hostname is not None:
        parameters["tls-hostname"] = tls_hostname
    return (
        _set_capabilities(settings.capabilities),
        ("migrate-set-parameters", parameters),
    )


def _set_capabilities(names: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The command that turns `names` on."""
    states = [{"capability": name, "state": True} for name in names]
    return "migrate-set-capabilities", {"capabilities": states}


async def _clear_capabilities(client: qmp.QMPClient, capabilities: Any = None) -> None:
    """Turn every migration capability off, as QEMU starts (a later migration sets its own).

    `capabilities` is QEMU's ``query-migrate-capabilities`` reply if the caller has it.
    """
    if capabilities is None:
        capabilities = await _execute(client, "query-migrate-capabilities")
    known = msgspec.convert(capabilities, list[_Capability])
    states = [{"capability": c.capability, "state": False} for c in known if c.state]
    if states:
        await _execute(client, "migrate-set-capabilities", {"capabilities": states})


def _postcopy_due(job: _Outgoing) -> bool:
    """Whether the migration of `job` should switch to postcopy now."""
    return (
        job.postcopy_after is not None
        and not job.postcopy_started
        and job.status.status == "active"
        and (job.status.dirty_sync_count or 0) >= job.postcopy_after
    )


def _check_userfaultfd(security_model: str, field: str) -> None:
    """Refuse, under `field`, postcopy where the kernel refuses userfaultfd to QEMU."""
    runs_as_root = os.geteuid() == 0 and security_model not in ("user", "pool")
    refusal = userfaultfd_refusal(runs_as_root=runs_as_root)
    if refusal is not None:
        raise InvalidConfigError(field, f"{POSTCOPY} needs userfaultfd on the target: {refusal}")


def _check_x509_dir(directory: str | None, endpoint: Endpoint) -> None:
    """Refuse, naming the config key, an x509 dir that lacks a file `endpoint` needs."""
    if directory is None:
        return
    missing = missing_x509_files(directory, endpoint)
    if missing:
        raise InvalidConfigError(
            "migration_tls_x509_dir",
            f"{directory} lacks {', '.join(missing)}, which the migration's TLS {endpoint} needs",
        )


async def _tls_creds(client: qmp.QMPClient, directory: str | None, endpoint: Endpoint) -> str:
    """Give QEMU the credentials in `directory` for TLS as `endpoint` (None: no TLS); the
    ``tls-creds`` migration parameter that selects them ("" for none: a QEMU may have
    migrated with TLS before)."""
    if directory is None:
        return ""
    objects = await _execute(client, "qom-list", {"path": "/objects"})
    if any(entry.get("name") == TLS_CREDS_ID for entry in objects):
        await _execute(client, "object-del", {"id": TLS_CREDS_ID})
    await _execute(client, "object-add", tls_creds_object(directory, endpoint))
    return TLS_CREDS_ID


async def _read_sizes(instance: Instance, client: qmp.QMPClient) -> None:
    """The arrived guest's memory and vCPUs as its QEMU reports them. Only figures: a
    QEMU that cannot tell them leaves the instance's as they were (the guest runs here
    whatever they are), with a warning."""
    try:
        await instance.read_sizes(client)
    except qmp.QMPError as error:
        instance.log.warning("memory and vCPUs not read", reason=str(error))


async def _qemu_status(client: qmp.QMPClient) -> str:
    return str((await _execute(client, "query-status"))["status"])


async def _note_outgoing(instance: Instance, outgoing: OutgoingMigration | None) -> None:
    """Save `outgoing` (None: no migration) in the instance's runtime record."""
    record = instance.record
    if record is None or record.outgoing == outgoing:
        return
    noted = msgspec.structs.replace(record, outgoing=outgoing)
    with host_io_errors(f"migration of {instance.name!r}", instance.paths.directory):
        await store_record(noted.paths.runtime_record, noted)
    instance.record = noted


async def _forget_outgoing(instance: Instance) -> None:
    """`_note_outgoing` of no migration, once one has ended here; a failure is logged."""
    try:
        await _note_outgoing(instance, None)
    except SupervisorError as error:
        instance.log.error("runtime record not updated after the migration", error=str(error))


class _Outgoing:
    """One outgoing migration: what `Migrations.start` set up and the figures since."""

    def __init__(
        self,
        *,
        uri: str,
        address: tuple[str, int] | None = None,
        settings: _Settings,
        prepared: bool = False,
        clear_first: bool = False,
        resume: bool,
        progress: MigrationProgress,
        postcopy_after: int | None = None,
    ) -> None:
        self.uri = uri
        #: The target's host and port, for a migration this daemon begins (not one it
        #: follows again after a restart).
        self.address = address
        self.settings = settings
        #: QEMU holds the settings already (`Migrations.prepare`), or other ones from
        #: it, to be cleared first.
        self.prepared = prepared
        self.clear_first = clear_first
        #: The guest ran when the migration began: a failed one resumes it.
        self.resume = resume
        self.progress = progress
        #: With ``postcopy-ram``: the dirty-sync passes after which it switches to postcopy.
        self.postcopy_after = postcopy_after
        self.postcopy_started = False
        self.status = progress.status
        self.done = anyio.Event()
        self.cancel_requested = False
        #: Seconds without a byte moved when the stall guard cancelled the migration.
        self.stalled_s: float | None = None
        #: Why the task following the migration ended early (its monitor lost).
        self.error: str | None = None
        #: What `Migrations._begin` did before ``migrate``, for `Migrations._undo_start`:
        #: the stream handed to QEMU (``getfd`` sent), the guest paused (non-live).
        self.stream_handed = False
        self.paused_for_it = False

    @property
    def live(self) -> bool:
        return self.settings.live

    @property
    def completed(self) -> bool:
        """Whether the migration ended completed (the guest runs on the target)."""
        return self.done.is_set() and self.status.status == "completed"


class Migrations:
    """The ``migration.*`` operations of one `Supervisor` (``sup.migrations``).

    Errors are `SupervisorError` subclasses, as the supervisor's: `MigrationError` (8)
    for a migration QEMU refused or that is in the wrong phase, `InvalidConfigError` (7)
    for a payload this host cannot run or an unknown capability.
    """

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        #: The outgoing migration of each instance, from `start` to `finalize_source`
        #: (or the next `start`): at most one per instance.
        self._outgoing: dict[str, _Outgoing] = {}
        #: Settings `prepare` applied, by instance, until the `start` that uses them (or
        #: `finalize_source`): at most one per instance whose QEMU still runs, and one
        #: per instance whose QEMU exited since the last `prepare` (each `prepare` drops
        #: those, with the connection each holds).
        self._prepared: dict[str, _Prepared] = {}

    # -- source ----------------------------------------------------------------------

    def info(self, name: str) -> MigrationInfoResult:
        """The payload of `name`'s running guest, for ``migration.accept`` on the target."""
        instance = self._sup.instance(name)
        record = instance.record
        if record is None or not instance.alive:
            raise InstanceNotRunning(name, str(instance.state))
        return MigrationInfoResult(runtime=encode_payload(payload_for(record)), spec=record.spec)

    async def prepare(
        self,
        name: str,
        *,
        live: bool | None = None,
        bandwidth_mib_s: int | None = None,
        downtime_ms: int | None = None,
        capabilities: Sequence[str] | None = None,
    ) -> bool:
        """Give QEMU now the settings of a `start` with the same values, which then
        sends only ``migrate``: QEMU takes a few milliseconds over them, which is done
        while the target's QEMU starts (`supervisor.control.migrate` asks this beside
        ``migration.accept``) rather than before the migration.

        Returns whether they were applied: not with TLS (the target's host name is a
        setting) nor for a non-live migration (the guest is paused at the start, just
        before ``migrate``). `finalize_source` with no success clears them. Raises
        `InvalidConfigError` for a capability QEMU lacks, `MigrationError` when QEMU
        refuses a setting (the capabilities are cleared then).
        """
        instance = self._sup.instance(name)
        async with instance.operation("migration.prepare"):
            record, client = _migrating_from_here(instance)
            settings = _settings(
                record.hvparams,
                live=live,
                bandwidth_mib_s=bandwidth_mib_s,
                downtime_ms=downtime_ms,
                capabilities=capabilities,
            )
            earlier = self._prepared.pop(name, None)
            if earlier is not None and earlier.client is client:
                await _clear_capabilities(client)
            await _check_capabilities(
                client, settings.capabilities, field=settings.capabilities_field
            )
            if self._sup.config.migration_tls_x509_dir is not None or not settings.live:
                return False
            try:
                await _execute_in_order(client, *_settings_commands(settings, tls_creds=""))
            except BaseException:
                with anyio.CancelScope(shield=True), contextlib.suppress(SupervisorError):
                    await _clear_capabilities(client)
                raise
            self._prepared = {
                prepared_name: prepared
                for prepared_name, prepared in self._prepared.items()
                if not prepared.client.closed
            }
            self._prepared[name] = _Prepared(
                client=client, passthroughs=instance.passthroughs, settings=settings
            )
        return True

    def _take_prepared(
        self, instance: Instance, client: qmp.QMPClient, settings: _Settings
    ) -> tuple[bool, bool]:
        """Whether `client`'s QEMU holds `settings` from `prepare`, untouched since; and
        whether it holds other ones from it, to be cleared first (the capabilities are
        only ever turned on). The preparation is used up either way."""
        prepared = self._prepared.pop(instance.name, None)
        if prepared is None or prepared.client is not client:
            return False, False
        holds = prepared.passthroughs == instance.passthroughs and prepared.settings == settings
        return holds, not holds

    async def start(
        self,
        name: str,
        *,
        target: str,
        port: int | None = None,
        live: bool | None = None,
        bandwidth_mib_s: int | None = None,
        downtime_ms: int | None = None,
        capabilities: Sequence[str] | None = None,
    ) -> MigrationStatus:
        """Start migrating `name` to a target that accepted it on `target`:`port`.

        Returns at once, with the migration under way (`migrating`); absent values come
        from the instance's hvparams. A non-live migration pauses the guest first.
        Raises `InvalidConfigError` for a capability QEMU lacks, `MigrationError` when
        QEMU refuses to begin (nothing is changed then).
        """
        instance = self._sup.instance(name)
        async with instance.operation("migration.start"):
            record, client = _migrating_from_here(instance)
            hv = record.hvparams
            port = hv.migration_port if port is None else port
            uri = migration_uri(target, port)
            settings = _settings(
                hv,
                live=live,
                bandwidth_mib_s=bandwidth_mib_s,
                downtime_ms=downtime_ms,
                capabilities=capabilities,
            )
            live = settings.live
            prepared, clear_first = self._take_prepared(instance, client, settings)
            _check_x509_dir(self._sup.config.migration_tls_x509_dir, "client")
            progress = MigrationProgress(
                stall_timeout_s=self._sup.config.migration_stall_timeout_s,
                now=anyio.current_time(),
            )
            postcopy = POSTCOPY in settings.capabilities
            job = _Outgoing(
                uri=uri,
                address=(target, port),
                settings=settings,
                prepared=prepared,
                clear_first=clear_first,
                resume=instance.state == S.RUNNING,
                progress=progress,
                postcopy_after=(
                    self._sup.config.migration_postcopy_after_passes if postcopy else None
                ),
            )
            previous = instance.state
            self._outgoing[name] = job
            instance.hold = f"a migration to {uri}"
            instance.set_state(S.MIGRATING, "migration started", target=uri, live=live)
            try:
                await instance.start_task(self._follow_outgoing, instance, client, job, True)
            except BaseException:
                del self._outgoing[name]
                instance.hold = None
                if instance.alive:
                    instance.set_state(previous, "migration not started")
                raise
            instance.log.info("migration started", target=uri, live=live)
        return job.status

    async def _follow_outgoing(
        self,
        instance: Instance,
        client: qmp.QMPClient,
        job: _Outgoing,
        begin: bool,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Begin the migration (if `begin`: `start`'s; not one a restarted daemon picked
        up), then follow it to its end.

        Started once ``migrate`` is accepted; what fails before that is undone and
        raised. Afterwards nothing is raised: the end, whatever it is, is reported in
        `job` and a last ``migration.progress`` event.
        """
        async with client.events(MIGRATION_EVENTS, max_buffer=EVENT_BUFFER) as events:
            try:
                if begin:
                    await self._begin(instance, client, job)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._undo_start(instance, client, job)
                raise
            task_status.started()
            try:
                await self._follow(instance, client, job, events)
            except qmp.QMPError as error:
                # A dying QEMU closes its monitor a moment before its exit is reported.
                with anyio.move_on_after(MONITOR_RETRY_S):
                    await instance.wait_exited()
                job.error = f"QEMU's monitor was lost during the migration: {error}"
            except Exception as error:  # a bug must not take the instance's run down
                instance.log.exception("migration task failed")
                job.error = f"the migration task failed: {error!r}"
            finally:
                with anyio.CancelScope(shield=True):
                    await self._end_outgoing(instance, client, job)

    async def _begin(self, instance: Instance, client: qmp.QMPClient, job: _Outgoing) -> None:
        """Set the migration up (unless `prepare` did) and send ``migrate``; `job` notes
        what was done, for `_undo_start`."""
        noted = OutgoingMigration(uri=job.uri, live=job.live, resume=job.resume)
        settings = job.settings
        with contextlib.ExitStack() as ours, ungrouped():
            async with anyio.create_task_group() as setting_up:
                # Saved (beside the connection and QEMU's set-up) before ``migrate``: a
                # daemon killed from then on finds it.
                setting_up.start_soon(_note_outgoing, instance, noted)
                if job.clear_first:
                    await _clear_capabilities(client)
                if not job.prepared:
                    await _check_capabilities(
                        client, settings.capabilities, field=settings.capabilities_field
                    )
                stream = await self._connect(job)
                if stream is not None:
                    ours.enter_context(stream)  # closed once QEMU holds its own copy
                job.stream_handed = stream is not None
                if not job.prepared:
                    tls = self._sup.config.migration_tls_x509_dir
                    creds = await _tls_creds(client, tls, "client")
                    # What QEMU takes from a ``tcp:`` URI; an ``fd:`` one has none.
                    hostname = job.address[0] if creds and job.address is not None else None
                    commands = _settings_commands(settings, tls_creds=creds, tls_hostname=hostname)
                    await _settle_and_hand_over(client, commands, stream)
                    if not job.live and await _qemu_status(client) == "running":
                        await _execute(client, "stop")
                        job.paused_for_it = True
            migrate = ("migrate", {"uri": fd_uri() if job.stream_handed else job.uri})
            if job.prepared and stream is not None:
                # In one write: should ``getfd`` fail, ``migrate`` of its fd fails too.
                await _execute_in_order(
                    client,
                    ("getfd", {"fdname": STREAM_FD_NAME}),
                    migrate,
                    fds=(stream.fileno(),),
                )
                return
        await _execute(client, *migrate)

    async def _connect(self, job: _Outgoing) -> socket.socket | None:
        """The stream to the target (`supervisor.qemu.migration_stream`), or None when
        QEMU must connect itself."""
        if job.address is None or opens_own_stream(job.settings.capabilities):
            return None
        host, port = job.address
        try:
            return await connect_stream(
                host, port, timeout_s=self._sup.config.migration_stall_timeout_s
            )
        except OSError as error:
            reason = "no answer" if isinstance(error, TimeoutError) else str(error)
            raise MigrationError(f"cannot connect to the target at {job.uri}: {reason}") from None

    async def _undo_start(self, instance: Instance, client: qmp.QMPClient, job: _Outgoing) -> None:
        try:
            if job.stream_handed:
                # QEMU's copy of the stream would keep the target waiting on an idle
                # connection (gone already if ``migrate`` took it, or ``getfd`` failed).
                with contextlib.suppress(MigrationError):
                    await _execute(client, "closefd", {"fdname": STREAM_FD_NAME})
            if job.paused_for_it:
                await _execute(client, "cont")
            await _clear_capabilities(client)
            await _note_outgoing(instance, None)
        except SupervisorError as error:
            instance.log.error("undoing a migration that did not start failed", error=str(error))

    async def _follow(
        self,
        instance: Instance,
        client: qmp.QMPClient,
        job: _Outgoing,
        events: qmp.EventSubscription,
    ) -> None:
        """Read ``query-migrate`` at each QEMU event and every progress interval until the
        migration ends (with its figures); cancel it when the stall guard says so."""
        interval = self._sup.config.migration_progress_interval_s
        progress = job.progress
        asked = anyio.current_time()
        while True:
            wait = asked + interval - anyio.current_time()
            if progress.figures_pending:
                wait = FIGURES_RETRY_S
            event = None
            with anyio.move_on_after(max(0.0, wait)):
                event = await events.__anext__()  # ends with an error when QEMU goes away
            if (
                isinstance(event, qmp.QMPEvent)
                and event.name == "MIGRATION_PASS"
                and not progress.figures_pending
            ):
                # Not a change of status, and maybe the last pass, inside the switch-over:
                # QEMU is not asked (`supervisor.qemu.migration_progress`), unless the
                # interval's reading is due (passes may come faster than it).
                job.status = progress.passed(int(event.data["pass"]))
                if not _postcopy_due(job) and anyio.current_time() < asked + interval:
                    continue
            asked = anyio.current_time()
            job.status = progress.update(await client.execute("query-migrate"), asked)
            if progress.finished:
                return
            if progress.figures_pending:
                continue  # the end is published once, with QEMU's figures
            if _postcopy_due(job):
                job.postcopy_started = True
                instance.log.info("switching to postcopy", passes=job.status.dirty_sync_count)
                await client.execute("migrate-start-postcopy")
            self._publish(instance, job.status)
            if job.stalled_s is None and progress.stalled(asked):
                job.stalled_s = progress.stalled_for(asked)
                instance.log.warning("migration stalled: cancelling it", stalled_s=job.stalled_s)
                await client.execute("migrate_cancel")

    async def _end_outgoing(
        self, instance: Instance, client: qmp.QMPClient, job: _Outgoing
    ) -> None:
        """Report how the migration ended; a failed one gives the guest back its run."""
        status = job.status
        try:
            if status.status == "completed":
                instance.hold = f"a completed migration to {job.uri} (until finalize_source)"
                instance.log.info(
                    "migration completed",
                    downtime_ms=status.downtime_ms,
                    total_time_ms=status.total_time_ms,
                )
                return
            if not instance.alive:
                job.status = msgspec.structs.replace(
                    status, status="failed", error="the source's QEMU exited during the migration"
                )
                instance.hold = None
                await _forget_outgoing(instance)
                return
            if job.error is None and not job.progress.finished:
                # Cancelled: the daemon is leaving, and QEMU goes on by itself.
                instance.log.warning("daemon leaving during a migration", target=job.uri)
                return
            if not job.progress.finished:
                ended = "failed"  # its monitor was lost
            elif job.cancel_requested or job.stalled_s is not None:
                # QEMU may call a migration we cancelled `failed` (its return path saw
                # the stream end first): it was cancelled all the same.
                ended = "cancelled"
            else:
                ended = status.status
            job.status = msgspec.structs.replace(
                status,
                status=ended,
                error=self._failure(job),
                stalled=job.stalled_s is not None,
            )
            instance.log.warning("migration did not complete", error=job.status.error)
            # After the switch to postcopy the guest ran on the target: resuming it here
            # would rewind it (its disk writes since are the target's), so it stays paused.
            resume = job.resume and not job.postcopy_started
            await self._give_back(instance, client, resume=resume, reason="migration failed")
        finally:
            job.done.set()
            self._publish(instance, job.status)

    def _failure(self, job: _Outgoing) -> str:
        if job.stalled_s is not None:
            return f"stalled: no byte moved for {job.stalled_s:.1f} s (migration_stall_timeout_s)"
        if job.cancel_requested:
            return "cancelled"
        if job.error is not None:
            return job.error
        return job.status.error or f"QEMU reports the migration {job.status.status}"

    async def _give_back(
        self, instance: Instance, client: qmp.QMPClient, *, resume: bool, reason: str
    ) -> None:
        """After a migration that did not complete: resume the guest if `resume` (it ran
        before), clear the capabilities, and release the instance."""
        try:
            qemu_status = await _qemu_status(client)
            if resume and qemu_status != "running":
                await _execute(client, "cont")
                qemu_status = "running"
            await _clear_capabilities(client)
            instance.qemu_status = qemu_status
            instance.set_state(state_for_qemu_status(qemu_status), reason)
        except SupervisorError as error:
            instance.log.error("resuming the guest after its migration failed", error=str(error))
        finally:
            instance.hold = None
            await _forget_outgoing(instance)

    def _publish(self, instance: Instance, status: MigrationStatus) -> None:
        data = msgspec.to_builtins(status)
        self._sup.bus.publish(make_event(instance.name, "migration.progress", data))

    async def status(self, name: str) -> MigrationStatus:
        """The figures of `name`'s migration as last read (no waiting on the source);
        status ``none`` when it has none."""
        instance = self._sup.instance(name)
        job = self._outgoing.get(name)
        if job is not None:
            return job.status
        record = instance.record
        if record is not None and record.incoming and instance.alive:
            status, _ = parse_query_migrate(
                await _execute(instance.require_running(), "query-migrate")
            )
            return status
        return MigrationStatus(status="none")

    async def cancel(self, name: str) -> MigrationStatus:
        """Cancel `name`'s migration: on the source, the guest keeps (or resumes) running;
        on the target, the waiting QEMU is stopped and its runtime removed.

        Returns the last figures once the migration has ended. Raises `MigrationError`
        when there is none to cancel, or it completed already.
        """
        instance = self._sup.instance(name)
        job = self._outgoing.get(name)
        if job is not None:
            if job.status.status == "completed":
                raise MigrationError(
                    f"the migration of {name!r} completed: its guest runs on the target",
                    name=name,
                )
            if not job.done.is_set():
                job.cancel_requested = True
                await _execute(instance.require_running(), "migrate_cancel")
                timeout = self._sup.config.qmp_timeout_s
                with anyio.move_on_after(timeout):
                    await job.done.wait()
                if not job.done.is_set():
                    raise OperationTimeout(f"cancel of the migration of {name!r}", timeout)
            return job.status
        record = instance.record
        if record is not None and record.incoming and instance.alive:
            async with instance.operation("migration.cancel", holder=True):
                await self._abandon_incoming(instance)
            return MigrationStatus(status="cancelled", error="cancelled on the target")
        raise MigrationError(f"instance {name!r} has no migration in progress", name=name)

    async def finalize_source(self, name: str, *, success: bool, live: bool = True) -> None:
        """End the source's part: on `success` QEMU (in ``postmigrate``) is ended and the
        instance's runtime removed; otherwise an unfinished migration is cancelled and
        the guest resumed if it ran before (after a daemon restart, which forgets that:
        if `live`, as Ganeti does).

        Raises `MigrationError` when QEMU's state contradicts `success`: a guest that
        still runs here is never ended, nor one resumed that runs on the target now.
        A `success` for an instance this daemon no longer has is done already (a
        restarted daemon ends the source's part of a migration that completed while it
        was down).
        """
        try:
            instance = self._sup.instance(name)
        except InstanceNotFound:
            if success:
                return
            raise
        async with instance.operation("migration.finalize_source", holder=True):
            job = self._outgoing.get(name)
            if job is not None and not job.done.is_set():
                raise MigrationError(
                    f"the migration of {name!r} is still running: cancel it or wait for its end",
                    name=name,
                )
            prepared = self._prepared.pop(name, None)
            if success:
                await self._end_migrated(instance, completed=job is not None and job.completed)
            elif job is None and prepared is not None and prepared.client is instance.qmp:
                # Prepared, never started (the target refused): only the settings to undo.
                await _clear_capabilities(prepared.client)
            elif instance.alive:
                await self._end_failed(instance, resume=job.resume if job else live)
            self._outgoing.pop(name, None)

    async def _end_migrated(self, instance: Instance, *, completed: bool = False) -> None:
        """End the QEMU whose guest went to the target, and remove its runtime.

        Unless the migration this daemon followed `completed` (QEMU, once it has given
        its final figures, is ``postmigrate``), QEMU is asked first.
        """
        name = instance.name
        if instance.alive:
            qemu_status = (
                "postmigrate" if completed else await _qemu_status(instance.require_running())
            )
            if qemu_status != "postmigrate":
                raise MigrationError(
                    f"QEMU of {name!r} is {qemu_status}, not postmigrate: the migration did not"
                    " complete from here, so the guest is left as it is",
                    name=name,
                    qemu_status=qemu_status,
                )
            await instance.stop(force=True, timeout_s=0, reason="migrated")
        instance.hold = None
        await self._sup._clean_up(instance)
        instance.log.info("migrated away: runtime removed")

    async def _end_failed(self, instance: Instance, *, resume: bool) -> None:
        client = instance.require_running()
        async with client.events({"MIGRATION"}, max_buffer=EVENT_BUFFER) as events:
            reply = await _execute(client, "query-migrate")
            if reply.get("status", "none") not in FINISHED | {"none"}:
                # A migration nobody follows (the daemon restarted during it): end it first.
                await _execute(client, "migrate_cancel")
                timeout = self._sup.config.qmp_timeout_s
                with anyio.move_on_after(timeout) as waiting:
                    async for event in events:
                        if isinstance(event, qmp.QMPEvent) and event.data["status"] in FINISHED:
                            break
                if waiting.cancelled_caught:
                    raise OperationTimeout(f"cancel of the migration of {instance.name!r}", timeout)
        if await _qemu_status(client) == "postmigrate":
            raise MigrationError(
                f"the migration of {instance.name!r} completed: its guest runs on the target"
                " now and is not resumed here; finalize with success",
                name=instance.name,
            )
        await self._give_back(instance, client, resume=resume, reason="migration failed")

    # -- target ----------------------------------------------------------------------

    async def accept(
        self,
        spec: InstanceSpec,
        runtime: str,
        *,
        address: str,
        port: int = 0,
        capabilities: Sequence[str] | None = None,
    ) -> MigrationAcceptResult:
        """Start a QEMU that waits for `runtime`'s guest on `address`:`port` (0: any port).

        Returns once QEMU listens (`incoming`), with the port it bound. Raises
        `InvalidConfigError` naming the field, before anything starts, when this host
        cannot run the guest (machine type, devices, accelerator, files, this QEMU's
        layout); `InstanceExists` when the instance runs or has a runtime here;
        `MigrationError` when QEMU cannot listen (everything is rolled back then).
        """
        payload = decode_payload(runtime)
        target_spec = guest_spec(spec, payload)
        _check_x509_dir(self._sup.config.migration_tls_x509_dir, "server")
        if capabilities is None:
            names = _split_caps(payload.hvparams.migration_caps)
            field = "runtime.hvparams.migration_caps"
        else:
            names, field = list(capabilities), "capabilities"
        if POSTCOPY in names:
            _check_userfaultfd(payload.hvparams.security_model, field)
        sup = self._sup
        name = target_spec.name
        instance = sup._instance(name, create=True)
        async with instance.operation("migration.accept"):
            if sup._instances.setdefault(name, instance) is not instance:
                raise Busy(name, "migration.accept")
            try:
                with host_io_errors(f"migration.accept of {name!r}", instance.paths.directory):
                    if instance.alive:
                        raise InstanceExists(name, "is running here")
                    if instance.record is not None:
                        raise InstanceExists(
                            name, "has a runtime record here: remove it first (instance.cleanup)"
                        )
                    record = await self._prepare_incoming(instance, target_spec, payload)
                    await sup._launch(instance, record, paused=True)
                bound = await self._listen(
                    instance, migration_uri(address, port), _capability_list(names), field
                )
            except SupervisorError:
                if not instance.alive:
                    await sup._roll_back_start(instance, None)
                raise
            instance.log.info("waiting for a migration", address=address, port=bound)
        return MigrationAcceptResult(address=address, port=bound, instance=instance.info())

    async def _prepare_incoming(
        self, instance: Instance, spec: InstanceSpec, payload: MigrationPayload
    ) -> RuntimeRecord:
        """The record of a QEMU that rebuilds the guest of `payload` here."""
        launcher = self._sup.launcher
        # The machine type is pinned, so a newer QEMU here keeps the guest's hardware.
        hv = msgspec.structs.replace(payload.hvparams, machine_version=payload.machine)
        caps = await launcher.capabilities.get(hv.kvm_path)
        accel = resolve_accelerator(hv.kvm_flag, launcher.kvm, instance=spec.name)
        raise_first(payload_problems(payload, caps, accel))
        record = await launcher.prepare(
            instance,
            spec,
            known_uuid=None,
            macs_in_use=self._sup._macs_in_use(),
            hvparams=hv,
            accel=accel,
        )
        problems = layout_problems(
            payload,
            machine=argv_machine(record.argv),
            devices=argv_devices(record.argv),
            layout=device_layout(record.disks, record.nics),
        )
        if problems:
            launcher.release_record(record)
            raise_first(problems)
        return msgspec.structs.replace(record, incoming=True)

    async def _listen(
        self, instance: Instance, uri: str, capabilities: Sequence[str], field: str
    ) -> int:
        """Have the incoming QEMU listen on `uri`; the port it bound. QEMU is stopped if
        this fails."""
        try:
            client = instance.require_running()
            await _check_capabilities(client, capabilities, field=field)
            tls_creds = await _tls_creds(client, self._sup.config.migration_tls_x509_dir, "server")
            # Sent at once: should one fail, this QEMU is stopped whatever the others did.
            *_, listening, _ = await _execute_in_order(
                client,
                _set_capabilities(capabilities),
                # This QEMU was just started: it has no ``tls-creds`` unless given here.
                *([("migrate-set-parameters", {"tls-creds": tls_creds})] if tls_creds else []),
                ("migrate-incoming", {"uri": uri}),
                ("query-migrate", None),
                # In `inmigrate`, `cont` means "run once the guest has arrived": the guest
                # of a live migration runs on the moment it switches over (one paused on
                # its source stays paused: QEMU migrates the run state too).
                ("cont", None),
            )
            port = _bound_port(listening)
            instance.incoming_capabilities = tuple(capabilities)
            record = instance.record
            assert record is not None
            # Only now: a daemon killed before this finds the accept interrupted (nobody
            # got the port) and, restarted, stops this QEMU (`_adopt_incoming`).
            await self._sup.launcher.complete(instance, record)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await instance.stop(force=True, timeout_s=0, reason=MIGRATION_FAILED)
            raise
        return port

    async def finalize_target(
        self, name: str, runtime: str, *, success: bool, resume: bool = True
    ) -> InstanceInfo | None:
        """End the target's part: on `success` the instance is this daemon's (its record
        saved as an ordinary one; if `resume`, a guest that arrived paused or never
        started runs), otherwise its QEMU is stopped and its runtime removed (nothing
        to do if that happened already).

        Raises `MigrationError` for a `success` whose migration did not complete here,
        `NetworkError` when a routed NIC cannot be set up (the guest runs here then, its
        routed NICs down and the instance still incoming: finalize again once the host
        is fixed).
        """
        payload = decode_payload(runtime)
        if payload.spec.name != name:
            raise InvalidConfigError("runtime", f"is the payload of {payload.spec.name!r}")
        try:
            instance = self._sup.instance(name)
        except InstanceNotFound:
            if success:
                raise
            return None  # its QEMU exited and its runtime was removed already
        async with instance.operation("migration.finalize_target", holder=True):
            record = instance.record
            if record is None or not record.incoming:
                if not success and not instance.alive:
                    return None
                raise MigrationError(f"instance {name!r} has no incoming migration", name=name)
            if record.uuid != payload.spec.uuid:
                raise InvalidConfigError("runtime.spec.uuid", f"is not the uuid of {name!r} here")
            if not success:
                await self._abandon_incoming(instance)
                return None
            await self._take_over(instance, record, resume=resume)
        return instance.info()

    async def _take_over(self, instance: Instance, record: RuntimeRecord, *, resume: bool) -> None:
        client = instance.require_running()
        migrated, qemu_status, capabilities = await self._incoming_end(instance, client)
        if migrated != "completed":
            raise MigrationError(
                f"the incoming migration of {instance.name!r} is {migrated}, not completed",
                name=instance.name,
                status=migrated,
            )
        # Routed NICs come up once the guest has switched over (Ganeti's order); a failure
        # leaves the instance incoming (`set_up` undid its part): finalize again.
        await self._sup.launcher.network.set_up(
            record.nics, instance=record.name, tags=record.spec.tags, modes=ROUTED_MODES
        )
        # Completed as a start too: a guest that arrived after an interrupted accept
        # (see `_adopt_incoming`) is adopted as is after a restart, never started again.
        owned = msgspec.structs.replace(record, incoming=False, start_completed=True)
        if capabilities is None and instance.incoming_capabilities is not None:
            # Those `accept` turned on in this QEMU, which started with all of them off: a
            # round trip less, while the source's QEMU is ended beside.
            capabilities = [
                {"capability": name, "state": True} for name in instance.incoming_capabilities
            ]
        with ungrouped():
            async with anyio.create_task_group() as finishing:
                # QEMU's part beside the record's save.
                finishing.start_soon(_clear_capabilities, client, capabilities)
                finishing.start_soon(_read_sizes, instance, client)
                with host_io_errors(f"finalize of {instance.name!r}", instance.paths.directory):
                    await store_record(owned.paths.runtime_record, owned)
        instance.record = owned
        if resume and qemu_status in RESUMABLE:
            await _execute(client, "cont")
            qemu_status = "running"
        instance.qemu_status = qemu_status
        instance.set_state(state_for_qemu_status(qemu_status), "migrated")
        instance.log.info("migration finalized: the instance runs here")

    async def _incoming_end(
        self, instance: Instance, client: qmp.QMPClient
    ) -> tuple[str, str, Any]:
        """How the incoming migration ended, with QEMU's run state and its migration
        capabilities (``query-migrate-capabilities``) after that end.

        A live guest whose ``RESUME`` and then ``MIGRATION`` ``completed`` the monitor
        has seen (QEMU resumes it, then says completed) ended so: nothing is asked, and
        the capabilities are not known (None). Otherwise the three questions go out at
        once; the source reports its end a moment before the target has loaded the last
        state, so an ``active`` one is waited for (at most ``qmp_timeout_s``) and the
        other two asked again.
        """
        if instance.migration_event_status == "completed" and instance.qemu_status == "running":
            # A round trip less to a QEMU busy with the guest it just took over.
            return "completed", "running", None
        questions = (
            ("query-migrate", None),
            ("query-status", None),
            ("query-migrate-capabilities", None),
        )
        async with client.events({"MIGRATION"}, max_buffer=EVENT_BUFFER) as events:
            migration, run_state, capabilities = await _execute_in_order(client, *questions)
            status = str(migration.get("status", "none"))
            if status not in FINISHED and status != "none":
                with anyio.move_on_after(self._sup.config.qmp_timeout_s):
                    try:
                        async for event in events:
                            if isinstance(event, qmp.QMPEvent) and event.data["status"] in FINISHED:
                                status = str(event.data["status"])
                                break
                    except qmp.QMPError:
                        return "failed", "", None  # QEMU went away: its exit says the rest
                if status in FINISHED:
                    run_state, capabilities = await _execute_in_order(client, *questions[1:])
        return status, str(run_state["status"]), capabilities

    async def _abandon_incoming(self, instance: Instance) -> None:
        """Stop an incoming QEMU and remove its runtime (operation lock held).

        Raises `MigrationError` when its migration completed: the guest runs here now,
        and its source has ended (or ends) its own copy.
        """
        if instance.alive:
            client = instance.qmp
            if client is not None and not client.closed:
                try:
                    status = (await _execute(client, "query-migrate")).get("status")
                except SupervisorError:
                    status = None  # QEMU is going: nothing runs here
                if status == "completed":
                    raise MigrationError(
                        f"the incoming migration of {instance.name!r} completed: its guest"
                        " runs here now and is not stopped; finalize it with success",
                        name=instance.name,
                        status=status,
                    )
            await instance.stop(force=True, timeout_s=0, reason=MIGRATION_FAILED)
        await self._sup._clean_up(instance)

    async def forget_failed_incoming(self, instance: Instance) -> None:
        """Remove the runtime of an incoming QEMU that exited before the migration was
        finalized (the supervisor calls it when such a run ends): its guest never ran
        here, so nothing of it may be started again on this host."""
        try:
            async with instance.operation("migration clean-up", holder=True):
                record = instance.record
                if instance.alive or record is None or not record.incoming:
                    return  # the accept that failed removed it, or a new run began
                await self._sup._clean_up(instance)
                instance.log.info("incoming migration failed: runtime removed")
        except SupervisorError as error:
            instance.log.error("clean-up after a failed incoming migration", error=str(error))

    # -- after a daemon restart ------------------------------------------------------

    async def adopt(self, instance: Instance) -> None:
        """Pick up the migration of a QEMU a restarted daemon adopted (the adoption holds
        the operation lock): an outgoing one the record notes is followed again, or its
        end is carried out; an incoming one that cannot arrive any more is abandoned."""
        record = instance.record
        try:
            if record is not None and record.outgoing is not None:
                await self._adopt_outgoing(instance, record.outgoing)
            elif record is not None and record.incoming:
                await self._adopt_incoming(instance)
        except SupervisorError as error:
            instance.log.error("migration not picked up after the restart", error=str(error))

    async def _adopt_outgoing(self, instance: Instance, outgoing: OutgoingMigration) -> None:
        """As QEMU says: still under way, it is followed (and held) as `start`'s is;
        completed (QEMU ``postmigrate``), the source's part ends as ``finalize_source``
        ends it; failed, cancelled or never begun, the guest is given back its run."""
        client = instance.require_running()
        progress = MigrationProgress(
            stall_timeout_s=self._sup.config.migration_stall_timeout_s, now=anyio.current_time()
        )
        job = _Outgoing(
            uri=outgoing.uri,
            settings=_Settings(
                live=outgoing.live, capabilities=(), capabilities_field="", parameters={}
            ),
            resume=outgoing.resume,
            progress=progress,
        )
        job.status = progress.update(await _execute(client, "query-migrate"), anyio.current_time())
        self._outgoing[instance.name] = job
        ended = job.status.status
        if ended not in FINISHED | {"none"}:
            instance.hold = f"a migration to {job.uri}"
            instance.set_state(
                S.MIGRATING, "migration followed after a restart", target=job.uri, live=job.live
            )
            instance.log.info("following the migration again after a restart", target=job.uri)
            await instance.start_task(self._follow_outgoing, instance, client, job, False)
            return
        try:
            if ended == "completed":
                instance.log.info("the migration completed while the daemon was down")
                await self._end_migrated(instance)
                del self._outgoing[instance.name]
                return
            why = job.status.error or f"QEMU reports it {ended}"
            if ended == "none":
                why = "the daemon was killed before QEMU was told to migrate"
                # A stream handed over already would keep the target waiting on it.
                with contextlib.suppress(SupervisorError):
                    await _execute(client, "closefd", {"fdname": STREAM_FD_NAME})
            job.status = msgspec.structs.replace(
                job.status,
                status="cancelled" if ended == "cancelled" else "failed",
                error=f"ended while the source's daemon was down: {why}",
            )
            instance.log.warning("migration did not complete", error=job.status.error)
            await self._give_back(instance, client, resume=job.resume, reason="migration failed")
        finally:
            job.done.set()
            self._publish(instance, job.status)

    async def _adopt_incoming(self, instance: Instance) -> None:
        """An incoming QEMU whose ``migration.accept`` was interrupted (its start not
        completed: nobody got its port, so no source will come) or whose migration
        failed is stopped and its runtime removed, as libvirt cleans up a half-made
        incoming domain; one an accept answered for, still listening or receiving, stays
        held for ``finalize_target``, and one whose guest arrived runs on, held likewise."""
        record = instance.record
        interrupted = record is not None and not record.start_completed
        client = instance.require_running()
        status = str((await _execute(client, "query-migrate")).get("status", "none"))
        if interrupted or status in {"failed", "cancelled"}:
            instance.log.warning(
                "incoming migration abandoned after a restart",
                status=status,
                accept_interrupted=interrupted,
            )
            await self._abandon_incoming(instance)
