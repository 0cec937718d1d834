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
