"""Building ``transact`` operations and reading their results (RFC 7047 §5).

Values in OVSDB's JSON notation: a set is ``["set", [...]]`` (a lone atom also stands
for a one-element set), a map ``["map", [[k, v], ...]]``, a row reference
``["uuid", "..."]`` or, within one transaction, ``["named-uuid", "name"]``. The op
builders return plain dicts ready to be encoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from ._errors import ProtocolError, TransactError

Condition = tuple[str, str, Any]
"""``(column, function, value)``, e.g. ``("name", "==", "br0")``."""


def oset(values: Iterable[Any]) -> list[Any]:
    """An OVSDB set of these atoms."""
    return ["set", list(values)]


def omap(items: Mapping[Any, Any]) -> list[Any]:
    """An OVSDB map."""
    return ["map", [[key, value] for key, value in items.items()]]


def uuid(value: str) -> list[str]:
    """A reference to the row with this UUID."""
    return ["uuid", value]


def named_uuid(name: str) -> list[str]:
    """A reference to the row this transaction inserts with ``uuid_name=name``."""
    return ["named-uuid", name]


def _where(conditions: Sequence[Condition]) -> list[list[Any]]:
    return [list(condition) for condition in conditions]


def insert(table: str, row: Mapping[str, Any], *, uuid_name: str | None = None) -> dict[str, Any]:
    """Insert a row; ``uuid_name`` lets later operations refer to it."""
    op: dict[str, Any] = {"op": "insert", "table": table, "row": dict(row)}
    if uuid_name is not None:
        op["uuid-name"] = uuid_name
    return op


def select(
    table: str, where: Sequence[Condition], columns: Sequence[str] | None = None
) -> dict[str, Any]:
    """Select the matching rows (all columns when ``columns`` is ``None``)."""
    op: dict[str, Any] = {"op": "select", "table": table, "where": _where(where)}
    if columns is not None:
        op["columns"] = list(columns)
    return op


def update(table: str, where: Sequence[Condition], row: Mapping[str, Any]) -> dict[str, Any]:
    """Set columns of the matching rows."""
    return {"op": "update", "table": table, "where": _where(where), "row": dict(row)}


def mutate(
    table: str,
    where: Sequence[Condition],
    mutations: Sequence[tuple[str, Literal["insert", "delete", "+=", "-="], Any]],
) -> dict[str, Any]:
    """Mutate columns of the matching rows: ``("ports", "insert", oset([...]))``."""
    return {
        "op": "mutate",
        "table": table,
        "where": _where(where),
        "mutations": [list(mutation) for mutation in mutations],
    }


def delete(table: str, where: Sequence[Condition]) -> dict[str, Any]:
    """Delete the matching rows (of a root table: others are garbage-collected)."""
    return {"op": "delete", "table": table, "where": _where(where)}


def wait_rows(
    table: str,
    where: Sequence[Condition],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    until: Literal["==", "!="] = "==",
) -> dict[str, Any]:
    """Fail the transaction at once (timeout 0, error ``"timed out"``) unless the rows
    matching ``where``, limited to ``columns``, are (``until="=="``) or are not exactly
    ``rows``: the transaction's precondition."""
    return {
        "op": "wait",
        "timeout": 0,
        "table": table,
        "where": _where(where),
        "columns": list(columns),
        "until": until,
        "rows": [dict(row) for row in rows],
    }


def comment(text: str) -> dict[str, Any]:
    """A comment the server logs with the transaction."""
    return {"op": "comment", "comment": text}


def check_transact_result(ops: Sequence[Mapping[str, Any]], result: Any) -> list[dict[str, Any]]:
    """The per-operation results of a ``transact``, or the first failure raised.

    The server answers one result object per operation, stops at the first failed one
    (its result has ``error``, later ones are ``null``), and may add one more object when
    the commit itself fails (a constraint violation or referential integrity error).

    :raises TransactError: an operation or the commit failed.
    :raises ProtocolError: the result is not shaped as RFC 7047 says.
    """
    if not isinstance(result, list) or not all(
        isinstance(item, dict) or item is None for item in result
    ):
        raise ProtocolError(f"transact result is not an array of objects: {result!r:.200}")
    for index, item in enumerate(result):
        if item is not None and "error" in item:
            error = item["error"]
            details = item.get("details", "")
            raise TransactError(
                index if index < len(ops) else None, str(error), str(details) if details else ""
            )
    if len(result) < len(ops) or None in result:
        raise ProtocolError(f"transact result has too few results: {result!r:.200}")
    return list(result)
