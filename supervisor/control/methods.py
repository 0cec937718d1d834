"""The control protocol's method table: name -> params type, handler, result type.

The RPC server decodes params with the method's own Struct (so a bad field is
-32602 with its path), calls the handler with the `Supervisor`, and encodes the
result; ``rpc.discover`` renders the same table as an OpenRPC document.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from supervisor.engine.supervisor import Supervisor
from supervisor.host.node import node_info, verify_node
from supervisor.model import api
from supervisor.model.errors import InvalidConfigError

Handler = Callable[[Supervisor, Any], Awaitable[Any]]


class Method(msgspec.Struct, frozen=True):
    name: str
    params: type[msgspec.Struct]
    result: Any
    handler: Handler
    summary: str


async def _ping(sup: Supervisor, _: api.NoParams) -> api.PingResult:
    return api.PingResult(version=sup.version)


async def _info(sup: Supervisor, _: api.NoParams) -> api.SupervisorInfo:
    return api.SupervisorInfo(
        version=sup.version,
        pid=os.getpid(),
        uptime_s=round(sup.uptime_s(), 3),
        state_dir=sup.config.state_dir,
        qemu=await sup.launcher.qemu_summary(),
        node=node_info(await sup.launcher.hv_version()),
    )


async def _verify(sup: Supervisor, _: api.NoParams) -> api.VerifyResult:
    qemu = await sup.launcher.qemu_summary()
    return verify_node(qemu_path=qemu.path, state_dir=Path(sup.config.state_dir))


async def _start(sup: Supervisor, params: api.StartParams) -> api.InstanceInfo:
    if (params.spec is None) == (params.name is None):
        raise InvalidConfigError("spec", "give exactly one of spec or name")
    return await sup.start(params.spec, name=params.name, paused=params.paused)


async def _stop(sup: Supervisor, params: api.StopParams) -> api.InstanceInfo:
    return await sup.stop(params.name, force=params.force, timeout_s=params.timeout_s)


async def _reboot(sup: Supervisor, params: api.NameParams) -> api.InstanceInfo:
    return await sup.reboot(params.name)


async def _pause(sup: Supervisor, params: api.NameParams) -> api.InstanceInfo:
    return await sup.pause(params.name)


async def _resume(sup: Supervisor, params: api.NameParams) -> api.InstanceInfo:
    return await sup.resume(params.name)


async def _cleanup(sup: Supervisor, params: api.NameParams) -> api.Empty:
    await sup.cleanup(params.name)
    return api.Empty()


async def _list(sup: Supervisor, _: api.NoParams) -> list[api.InstanceSummary]:
    return sup.list()


async def _instance_info(sup: Supervisor, params: api.NameParams) -> api.InstanceInfo:
    return sup.info(params.name)


async def _balloon(sup: Supervisor, params: api.BalloonParams) -> api.InstanceInfo:
    return await sup.balloon(params.name, params.memory_mib)


async def _console(sup: Supervisor, params: api.NameParams) -> dict[str, Any]:
    return sup.console(params.name)


async def _monitor(sup: Supervisor, params: api.MonitorParams) -> api.MonitorResult:
    return api.MonitorResult(output=await sup.monitor(params.name, params.command))


async def _qmp(sup: Supervisor, params: api.QmpParams) -> api.QmpResult:
    return api.QmpResult(return_=await sup.qmp(params.name, params.command, params.arguments))


async def _migration_info(sup: Supervisor, params: api.NameParams) -> api.MigrationInfoResult:
    return sup.migrations.info(params.name)


async def _migration_accept(
    sup: Supervisor, params: api.MigrationAcceptParams
) -> api.MigrationAcceptResult:
    return await sup.migrations.accept(
        params.spec,
        params.runtime,
        address=params.address,
        port=params.port,
        capabilities=params.capabilities,
    )


def _migration_settings(
    params: api.MigrationPrepareParams | api.MigrationStartParams,
) -> dict[str, Any]:
    """The settings `params` choose (absent: the instance's hvparams')."""
    return {
        "live": params.live,
        "bandwidth_mib_s": params.bandwidth_mib_s,
        "downtime_ms": params.downtime_ms,
        "capabilities": params.capabilities,
    }


async def _migration_prepare(
    sup: Supervisor, params: api.MigrationPrepareParams
) -> api.MigrationPrepareResult:
    applied = await sup.migrations.prepare(params.name, **_migration_settings(params))
    return api.MigrationPrepareResult(applied=applied)


async def _migration_start(
    sup: Supervisor, params: api.MigrationStartParams
) -> api.MigrationStartResult:
    status = await sup.migrations.start(
        params.name, target=params.target, port=params.port, **_migration_settings(params)
    )
    return api.MigrationStartResult(status=status)


async def _migration_status(sup: Supervisor, params: api.NameParams) -> api.MigrationStatus:
    return await sup.migrations.status(params.name)


async def _migration_cancel(sup: Supervisor, params: api.NameParams) -> api.MigrationStatus:
    return await sup.migrations.cancel(params.name)


async def _finalize_source(sup: Supervisor, params: api.FinalizeSourceParams) -> api.Empty:
    await sup.migrations.finalize_source(params.name, success=params.success, live=params.live)
    return api.Empty()


async def _finalize_target(
    sup: Supervisor, params: api.FinalizeTargetParams
) -> api.InstanceInfo | api.Empty:
    info = await sup.migrations.finalize_target(
        params.name, params.runtime, success=params.success, resume=params.resume
    )
    return api.Empty() if info is None else info


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("supervisor.ping", api.NoParams, api.PingResult, _ping, "Is the daemon alive?"),
        Method(
            "supervisor.info",
            api.NoParams,
            api.SupervisorInfo,
            _info,
            "Daemon, QEMU and node information.",
        ),
        Method(
            "supervisor.verify",
            api.NoParams,
            api.VerifyResult,
            _verify,
            "Check binaries, /dev/kvm, /dev/net/tun and the state dir.",
        ),
        Method(
            "instance.start",
            api.StartParams,
            api.InstanceInfo,
            _start,
            "Start a spec or a defined instance; returns once QEMU runs.",
        ),
        Method(
            "instance.stop",
            api.StopParams,
            api.InstanceInfo,
            _stop,
            "ACPI power-down, then kill after timeout_s; force kills at once.",
        ),
        Method(
            "instance.reboot",
            api.NameParams,
            api.InstanceInfo,
            _reboot,
            "Stop, then start from the saved runtime (same uuid).",
        ),
        Method("instance.pause", api.NameParams, api.InstanceInfo, _pause, "Pause the vCPUs."),
        Method("instance.resume", api.NameParams, api.InstanceInfo, _resume, "Resume the vCPUs."),
        Method(
            "instance.cleanup",
            api.NameParams,
            api.Empty,
            _cleanup,
            "Remove runtime files, uid lease and chroot of a stopped instance.",
        ),
        Method(
            "instance.list",
            api.NoParams,
            list[api.InstanceSummary],
            _list,
            "Every instance.",
        ),
        Method("instance.info", api.NameParams, api.InstanceInfo, _instance_info, "One instance."),
        Method(
            "instance.balloon",
            api.BalloonParams,
            api.InstanceInfo,
            _balloon,
            "Set the balloon target.",
        ),
        Method(
            "instance.console",
            api.NameParams,
            api.ConsoleInfo,
            _console,
            "How to reach the console (serial socket, VNC or SPICE).",
        ),
        Method(
            "instance.monitor",
            api.MonitorParams,
            api.MonitorResult,
            _monitor,
            "Run a human-monitor command.",
        ),
        Method(
            "instance.qmp",
            api.QmpParams,
            api.QmpResult,
            _qmp,
            "Run a QMP command (state-changing ones are refused).",
        ),
        Method(
            "migration.info",
            api.NameParams,
            api.MigrationInfoResult,
            _migration_info,
            "Source: the running guest as an opaque payload for migration.accept.",
        ),
        Method(
            "migration.accept",
            api.MigrationAcceptParams,
            api.MigrationAcceptResult,
            _migration_accept,
            "Target: start QEMU waiting for the guest; returns the port it listens on.",
        ),
        Method(
            "migration.prepare",
            api.MigrationPrepareParams,
            api.MigrationPrepareResult,
            _migration_prepare,
            "Source: apply migration.start's settings beforehand (beside migration.accept).",
        ),
        Method(
            "migration.start",
            api.MigrationStartParams,
            api.MigrationStartResult,
            _migration_start,
            "Source: start migrating to an accepting target; returns at once.",
        ),
        Method(
            "migration.status",
            api.NameParams,
            api.MigrationStatus,
            _migration_status,
            "A migration's figures, without waiting.",
        ),
        Method(
            "migration.cancel",
            api.NameParams,
            api.MigrationStatus,
            _migration_cancel,
            "Cancel a migration: the source keeps running; a target's QEMU is stopped.",
        ),
        Method(
            "migration.finalize_source",
            api.FinalizeSourceParams,
            api.Empty,
            _finalize_source,
            "Source: success ends QEMU and removes the runtime; failure resumes the guest.",
        ),
        Method(
            "migration.finalize_target",
            api.FinalizeTargetParams,
            # InstanceInfo or {}: msgspec's schemas take no union of two untagged Structs.
            Any,
            _finalize_target,
            "Target: success makes the instance this daemon's (returns its InstanceInfo);"
            " failure stops its QEMU (returns {}).",
        ),
    )
}
