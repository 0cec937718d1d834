"""`migrate`: the four migration steps against two daemons, as one call.

What ``kvm-supervisor migrate`` runs, and what an embedding program or a cluster
manager can run itself over two JSON-RPC connections (`protocols.jsonrpc`)::

    async with connect_unix(source_socket) as source, connect_unix(target_socket) as target:
        result = await migrate(source, target, "web1", address="10.0.0.2")

The steps are Ganeti's: ``migration.info`` on the source, ``migration.accept`` on the
target (and beside it ``migration.prepare`` on the source, which gives its QEMU the
migration's settings while the target's QEMU starts), ``migration.start`` on the source,
then, following the source's
``migration.progress`` events to the migration's end, ``migration.finalize_target``
and ``migration.finalize_source``. The two finalizes of a completed migration run at
once (Ganeti ends the source first): the source completes only once the target has
loaded the whole guest (the ``return-path`` capability), and its QEMU, in
``postmigrate``, never runs the guest again. A migration that fails or is cancelled is
finalized as a failure on both ends: the guest keeps running on the source, the
target's QEMU is stopped and its runtime removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import anyio
import msgspec

from protocols.groups import ungrouped
from protocols.jsonrpc import RPCClient, RPCConnectionLostError, RPCError
from supervisor.model.api import InstanceInfo, MigrationStatus
from supervisor.model.errors import MigrationError
from supervisor.qemu.migration_progress import FINISHED

__all__ = ["MigrationResult", "migrate"]

#: How long the clean-up after a migration (failed, cancelled or not) may take.
CLEANUP_TIMEOUT_S: Final = 60.0


class MigrationResult(msgspec.Struct, frozen=True, kw_only=True):
    """A completed migration: its last figures (``downtime_ms`` among them), the seconds
    from ``migration.start`` to the end of the finalization, where the target listened
    and the instance as the target runs it."""

    status: MigrationStatus
    total_s: float
    address: str
    port: int
    instance: InstanceInfo


async def migrate(
    source: RPCClient,
    target: RPCClient,
    name: str,
    *,
    address: str = "127.0.0.1",
    port: int = 0,
    live: bool | None = None,
    bandwidth_mib_s: int | None = None,
    downtime_ms: int | None = None,
    capabilities: Sequence[str] | None = None,
    on_progress: Callable[[MigrationStatus], None] | None = None,
) -> MigrationResult:
    """Migrate instance `name` from the daemon of `source` to the daemon of `target`.

    The target listens on `address`:`port` (0: any free port) and the source connects
    there; absent values come from the instance's hvparams (``migration_mode``,
    ``migration_bandwidth``, ``migration_downtime``, ``migration_caps``).
    `on_progress` gets every ``migration.progress`` figure as it comes. Both clients'
    notifications are this call's while it runs: give it connections of its own (the
    target's end tells that its daemon went away).

    Raises `RPCError` as a daemon answered a step (code 7 for an unknown capability or
    a guest the target cannot run, ...), or with code 8 (``migration_error``, its last
    figures in ``data["status"]``) for a migration that failed or was cancelled;
    `RPCConnectionLostError` when a daemon goes away. In both cases, and on
    cancellation (after which the cancellation goes on), the migration is cancelled
    and finalized as a failure first, so the guest keeps running on the source;
    should it have completed meanwhile, it is finalized as a success instead.
    """
    subscription: int | None = None
    settings = {
        key: value
        for key, value in (
            ("live", live),
            ("bandwidth_mib_s", bandwidth_mib_s),
            ("downtime_ms", downtime_ms),
            ("capabilities", None if capabilities is None else list(capabilities)),
        )
        if value is not None
    }
    #: The steps that succeeded before the migration began, to undo should another fail.
    done: set[str] = set()
    runtime = ""

    async def step(client: RPCClient, method: str, params: dict[str, Any]) -> Any:
        result = await client.call(method, params)
        done.add(method)
        return result

    async def subscribe() -> None:
        nonlocal subscription
        subscribed = await source.call(
            "events.subscribe", {"instances": [name], "kinds": ["migration.progress"]}
        )
        subscription = subscribed["subscription"]

    try:
        # The subscription now, beside the first requests: its round trip is off the
        # migration's path (nothing is published before ``migration.start``).
        info, before, _ = await _gather(
            source.call("migration.info", {"name": name}),
            source.call("instance.info", {"name": name}),
            subscribe(),
        )
        runtime = info["runtime"]
        accept: dict[str, Any] = {
            "spec": info["spec"],
            "runtime": runtime,
            "address": address,
            "port": port,
        }
        if capabilities is not None:
            accept["capabilities"] = list(capabilities)
        accepted, _ = await _gather(
            step(target, "migration.accept", accept),
            step(source, "migration.prepare", {"name": name, **settings}),
        )
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
            await _undo_before_start(source, target, name, done, runtime)
        await _unsubscribe(source, subscription)
        raise
    assert subscription is not None
    steps = _Steps(source, target, name, runtime, resume=before["state"] == "running")
    completed = False
    try:
        start = {"name": name, "target": address, "port": accepted["port"], **settings}
        began = anyio.current_time()
        await source.call("migration.start", start)
        with ungrouped():
            async with anyio.create_task_group() as watch:
                watch.start_soon(_watch_target, target)
                final = await _follow(source, name, subscription, on_progress)
                watch.cancel_scope.cancel()
        completed = final.status == "completed"
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
            await steps.settle()
        raise
    finally:
        if not completed:  # else beside the take-over
            await _unsubscribe(source, subscription)
    if not completed:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
            await steps.give_back()
        raise RPCError(
            MigrationError.code,
            f"migration of {name!r} {final.status}: {final.error or 'no reason given'}",
            {"name": name, "status": msgspec.to_builtins(final)},
        )
    instance = await steps.take_over(_unsubscribe(source, subscription))
    return MigrationResult(
        status=final,
        total_s=round(anyio.current_time() - began, 3),
        address=address,
        port=accepted["port"],
        instance=msgspec.convert(instance, InstanceInfo),
    )


async def _gather(*calls: Awaitable[Any], raise_order: Sequence[int] | None = None) -> list[Any]:
    """The results of `calls`, awaited at once (the requests go out together, in the
    order of `calls`: the first from the caller's task, before the others' tasks run).

    Each runs to its end even when another fails (so that what one did is known, and
    can be undone); then the first failure is raised, in the order of `calls` or, if
    given, of the indexes in `raise_order`.
    """
    results: list[Any] = [None] * len(calls)
    failures: list[Exception | None] = [None] * len(calls)

    async def run(index: int, call: Awaitable[Any]) -> None:
        try:
            results[index] = await call
        except Exception as error:
            failures[index] = error

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls[1:], start=1):
            tg.start_soon(run, index, call)
        await run(0, calls[0])
    for index in range(len(calls)) if raise_order is None else raise_order:
        failure = failures[index]
        if failure is not None:
            raise failure
    return results


async def _undo_before_start(
    source: RPCClient, target: RPCClient, name: str, done: set[str], runtime: str
) -> None:
    """Undo what of ``migration.accept`` and ``migration.prepare`` succeeded when the
    other failed (best effort, as `_Steps.give_back`)."""
    with contextlib.suppress(RPCError, RPCConnectionLostError):
        if "migration.prepare" in done:
            await source.call("migration.finalize_source", {"name": name, "success": False})
    with contextlib.suppress(RPCError, RPCConnectionLostError):
        if "migration.accept" in done:
            await target.call(
                "migration.finalize_target",
                {"name": name, "runtime": runtime, "success": False},
            )


async def _unsubscribe(source: RPCClient, subscription: int | None) -> None:
    """End `subscription` on `source` (if any): shielded, bounded, best effort."""
    if subscription is None:
        return
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(CLEANUP_TIMEOUT_S),
        contextlib.suppress(RPCError, RPCConnectionLostError),
    ):
        await source.call("events.unsubscribe", {"subscription": subscription})


async def _follow(
    source: RPCClient,
    name: str,
    subscription: int,
    on_progress: Callable[[MigrationStatus], None] | None,
) -> MigrationStatus:
    """The source's progress figures until the migration ends; the last ones."""
    async for notification in source.notifications():
        event = notification.params
        if not isinstance(event, dict) or event.get("subscription") != subscription:
            continue
        if event.get("kind") == "events.dropped":
            # Figures were lost on the way: the source says where the migration is.
            status = msgspec.convert(
                await source.call("migration.status", {"name": name}), MigrationStatus
            )
        else:
            status = msgspec.convert(event.get("data"), MigrationStatus)
        if on_progress is not None:
            on_progress(status)
        if status.status in FINISHED:
            return status
    raise RPCConnectionLostError("the source daemon's notifications ended")


async def _watch_target(target: RPCClient) -> None:
    """Raise `RPCConnectionLostError` once the target daemon's connection ends: its
    daemon died, and the migration is cancelled rather than left to complete into a
    QEMU that nobody supervises or finalizes."""
    async for _ in target.notifications():
        pass  # this call subscribes to nothing there; the stream's end raises


class _Steps:
    """The finalization of one migration, on both daemons."""

    def __init__(
        self, source: RPCClient, target: RPCClient, name: str, runtime: str, *, resume: bool
    ) -> None:
        self.source = source
        self.target = target
        self.name = name
        self.runtime = runtime
        #: The guest ran before the migration: it runs on the target afterwards.
        self.resume = resume

    async def take_over(self, *beside: Awaitable[None]) -> Any:
        """Finalize a completed migration, both ends at once (and `beside` with them);
        the instance as the target runs it. Each end is finalized even if the other
        fails (the target's failure is raised first: its guest runs there, to be
        finalized again).

        The source's request goes out first: the end of its QEMU is the longer wait.
        """
        _, instance, *_ = await _gather(
            self.source.call("migration.finalize_source", {"name": self.name, "success": True}),
            self.target.call(
                "migration.finalize_target",
                {
                    "name": self.name,
                    "runtime": self.runtime,
                    "success": True,
                    "resume": self.resume,
                },
            ),
            *beside,
            raise_order=(1, 0),
        )
        return instance

    async def give_back(self) -> None:
        """Finalize a migration that did not complete: the guest stays on the source.

        Best effort, each end on its own: a daemon that cannot be reached is left as it
        is (the caller gets the error that brought us here).
        """
        with contextlib.suppress(RPCError, RPCConnectionLostError):
            await self.source.call(
                "migration.finalize_source", {"name": self.name, "success": False}
            )
        with contextlib.suppress(RPCError, RPCConnectionLostError):
            await self.target.call(
                "migration.finalize_target",
                {"name": self.name, "runtime": self.runtime, "success": False},
            )

    async def settle(self) -> None:
        """After an error or a cancellation: cancel the migration, then finalize it as
        the source says it ended (best effort, as `give_back`)."""
        with contextlib.suppress(RPCError, RPCConnectionLostError):
            await self.source.call("migration.cancel", {"name": self.name})
        try:
            status = await self.source.call("migration.status", {"name": self.name})
        except (RPCError, RPCConnectionLostError):
            status = {}
        if status.get("status") == "completed":
            with contextlib.suppress(RPCError, RPCConnectionLostError):
                await self.take_over()
        else:
            await self.give_back()
