"""The config keys of the per-NIC hook: `nic_hook` (a path, resolved like the others)
and `nic_hook_timeout_s`."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.model.config import Config, check_config, load_config
from supervisor.model.errors import InvalidConfigError, InvalidParams


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_hook_by_default() -> None:
    assert Config().nic_hook is None
    assert Config().nic_hook_timeout_s == 30
    assert load_config(None).nic_hook is None


def test_hook_path_is_resolved_against_the_config_file(tmp_path: Path) -> None:
    text = 'nic_hook = "hooks/nic"\nnic_hook_timeout_s = 5\n'
    config = load_config(write(tmp_path / "etc" / "c.toml", text))
    assert config.nic_hook == str(tmp_path / "etc" / "hooks" / "nic")
    assert config.nic_hook_timeout_s == 5
    absolute = load_config(write(tmp_path / "c.toml", 'nic_hook = "/usr/local/sbin/nic-hook"\n'))
    assert absolute.nic_hook == "/usr/local/sbin/nic-hook"


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        ("nic_hook = 1\n", "nic_hook", "Expected `str | null`, got `int`"),
        ("nic_hook_timeout_s = 0\n", "nic_hook_timeout_s", "Expected `float` > 0.0"),
        ("nic_hook_timeout_s = '30'\n", "nic_hook_timeout_s", "Expected `float`, got `str`"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, path: str, reason: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        load_config(write(tmp_path / "c.toml", text))
    assert (caught.value.path, caught.value.reason) == (path, reason)


def test_an_empty_hook_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        load_config(write(tmp_path / "c.toml", 'nic_hook = ""\n'))
    assert str(caught.value) == "nic_hook: '' is not an absolute path"
    assert caught.value.code == 7


def test_a_hand_built_config_needs_an_absolute_hook() -> None:
    with pytest.raises(InvalidConfigError) as caught:
        check_config(Config(nic_hook="hooks/nic"))
    assert (caught.value.path, caught.value.reason) == (
        "nic_hook",
        "'hooks/nic' is not an absolute path",
    )
    check_config(Config(nic_hook="/etc/kvm-supervisor/nic-hook"))
    with pytest.raises(InvalidParams) as caught:
        check_config(Config(nic_hook_timeout_s=-1))
    assert caught.value.path == "nic_hook_timeout_s"
