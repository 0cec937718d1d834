"""One route-netlink socket (pyroute2) usable on asyncio and on trio.

pyroute2's `AsyncIPRoute` runs on asyncio only, and its blocking `IPRoute` refuses to
run inside a running asyncio loop: under asyncio the socket is an `AsyncIPRoute` on the
caller's loop (no thread); under trio every request opens, uses and closes an `IPRoute`
in one of anyio's worker threads (``anyio.to_thread``), the only thread the library ever
uses. One `IPRoute` per request because pyroute2 keeps an asyncio loop and transport per
thread: an `IPRoute` used from several of anyio's threads leaks one of each per thread.
It costs about 1 ms a request. This is the one place that chooses; everything speaking
netlink goes through it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Self

import anyio
from pyroute2 import AsyncIPRoute, IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

__all__ = ["RouteSocket"]


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class RouteSocket:
    """``async with RouteSocket() as rtnl: await rtnl.request("link_lookup", ifname=n)``.

    `request` calls the pyroute2 `IPRoute` method of that name and returns its result,
    a dump collected into a list. A kernel refusal is raised as `OSError` with the
    kernel's errno (pyroute2's `NetlinkError.code`), so callers test ``error.errno``.
    On cancellation under asyncio the request is abandoned; under trio it finishes in
    its thread and its result is discarded.
    """

    def __init__(self) -> None:
        self._async: Any = None

    async def __aenter__(self) -> Self:
        if _on_asyncio():
            self._async = AsyncIPRoute()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._async is not None:
            self._async.close()

    async def request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The result of ``IPRoute.<method>(*args, **kwargs)``; dumps come as lists."""
        try:
            if self._async is not None:
                result = await getattr(self._async, method)(*args, **kwargs)
                if isinstance(result, AsyncIterator):
                    return [message async for message in result]
                return result
            return await anyio.to_thread.run_sync(self._blocking, method, args, kwargs)
        except NetlinkError as error:
            raise OSError(error.code, os.strerror(error.code)) from error

    @staticmethod
    def _blocking(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with IPRoute() as netlink:
            result = getattr(netlink, method)(*args, **kwargs)
            return list(result) if isinstance(result, Iterator) else result
