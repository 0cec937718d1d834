"""Validation of an instance and its resolved hypervisor parameters, in two layers.

`check_syntax` needs nothing from the host: it re-checks every field's type and value
set (so hand-built structs get the same scrutiny as decoded ones) and the rules across
fields that Ganeti's ``CheckParameterSyntax`` enforces, plus a few of our own (NIC modes,
duplicate disks and MACs, QEMU's ``-smp`` topology rule).

`check_host_basics` looks at the machine without running QEMU: users, interfaces,
files and directories, ``/dev/kvm`` and ``/dev/vhost-net``. The checks that need QEMU's
own answers (SPICE support, machine types, CPU models) belong to
`supervisor.qemu.capabilities` and `supervisor.qemu.cmdline`.

Both return every problem found, not only the first; each is an `InvalidConfigError`
whose path names the field (``spec.hvparams.serial_speed``) and whose reason says what
is wrong with it. `raise_first` turns such a list into an exception; `validated_hvparams`
resolves an instance's parameters and runs both layers in one call.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shlex
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from supervisor.model.errors import InvalidConfigError, InvalidParams
from supervisor.model.hvparams import (
    PATH_PARAMETERS,
    VALID_SERIAL_SPEEDS,
    HvParams,
    format_choices,
    is_url,
    parse_cpu_mask,
    resolve_hvparams,
)
from supervisor.model.spec import InstanceSpec, decode_spec

__all__ = [
    "KVM_DEVICE",
    "SPICE_OPTIONS_NEEDING_BIND",
    "VHOST_NET_DEVICE",
    "VNC_X509_FILES",
    "check_host_basics",
    "check_syntax",
    "ip_version",
    "raise_first",
    "validated_hvparams",
]

HV: Final = "spec.hvparams"

#: Ganeti's ``_SPICE_ADDITIONAL_PARAMS``: meaningless without ``spice_bind``. The other
#: SPICE options (playback compression, TLS ciphers, vdagent) default to set values and
#: are simply unused without it.
SPICE_OPTIONS_NEEDING_BIND: Final = (
    "spice_ip_version",
    "spice_password_file",
    "spice_image_compression",
    "spice_jpeg_wan_compression",
    "spice_zlib_glz_wan_compression",
    "spice_streaming_video",
    "spice_use_tls",
)

#: What QEMU's tls-creds-x509 object reads from ``vnc_x509_path`` as a server.
VNC_X509_FILES: Final = ("ca-cert.pem", "server-cert.pem", "server-key.pem")

KVM_DEVICE: Final = "/dev/kvm"
VHOST_NET_DEVICE: Final = "/dev/vhost-net"

_MIGRATION_CAPABILITY: Final = re.compile(r"[a-z0-9-]+")


def validated_hvparams(
    spec: InstanceSpec, node_defaults: Mapping[str, Any], *, check_host: bool = True
) -> HvParams:
    """Resolve `spec`'s hvparams over `node_defaults`, run both layers, raise the first problem.

    The host layer runs only when the syntax layer found nothing, and not at all with
    ``check_host=False`` (for a spec that is only being looked at, or built elsewhere).
    """
    hv = resolve_hvparams(node_defaults, spec.hvparams)
    raise_first(check_syntax(spec, hv))
    if check_host:
        raise_first(check_host_basics(spec, hv))
    return hv


def raise_first(problems: list[InvalidConfigError]) -> None:
    """Raise the first of `problems`, if any."""
    if problems:
        raise problems[0]


def check_syntax(spec: InstanceSpec, hv: HvParams) -> list[InvalidConfigError]:
    """Every problem of `spec` and its resolved `hv` that needs nothing from the host."""
    decoding = list(_decoding_problems(spec, hv))
    if decoding:
        # The rules below assume well-typed values.
        return decoding
    return [
        *_path_problems(spec, hv),
        *_boot_problems(spec, hv),
        *_console_problems(hv),
        *_display_problems(hv),
        *_security_problems(hv),
        *_disk_problems(spec, hv),
        *_cpu_problems(spec, hv),
        *_nic_problems(spec, hv),
        *_misc_problems(spec, hv),
    ]


def _decoding_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    try:
        decode_spec(msgspec.to_builtins(spec))
    except InvalidConfigError as error:
        yield error
    try:
        msgspec.convert(msgspec.to_builtins(hv), HvParams)
    except msgspec.ValidationError as error:
        yield InvalidParams.from_validation_error(error, HV)


def _path_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    for name in PATH_PARAMETERS:
        value: str = getattr(hv, name)
        if value and not is_url(value) and not os.path.isabs(value):
            yield InvalidConfigError(f"{HV}.{name}", f"{value!r} is not an absolute path")
    for index, disk in enumerate(spec.disks):
        if not os.path.isabs(disk.path):
            yield InvalidConfigError(
                f"spec.disks[{index}].path", f"{disk.path!r} is not an absolute path"
            )


def _boot_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    if hv.kernel_path and not hv.root_path:
        yield InvalidConfigError(f"{HV}.root_path", "a root partition is needed with kernel_path")
    if hv.initrd_path and not hv.kernel_path:
        yield InvalidConfigError(f"{HV}.initrd_path", "an initrd needs kernel_path")
    if hv.boot_order == "cdrom" and not hv.cdrom_image_path:
        yield InvalidConfigError(
            f"{HV}.boot_order", "booting from cdrom needs an ISO in cdrom_image_path"
        )
    if hv.boot_order == "floppy" and not hv.floppy_image_path:
        yield InvalidConfigError(
            f"{HV}.boot_order", "booting from floppy needs an image in floppy_image_path"
        )
    if hv.boot_order == "network" and not spec.nics:
        yield InvalidConfigError(f"{HV}.boot_order", "booting from network needs a NIC")


def _console_problems(hv: HvParams) -> Iterator[InvalidConfigError]:
    if hv.serial_console and hv.serial_speed not in VALID_SERIAL_SPEEDS:
        yield InvalidConfigError(
            f"{HV}.serial_speed",
            f"{hv.serial_speed} is not one of {format_choices(VALID_SERIAL_SPEEDS)}",
        )


def ip_version(address: str) -> int | None:
    """4 or 6 for an IP address, None for anything else (an interface name, a path)."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


def _display_problems(hv: HvParams) -> Iterator[InvalidConfigError]:
    if hv.vnc_x509_verify and not hv.vnc_x509_path:
        yield InvalidConfigError(f"{HV}.vnc_x509_verify", "needs vnc_x509_path")
    vnc = hv.vnc_bind_address
    if vnc.startswith("/") and os.path.normpath(vnc) != vnc:
        yield InvalidConfigError(f"{HV}.vnc_bind_address", f"{vnc!r} is not a normalised path")
    if not hv.spice_bind:
        for name in SPICE_OPTIONS_NEEDING_BIND:
            if getattr(hv, name):
                yield InvalidConfigError(f"{HV}.{name}", "needs spice_bind")
        return
    if hv.vnc_bind_address:
        yield InvalidConfigError(
            f"{HV}.spice_bind", "SPICE and VNC (vnc_bind_address) cannot both be enabled"
        )
    bind_version = ip_version(hv.spice_bind)
    if bind_version is not None and hv.spice_ip_version not in (0, bind_version):
        yield InvalidConfigError(
            f"{HV}.spice_ip_version",
            f"spice_bind {hv.spice_bind!r} is an IPv{bind_version} address,"
            f" not IPv{hv.spice_ip_version}",
        )


def _security_problems(hv: HvParams) -> Iterator[InvalidConfigError]:
    if hv.security_model == "user" and not hv.security_domain:
        yield InvalidConfigError(
            f"{HV}.security_domain", "security_model user needs a user to run QEMU as"
        )
    if hv.security_model in ("none", "pool") and hv.security_domain:
        yield InvalidConfigError(
            f"{HV}.security_domain",
            f"must be empty with security_model {hv.security_model}",
        )


def _disk_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    if hv.disk_aio == "native" and hv.disk_cache != "none":
        yield InvalidConfigError(
            f"{HV}.disk_aio", f"native needs disk_cache none, not {hv.disk_cache}"
        )
    first_use: dict[str, int] = {}
    for index, disk in enumerate(spec.disks):
        path = os.path.normpath(disk.path)
        if path in first_use:
            yield InvalidConfigError(
                f"spec.disks[{index}].path", f"same path as disks[{first_use[path]}]"
            )
        first_use.setdefault(path, index)


def _cpu_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    try:
        mask = parse_cpu_mask(hv.cpu_mask)
    except ValueError as error:
        yield InvalidConfigError(f"{HV}.cpu_mask", str(error))
    else:
        if len(mask) > 1 and len(mask) != spec.vcpus:
            yield InvalidConfigError(
                f"{HV}.cpu_mask",
                f"{len(mask)} per-vCPU entries for {spec.vcpus} vCPU(s)",
            )
    # QEMU fills in the missing -smp values from the given ones and the vCPU count, and
    # insists (without maxcpus) that sockets * cores * threads == vCPUs.
    topology = {
        "cpu_sockets": hv.cpu_sockets,
        "cpu_cores": hv.cpu_cores,
        "cpu_threads": hv.cpu_threads,
    }
    given = {name: count for name, count in topology.items() if count}
    product = 1
    for count in given.values():
        product *= count
    if not given:
        return
    described = " * ".join(f"{name} {count}" for name, count in given.items())
    if len(given) == len(topology) and product != spec.vcpus:
        yield InvalidConfigError("spec.vcpus", f"{described} = {product}, not {spec.vcpus}")
    elif len(given) < len(topology) and spec.vcpus % product:
        yield InvalidConfigError(
            "spec.vcpus", f"{spec.vcpus} vCPU(s) cannot be split into {described}"
        )


def _nic_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    if spec.nics and hv.virtio_net_queues > 1 and hv.nic_type != "paravirtual":
        yield InvalidConfigError(
            f"{HV}.virtio_net_queues",
            f"{hv.virtio_net_queues} queues need nic_type paravirtual, not {hv.nic_type}",
        )
    first_use: dict[str, int] = {}
    for index, nic in enumerate(spec.nics):
        path = f"spec.nics[{index}]"
        if nic.mac is not None:
            mac = nic.mac.lower()
            if int(mac[:2], 16) & 1:
                yield InvalidConfigError(f"{path}.mac", f"{nic.mac} is a multicast address")
            if mac in first_use:
                yield InvalidConfigError(f"{path}.mac", f"same MAC as nics[{first_use[mac]}]")
            first_use.setdefault(mac, index)
        if nic.ip is not None and ip_version(nic.ip) is None:
            yield InvalidConfigError(f"{path}.ip", f"{nic.ip!r} is not an IP address")
        if nic.mode in ("bridged", "openvswitch") and nic.link is None:
            yield InvalidConfigError(f"{path}.link", f"a {nic.mode} NIC needs a link")
        if nic.mode == "routed" and nic.ip is None:
            yield InvalidConfigError(f"{path}.ip", "a routed NIC needs an IP address")
        if nic.vlan is not None and nic.mode == "routed":
            yield InvalidConfigError(
                f"{path}.vlan", "a routed NIC has no VLAN: use bridged or openvswitch"
            )


def _misc_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    if spec.startup_memory_mib is not None and spec.startup_memory_mib > spec.memory_mib:
        yield InvalidConfigError(
            "spec.startup_memory_mib",
            f"{spec.startup_memory_mib} exceeds memory_mib {spec.memory_mib}",
        )
    for capability in filter(None, hv.migration_caps.split(":")):
        if not _MIGRATION_CAPABILITY.fullmatch(capability):
            yield InvalidConfigError(
                f"{HV}.migration_caps", f"{capability!r} is not a capability name"
            )
    try:
        shlex.split(hv.kvm_extra)
    except ValueError as error:
        yield InvalidConfigError(f"{HV}.kvm_extra", f"cannot be split: {error}")


def check_host_basics(
    spec: InstanceSpec,
    hv: HvParams,
    *,
    kvm_device: str = KVM_DEVICE,
    vhost_net_device: str = VHOST_NET_DEVICE,
) -> list[InvalidConfigError]:
    """Every problem of `spec` and `hv` this host shows without running QEMU.

    Run it after `check_syntax` came back clean. The device paths are parameters so
    tests can point them elsewhere.
    """
    return [
        *_user_problems(hv),
        *_bind_problems(hv),
        *_file_problems(spec, hv),
        *_device_problems(hv, kvm_device, vhost_net_device),
        *_host_cpu_problems(hv),
    ]


def _user_problems(hv: HvParams) -> Iterator[InvalidConfigError]:
    if hv.security_model != "user":
        return
    try:
        pwd.getpwnam(hv.security_domain)
    except KeyError:
        yield InvalidConfigError(
            f"{HV}.security_domain", f"no user {hv.security_domain!r} on this host"
        )


def _is_interface(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except (OSError, ValueError):
        return False
    return True


def _bind_problems(hv: HvParams) -> Iterator[InvalidConfigError]:
    vnc = hv.vnc_bind_address
    if vnc and ip_version(vnc) is None and not _is_interface(vnc):
        if not vnc.startswith("/"):
            yield InvalidConfigError(
                f"{HV}.vnc_bind_address",
                f"{vnc!r} is neither an IP address, an interface, nor an absolute directory",
            )
        elif not os.path.isdir(vnc):
            yield InvalidConfigError(
                f"{HV}.vnc_bind_address", f"no directory {vnc} for the VNC socket"
            )
    spice = hv.spice_bind
    if spice and ip_version(spice) is None and not _is_interface(spice):
        yield InvalidConfigError(
            f"{HV}.spice_bind", f"{spice!r} is neither an IP address nor an interface"
        )


_FILE_PARAMETERS: Final = (
    "kernel_path",
    "initrd_path",
    "floppy_image_path",
    "cdrom_image_path",
    "cdrom2_image_path",
    "vnc_password_file",
    "spice_password_file",
)


def _file_problems(spec: InstanceSpec, hv: HvParams) -> Iterator[InvalidConfigError]:
    if not os.access(hv.kvm_path, os.X_OK) or os.path.isdir(hv.kvm_path):
        yield InvalidConfigError(f"{HV}.kvm_path", f"{hv.kvm_path} is not an executable file")
    for name in _FILE_PARAMETERS:
        value: str = getattr(hv, name)
        if not value or is_url(value):
            continue
        if not os.path.exists(value):
            yield InvalidConfigError(f"{HV}.{name}", f"{value} does not exist")
        elif os.path.isdir(value):
            yield InvalidConfigError(f"{HV}.{name}", f"{value} is a directory")
        elif not os.access(value, os.R_OK):
            yield InvalidConfigError(f"{HV}.{name}", f"{value} is not readable")
    if hv.mem_path and not os.path.isdir(hv.mem_path):
        yield InvalidConfigError(f"{HV}.mem_path", f"no directory {hv.mem_path}")
    if hv.vnc_x509_path:
        x509 = Path(hv.vnc_x509_path)
        if not x509.is_dir():
            yield InvalidConfigError(f"{HV}.vnc_x509_path", f"no directory {x509}")
        elif hv.vnc_tls:
            missing = [name for name in VNC_X509_FILES if not (x509 / name).is_file()]
            if missing:
                yield InvalidConfigError(
                    f"{HV}.vnc_x509_path", f"{x509} lacks {', '.join(missing)}"
                )
    for index, disk in enumerate(spec.disks):
        path = f"spec.disks[{index}].path"
        access = os.R_OK | (os.W_OK if disk.mode == "rw" else 0)
        if not os.path.exists(disk.path):
            yield InvalidConfigError(path, f"{disk.path} does not exist")
        elif os.path.isdir(disk.path):
            yield InvalidConfigError(path, f"{disk.path} is a directory")
        elif not os.access(disk.path, access):
            wanted = "writable" if disk.mode == "rw" else "readable"
            yield InvalidConfigError(path, f"{disk.path} is not {wanted}")


def _device_problems(
    hv: HvParams, kvm_device: str, vhost_net_device: str
) -> Iterator[InvalidConfigError]:
    if hv.vhost_net and not os.path.exists(vhost_net_device):
        yield InvalidConfigError(
            f"{HV}.vhost_net",
            f"{vhost_net_device} is missing (load the vhost_net module, or set vhost_net false)",
        )
    if hv.kvm_flag == "enabled":
        try:
            os.close(os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC))
        except OSError as error:
            yield InvalidConfigError(
                f"{HV}.kvm_flag", f"cannot open {kvm_device}: {error.strerror}"
            )


def _host_cpu_problems(hv: HvParams) -> Iterator[InvalidConfigError]:
    host_cpus = os.cpu_count() or 1
    try:
        mask = parse_cpu_mask(hv.cpu_mask)
    except ValueError:
        return  # check_syntax reports it
    highest = max((max(cpus) for cpus in mask if cpus is not None), default=-1)
    if highest >= host_cpus:
        yield InvalidConfigError(
            f"{HV}.cpu_mask", f"CPU {highest} does not exist (this host has {host_cpus})"
        )
