"""Typed parameters and results of the control protocol's methods (API.md §3).

Every method's params decode into one of these Structs (unknown fields are
errors, names must match the instance-name pattern), and every result is one of
them; ``rpc.discover`` renders its OpenRPC document from the same types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from supervisor.model.spec import PATTERN_END, InstanceName, InstanceSpec


class _Params(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class NoParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NameParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName


class StartParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Either a full ``spec`` or the ``name`` of a defined instance."""

    spec: InstanceSpec | None = None
    name: InstanceName | None = None
    paused: bool = False


class StopParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName
    force: bool = False
    timeout_s: Annotated[float, Meta(ge=0, le=86400)] | None = None


class BalloonParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName
    memory_mib: Annotated[int, Meta(ge=1)]


class MonitorParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName
    command: Annotated[str, Meta(min_length=1, max_length=4096)]


class QmpParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName
    command: Annotated[str, Meta(min_length=1, max_length=256)]
    arguments: dict[str, Any] | None = None


#: Where a migration stream listens or connects: an IP address or a host name.
MigrationHost = Annotated[
    str,
    Meta(
        pattern=r"^[0-9A-Za-z.:-]{1,253}" + PATTERN_END,
        description="IP address (v4 or v6) or host name.",
    ),
]
MigrationCapability = Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,64}" + PATTERN_END)]


class MigrationAcceptParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``migration.accept``: the target starts QEMU waiting for `runtime`'s guest.

    `spec` names the instance and must agree with the runtime's (see the README);
    `capabilities` defaults to the runtime's ``migration_caps`` and must be the list
    ``migration.start`` gets.
    """

    spec: InstanceSpec
    runtime: Annotated[str, Meta(min_length=1)]
    address: MigrationHost
    port: Annotated[int, Meta(ge=0, le=65535)] = 0
    capabilities: list[MigrationCapability] | None = None


class MigrationStartParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``migration.start``; absent values come from the instance's hvparams
    (``migration_port``, ``migration_mode``, ``migration_bandwidth``,
    ``migration_downtime``, ``migration_caps``)."""

    name: InstanceName
    target: MigrationHost
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    live: bool | None = None
    bandwidth_mib_s: Annotated[int, Meta(ge=0)] | None = None
    downtime_ms: Annotated[int, Meta(ge=0, le=2_000_000)] | None = None
    capabilities: list[MigrationCapability] | None = None


class MigrationPrepareParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``migration.prepare`` (an extension): the source's settings for a
    ``migration.start`` with the same values, applied beforehand (see the README)."""

    name: InstanceName
    live: bool | None = None
    bandwidth_mib_s: Annotated[int, Meta(ge=0)] | None = None
    downtime_ms: Annotated[int, Meta(ge=0, le=2_000_000)] | None = None
    capabilities: list[MigrationCapability] | None = None


class FinalizeSourceParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName
    success: bool
    live: bool = True


class FinalizeTargetParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``resume`` (an extension): run a guest the migration left paused, as a non-live
    migration does, or one never started (``-S``) on its source; false keeps it as it
    arrived (a guest that was paused on its source)."""

    name: InstanceName
    runtime: Annotated[str, Meta(min_length=1)]
    success: bool
    resume: bool = True


class SubscribeParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    instances: list[InstanceName] | None = None
    kinds: list[Annotated[str, Meta(min_length=1)]] | None = None


class UnsubscribeParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    subscription: int


class NicInfo(msgspec.Struct, kw_only=True, frozen=True):
    mac: str
    #: The host's tap device (kept in the runtime record: the same after a daemon restart).
    tap: str | None
    mode: str
    link: str | None
    ip: str | None = None
    vlan: int | None = None
    mtu: int | None = None


class InstanceInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What ``instance.info`` and most instance methods return (API.md §3)."""

    name: str
    uuid: str | None
    state: str
    pid: int | None
    memory_mib: int
    vcpus: int
    qemu_status: str | None
    uptime_s: float | None
    started_at: float | None
    nics: list[NicInfo]
    console: dict[str, Any]
    restarts: int
    reason: str | None = None
    serial_log: str | None = None
    accel: str | None = None


class InstanceSummary(msgspec.Struct, kw_only=True, frozen=True):
    name: str
    state: str
    pid: int | None


class PingResult(msgspec.Struct, kw_only=True, frozen=True):
    version: str


class QemuInfo(msgspec.Struct, kw_only=True, frozen=True):
    path: str
    version: str | None
    accel: str


class NodeInfo(msgspec.Struct, kw_only=True, frozen=True):
    """The node's memory (MiB), CPUs and QEMU version ``[major, minor, micro]``."""

    memory_total_mib: int
    memory_free_mib: int
    memory_dom0_mib: int
    cpu_count: int
    hv_version: list[int]


class SupervisorInfo(msgspec.Struct, kw_only=True, frozen=True):
    version: str
    pid: int
    uptime_s: float
    state_dir: str
    qemu: QemuInfo
    node: NodeInfo


class VerifyResult(msgspec.Struct, kw_only=True, frozen=True):
    """Problems stop instances from working; warnings make them work worse."""

    problems: list[str]
    warnings: list[str]


class MonitorResult(msgspec.Struct, kw_only=True, frozen=True):
    output: str


class QmpResult(msgspec.Struct, kw_only=True, frozen=True, rename={"return_": "return"}):
    return_: Any


class SubscribeResult(msgspec.Struct, kw_only=True, frozen=True):
    subscription: int


class Empty(msgspec.Struct, frozen=True):
    pass


class ConsoleInfo(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    kind: Literal["serial", "vnc", "spice", "message"]
    socket: str | None = None
    host: str | None = None
    port: int | None = None
    display: int | None = None
    message: str | None = None


class MigrationStatus(msgspec.Struct, kw_only=True, frozen=True):
    """A migration's progress (API.md §3), from QEMU's ``query-migrate``.

    `status` is QEMU's (``setup``, ``active``, ``device``, ``completed``, ``failed``,
    ``cancelled``, ...) or ``none``. Sizes in MiB; `percent` is the share of guest
    memory no longer waiting to be sent; `mbps` QEMU's throughput in megabits per
    second. Extensions: `total_time_ms` (QEMU's), and, once a migration failed or was
    cancelled, `error` saying why and `stalled` when the stall guard cancelled it; with
    ``auto-converge``, `cpu_throttle_percentage` (how much of the guest's CPU time QEMU
    takes away to slow its writes); with ``xbzrle``, `xbzrle_pages` (pages sent as
    deltas against the previous copy), `xbzrle_mib` (what those deltas took) and
    `xbzrle_cache_miss` (pages found nowhere to delta against: sent whole).
    """

    status: str
    transferred_mib: float = 0.0
    remaining_mib: float = 0.0
    total_mib: float = 0.0
    percent: float = 0.0
    mbps: float | None = None
    dirty_sync_count: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    total_time_ms: int | None = None
    error: str | None = None
    stalled: bool = False
    cpu_throttle_percentage: int | None = None
    xbzrle_pages: int | None = None
    xbzrle_mib: float | None = None
    xbzrle_cache_miss: int | None = None


class MigrationInfoResult(msgspec.Struct, kw_only=True, frozen=True):
    """``migration.info``: `runtime` is the opaque payload for the target; `spec` (an
    extension) the instance's spec as it runs, for ``migration.accept``."""

    runtime: str
    spec: InstanceSpec


class MigrationAcceptResult(msgspec.Struct, kw_only=True, frozen=True):
    address: str
    port: int
    instance: InstanceInfo


class MigrationPrepareResult(msgspec.Struct, kw_only=True, frozen=True):
    """``migration.prepare``: whether QEMU holds the settings now (`applied`), so that a
    ``migration.start`` with the same values sends only ``migrate``; false when they
    wait for the start (TLS, whose host name comes with the target; a non-live
    migration)."""

    applied: bool


class MigrationStartResult(msgspec.Struct, kw_only=True, frozen=True):
    status: MigrationStatus
