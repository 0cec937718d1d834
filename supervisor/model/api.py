"""Typed parameters and results of the control protocol's methods (API.md §3).

Every method's params decode into one of these Structs (unknown fields are
errors, names must match the instance-name pattern), and every result is one of
them; ``rpc.discover`` renders its OpenRPC document from the same types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from supervisor.model.spec import InstanceName, InstanceSpec


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
