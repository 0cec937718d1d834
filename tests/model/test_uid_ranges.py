"""uid_pool ranges: the config and the uid pool read them by one rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.host.uidpool import UidPool
from supervisor.model.config import Config, load_config
from supervisor.model.errors import InvalidConfigError


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("6000-5999", "uid range 6000-5999 runs backwards"),
        ("0-5", "uid range 0-5 includes root: a pool uid must be above 0"),
        ("4294967295", "uid range 4294967295-4294967295 goes beyond the largest uid 4294967294"),
    ],
)
def test_config_and_pool_refuse_the_same_ranges(tmp_path: Path, entry: str, reason: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"uid_pool = ['5000', '{entry}']\n")
    with pytest.raises(InvalidConfigError) as caught:
        load_config(path)
    assert (caught.value.path, caught.value.reason) == ("uid_pool[1]", reason)
    first, _, last = entry.partition("-")
    with pytest.raises(ValueError, match=f"^{reason}$"):
        UidPool(tmp_path / "leases", [(int(first), int(last or first))])


def test_a_hand_built_config_names_the_bad_entry() -> None:
    with pytest.raises(InvalidConfigError) as caught:
        Config(uid_pool=["1-2", "0"]).uid_ranges()
    assert caught.value.path == "uid_pool[1]"


def test_ranges_in_ganeti_syntax_sorted() -> None:
    config = Config(uid_pool=["6000", "5000-5099"])
    assert config.uid_ranges() == [(5000, 5099), (6000, 6000)]
    assert UidPool(Path("/nonexistent"), config.uid_ranges()).describe() == "5000-5099, 6000"
