"""`Supervisor.start(spec=...)` takes an `InstanceSpec` or a plain mapping (parsed JSON or
TOML), decoded with the same field paths as the control socket's ``instance.start``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from core.conftest import GUEST_MIB, config, state_dir

from supervisor import Supervisor
from supervisor.model.config import Config
from supervisor.model.errors import InvalidConfigError, InvalidParams

from .nothing_left import assert_nothing_left

__all__ = ["config", "state_dir"]  # fixtures

pytestmark = [pytest.mark.anyio, pytest.mark.guest]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_plain_mapping_starts_like_a_spec(config: Config) -> None:
    spec = {"name": "plain", "memory_mib": GUEST_MIB, "vcpus": 2, "hvparams": {"acpi": True}}
    async with Supervisor(config) as sup:
        info = await sup.start(spec=spec, paused=True)
        assert (info.name, info.state, info.vcpus, info.memory_mib) == (
            "plain",
            "paused",
            2,
            GUEST_MIB,
        )
        record = sup.instance("plain").record
        assert record is not None
        assert (record.spec.vcpus, record.hvparams.acpi) == (2, True)
        await sup.stop("plain", force=True)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"name": "bad", "memory_mib": "lots"}, "spec.memory_mib"),
        ({"name": "bad", "bogus": 1}, "spec.bogus"),
        ({"memory_mib": 96}, "spec.name"),
        ({"name": "../bad"}, "spec.name"),
        (
            {"name": "bad", "disks": [{"path": "/x", "mode": "rw"}, {"mode": "ro"}]},
            "spec.disks[1].path",
        ),
        ({"name": "bad", "hvparams": {"serial_speed": "fast"}}, "spec.hvparams.serial_speed"),
    ],
)
async def test_a_bad_mapping_is_refused_with_the_field_path(
    config: Config, state_dir: Path, spec: dict[str, Any], path: str
) -> None:
    async with Supervisor(config) as sup:
        with pytest.raises(InvalidConfigError) as error:
            await sup.start(spec=spec)
        assert error.value.path == path
        assert isinstance(error.value, InvalidParams) or path.startswith("spec.hvparams")
        assert_nothing_left(sup, state_dir, "bad")
