"""How the client verbs print results: JSON (``--json``) or text for people.

Text output shows times as dates and versions as dotted numbers; JSON keeps the numbers
the daemon sent (epoch seconds, ``[major, minor, micro]``).
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any, Final, TextIO

import anyio
import msgspec

__all__ = ["print_json", "print_mapping", "print_table", "readable", "show_wait"]

#: Epoch-seconds fields shown as local dates.
_TIMESTAMPS: Final = frozenset({"started_at", "timestamp"})
#: ``[major, minor, micro]`` fields shown as ``7.2.22``.
_VERSIONS: Final = frozenset({"hv_version"})


def print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("-" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def readable(key: str, value: Any) -> Any:
    """`value` of field `key` as a person reads it (dates, dotted versions)."""
    if key in _TIMESTAMPS and isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.datetime.fromtimestamp(value).astimezone()
        return moment.isoformat(sep=" ", timespec="seconds")
    if key in _VERSIONS and isinstance(value, list) and all(isinstance(x, int) for x in value):
        return ".".join(str(x) for x in value)
    return value


def print_mapping(value: dict[str, Any], indent: str = "") -> None:
    for key, raw in value.items():
        item = readable(key, raw)
        if isinstance(item, dict) and item:
            print(f"{indent}{key}:")
            print_mapping(item, indent + "  ")
        elif isinstance(item, list):
            rendered = ", ".join(
                json.dumps(x, separators=(",", ":")) if isinstance(x, dict) else str(x)
                for x in item
            )
            print(f"{indent}{key}: {rendered or '-'}")
        else:
            print(f"{indent}{key}: {'-' if item is None else item}")


async def show_wait(what: str, timeout_s: float | None, stream: TextIO) -> None:
    """Until cancelled, rewrite one line of `stream` each second: what is awaited, for
    how long so far and out of how long (a terminal's only: the caller checks)."""
    started = anyio.current_time()
    limit = "" if timeout_s is None else f" / {timeout_s:g} s"
    try:
        while True:
            await anyio.sleep(1)
            elapsed = anyio.current_time() - started
            stream.write(f"\r\033[K{what}: {elapsed:.0f} s{limit} (--force kills at once)")
            stream.flush()
    finally:
        stream.write("\r\033[K")
        stream.flush()
