"""The README's parameter table is the one the code generates."""

from __future__ import annotations

from pathlib import Path

from supervisor.model.hvparams import render_markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_hvparam_as_the_code_describes_it() -> None:
    assert render_markdown_table().strip() in README.read_text()
