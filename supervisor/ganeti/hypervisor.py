"""Ganeti's ``kvm`` hypervisor, handed to the node's kvm-supervisor daemon.

`KvmSupervisorHypervisor` implements ``hv_base.BaseHypervisor`` with calls to the local
daemon's control socket (API.md §3): Ganeti keeps deciding where instances run, the
daemon runs them. Ganeti makes a fresh object for every call (noded does, per request),
so nothing is kept between calls: each method opens one connection, makes its requests
and closes it. The daemon's socket comes from this node's ``driver.toml``
(`supervisor.ganeti.settings`).

The hypervisor parameters are Ganeti's KVM ones, checked by Ganeti's own rules
(`CheckParameterSyntax` on the master, `ValidateParameters` on the nodes); the daemon
checks them again, against the host, when an instance starts. Hotplug is not
supported (the base class's answers). Runs inside Ganeti's Python: the standard
library and Ganeti's modules only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Final

from ganeti import constants, errors, objects, pathutils, vcluster
from ganeti.hypervisor import hv_base
from ganeti.hypervisor.hv_kvm import KVMHypervisor
from ganeti.hypervisor.hv_kvm import validation as kvm_validation

from supervisor.ganeti import convert
from supervisor.ganeti.rpc import (
    DEFAULT_TIMEOUT_S,
    INSTANCE_NOT_FOUND,
    INSTANCE_NOT_RUNNING,
    DaemonClient,
    DaemonError,
    DaemonUnreachable,
)
from supervisor.ganeti.settings import DriverSettings, SettingsError, load_settings, node_root

#: Added to a stop's ACPI wait for the daemon's reply: the kill and QEMU's exit.
_STOP_MARGIN_S: Final = 30.0
#: A stop without a timeout waits for the daemon's own ``stop_timeout_s``; Ganeti's
#: RPC to noded gives up after 15 minutes (``RPC_TMO_NORMAL``).
_STOP_WITHOUT_TIMEOUT_S: Final = 900.0
#: A start may probe QEMU and set NICs up; a reboot stops first.
_START_TIMEOUT_S: Final = 300.0

#: Error codes that mean "no such instance here" (API.md §2).
_UNKNOWN: Final = frozenset({INSTANCE_NOT_FOUND})
_NOT_RUNNING: Final = frozenset({INSTANCE_NOT_FOUND, INSTANCE_NOT_RUNNING})

_log = logging.getLogger(__name__)


def _settings() -> DriverSettings:
    try:
        return load_settings()
    except SettingsError as error:
        raise errors.HypervisorError(f"kvm-supervisor: {error}") from None


def _daemon(*, timeout_s: float | None = None) -> DaemonClient:
    return DaemonClient(_settings().socket, timeout_s=timeout_s or DEFAULT_TIMEOUT_S)


@contextlib.contextmanager
def _connection(timeout_s: float | None = None) -> Iterator[DaemonClient]:
    """A connection to the node's daemon; its errors become ``HypervisorError``."""
    try:
        with _daemon(timeout_s=timeout_s) as daemon:
            yield daemon
    except (DaemonError, DaemonUnreachable) as error:
        raise errors.HypervisorError(f"kvm-supervisor: {error}") from None


def _request(
    daemon: DaemonClient,
    method: str,
    params: Mapping[str, Any] | None = None,
    absent: frozenset[int] = frozenset(),
) -> Any:
    """`method`'s result, or None for an error whose code is in `absent` (an instance
    already gone, say)."""
    try:
        return daemon.call(method, params)
    except DaemonError as error:
        if error.code in absent:
            return None
        raise DaemonError(error.code, f"{method}: {error.message}", error.data) from None


def _call(
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    timeout_s: float | None = None,
    absent: frozenset[int] = frozenset(),
) -> Any:
    """One request on a connection of its own (see `_request`)."""
    with _connection(timeout_s) as daemon:
        return _request(daemon, method, params, absent)


def _disk_links(instance: objects.Instance) -> list[tuple[Any, str, None]]:
    """The links to `instance`'s block devices on this node, as StartInstance gets them:
    Ganeti makes them (``BlockdevOpen``) before it asks a target to accept an instance."""
    return [
        (disk, f"{pathutils.DISK_LINKS_DIR}/{instance.name}{constants.DISK_SEPARATOR}{index}", None)
        for index, disk in enumerate(instance.disks_info or [])
    ]


def _node_socket(node_name: str, socket_path: str) -> str:
    """`node_name`'s daemon socket, given this node's: the same path on a real cluster
    (all nodes alike, as Ganeti assumes for its own files); on a virtual cluster, a
    socket under this node's root sits at the same place under `node_name`'s."""
    root = node_root()
    if root and socket_path.startswith(f"{root}/"):
        return str(vcluster.ExchangeNodeRoot(node_name, socket_path))
    return socket_path


def _instance_info(name: str) -> dict[str, Any] | None:
    """``instance.info``, or None when the daemon does not know the instance."""
    info: dict[str, Any] | None = _call("instance.info", {"name": name}, absent=_UNKNOWN)
    return info


class KvmSupervisorHypervisor(hv_base.BaseHypervisor):  # type: ignore[misc]  # Ganeti is untyped
    """Ganeti's KVM hypervisor interface, by calls to the node's kvm-supervisor daemon."""

    CAN_MIGRATE = True
    #: Ganeti's KVM parameters, names and checks: clusters keep their hvparams as they are.
    PARAMETERS = KVMHypervisor.PARAMETERS

    @staticmethod
    def VersionsSafeForMigration(src: Any, target: Any) -> bool:
        # The payload pins the machine type, and the target refuses a guest its QEMU
        # cannot rebuild before anything starts (migration.accept), as Ganeti's KVM
        # driver also assumes.
        return True

    # -- lifecycle -----------------------------------------------------------------------

    def StartInstance(
        self,
        instance: objects.Instance,
        block_devices: list[tuple[Any, str, str | None]],
        startup_paused: bool,
    ) -> None:
        """Start with the maximum memory, then balloon down to Ganeti's startup memory
        (the maximum if the node has it free, never below the minimum), as Ganeti's KVM
        driver does: the spec stays the same on every node, for migrations."""
        spec = convert.instance_spec(instance, block_devices)
        with _connection(_START_TIMEOUT_S) as daemon:
            node = _request(daemon, "supervisor.info")["node"]
            startup = convert.startup_memory(instance, int(node["memory_free_mib"]))
            _request(daemon, "instance.start", {"spec": spec, "paused": bool(startup_paused)})
            if startup < spec["memory_mib"]:
                params = {"name": instance.name, "memory_mib": startup}
                _request(daemon, "instance.balloon", params)

    def StopInstance(
        self,
        instance: objects.Instance | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
        timeout: int | None = None,
    ) -> None:
        """Stop and wait: the ACPI power button, then a kill after `timeout` seconds
        (the daemon's ``stop_timeout_s`` when None); at once with `force`."""
        if name is None:
            assert instance is not None
            name = instance.name
        elif not force:
            raise errors.HypervisorError("Cannot shutdown cleanly by name only")
        params: dict[str, Any] = {"name": name, "force": force}
        deadline = _STOP_WITHOUT_TIMEOUT_S
        if timeout is not None and not force:
            params["timeout_s"] = float(timeout)
            deadline = timeout + _STOP_MARGIN_S
        _call("instance.stop", params, timeout_s=deadline, absent=_NOT_RUNNING)

    def CleanupInstance(self, instance_name: str) -> None:
        _call("instance.cleanup", {"name": instance_name}, absent=_UNKNOWN)

    def RebootInstance(self, instance: objects.Instance) -> None:
        _call("instance.reboot", {"name": instance.name}, timeout_s=_STOP_WITHOUT_TIMEOUT_S)

    def BalloonInstanceMemory(self, instance: objects.Instance, mem: int) -> None:
        _call("instance.balloon", {"name": instance.name, "memory_mib": int(mem)})

    # -- queries -------------------------------------------------------------------------

    def ListInstances(self, hvparams: Mapping[str, Any] | None = None) -> list[str]:
        return convert.alive_names(_call("instance.list"))

    def GetInstanceInfo(
        self, instance_name: str, hvparams: Mapping[str, Any] | None = None
    ) -> tuple[str, int, int, int, int, int] | None:
        info = _instance_info(instance_name)
        return None if info is None else convert.instance_tuple(info, hvparams)

    def GetAllInstancesInfo(
        self, hvparams: Mapping[str, Any] | None = None
    ) -> list[tuple[str, int, int, int, int, int]]:
        found = []
        with _connection() as daemon:
            for name in convert.alive_names(_request(daemon, "instance.list")):
                # None: cleaned up since the list.
                info = _request(daemon, "instance.info", {"name": name}, _UNKNOWN)
                entry = None if info is None else convert.instance_tuple(info, hvparams)
                if entry is not None:
                    found.append(entry)
        return found

    def GetNodeInfo(self, hvparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The daemon's node facts and QEMU version.

        Without a daemon, the node's own facts, as Ganeti reads them for its KVM driver,
        and no version (Ganeti takes it as optional): node verification then goes on and
        reports the daemon through `Verify`, instead of failing as a whole.
        """
        try:
            with _daemon() as daemon:
                return convert.node_info(daemon.call("supervisor.info"))
        except DaemonUnreachable as error:
            _log.warning("kvm-supervisor: %s; node facts from /proc", error)
            return self.GetLinuxNodeInfo()  # type: ignore[no-any-return]
        except DaemonError as error:
            raise errors.HypervisorError(f"kvm-supervisor: supervisor.info: {error}") from None

    def Verify(self, hvparams: Mapping[str, Any] | None = None) -> str | None:
        """The daemon's problems (``supervisor.verify``), or why it cannot be asked."""
        try:
            socket_path = load_settings().socket
            with DaemonClient(socket_path) as daemon:
                result = daemon.call("supervisor.verify")
        except (SettingsError, DaemonError, DaemonUnreachable) as error:
            return f"kvm-supervisor: {error}"
        for warning in result.get("warnings", []):
            _log.warning("kvm-supervisor: %s", warning)
        problems = [f"kvm-supervisor: {problem}" for problem in result.get("problems", [])]
        return self._FormatVerifyResults(problems)  # type: ignore[no-any-return]

    def VerifyInstance(self, instance: objects.Instance) -> bool:
        """Whether the daemon runs this very instance (same uuid) rather than a namesake."""
        info = _instance_info(instance.name)
        return info is not None and info.get("uuid") == instance.uuid

    @classmethod
    def GetInstanceConsole(
        cls,
        instance: objects.Instance,
        primary_node: objects.Node,
        node_group: objects.NodeGroup,
        hvparams: Mapping[str, Any],
        beparams: Mapping[str, Any],
    ) -> objects.InstanceConsole:
        """kvm-supervisor's serial console on the primary node, over ssh as Ganeti does;
        VNC and SPICE as Ganeti's KVM driver gives them."""
        if hvparams[constants.HV_SERIAL_CONSOLE]:
            settings = _settings()
            socket_path = _node_socket(primary_node.name, settings.socket)
            ndparams = node_group.FillND(primary_node)
            return objects.InstanceConsole(
                instance=instance.name,
                kind=constants.CONS_SSH,
                host=primary_node.name,
                port=ndparams.get(constants.ND_SSH_PORT),
                user=constants.SSH_CONSOLE_USER,
                command=settings.console_command(socket_path, instance.name),
            )
        vnc_bind_address = hvparams[constants.HV_VNC_BIND_ADDRESS]
        if vnc_bind_address and instance.network_port > constants.VNC_BASE_PORT:
            return objects.InstanceConsole(
                instance=instance.name,
                kind=constants.CONS_VNC,
                host=vnc_bind_address,
                port=instance.network_port,
                display=instance.network_port - constants.VNC_BASE_PORT,
            )
        spice_bind = hvparams[constants.HV_KVM_SPICE_BIND]
        if spice_bind:
            return objects.InstanceConsole(
                instance=instance.name,
                kind=constants.CONS_SPICE,
                host=spice_bind,
                port=instance.network_port,
            )
        return objects.InstanceConsole(
            instance=instance.name,
            kind=constants.CONS_MESSAGE,
            message=f"No serial shell for instance {instance.name}",
        )

    # -- parameters ----------------------------------------------------------------------

    @classmethod
    def CheckParameterSyntax(cls, hvparams: Mapping[str, Any]) -> None:
        """Ganeti's checks of its KVM parameters, without touching the host."""
        super().CheckParameterSyntax(hvparams)
        kvm_validation.check_boot_parameters(hvparams)
        kvm_validation.check_security_model(hvparams)
        kvm_validation.check_console_parameters(hvparams)
        kvm_validation.check_vnc_parameters(hvparams)
        kvm_validation.check_spice_parameters(hvparams)
        kvm_validation.check_disk_cache_parameters(hvparams)

    @classmethod
    def ValidateParameters(cls, hvparams: Mapping[str, Any]) -> None:
        """Ganeti's checks against this node (files, users, addresses); what QEMU itself
        supports the daemon checks when it starts an instance."""
        super().ValidateParameters(hvparams)
        kvm_validation.validate_security_model(hvparams)
        kvm_validation.validate_vnc_parameters(hvparams)

    @classmethod
    def PowercycleNode(cls, hvparams: Mapping[str, Any] | None = None) -> None:
        cls.LinuxPowercycle()

    # -- migration (API.md §3, the four steps Ganeti drives) ------------------------------

    def MigrationInfo(self, instance: objects.Instance) -> str:
        return str(_call("migration.info", {"name": instance.name})["runtime"])

    def AcceptInstance(self, instance: objects.Instance, info: str, target: str) -> None:
        spec = convert.instance_spec(instance, _disk_links(instance))
        params = {
            "spec": spec,
            "runtime": info,
            "address": target,
            "port": int(instance.hvparams[constants.HV_MIGRATION_PORT]),
        }
        _call("migration.accept", params, timeout_s=_START_TIMEOUT_S)

    def MigrateInstance(
        self, cluster_name: str, instance: objects.Instance, target: str, live: bool
    ) -> None:
        params = {
            "name": instance.name,
            "target": target,
            "port": int(instance.hvparams[constants.HV_MIGRATION_PORT]),
            "live": bool(live),
        }
        _call("migration.start", params)

    def GetMigrationStatus(self, instance: objects.Instance) -> objects.MigrationStatus:
        return convert.migration_status(_call("migration.status", {"name": instance.name}))

    def FinalizeMigrationDst(self, instance: objects.Instance, info: str, success: bool) -> None:
        params = {"name": instance.name, "runtime": info, "success": bool(success)}
        _call("migration.finalize_target", params, timeout_s=_STOP_WITHOUT_TIMEOUT_S)

    def FinalizeMigrationSource(
        self, instance: objects.Instance, success: bool, live: bool
    ) -> None:
        params = {"name": instance.name, "success": bool(success), "live": bool(live)}
        _call("migration.finalize_source", params, timeout_s=_STOP_WITHOUT_TIMEOUT_S)
