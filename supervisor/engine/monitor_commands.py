"""Which monitor commands a client may pass through to QEMU: one table per protocol.

``instance.qmp`` and ``instance.monitor`` hand a client's command to the instance's QEMU.
Refused for every caller (root and embedding programs included) are the commands that
would change what the daemon tracks behind its back (run state, the process, migration,
the balloon) and, on the human monitor, those that act on the host (write or open host
files, devices, sockets, file descriptors): the refusal names the method to use instead
where there is one. A caller restricted to reading (a control-group member, see
`supervisor.control.privilege`) may run the read-only queries listed here and nothing
else.

A refusal names the command word only, never the rest of the line: a command may hold a
password (``set_password vnc SECRET``), and refusals are returned and logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = [
    "READ_ONLY_HMP_INFO",
    "READ_ONLY_QMP",
    "REFUSED_HMP",
    "REFUSED_HMP_FAMILIES",
    "REFUSED_QMP",
    "SECRET_HMP",
    "SECRET_QMP",
    "hmp_command_name",
    "hmp_refusal",
    "qmp_refusal",
]

#: QMP commands refused for everyone, and what to use instead.
REFUSED_QMP: Final[Mapping[str, str]] = {
    "quit": "instance.stop",
    "system_powerdown": "instance.stop",
    "stop": "instance.pause",
    "cont": "instance.resume",
    "migrate": "migration.start",
    "migrate-incoming": "migration.accept",
    "migrate_cancel": "migration.cancel",
    "balloon": "instance.balloon",
    "qmp_capabilities": "(already negotiated)",
    "human-monitor-command": "instance.monitor",
}

#: QMP commands open to read-only callers: queries that change nothing and touch no host
#: file (QEMU 7.2's names).
READ_ONLY_QMP: Final = frozenset(
    {
        "query-acpi-ospm-status",
        "query-balloon",
        "query-block",
        "query-block-jobs",
        "query-blockstats",
        "query-chardev",
        "query-commands",
        "query-cpus-fast",
        "query-current-machine",
        "query-display-options",
        "query-hotpluggable-cpus",
        "query-iothreads",
        "query-kvm",
        "query-memdev",
        "query-memory-devices",
        "query-memory-size-summary",
        "query-mice",
        "query-migrate",
        "query-migrate-capabilities",
        "query-migrate-parameters",
        "query-name",
        "query-pci",
        "query-qmp-schema",
        "query-spice",
        "query-status",
        "query-target",
        "query-uuid",
        "query-version",
        "query-vnc",
        "query-vnc-servers",
    }
)

_MIGRATION = "the migration.* methods"
_HOST = "(acts on the host: not available through instance.monitor)"
_STATE = "(changes the guest behind the supervisor: not available through instance.monitor)"

#: HMP commands refused for everyone, under every name HMP accepts for them (QEMU's
#: ``help`` spells the aliases: ``cont|c``, ``stop|s``, ``quit|q``), and what to use
#: instead. HMP matches a command name exactly; it has no abbreviations beyond these.
REFUSED_HMP: Final[Mapping[str, str]] = {
    "quit": "instance.stop",
    "q": "instance.stop",
    "stop": "instance.pause",
    "s": "instance.pause",
    "cont": "instance.resume",
    "c": "instance.resume",
    "balloon": "instance.balloon",
    "change": _HOST,
    "commit": _HOST,
    "savevm": _HOST,
    "loadvm": _HOST,
    "delvm": _HOST,
    "screendump": _HOST,
    "pmemsave": _HOST,
    "memsave": _HOST,
    "dump-guest-memory": _HOST,
    "dumpdtb": _HOST,
    "logfile": _HOST,
    "wavcapture": _HOST,
    "getfd": _HOST,
    "closefd": _HOST,
    "gdbserver": _HOST,
    "object_add": _HOST,
    "object_del": _HOST,
    "set_link": _HOST,
    "exit_preconfig": _STATE,
    "x_colo_lost_heartbeat": _STATE,
}

#: HMP command families refused for everyone: every command whose name starts so.
REFUSED_HMP_FAMILIES: Final[Mapping[str, str]] = {
    "system_": "instance.stop or instance.reboot",
    "migrate": _MIGRATION,
    "drive_": _HOST,
    "device_": _HOST,
    "netdev_": _HOST,
    "block_": _HOST,
    "snapshot_": _HOST,
    "nbd_server_": _HOST,
    "chardev-": _HOST,
    "hostfwd_": _HOST,
    "host_net_": _HOST,
}

#: ``info`` subcommands open to read-only callers. Left out on purpose: ``history``
#: (other callers' command lines, passwords included), ``usbhost`` and ``roms`` (host
#: facts), and the guest-memory and debugging views (``mem``, ``tlb``, ``registers``,
#: ``mtree``, ``ramblock``, ...).
READ_ONLY_HMP_INFO: Final = frozenset(
    {
        "balloon",
        "block",
        "block-jobs",
        "blockstats",
        "chardev",
        "cpus",
        "hotpluggable-cpus",
        "iothreads",
        "kvm",
        "memdev",
        "memory-devices",
        "memory_size_summary",
        "mice",
        "migrate",
        "migrate_capabilities",
        "migrate_parameters",
        "name",
        "network",
        "numa",
        "pci",
        "qtree",
        "spice",
        "status",
        "usb",
        "uuid",
        "version",
        "vnc",
    }
)

#: Commands with a secret among their arguments. QEMU quotes argument values in some of
#: its error messages (``invalid parameter value: ...``), and a password given in the
#: wrong place would be quoted: a failure of these reports no detail from QEMU.
SECRET_QMP: Final = frozenset({"set_password", "change-vnc-password"})
SECRET_HMP: Final = frozenset({"set_password"})

#: QEMU's ``get_command_name``: after blanks, a name runs to a blank or a ``/`` (``x/4x``).
_HMP_NAME: Final = re.compile(r"\s*([^\s/]*)(.*)", re.DOTALL)


def qmp_refusal(command: str, *, read_only: bool = False) -> str | None:
    """Why the QMP `command` may not be passed through, or None when it may."""
    instead = REFUSED_QMP.get(command)
    if instead is not None:
        return f"{command!r} would bypass the supervisor: use {instead}"
    if read_only and command not in READ_ONLY_QMP:
        return (
            f"{command!r} is not one of the read-only queries open to control-group members:"
            " only root may run it"
        )
    return None


def hmp_command_name(command_line: str) -> tuple[str, str]:
    """The command name of an HMP line as QEMU reads it, and the rest of the line."""
    match = _HMP_NAME.match(command_line)
    assert match is not None  # the pattern matches every string
    return match[1], match[2]


def hmp_refusal(command_line: str, *, read_only: bool = False) -> str | None:
    """Why the HMP `command_line` may not be passed through, or None when it may."""
    name, rest = hmp_command_name(command_line)
    instead = REFUSED_HMP.get(name) or next(
        (why for prefix, why in REFUSED_HMP_FAMILIES.items() if name.startswith(prefix)), None
    )
    if instead is not None:
        if instead.startswith("("):
            return f"{name!r} is refused {instead}"
        return f"{name!r} would bypass the supervisor: use {instead}"
    if not read_only:
        return None
    if name == "info":
        subcommand, _ = hmp_command_name(rest)
        if subcommand in READ_ONLY_HMP_INFO:
            return None
        return (
            f"'info {subcommand}' is not one of the read-only 'info' commands open to"
            " control-group members: only root may run it"
        )
    return f"{name!r}: control-group members may run read-only 'info' commands only"
