"""The golden-file check: a difference always fails, the update switch included."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import UPDATE_GOLDEN, check_golden

ARGV = "qemu-system-x86_64\n-S\n"
OLD_ARGV = "qemu-system-x86_64\n"


@pytest.fixture
def golden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A golden file holding OLD_ARGV, with neither the switch nor CI set."""
    monkeypatch.delenv(UPDATE_GOLDEN, raising=False)
    monkeypatch.delenv("CI", raising=False)
    path = tmp_path / "case.argv"
    path.write_text(OLD_ARGV)
    return path


def test_a_match_passes_with_or_without_the_switch(
    golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_golden(golden, OLD_ARGV)
    monkeypatch.setenv(UPDATE_GOLDEN, "1")
    monkeypatch.setenv("CI", "true")
    check_golden(golden, OLD_ARGV)
    assert golden.read_text() == OLD_ARGV


def test_a_difference_fails_and_leaves_the_file(golden: Path) -> None:
    with pytest.raises(AssertionError, match="differs from"):
        check_golden(golden, ARGV)
    assert golden.read_text() == OLD_ARGV


def test_the_switch_rewrites_a_difference_and_still_fails(
    golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(UPDATE_GOLDEN, "1")
    with pytest.raises(pytest.fail.Exception, match=r"rewrote .*case\.argv: review the diff"):
        check_golden(golden, ARGV)
    assert golden.read_text() == ARGV
    check_golden(golden, ARGV)  # the next run compares with the rewritten file


def test_the_switch_writes_a_missing_file_and_still_fails(
    golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    golden.unlink()
    with pytest.raises(pytest.fail.Exception, match="is missing"):
        check_golden(golden, ARGV)
    assert not golden.exists()
    monkeypatch.setenv(UPDATE_GOLDEN, "1")
    with pytest.raises(pytest.fail.Exception, match="rewrote"):
        check_golden(golden, ARGV)
    assert golden.read_text() == ARGV


@pytest.mark.parametrize("ci", ["true", "1", "True"])
def test_under_ci_the_switch_is_refused_and_nothing_is_written(
    golden: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setenv(UPDATE_GOLDEN, "1")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="refused under CI"):
        check_golden(golden, ARGV)
    assert golden.read_text() == OLD_ARGV


@pytest.mark.parametrize("off", ["", "0"])
def test_an_empty_or_zero_switch_is_off(
    golden: Path, monkeypatch: pytest.MonkeyPatch, off: str
) -> None:
    monkeypatch.setenv(UPDATE_GOLDEN, off)
    with pytest.raises(AssertionError, match="differs from"):
        check_golden(golden, ARGV)
    assert golden.read_text() == OLD_ARGV
