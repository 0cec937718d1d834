"""Who may connect to the control socket: the peer's credentials (SO_PEERCRED) and the
check made before a byte is read. What a peer may then ask is `supervisor.control.privilege`'s."""

from __future__ import annotations

import grp
import pwd
import socket
import struct

from supervisor.control.privilege import Privilege, privilege_of


def peer_uid_gid(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_allowed(uid: int, gid: int, control_group: str) -> bool:
    """Root, the daemon's own user, or a member of `control_group` (primary or supplementary)."""
    if privilege_of(uid) is Privilege.ADMIN:
        return True
    try:
        group = grp.getgrnam(control_group)
    except KeyError:
        return False
    if gid == group.gr_gid:
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem
