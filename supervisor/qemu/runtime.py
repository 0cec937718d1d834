"""The runtime record: everything needed to restart or migrate a running instance as it is.

Ganeti keeps a "KVM runtime" per instance (argv, NICs, hvparams at start, disks) and
starts it again unchanged on reboot, or hands it to the migration target. The
`RuntimeRecord` is ours: versioned, typed, with the NIC and disk plans of the command
line, the capability fingerprint of the QEMU that ran it, and what the host leased for
it (display port, uid). It is JSON: `save_record` writes it atomically (a spare file
swapped in; `store_record` does it in a worker thread), `load_record` reads it, and
`encode_record` / `decode_record` give the string sent to a migration target.

A record must outlive the daemon (killed at any point), not the host: it describes a
running QEMU, which a host crash ends too. So it is not fsynced (libvirt's domain
status files and Ganeti's runtime files live on ``/run``, a tmpfs, for the same
reason): once renamed, it is what every process reads; after a host crash a record
that lost its last save names a QEMU that is gone, or cannot be read (the daemon logs
that and goes on). An fsync would cost every start and migration disk flushes (tens of
ms on a busy disk) for nothing a restart needs.

Bad input never crashes: a corrupt or truncated record, one from a future version, or
Ganeti's own runtime file each raise `RuntimeRecordError`, naming the file (or source)
and the field at fault (or, in text that is not JSON, the byte).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec

from supervisor.host.atomic_write import replace_file
from supervisor.host.statedir import InstancePaths, open_no_follow
from supervisor.model.errors import InvalidConfigError
from supervisor.model.hvparams import HvParams
from supervisor.model.spec import InstanceSpec
from supervisor.qemu.accel import Accelerator
from supervisor.qemu.capabilities import QemuCapabilities
from supervisor.qemu.cmdline import CommandLine, DiskPlan, NicPlan

__all__ = [
    "RECORD_VERSION",
    "OutgoingMigration",
    "RuntimeRecord",
    "RuntimeRecordError",
    "decode_record",
    "encode_record",
    "load_record",
    "save_record",
    "store_record",
]

#: The version this code writes; it reads this one only (there is no older one yet).
RECORD_VERSION: Final = 1


class RuntimeRecordError(InvalidConfigError):
    """A runtime record that cannot be used; ``data`` holds ``file`` and ``field``."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        super().__init__(f"{source}: {field}" if field else source, reason)
        self.data["file"] = source
        self.data["field"] = field


class OutgoingMigration(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A migration this run's QEMU was told to send (``migrate``), until it ends here."""

    #: QEMU's ``tcp:`` URI of the target.
    uri: str
    live: bool
    #: The guest ran when the migration began: one that does not complete resumes it.
    resume: bool


class RuntimeRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One start of an instance, as it ran."""

    version: int = RECORD_VERSION
    name: str
    uuid: str
    #: The spec as started (uuid and MACs filled in).
    spec: InstanceSpec
    #: The hypervisor parameters at start: a reboot reuses them, whatever changed since.
    hvparams: HvParams
    #: The argv, with tap fds by name (`supervisor.qemu.cmdline.argv_with_fds`).
    argv: tuple[str, ...]
    nics: tuple[NicPlan, ...] = ()
    disks: tuple[DiskPlan, ...] = ()
    accel: Accelerator
    #: `supervisor.qemu.capabilities.QemuCapabilities.fingerprint` of the QEMU started.
    qemu_fingerprint: str
    qemu_version: tuple[int, int, int]
    paths: InstancePaths
    #: Wall-clock start time (seconds since the epoch), once QEMU runs.
    started_at: float | None = None
    pid: int | None = None
    vnc_port: int | None = None
    spice_port: int | None = None
    #: The uid leased from the uid pool (``security_model = "pool"``).
    uid: int | None = None
    #: The start asked for a paused guest (``start(paused=True)``): no ``cont``.
    start_paused: bool = False
    #: Whether the start-up steps (passwords, pinning, balloon, ``cont``) are done.
    #: `supervisor.engine.launcher.Launcher.launch` saves the record with False before
    #: it spawns QEMU, so a daemon killed before the steps are done finishes them
    #: after its restart. Records made elsewhere are complete from the start.
    start_completed: bool = True
    #: This run receives a migration: QEMU is started with ``-incoming defer``, holds no
    #: guest of its own until the migration completes, and an exit before
    #: ``migration.finalize_target`` is a failed migration, not a crash.
    incoming: bool = False
    #: Saved before ``migrate`` is sent and removed once the migration has ended here, so
    #: a daemon restarted in between follows the migration QEMU goes on with.
    outgoing: OutgoingMigration | None = None

    @classmethod
    def for_start(
        cls,
        spec: InstanceSpec,
        hv: HvParams,
        command: CommandLine,
        caps: QemuCapabilities,
        paths: InstancePaths,
        *,
        uid: int | None = None,
    ) -> RuntimeRecord:
        """The record of a start of `spec` with `command`, before QEMU is spawned."""
        if spec.uuid is None:
            raise ValueError(f"instance {spec.name!r} has no uuid yet")
        return cls(
            name=spec.name,
            uuid=spec.uuid,
            spec=spec,
            hvparams=hv,
            argv=command.argv,
            nics=command.nics,
            disks=command.disks,
            accel=command.accel,
            qemu_fingerprint=caps.fingerprint,
            qemu_version=caps.version,
            paths=paths,
            vnc_port=command.display_port if hv.vnc_bind_address else None,
            spice_port=command.display_port if hv.spice_bind else None,
            uid=uid,
        )


class _Versioned(msgspec.Struct):
    """Just the version of a record (other fields ignored), read before the rest."""

    version: int | None = None


def _enc_hook(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def _dec_hook(kind: type, value: object) -> object:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError(f"cannot decode {kind.__name__}")


_ENCODER: Final = msgspec.json.Encoder(enc_hook=_enc_hook)
_DECODER: Final = msgspec.json.Decoder(RuntimeRecord, dec_hook=_dec_hook)
_VERSION_DECODER: Final = msgspec.json.Decoder(_Versioned)


def encode_record(record: RuntimeRecord) -> str:
    """The record as a JSON string (the migration payload)."""
    return _ENCODER.encode(record).decode()


def decode_record(text: str | bytes, *, source: str = "runtime record") -> RuntimeRecord:
    """Read a record from `text`; `source` names it in errors (a file, ``migration``).

    Raises `RuntimeRecordError` naming the field at fault, e.g. ``nics[0].mac``, or, for
    text that is not JSON, the byte where it breaks (``... (byte 120)``, ``truncated``).
    """
    data = text.encode() if isinstance(text, str) else text
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as error:
        # msgspec names the byte it stopped at; a field path exists only once it parses.
        raise RuntimeRecordError(source, "", f"not valid JSON: {error}") from None
    if isinstance(value, list):
        raise RuntimeRecordError(source, "", _ganeti_refusal(value))
    if not isinstance(value, dict):
        raise RuntimeRecordError(
            source, "", f"a runtime record is a JSON object, not {type(value).__name__}"
        )
    try:
        version = _VERSION_DECODER.decode(data).version
    except msgspec.ValidationError as error:
        message, _, _ = str(error).partition(" - at ")
        raise RuntimeRecordError(source, "version", message) from None
    if version is None:
        raise RuntimeRecordError(source, "version", "missing: this is not a runtime record")
    if version > RECORD_VERSION:
        raise RuntimeRecordError(
            source,
            "version",
            f"record version {version} was written by a newer kvm-supervisor;"
            f" this one reads version {RECORD_VERSION}",
        )
    if version != RECORD_VERSION:
        raise RuntimeRecordError(
            source, "version", f"unknown record version {version} (this one reads {RECORD_VERSION})"
        )
    try:
        record = _DECODER.decode(data)
    except msgspec.ValidationError as error:
        message, _, location = str(error).partition(" - at `$")
        raise RuntimeRecordError(source, location.rstrip("`").lstrip("."), message) from None
    if record.spec.name != record.name or record.spec.uuid != record.uuid:
        raise RuntimeRecordError(source, "spec", "name and uuid differ from the record's")
    return record


def _ganeti_refusal(value: list[Any]) -> str:
    """Why a JSON list (Ganeti's runtime format, or garbage) is not converted."""
    looks_like_ganeti = (
        3 <= len(value) <= 4
        and isinstance(value[0], list)
        and isinstance(value[1], list)
        and isinstance(value[2], dict)
    )
    if not looks_like_ganeti:
        return "a runtime record is a JSON object, not a list"
    return (
        "this is a Ganeti KVM runtime file ([argv, NICs, hvparams, disks]), not a"
        " kvm-supervisor record, and it cannot be converted: its argv is built for"
        " Ganeti's own paths and daemons (-pidfile and sockets under /var/run/ganeti,"
        " -daemonize), it holds no instance uuid, and its disks are Ganeti storage"
        " objects. Write an instance spec instead: its hvparams keep Ganeti's names,"
        " so the third element can be copied as the spec's hvparams"
    )


def save_record(path: Path, record: RuntimeRecord) -> None:
    """Write `record` to `path` atomically: a daemon killed meanwhile, or a reader,
    sees the old file or the new one (not fsynced: see the module's docstring; for a
    reader whose read spans two saves see `supervisor.host.atomic_write`).

    Written into a spare file beside `path` and swapped in
    (`supervisor.host.atomic_write`), never through a symlink at either.
    """
    replace_file(path, _ENCODER.encode(record) + b"\n", mode=0o640)


async def store_record(path: Path, record: RuntimeRecord) -> None:
    """`save_record` in one of anyio's worker threads: a write may block on a busy disk
    (the kernel throttles writers when too much is waiting to be written back).

    Not interrupted by cancellation: when it returns or raises, the record is saved or
    the old file is in place, as with `save_record`.
    """
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(save_record, path, record)


def load_record(path: Path) -> RuntimeRecord:
    """Read the record at `path`.

    Raises FileNotFoundError when there is none, `RuntimeRecordError` naming the file
    and field when it cannot be used (corrupt, truncated, from a newer version, or
    Ganeti's format), or when it cannot be read (a symlink there is not followed).
    """
    try:
        with os.fdopen(open_no_follow(path, os.O_RDONLY), "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise RuntimeRecordError(str(path), "", f"cannot read: {error.strerror}") from None
    return decode_record(data, source=str(path))
