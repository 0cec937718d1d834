"""Least privilege on the control socket: what each kind of peer may ask of the daemon.

Two kinds of peer pass the SO_PEERCRED check (`supervisor.control.peers.peer_allowed`):

- ``ADMIN``: root and the daemon's own user, who may do anything the API offers;
- ``MEMBER``: any other member of ``control_group``, who may do the same, except:

  * ``instance.start`` with a ``spec``: set no host-level hypervisor parameter
    (`ROOT_ONLY_HVPARAMS`: the QEMU binary and extra arguments, memory backing, the user
    QEMU runs as, the chroot, the password files the daemon would read as root), name no
    host path outside the config's ``image_dirs`` (disks, kernel, initrd, ISOs, floppy,
    x509 dir, a VNC socket dir; symlinks and ``..`` resolved first; a qcow2 disk's backing
    chain included), no URL for an ISO, no host USB device, no ``,`` where QEMU would
    read the rest as its own options, and no display port outside
    ``display_port_range``; and no NIC but on a bridge named in ``member_links``, with
    no VLAN of its choosing (a routed NIC changes the host's routing: root's only);
  * ``instance.qmp``: read-only queries only; ``instance.monitor``: read-only ``info``
    commands only (`supervisor.engine.monitor_commands`);
  * no ``migration.*`` method: a migration payload carries host-level parameters that
    no member-checked spec went through, and a migration opens the guest's memory to a
    network peer.

Only what a spec sent over the socket sets is checked: the node-wide defaults of the
config's ``[hvparams]`` and the instance files in ``instances_dir`` are the admin's
(``instance.start {name}`` is not restricted). A reboot or a crash restart reuses the
argv saved when the instance started, so an instance a member started runs again as it
was checked then.

Every refusal is an `InvalidConfigError` (error 7) naming the field, e.g.
``spec.hvparams.kvm_path: may only be set by root``.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from supervisor.engine.monitor_commands import hmp_refusal, qmp_refusal
from supervisor.host.images import ImageReferenceError, referenced_files
from supervisor.model import api
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError
from supervisor.model.hvparams import PATH_PARAMETERS, is_url, resolve_hvparams
from supervisor.model.spec import InstanceSpec

__all__ = [
    "IMAGE_PATH_HVPARAMS",
    "MIGRATION_METHODS",
    "ROOT_ONLY_HVPARAMS",
    "Privilege",
    "authorize",
    "check_member_spec",
    "privilege_of",
]

HV: Final = "spec.hvparams"
ROOT_ONLY: Final = "may only be set by root"
_ONLY_ROOT_MAY: Final = "only root may"
_COMMA: Final = f"holds ',' (QEMU would read what follows as options): {_ONLY_ROOT_MAY} set that"

#: Hypervisor parameters only root (or the daemon's user) may set in a spec.
ROOT_ONLY_HVPARAMS: Final = (
    "kvm_path",
    "kvm_extra",
    "mem_path",
    "security_model",
    "security_domain",
    "use_chroot",
    "vnc_password_file",
    "spice_password_file",
)

#: Path parameters a member may set to a path inside ``image_dirs``.
IMAGE_PATH_HVPARAMS: Final = tuple(
    name for name in PATH_PARAMETERS if name not in ROOT_ONLY_HVPARAMS
)

#: Parameters written inside a QEMU option list (``-machine NAME,accel=...``,
#: ``-spice addr=...``), where a ``,`` would start an option of the caller's choosing
#: (``firmware=/etc/shadow``). Path parameters and disk paths get the same check.
_OPTION_LIST_HVPARAMS: Final = (
    "machine_version",
    "vnc_bind_address",
    "spice_bind",
    "spice_tls_ciphers",
)

#: A ``-usbdevice`` that is a plain emulated device (``tablet``, ``mouse``, ``keyboard``),
#: not a host device or a host file (``host:...``, ``disk:...``, ``serial:...``).
_EMULATED_USB_DEVICE: Final = re.compile(r"[A-Za-z0-9_-]+")
#: A keymap name; QEMU reads a value holding a ``/`` as a host file.
_KEYMAP_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")

#: How deep a qcow2 backing chain is followed before it is refused.
MAX_BACKING_CHAIN: Final = 16


class Privilege(enum.Enum):
    """What a peer of the control socket may do (see the module docstring)."""

    ADMIN = "admin"
    MEMBER = "member"


def privilege_of(uid: int) -> Privilege:
    """Root and the daemon's own user are admins; other permitted peers are members."""
    return Privilege.ADMIN if uid in (0, os.getuid()) else Privilege.MEMBER


def authorize(privilege: Privilege, method: str, params: Any, config: Config) -> None:
    """Refuse, with `InvalidConfigError` naming the field, what `privilege` may not ask.

    `params` are the method's decoded params; methods without a rule are open to every
    permitted peer.
    """
    if privilege is Privilege.ADMIN:
        return
    check = _MEMBER_RULES.get(method)
    if check is not None:
        check(params, config)


def _start(params: api.StartParams, config: Config) -> None:
    if params.spec is not None:
        check_member_spec(params.spec, config)


def _qmp(params: api.QmpParams, _: Config) -> None:
    refusal = qmp_refusal(params.command, read_only=True)
    if refusal is not None:
        raise InvalidConfigError("command", refusal)


def _monitor(params: api.MonitorParams, _: Config) -> None:
    refusal = hmp_refusal(params.command, read_only=True)
    if refusal is not None:
        raise InvalidConfigError("command", refusal)


def _admin_only(method: str) -> Callable[[Any, Config], None]:
    def refuse(_params: Any, _config: Config) -> None:
        raise InvalidConfigError("method", f"{method}: {_ONLY_ROOT_MAY} migrate instances")

    return refuse


#: The migration methods, all for admins only.
MIGRATION_METHODS: Final = (
    "migration.info",
    "migration.accept",
    "migration.prepare",
    "migration.start",
    "migration.status",
    "migration.cancel",
    "migration.finalize_source",
    "migration.finalize_target",
)

_MEMBER_RULES: Final[Mapping[str, Callable[[Any, Config], None]]] = {
    "instance.start": _start,
    "instance.qmp": _qmp,
    "instance.monitor": _monitor,
    **{method: _admin_only(method) for method in MIGRATION_METHODS},
}


def check_member_spec(spec: InstanceSpec, config: Config) -> None:
    """Raise `InvalidConfigError` for the first thing in `spec` a member may not set."""
    hv = resolve_hvparams(config.hvparams, spec.hvparams)
    given = spec.hvparams.keys()
    for name in ROOT_ONLY_HVPARAMS:
        if name in given:
            raise InvalidConfigError(f"{HV}.{name}", ROOT_ONLY)
    for name in _OPTION_LIST_HVPARAMS:
        if name in given and "," in getattr(hv, name):
            raise InvalidConfigError(f"{HV}.{name}", _COMMA)
    for name in IMAGE_PATH_HVPARAMS:
        value: str = getattr(hv, name)
        if name in given and value:
            _check_host_path(f"{HV}.{name}", value, config.image_dirs)
    if "vnc_bind_address" in given and hv.vnc_bind_address.startswith("/"):
        _check_host_path(f"{HV}.vnc_bind_address", hv.vnc_bind_address, config.image_dirs)
    if "keymap" in given and hv.keymap and not _KEYMAP_NAME.fullmatch(hv.keymap):
        raise InvalidConfigError(
            f"{HV}.keymap", f"{hv.keymap!r} is not a keymap name: {_ONLY_ROOT_MAY} name a host file"
        )
    if "usb_devices" in given:
        for device in filter(None, hv.usb_devices.split(",")):
            if not _EMULATED_USB_DEVICE.fullmatch(device):
                raise InvalidConfigError(
                    f"{HV}.usb_devices",
                    f"{device!r} is not an emulated device:"
                    f" {_ONLY_ROOT_MAY} pass host devices and files",
                )
    low, high = config.display_port_range
    if spec.network_port is not None and not low <= spec.network_port <= high:
        raise InvalidConfigError(
            "spec.network_port",
            f"{spec.network_port} is outside display_port_range {low}-{high}:"
            f" {_ONLY_ROOT_MAY} choose other ports",
        )
    for index, disk in enumerate(spec.disks):
        field = f"spec.disks[{index}].path"
        _check_host_path(field, disk.path, config.image_dirs)
        if disk.format == "qcow2":
            _check_backing_chain(field, disk.path, config.image_dirs)
    for index, nic in enumerate(spec.nics):
        field = f"spec.nics[{index}]"
        if nic.mode == "routed":
            raise InvalidConfigError(
                f"{field}.mode", f"a routed NIC adds host routes: {_ONLY_ROOT_MAY} start one"
            )
        if nic.link not in config.member_links:
            raise InvalidConfigError(
                f"{field}.link",
                f"{nic.link!r} is not in member_links: {_ONLY_ROOT_MAY} attach a NIC to it",
            )
        if nic.vlan is not None:
            raise InvalidConfigError(f"{field}.vlan", f"{_ONLY_ROOT_MAY} choose a VLAN")


def _check_host_path(field: str, value: str, image_dirs: list[str]) -> None:
    """Refuse `value` unless it lies inside one of `image_dirs` once resolved."""
    if is_url(value):
        raise InvalidConfigError(field, f"a URL: {_ONLY_ROOT_MAY} make the host fetch one")
    if not os.path.isabs(value):
        raise InvalidConfigError(field, f"{value!r} is not an absolute path")
    if "," in value:
        raise InvalidConfigError(field, _COMMA)
    resolved = os.path.realpath(value)
    for directory in image_dirs:
        root = os.path.realpath(directory)
        if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
            return
    allowed = ", ".join(image_dirs) if image_dirs else "none configured"
    shown = value if resolved == value else f"{value} (resolved: {resolved})"
    raise InvalidConfigError(
        field, f"{shown} is outside image_dirs ({allowed}): {_ONLY_ROOT_MAY} name other paths"
    )


def _check_backing_chain(field: str, path: str, image_dirs: list[str]) -> None:
    """Refuse a qcow2 image whose backing chain leaves `image_dirs` or needs probing."""
    image = path
    for _ in range(MAX_BACKING_CHAIN):
        try:
            references = referenced_files(image)
        except FileNotFoundError:
            return  # validation reports the missing disk
        except (OSError, ImageReferenceError) as error:
            raise InvalidConfigError(field, f"cannot read the image header: {error}") from None
        backing = None
        for reference in references:
            try:
                _check_host_path(field, reference.path, image_dirs)
            except InvalidConfigError as error:
                raise InvalidConfigError(field, f"its {reference.kind} {error.reason}") from None
            if reference.format is None:
                raise InvalidConfigError(
                    field,
                    f"its {reference.kind} {reference.path} has no recorded format (QEMU would"
                    f" probe it): {_ONLY_ROOT_MAY} use such an image",
                )
            if reference.kind == "backing file":
                backing = reference.path
        if backing is None:
            return
        image = backing
    raise InvalidConfigError(field, f"backing chain longer than {MAX_BACKING_CHAIN} images")
