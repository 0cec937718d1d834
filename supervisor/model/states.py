"""Instance states and the transitions between them, as one table."""

from __future__ import annotations

import enum


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    INCOMING = "incoming"
    MIGRATING = "migrating"


S = InstanceState

#: Every legal change of state, and nothing else: `Instance.set_state` refuses (and logs
#: as an error) any move not listed. QEMU exiting ends every live state (stopped or
#: crashed).
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.STOPPED: frozenset({S.STARTING, S.INCOMING}),
    # A stop makes a crashed instance stopped (and cancels its restart).
    S.CRASHED: frozenset({S.STARTING, S.INCOMING, S.STOPPED}),
    # Also the state of an adopted QEMU until its monitor tells QEMU's own state.
    S.STARTING: frozenset(
        {S.RUNNING, S.PAUSED, S.STOPPING, S.INCOMING, S.MIGRATING, S.STOPPED, S.CRASHED}
    ),
    S.RUNNING: frozenset({S.PAUSED, S.STOPPING, S.MIGRATING, S.STOPPED, S.CRASHED}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPING, S.MIGRATING, S.STOPPED, S.CRASHED}),
    # A stop abandoned before QEMU exited gives QEMU's state back.
    S.STOPPING: frozenset({S.RUNNING, S.PAUSED, S.STOPPED, S.CRASHED}),
    S.INCOMING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING, S.STOPPED, S.CRASHED}),
    S.MIGRATING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING, S.STOPPED, S.CRASHED}),
}

TERMINAL = frozenset({S.STOPPED, S.CRASHED})
ALIVE = frozenset(set(InstanceState) - TERMINAL)


def can_transition(current: InstanceState, new: InstanceState) -> bool:
    """Whether ``current -> new`` is in the table."""
    return new in TRANSITIONS[current]


def state_for_qemu_status(status: str) -> InstanceState:
    """Map QEMU's run state (``query-status``) to ours.

    ``postmigrate`` (the guest now lives on the migration target) is paused here, and
    `Instance.resume` refuses it: it must never run on this host again.
    """
    return _QEMU_STATUSES.get(status, S.PAUSED)


_QEMU_STATUSES = {
    "running": S.RUNNING,
    "inmigrate": S.INCOMING,
    "finish-migrate": S.MIGRATING,
    "shutdown": S.STOPPING,
}


def exit_for_shutdown(cause: str) -> tuple[InstanceState, str]:
    """The state and reason of a QEMU exit that followed a SHUTDOWN event with `cause`.

    The reasons (README, "Events") say who ended the run: the guest (``guest-shutdown``,
    ``guest-reset`` with ``reboot_behavior = "exit"``), QEMU's own failure or the guest's
    panic (crashed: the restart policy applies), or someone on the host going round the
    supervisor (``quit`` over QMP, a ``signal``, the ``ui``, a ``reset`` with
    ``-no-reboot``). A cause this table does not know (a later QEMU's) is ``shutdown``.
    """
    return _SHUTDOWN_CAUSES.get(cause, (S.STOPPED, "shutdown"))


_SHUTDOWN_CAUSES = {
    "guest-shutdown": (S.STOPPED, "guest-shutdown"),
    "guest-reset": (S.STOPPED, "guest-reset"),
    "guest-panic": (S.CRASHED, "guest-panic"),
    "host-error": (S.CRASHED, "host-error"),
    "host-qmp-quit": (S.STOPPED, "quit"),
    "host-signal": (S.STOPPED, "signal"),
    "host-ui": (S.STOPPED, "ui"),
    "host-qmp-system-reset": (S.STOPPED, "reset"),
    "subsystem-reset": (S.STOPPED, "reset"),
    "snapshot-load": (S.STOPPED, "reset"),
}
