"""Taps opened on ``/dev/net/tun`` by the daemon itself, and their names.

A tap opened here is not persistent: it exists while some process holds one of its
fds. The daemon hands the fds to QEMU and must then close its own copies, or the tap
outlives QEMU. The fds are opened close-on-exec (Python's default): only an explicit
``pass_fds`` (which clears the flag in the child) gives them to QEMU.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import functools
import hashlib
import os
import socket
import struct
import uuid
from typing import Final

import msgspec

from supervisor.model.errors import NetworkError
from supervisor.model.validation import VHOST_NET_DEVICE

__all__ = ["OpenTap", "open_tap", "tap_features", "tap_mac", "tap_name"]

TUN_DEVICE: Final = "/dev/net/tun"
#: From <linux/if_tun.h>.
_TUNSETIFF: Final = 0x400454CA
_TUNGETFEATURES: Final = 0x800454CF
_IFF_TAP: Final = 0x0002
_IFF_MULTI_QUEUE: Final = 0x0100
_IFF_NO_PI: Final = 0x1000
_IFF_VNET_HDR: Final = 0x4000
#: ``struct ifreq``: the name (IFNAMSIZ = 16 bytes with its NUL), the flags, padding.
_IFREQ: Final = struct.Struct("16sH22x")
#: IFNAMSIZ less the terminating NUL.
MAX_NAME_BYTES: Final = 15
_PREFIX: Final = "kvs"
#: Base32 characters of the uuid's hash in a name: 50 bits.
_HASH_CHARS: Final = 10
MAX_NICS: Final = 100


class OpenTap(msgspec.Struct, frozen=True, kw_only=True):
    """A tap and the fds holding it open, one per queue."""

    name: str
    fds: tuple[int, ...]
    #: Whether IFF_VNET_HDR was set: QEMU's ``vnet_hdr=on|off`` must match.
    vnet_hdr: bool
    #: ``/dev/vhost-net`` fds for QEMU's ``vhostfd=``/``vhostfds=``, one per queue.
    vhost_fds: tuple[int, ...] = ()

    def close(self) -> None:
        """Close the daemon's copies of the fds (after QEMU has its own, or to give up)."""
        for fd in (*self.fds, *self.vhost_fds):
            os.close(fd)


def tap_name(instance_uuid: str, nic_index: int, *, state_dir: str) -> str:
    """The tap of NIC `nic_index` of the instance run by the daemon of `state_dir` (an
    absolute path): ``kvs`` + 10 base32 chars + index.

    The 10 characters are 50 bits of the SHA-256 of the uuid and the state dir (not a
    prefix of the uuid, so uuids that share their first digits, e.g. sequential ones,
    still differ). The state dir makes the name the daemon's own: a migration's source
    and target daemons on one host run the same instance at once, each with its taps. Two
    (daemon, instance) pairs collide with a probability of about n²/2⁵¹ for n pairs, and
    a collision is caught when the tap is opened (`open_tap` refuses an existing name),
    never shared. The name is at most 15 bytes for index < 100 and stable across daemon
    restarts (the runtime record keeps it all the same).
    """
    if not 0 <= nic_index < MAX_NICS:
        raise ValueError(f"NIC index {nic_index} is not in 0..{MAX_NICS - 1}")
    digest = hashlib.sha256(uuid.UUID(instance_uuid).bytes + os.fsencode(state_dir)).digest()
    code = base64.b32encode(digest).decode("ascii")[:_HASH_CHARS].lower()
    return f"{_PREFIX}{code}{nic_index}"


def tap_mac(guest_mac: str) -> str:
    """The MAC a NIC's tap gets: the guest's with its first byte ``fe`` (as libvirt and
    Ganeti's ifup script set it).

    A Linux bridge (or Open vSwitch bridge) without an address of its own takes the
    lowest of its ports'; a tap's random address could become the bridge's, and change
    it when the guest stops. ``fe`` is the highest first byte a unicast address has, and
    the tap's address differs from the guest's, whose frames it carries.
    """
    return "fe" + guest_mac[2:]


def _exists(name: str) -> bool:
    """Whether this network namespace has an interface `name` (asked of the kernel, not of
    /sys, which may be mounted for another namespace)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


@functools.cache
def tap_features() -> int:
    """The IFF_* flags the kernel's tun driver offers (TUNGETFEATURES); 0 without tun.

    Asked once per process: the running kernel's driver does not change.
    """
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR)
    except OSError:
        return 0
    try:
        buffer = fcntl.ioctl(fd, _TUNGETFEATURES, b"\0" * 4)
    finally:
        os.close(fd)
    return int(struct.unpack("I", buffer)[0])


def open_tap(name: str, *, vnet_hdr: bool, queues: int = 1, vhost: bool = False) -> OpenTap:
    """Create tap `name` and return `queues` fds on it (IFF_MULTI_QUEUE when > 1), and
    as many ``/dev/vhost-net`` fds when `vhost` is asked for.

    IFF_VNET_HDR is set when `vnet_hdr` is asked for and the kernel offers it (the
    result says which). Raises `NetworkError` naming the tap when the name exists
    already (a leaked tap, or a hash collision: never attach to someone else's tap),
    when the kernel lacks multiqueue taps, or when ``/dev/net/tun`` refuses.
    """
    encoded = name.encode()
    if not 0 < len(encoded) <= MAX_NAME_BYTES:
        raise NetworkError(name, f"a tap name has 1 to {MAX_NAME_BYTES} bytes")
    if queues < 1:
        raise NetworkError(name, f"{queues} queues: a tap needs at least one")
    if _exists(name):
        raise NetworkError(name, "a network interface of that name exists already")
    features = tap_features()
    flags = _IFF_TAP | _IFF_NO_PI
    with_vnet_hdr = vnet_hdr and bool(features & _IFF_VNET_HDR)
    if with_vnet_hdr:
        flags |= _IFF_VNET_HDR
    if queues > 1:
        if not features & _IFF_MULTI_QUEUE:
            raise NetworkError(name, "the kernel offers no multiqueue taps (IFF_MULTI_QUEUE)")
        flags |= _IFF_MULTI_QUEUE
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open(TUN_DEVICE, os.O_RDWR)
            fds.append(fd)
            fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(encoded, flags))
    except OSError as error:
        for fd in fds:
            os.close(fd)
        if error.errno == errno.EBUSY:
            raise NetworkError(name, "the tap exists already and is in use") from error
        raise NetworkError(name, f"cannot open a tap: {error.strerror or error}") from error
    tap = OpenTap(name=name, fds=tuple(fds), vnet_hdr=with_vnet_hdr)
    if not vhost:
        return tap
    vhost_fds: list[int] = []
    try:
        for _ in range(queues):
            vhost_fds.append(os.open(VHOST_NET_DEVICE, os.O_RDWR))
    except OSError as error:
        tap.close()
        for fd in vhost_fds:
            os.close(fd)
        raise NetworkError(
            VHOST_NET_DEVICE, f"cannot open it for {name}: {error.strerror or error}"
        ) from error
    return msgspec.structs.replace(tap, vhost_fds=tuple(vhost_fds))
