"""Daemon configuration (API.md §8) and instance definition files, both TOML.

Every `Config` key has a default, so an empty file, or one holding only
``state_dir = "/some/dir"``, is complete. Unknown keys are errors naming the key, as are
values of the wrong type (``max_request_bytes: Expected `int`, got `str```).

Relative paths are resolved against the directory of the file that holds them: in the
config file `state_dir`, `instances_dir`, `image_dirs`, `ovsdb_socket`, `nic_hook`,
`migration_tls_x509_dir` and the path parameters of ``[hvparams]``; in an instance file
its disks and path parameters (kernel, initrd, ISOs, floppy, password files, x509 dir,
mem_path). Values coming over the control socket have no such base and must be
absolute (`supervisor.model.validation` says so).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from supervisor.model.errors import InvalidConfigError, InvalidParams
from supervisor.model.hvparams import PATH_PARAMETERS, is_url, resolve_hvparams
from supervisor.model.spec import PATTERN_END, InstanceSpec, decode_spec

__all__ = [
    "DEFAULT_INSTANCES_DIR",
    "DEFAULT_OVSDB_SOCKET",
    "DEFAULT_STATE_DIR",
    "UID_MAX",
    "Config",
    "check_config",
    "check_uid_range",
    "instance_file",
    "instance_files",
    "load_config",
    "load_instance_file",
]

DEFAULT_STATE_DIR: Final = "/var/lib/kvm-supervisor"
DEFAULT_INSTANCES_DIR: Final = "/etc/kvm-supervisor/instances"
DEFAULT_OVSDB_SOCKET: Final = "/var/run/openvswitch/db.sock"
#: The largest uid a pool may hold: uids are 32-bit and ``(uid_t) -1`` means "no uid".
UID_MAX: Final = 2**32 - 2

Seconds = Annotated[float, Meta(gt=0)]
Port = Annotated[int, Meta(ge=1, le=65535)]
#: One uid_pool entry in Ganeti's syntax: a uid (``"5000"``) or a range (``"5000-5099"``).
UidRange = Annotated[str, Meta(pattern=r"^[0-9]+(-[0-9]+)?" + PATTERN_END)]


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The daemon's configuration; `load_config` reads it from a TOML file."""

    #: Runtime records, sockets, the pid and lock files, uid leases.
    state_dir: str = DEFAULT_STATE_DIR
    #: Instance definition files, ``<name>.toml``.
    instances_dir: str = DEFAULT_INSTANCES_DIR
    #: Group whose members may use the control socket and serial consoles.
    control_group: Annotated[str, Meta(min_length=1)] = "root"
    #: Where the host paths in specs sent by control-group members may lie (disks,
    #: kernel, initrd, ISOs, ...); empty: nowhere (see `supervisor.control.privilege`).
    image_dirs: list[Annotated[str, Meta(min_length=1)]] = msgspec.field(default_factory=list)
    #: The bridges (Linux or Open vSwitch) control-group members may attach NICs to;
    #: empty: none (see `supervisor.control.privilege`).
    member_links: list[Annotated[str, Meta(min_length=1)]] = msgspec.field(default_factory=list)
    #: Longest request line accepted on the control socket.
    max_request_bytes: Annotated[int, Meta(ge=4096, le=64 * 1024 * 1024)] = 1024 * 1024
    #: Control socket connections served at once; more are closed at once.
    max_connections: Annotated[int, Meta(ge=1, le=65536)] = 64
    #: Requests one connection may have read and not yet answered (batch members count
    #: one each); at the bound the daemon stops reading it. Also the largest batch.
    max_requests_per_connection: Annotated[int, Meta(ge=1, le=65536)] = 64
    #: From a request line's first byte to its newline; a slower line ends the connection.
    request_line_timeout_s: Seconds = 30.0
    #: Stop the VMs when the daemon exits (otherwise they keep running and are adopted).
    shutdown_on_exit: bool = False
    #: ACPI shutdown wait before a kill; Ganeti's default shutdown timeout.
    stop_timeout_s: Seconds = 120.0
    #: From spawning QEMU until its QMP handshake is done.
    start_timeout_s: Seconds = 30.0
    #: Default deadline of one QMP or HMP command.
    qmp_timeout_s: Seconds = 10.0
    #: User ids leased to instances with ``security_model = "pool"``.
    uid_pool: list[UidRange] = msgspec.field(default_factory=list)
    #: Ports given to VNC and SPICE displays without a ``network_port``, inclusive.
    display_port_range: tuple[Port, Port] = (5900, 6899)
    #: Events buffered per subscriber before it gets ``events.dropped``.
    event_queue_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    #: A migration whose stream moves no byte for this long is cancelled and the guest
    #: resumed on its source (QEMU itself never gives up on a stalled stream).
    migration_stall_timeout_s: Seconds = 30.0
    #: ``migration.progress`` events come at least this often while a migration runs
    #: (and at every change of its status); at most a second, as API.md §4 promises.
    migration_progress_interval_s: Annotated[float, Meta(gt=0, le=1)] = 0.5
    #: A directory of x509 files (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
    #: ``client-cert.pem``, ``client-key.pem``, as QEMU's ``tls-creds-x509`` reads them):
    #: migrations from and to this daemon go over TLS, each end verifying the other's
    #: certificate. None: the stream is not encrypted.
    migration_tls_x509_dir: str | None = None
    #: With the ``postcopy-ram`` capability, a migration switches to postcopy once QEMU
    #: has made this many dirty-sync passes over the guest's memory (Ganeti's 2).
    migration_postcopy_after_passes: Annotated[int, Meta(ge=1, le=1000)] = 2
    #: ovsdb-server's unix socket, for ``mode = "openvswitch"`` NICs.
    ovsdb_socket: Annotated[str, Meta(min_length=1)] = DEFAULT_OVSDB_SOCKET
    #: An executable run for each NIC after its set-up and before its teardown
    #: (`supervisor.net.hook`); None: no hook.
    nic_hook: str | None = None
    #: How long one run of `nic_hook` may take before it is killed.
    nic_hook_timeout_s: Seconds = 30.0
    #: Node-wide hypervisor parameter defaults, overridden by each instance's.
    hvparams: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def control_socket(self) -> Path:
        """The control socket, ``<state_dir>/control.sock``."""
        return Path(self.state_dir) / "control.sock"

    def uid_ranges(self) -> list[tuple[int, int]]:
        """`uid_pool` as sorted inclusive ``(first, last)`` pairs.

        Raises `InvalidConfigError` naming the entry that `check_uid_range` refuses.
        """
        ranges = []
        for index, entry in enumerate(self.uid_pool):
            first, _, last = entry.partition("-")
            pair = int(first), int(last or first)
            try:
                check_uid_range(*pair)
            except ValueError as error:
                raise InvalidConfigError(f"uid_pool[{index}]", str(error)) from None
            ranges.append(pair)
        return sorted(ranges)


def check_uid_range(first: int, last: int) -> None:
    """Raise ValueError saying why ``first-last`` cannot be a uid pool range."""
    if first > last:
        raise ValueError(f"uid range {first}-{last} runs backwards")
    if first < 1:
        raise ValueError(f"uid range {first}-{last} includes root: a pool uid must be above 0")
    if last > UID_MAX:
        raise ValueError(f"uid range {first}-{last} goes beyond the largest uid {UID_MAX}")


def check_config(config: Config) -> None:
    """Check `config` as `load_config` does; raise `InvalidConfigError` on the first problem.

    A hand-built `Config` (the embedding API takes one) is decoded again, so its fields
    get the file's type checks; then image dirs, the NIC hook and the migration x509 dir
    must be absolute, uid ranges must pass `check_uid_range`, the display port range
    must run forwards, and the ``[hvparams]`` table must hold known parameters with
    valid values.
    """
    try:
        msgspec.convert(msgspec.to_builtins(config), Config)
    except msgspec.ValidationError as error:
        raise InvalidParams.from_validation_error(error, "") from None
    config.uid_ranges()
    for index, directory in enumerate(config.image_dirs):
        if not os.path.isabs(directory):
            raise InvalidConfigError(
                f"image_dirs[{index}]", f"{directory!r} is not an absolute path"
            )
    for key in ("nic_hook", "migration_tls_x509_dir"):
        value = getattr(config, key)
        if value is not None and not os.path.isabs(value):
            raise InvalidConfigError(key, f"{value!r} is not an absolute path")
    low, high = config.display_port_range
    if low > high:
        raise InvalidConfigError("display_port_range", f"range {low}-{high} runs backwards")
    resolve_hvparams(config.hvparams, {})


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidConfigError(str(path), f"cannot read: {error.strerror}") from None


def _absolute(base: Path, value: str) -> str:
    if not value or os.path.isabs(value):
        return value
    return os.path.normpath(base / value)


def _resolve_hvparam_paths(base: Path, hvparams: Mapping[str, Any]) -> dict[str, Any]:
    resolved = dict(hvparams)
    for name in PATH_PARAMETERS:
        value = resolved.get(name)
        if isinstance(value, str) and not is_url(value):
            resolved[name] = _absolute(base, value)
    return resolved


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read the daemon configuration from a TOML file, or the built-in defaults for None.

    Raises `InvalidConfigError` naming the key at fault (`InvalidParams` when the file
    does not decode), or naming the file when it cannot be read or is not TOML.
    """
    if path is None:
        return Config()
    file = Path(path)
    try:
        config = msgspec.toml.decode(_read(file), type=Config)
    except msgspec.ValidationError as error:
        raise InvalidParams.from_validation_error(error, "") from None
    except msgspec.DecodeError as error:
        raise InvalidParams(str(file), str(error)) from None
    base = file.resolve().parent
    config = msgspec.structs.replace(
        config,
        state_dir=_absolute(base, config.state_dir),
        instances_dir=_absolute(base, config.instances_dir),
        image_dirs=[_absolute(base, directory) for directory in config.image_dirs],
        ovsdb_socket=_absolute(base, config.ovsdb_socket),
        nic_hook=None if config.nic_hook is None else _absolute(base, config.nic_hook),
        migration_tls_x509_dir=(
            None
            if config.migration_tls_x509_dir is None
            else _absolute(base, config.migration_tls_x509_dir)
        ),
        hvparams=_resolve_hvparam_paths(base, config.hvparams),
    )
    check_config(config)
    return config


def instance_file(instances_dir: str | os.PathLike[str], name: str) -> Path:
    """Where the definition of instance `name` lives: ``<instances_dir>/<name>.toml``."""
    return Path(instances_dir) / f"{name}.toml"


def instance_files(instances_dir: str | os.PathLike[str]) -> list[Path]:
    """The instance definition files in `instances_dir`, sorted; none if it is missing."""
    directory = Path(instances_dir)
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob("*.toml") if path.is_file())


def load_instance_file(path: str | os.PathLike[str]) -> InstanceSpec:
    """Read an instance definition from a TOML file holding `InstanceSpec` fields.

    ``name`` defaults to the file's stem and, when given, must equal it (so
    ``instance.start {name}`` finds the file). Relative disk and path parameters are
    resolved against the file's directory. Errors are `InvalidConfigError` whose path
    names the field (``spec.nics[1].mac``) and whose ``data["file"]`` names the file.
    """
    file = Path(path)
    try:
        return _load_instance_file(file)
    except InvalidConfigError as error:
        error.data["file"] = str(file)
        raise


def _load_instance_file(file: Path) -> InstanceSpec:
    try:
        raw = msgspec.toml.decode(_read(file))
    except msgspec.DecodeError as error:
        raise InvalidParams(str(file), str(error)) from None
    name = raw.setdefault("name", file.stem)
    if name != file.stem:
        raise InvalidParams("spec.name", f"{name!r} does not match the file name {file.name!r}")
    spec = decode_spec(raw)
    base = file.resolve().parent
    disks = [msgspec.structs.replace(disk, path=_absolute(base, disk.path)) for disk in spec.disks]
    return msgspec.structs.replace(
        spec,
        disks=disks,
        hvparams=_resolve_hvparam_paths(base, spec.hvparams),
    )
