"""Turning a spec into a running QEMU, and tidying up after it (Ganeti's start/cleanup path).

`Launcher.prepare` validates the spec (syntax, host, this QEMU), leases what the
host hands out (display port, pool uid, chroot) and builds the runtime record;
`Launcher.launch` saves the record of the start, then starts QEMU paused (``-S``) in
its own session and connects its NICs while it initializes; the
`Launcher.startup_steps` then run over QMP (passwords, CPU pinning, balloon, ``cont``)
and mark the record complete. `Launcher.release` gives everything back after QEMU
exits.

Blocking work runs in anyio's worker threads: record saves (a write may wait for a
busy disk) and uid-pool requests (a scan of ``/proc``).

The daemon binds QEMU's QMP socket itself and hands QEMU the listening descriptor,
so the QMP connection is made the moment QEMU is spawned: no waiting for the
socket file to appear.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
import msgspec

from protocols import qmp
from protocols.groups import ungrouped
from supervisor.engine.instance import KILL_WAIT_S, Instance, StartupSteps
from supervisor.host.chroot import create_chroot, remove_chroot
from supervisor.host.pinning import CpuPinningError, pin_vcpus
from supervisor.host.statedir import StateDir, refuse_symlink
from supervisor.host.uidpool import UidPool
from supervisor.log import get_logger
from supervisor.model.api import QemuInfo
from supervisor.model.config import Config
from supervisor.model.errors import (
    HypervisorError,
    InstanceExists,
    InvalidConfigError,
    NetworkError,
)
from supervisor.model.hvparams import HvParams, parse_cpu_mask, resolve_hvparams
from supervisor.model.spec import InstanceSpec, assign_macs, ensure_uuid
from supervisor.model.states import InstanceState
from supervisor.model.validation import check_host_basics, check_syntax, raise_first
from supervisor.net.netlink import Link
from supervisor.net.nics import (
    SWITCHED_MODES,
    Networking,
    close_taps,
    open_taps,
    tap_fds,
    with_tap_names,
)
from supervisor.qemu.accel import Accelerator, probe_kvm, resolve_accelerator
from supervisor.qemu.capabilities import CapabilityCache, check_host_qemu
from supervisor.qemu.cmdline import (
    argv_with_fds,
    build_command_line,
    free_port,
    launch_resources,
    socket_path_problems,
)
from supervisor.qemu.process import QemuProcess, launch
from supervisor.qemu.runtime import RuntimeRecord, store_record

_log = get_logger(__name__)

QMP_CHARDEV_ID = "qmp-listen"


def launch_argv(argv: tuple[str, ...], qmp_listen_fd: int, *, incoming: bool = False) -> list[str]:
    """The argv to exec: paused (``-S``), with QMP on an already-listening descriptor.

    The record keeps the path form (``-qmp unix:PATH,server=on,wait=off``), which
    can be run by hand; QEMU gets the same socket as ``fd=`` instead. An `incoming`
    QEMU waits for a migration (``-incoming defer``: ``migrate-incoming`` says where).
    """
    result = [argv[0]]
    if "-S" not in argv:
        result.append("-S")
    if incoming:
        result += ["-incoming", "defer"]
    args = iter(argv[1:])
    for arg in args:
        if arg == "-qmp":
            spec = next(args)
            if not spec.startswith("unix:"):
                raise InvalidConfigError("argv", f"unexpected QMP socket {spec!r}")
            result += [
                "-chardev",
                f"socket,id={QMP_CHARDEV_ID},fd={qmp_listen_fd},server=on,wait=off",
                "-mon",
                f"chardev={QMP_CHARDEV_ID},mode=control",
            ]
        else:
            result.append(arg)
    return result


def _listening_socket(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fspath(path))
        os.chmod(path, 0o600)
        listener.listen(4)
    except BaseException:
        listener.close()
        raise
    return listener


class Launcher:
    """Start-up and clean-up of instances for one `Supervisor`."""

    def __init__(self, config: Config, state_dir: StateDir, *, group_id: int | None) -> None:
        self.config = config
        self.state_dir = state_dir
        #: What makes this daemon's tap names its own (`tap_name`): a migration's other
        #: end may run the same instance on this host.
        self._tap_scope = os.path.abspath(state_dir.path)
        self.group_id = group_id
        self.capabilities = CapabilityCache()
        self.kvm = probe_kvm()
        self.uid_pool = (
            UidPool(state_dir.uid_lease_dir, config.uid_ranges()) if config.uid_pool else None
        )
        self._leased_ports: dict[str, int] = {}
        #: The MACs of the starts under way (prepared, not yet alive), by instance.
        self._leased_macs: dict[str, frozenset[str]] = {}
        #: The Linux bridges the host check of a start under way found, by instance,
        #: for its NICs' set-up (one start per instance at a time: the operation lock).
        self._checked_bridges: dict[str, dict[str, Link]] = {}
        self.network = Networking(
            ovsdb_socket=config.ovsdb_socket,
            hook=config.nic_hook,
            hook_timeout_s=config.nic_hook_timeout_s,
        )

    async def qemu_summary(self) -> QemuInfo:
        """The default QEMU binary, its version and the accelerator a default instance gets."""
        hv = resolve_hvparams(self.config.hvparams, {})
        try:
            caps = await self.capabilities.get(hv.kvm_path)
            version: str | None = caps.version_text
        except HypervisorError:
            version = None
        accel = "kvm" if self.kvm.usable_for_stock_guests else "tcg"
        if hv.kvm_flag == "enabled":
            accel = "kvm"
        elif hv.kvm_flag == "disabled":
            accel = "tcg"
        return QemuInfo(path=hv.kvm_path, version=version, accel=accel)

    async def hv_version(self) -> tuple[int, int, int]:
        hv = resolve_hvparams(self.config.hvparams, {})
        try:
            return (await self.capabilities.get(hv.kvm_path)).version
        except HypervisorError:
            return (0, 0, 0)

    # -- start ---------------------------------------------------------------------------

    async def prepare(
        self,
        instance: Instance,
        spec: InstanceSpec,
        *,
        known_uuid: str | None,
        macs_in_use: Mapping[str, str] | None = None,
        hvparams: HvParams | None = None,
        accel: Accelerator | None = None,
    ) -> RuntimeRecord:
        """Validate `spec`, lease what it needs and build its runtime record.

        `macs_in_use` maps the MACs of the node's other running instances to their
        names: a NIC must not share one (nor one of a start under way). `hvparams` are
        the resolved parameters to run with (a migration target takes its source's); by
        default the spec's over the config's. `accel` is the accelerator the caller
        resolved for them already (its warning logged once). Raises `InvalidConfigError` naming the
        field at fault (nothing is leased then), `NetworkError` when the host cannot set
        up a NIC (its bridge is missing, say) and `HypervisorError` when QEMU cannot be
        probed.
        """
        if spec.uuid is None and known_uuid is not None:
            spec = msgspec.structs.replace(spec, uuid=known_uuid)
        spec = assign_macs(ensure_uuid(spec))
        self._refuse_macs_in_use(spec, macs_in_use or {})
        hv = resolve_hvparams(self.config.hvparams, spec.hvparams) if hvparams is None else hvparams
        raise_first(check_syntax(spec, hv))
        raise_first(check_host_basics(spec, hv))
        if hv.security_model == "pool" and self.uid_pool is None:
            raise InvalidConfigError(
                "spec.hvparams.security_model", "pool, but the daemon config has no uid_pool"
            )
        caps = await self.capabilities.get(hv.kvm_path)
        raise_first(check_host_qemu(spec, hv, caps, kvm=self.kvm))
        paths = self.state_dir.instance(spec.name)
        raise_first(socket_path_problems(spec, hv, paths))
        if accel is None:
            accel = resolve_accelerator(hv.kvm_flag, self.kvm, instance=spec.name)
        paths = self.state_dir.create_instance_dir(spec.name, group_id=self.group_id)
        uid = None
        try:
            if hv.security_model == "pool":
                uid = await self._request_uid(spec.name)
            resources = await launch_resources(
                spec,
                hv,
                port_range=self.config.display_port_range,
                # The live view: other starts may lease ports while this one awaits.
                taken_ports=self._leased_ports.values(),
                uid=uid,
            )
            if resources.display_port is not None:
                self._leased_ports[spec.name] = resources.display_port
            command = build_command_line(spec, hv, caps, paths, accel, resources=resources)
            assert spec.uuid is not None
            nics = tuple(with_tap_names(command.nics, spec.uuid, state_dir=self._tap_scope))
            command = msgspec.structs.replace(command, nics=nics)
            self._leased_macs[spec.name] = frozenset(nic.mac for nic in nics)
            self._checked_bridges[spec.name] = await self.network.check_host(nics)
            if hv.use_chroot:
                create_chroot(paths.chroot)
        except BaseException:
            self._release_leases(spec.name, uid)
            raise
        return RuntimeRecord.for_start(spec, hv, command, caps, paths, uid=uid)

    def _refuse_macs_in_use(self, spec: InstanceSpec, macs_in_use: Mapping[str, str]) -> None:
        users = dict(macs_in_use)
        for name, macs in self._leased_macs.items():
            if name != spec.name:
                users.update(dict.fromkeys(macs, name))
        for index, nic in enumerate(spec.nics):
            assert nic.mac is not None
            user = users.get(nic.mac)
            if user is not None and user != spec.name:
                raise InvalidConfigError(
                    f"spec.nics[{index}].mac", f"{nic.mac} is in use by instance {user!r}"
                )

    async def _request_uid(self, owner: str, uid: int | None = None) -> int:
        """Lease a pool uid (exactly `uid` if given) in a worker thread: it scans ``/proc``.

        Shielded, so a lease taken is always returned to the caller, who releases it.
        Raises `UidPoolExhausted` when none is free.
        """
        assert self.uid_pool is not None
        request = functools.partial(self.uid_pool.request, owner, uid=uid)
        with anyio.CancelScope(shield=True):
            lease = await anyio.to_thread.run_sync(request)
        return lease.uid

    async def renew(self, record: RuntimeRecord) -> RuntimeRecord:
        """The record for a new run of the same argv (reboot, restart): the same uid and
        display port leased again, or `InvalidConfigError` when they are taken now."""
        if record.uid is not None and self.uid_pool is not None:
            await self._request_uid(record.name, record.uid)
        port = record.vnc_port or record.spice_port
        if port is not None and record.spec.network_port is None:
            taken = {p for name, p in self._leased_ports.items() if name != record.name}
            if free_port(port, port, taken) is None:
                self._release_leases(record.name, record.uid)
                raise InvalidConfigError("display_port_range", f"port {port} is in use now")
            self._leased_ports[record.name] = port
        self._leased_macs[record.name] = frozenset(nic.mac for nic in record.nics)
        self.state_dir.create_instance_dir(record.name, group_id=self.group_id)
        if record.hvparams.use_chroot:
            create_chroot(record.paths.chroot)
        return msgspec.structs.replace(
            record, pid=None, started_at=None, incoming=False, outgoing=None
        )

    async def launch(
        self, instance: Instance, record: RuntimeRecord, *, paused: bool
    ) -> QemuProcess:
        """Spawn QEMU paused (``-S``) for `record`; the record is on disk before QEMU is.

        The record of the start (no pid, ``start_completed`` false, ``start_paused``) is
        saved first, so that a daemon killed at any later point finds this QEMU after
        its restart (by the ``-pidfile`` in its command line) and finishes the start;
        then QEMU is spawned and the record saved again with its pid.

        Once QEMU is spawned its NICs are connected (`_set_up_nics`) while it
        initializes, beside that save.

        Raises `InstanceExists` when the instance is alive (checked after every await,
        so nothing spawns a second QEMU), `HypervisorError` when QEMU cannot be
        executed, a record cannot be saved or QEMU exits meanwhile, `NetworkError` when
        a NIC cannot be connected (QEMU is killed and reaped then, its NICs undone). The
        caller releases what `prepare` leased, except after `InstanceExists` (the live
        run holds it). Call it shielded: a start is never cut between its saves.
        """
        _refuse_second_qemu(instance)
        intent = msgspec.structs.replace(
            record, pid=None, started_at=time.time(), start_paused=paused, start_completed=False
        )
        await _save(intent)
        if instance.alive:
            # Only a caller outside the operation lock gets here: keep the live record.
            if instance.record is not None:
                await _save(instance.record)
            _refuse_second_qemu(instance)
        paths = record.paths
        for stale in (paths.serial_socket, paths.pid_file):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        # Opened by the daemon (QEMU may run unprivileged) and closed once QEMU has them:
        # a tap lives while an fd holds it, so it dies with QEMU.
        taps = open_taps(record.nics)
        try:
            listener = _listening_socket(paths.qmp_socket)
            try:
                fds = tap_fds(record.nics, taps)
                argv = argv_with_fds(
                    launch_argv(record.argv, listener.fileno(), incoming=record.incoming),
                    record.nics,
                    fds,
                )
                refuse_symlink(paths.serial_log)  # QEMU appends to it (as root, maybe)
                process = launch(
                    argv, log_path=paths.qemu_log, pass_fds=(listener.fileno(), *fds.values())
                )
            except OSError as error:
                raise HypervisorError(
                    f"cannot start QEMU: {error.filename or record.argv[0]}: {error.strerror}",
                    stderr=str(error),
                ) from None
            finally:
                listener.close()
        finally:
            close_taps(taps)
        started = msgspec.structs.replace(intent, pid=process.pid)
        # `starting` from the spawn on, not from the save below (in a worker thread, slow
        # on a busy disk): whoever sees this QEMU sees its instance alive.
        instance.record = started
        instance.started_at = started.started_at
        instance.set_state(InstanceState.STARTING, "start requested", pid=process.pid)
        instance.log.info("launched", pid=process.pid, accel=record.accel)
        try:
            with ungrouped():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_save, started)
                    # While QEMU initializes (on another CPU), not after its QMP
                    # handshake: the NICs' set-up is off the start's critical path.
                    await self._set_up_nics(started)
        except (HypervisorError, NetworkError) as error:
            # A QEMU that failed by itself took its taps along: say why it failed.
            exited = not process.is_alive()
            await _kill_failed_start(instance, process)
            await self._tear_down_nics(instance, started)
            if isinstance(error, NetworkError) and exited:
                raise _qemu_exit_error(instance.name, process) from error
            raise
        return process

    async def _set_up_nics(self, record: RuntimeRecord) -> None:
        """Connect the NICs of `record`'s QEMU (spawned, holding its taps).

        A migration target routes its NICs once the guest has moved here
        (`supervisor.engine.migration`): the routes stay on the source's taps until then.
        Switch ports come up now: they must be there at the switch-over.
        """
        await self.network.set_up(
            record.nics,
            instance=record.name,
            tags=record.spec.tags,
            modes=SWITCHED_MODES if record.incoming else None,
            bridges=self._checked_bridges.pop(record.name, None),
        )

    def release_record(self, record: RuntimeRecord) -> None:
        """Give back what `prepare` leased for `record` when it never ran."""
        self._release_leases(record.name, record.uid)
        if record.hvparams.use_chroot:
            remove_chroot(
                record.paths.chroot, quarantine_dir=self.state_dir.quarantine_dir, name=record.name
            )

    def startup_steps(
        self, instance: Instance, *, paused: bool, nics_connected: bool
    ) -> StartupSteps:
        """What runs over QMP between spawn and ``cont`` (Ganeti's post-start steps).

        The NICs are connected first unless `nics_connected` (`launch` does it for a
        QEMU it spawns; a start a restarted daemon finishes does it again: idempotent).
        """

        async def run(client: qmp.QMPClient) -> None:
            record = instance.record
            assert record is not None and instance.process is not None
            hv = record.hvparams
            if not nics_connected:
                await self._set_up_nics(record)
            self._share_console(record)
            if hv.vnc_password_file:
                await client.execute(
                    "set_password",
                    {"protocol": "vnc", "password": _secret(hv.vnc_password_file)},
                )
            if hv.spice_password_file:
                await client.execute(
                    "set_password",
                    {"protocol": "spice", "password": _secret(hv.spice_password_file)},
                )
            try:
                await pin_vcpus(client, instance.process.pid, parse_cpu_mask(hv.cpu_mask))
            except CpuPinningError as error:
                raise InvalidConfigError("spec.hvparams.cpu_mask", str(error)) from None
            if record.incoming:
                # The guest, its balloon included, comes with the migration
                # (`supervisor.engine.migration` tells QEMU where to listen, and marks
                # the start completed once `migration.accept` has done so).
                instance.qemu_status = "inmigrate"
                instance.set_state(InstanceState.INCOMING, "waiting for a migration")
                return
            startup_mib = record.spec.startup_memory_mib
            if startup_mib is not None and startup_mib < record.spec.memory_mib:
                await client.execute("balloon", {"value": startup_mib * 1024 * 1024})
            if not paused:
                await client.execute("cont")
            # After `cont`: a daemon killed before this save runs the steps again.
            await self.complete(instance, record)
            if paused:
                instance.qemu_status = "paused"
                instance.set_state(InstanceState.PAUSED, "started paused")
            else:
                instance.qemu_status = "running"
                instance.set_state(InstanceState.RUNNING, "started")

        return run

    async def complete(self, instance: Instance, record: RuntimeRecord) -> None:
        """Save `record` as a start that completed (a restarted daemon adopts it as is)."""
        completed = msgspec.structs.replace(record, start_completed=True)
        await _save(completed)
        instance.record = completed

    def _share_console(self, record: RuntimeRecord) -> None:
        """Serial console socket: mode 0660 and the control group (API.md §1)."""
        serial = record.paths.serial_socket
        with contextlib.suppress(FileNotFoundError):
            if self.group_id is not None:
                os.chown(serial, -1, self.group_id)
            os.chmod(serial, 0o660)

    # -- clean-up ------------------------------------------------------------------------

    async def release(self, instance: Instance) -> None:
        """Give back what a run held: NICs, uid lease, display port, sockets, pid file,
        chroot.

        The NICs are torn down first (shielded, bounded): what outlived the taps
        (routes, proxy entries, Open vSwitch ports); a failure there is logged, and
        the rest is released all the same. The runtime record stays (``stop`` keeps
        it); `forget` removes it.
        """
        record = instance.record
        if record is not None:
            await self._tear_down_nics(instance, record)
        self._release_leases(instance.name, record.uid if record else None)
        paths = instance.paths
        for leftover in (*paths.sockets, paths.pid_file):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        if record is not None and record.hvparams.use_chroot:
            quarantined = remove_chroot(
                paths.chroot, quarantine_dir=self.state_dir.quarantine_dir, name=instance.name
            )
            if quarantined is not None:
                instance.log.warning("chroot not empty: quarantined", path=str(quarantined))

    async def _tear_down_nics(self, instance: Instance, record: RuntimeRecord) -> None:
        """Remove what outlives the taps of `record`'s NICs; a failure is logged."""
        if not record.nics:
            return
        try:
            await self.network.tear_down(record.nics, instance=record.name, tags=record.spec.tags)
        except NetworkError as error:
            instance.log.error(
                "NIC teardown failed", interface=error.interface, reason=error.reason
            )
        except TimeoutError:
            instance.log.error("NIC teardown timed out")

    def _release_leases(self, name: str, uid: int | None) -> None:
        self._leased_ports.pop(name, None)
        self._leased_macs.pop(name, None)
        self._checked_bridges.pop(name, None)
        if uid is not None and self.uid_pool is not None:
            self.uid_pool.release(uid, owner=name)

    def forget(self, instance: Instance) -> bool:
        """Move the instance's runtime dir, record and serial log included, into the
        state dir's trash (the caller has it emptied); whether there was one."""
        return self.state_dir.discard_instance_dir(instance.name)


async def _kill_failed_start(instance: Instance, process: QemuProcess) -> None:
    """Kill and reap the QEMU of a start that failed before its monitor was reached."""
    with anyio.CancelScope(shield=True):
        process.kill()
        with anyio.move_on_after(KILL_WAIT_S):
            await process.wait_exit()
    instance.set_state(InstanceState.STOPPED, "start-failed")


def _qemu_exit_error(name: str, process: QemuProcess) -> HypervisorError:
    """The error of a QEMU that exited by itself while its start was under way (its taps
    went with it, which is how the NICs' set-up noticed)."""
    status = process.exit_status
    return HypervisorError(
        f"QEMU of {name!r} failed to start: {status.describe() if status else 'it exited'}",
        stderr=process.stderr_tail(),
        exit_status=None if status is None else status.code,
    )


def _refuse_second_qemu(instance: Instance) -> None:
    if instance.alive:
        raise InstanceExists(instance.name, "is already running")


async def _save(record: RuntimeRecord) -> None:
    path = record.paths.runtime_record
    try:
        await store_record(path, record)
    except OSError as error:
        raise HypervisorError(f"cannot save the runtime record {path}: {error.strerror}") from None


def _secret(path: str) -> str:
    try:
        return Path(path).read_text().strip("\n")
    except OSError as error:
        raise InvalidConfigError("spec.hvparams", f"{path}: {error.strerror}") from None
