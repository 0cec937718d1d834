"""The result table every benchmark prints: metric, ours, anchor, ratio, target, met."""

from __future__ import annotations

import msgspec


class Row(msgspec.Struct):
    metric: str
    ours: str
    anchor: str
    ratio: float | None
    target: str
    met: bool | None


def format_table(rows: list[Row]) -> str:
    header = ("metric", "ours", "anchor", "ratio", "target", "met")
    cells = [
        (
            r.metric,
            r.ours,
            r.anchor,
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target,
            "-" if r.met is None else ("yes" if r.met else "no"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *cells]
    )
