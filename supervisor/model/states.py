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

# Every state can fall to STOPPED or CRASHED when QEMU exits; the table lists the rest.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.STOPPED: frozenset({S.STARTING, S.INCOMING}),
    S.CRASHED: frozenset({S.STARTING, S.INCOMING}),
    # INCOMING and MIGRATING: a QEMU adopted in the middle of a migration.
    S.STARTING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING, S.INCOMING, S.MIGRATING}),
    S.RUNNING: frozenset({S.PAUSED, S.STOPPING, S.MIGRATING}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPING, S.MIGRATING}),
    S.STOPPING: frozenset(),
    S.INCOMING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING}),
    S.MIGRATING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING}),
}

TERMINAL = frozenset({S.STOPPED, S.CRASHED})
ALIVE = frozenset(set(InstanceState) - TERMINAL)


def can_transition(current: InstanceState, new: InstanceState) -> bool:
    """Whether ``current -> new`` is a legal change (QEMU exiting is always legal)."""
    if new in TERMINAL:
        return current not in TERMINAL
    return new in TRANSITIONS[current]


def state_for_qemu_status(status: str) -> InstanceState:
    """Map QEMU's run state (``query-status``) to ours."""
    if status == "running":
        return S.RUNNING
    if status == "inmigrate":
        return S.INCOMING
    if status in {"finish-migrate", "postmigrate"}:
        # The guest's state went (or is going) to a target: never resumed here.
        return S.MIGRATING
    if status == "shutdown":
        return S.STOPPING
    return S.PAUSED
