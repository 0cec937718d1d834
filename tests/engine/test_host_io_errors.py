"""Host I/O failures during start (a full or read-only state dir) are error 4 naming the
path, leave nothing half-written, and the supervisor keeps working once the disk is back.

The faults are real: a tmpfs of a few hundred KiB, filled or remounted read-only, in a
private mount namespace (`state_dir_faults` runs under ``unshare -m``), so no mount
outlives the test whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from conftest import REPO
from core.conftest import config, state_dir

from supervisor.model.config import Config

__all__ = ["config", "state_dir"]  # fixtures

pytestmark = pytest.mark.guest


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_full_or_read_only_state_dir_fails_a_start_cleanly(
    config: Config, state_dir: Path, backend: str
) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("needs root and unshare (util-linux)")
    private = state_dir / "private"
    private.mkdir()
    environment = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    in_private_namespace = ["unshare", "-m", "--propagation", "private"]
    faults = [sys.executable, "-m", "engine.state_dir_faults", backend, str(private)]
    child = subprocess.run(
        [*in_private_namespace, *faults],
        input=msgspec.json.encode(config),
        capture_output=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")[-4000:]
    seen = json.loads(child.stdout.decode().splitlines()[-1])

    instances = private / "instances"
    for case, name in (("full", "full"), ("read_only", "ro")):
        outcome = seen[case]
        assert outcome["code"] == 4, outcome
        assert str(instances / name) in outcome["message"], outcome
        assert ("No space left on device" if case == "full" else "Read-only file system") in (
            outcome["message"]
        )
        assert (outcome["listed"], outcome["dir_left"], outcome["qemus"]) == ([], False, [])
    assert seen["after_full"] == seen["after_read_only"] == ["paused", "stopped"]
    assert not any(private.iterdir())  # the tmpfs was private to the child
