"""Logging: the library is silent until its host configures logging; then its records
reach the host's stdlib handlers with the instance name; ``serve`` logs JSON lines."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import GUEST_DIR, run_python
from core.conftest import FAST_KERNEL_ARGS, GUEST_MIB
from core.test_daemon import Daemon

pytestmark = [pytest.mark.qemu]

#: Starts and stops one paused guest (a QEMU in -S) through the embedding API.
EMBEDDING_PROGRAM = """
import json, logging, sys
import anyio
from supervisor import Supervisor
from supervisor.model.config import Config
from supervisor.model.spec import decode_spec

backend, state_dir, guest_dir, kernel_args, memory_mib, host_logs = sys.argv[1:]

class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = []

    def emit(self, record):
        self.seen.append({
            "logger": record.name,
            "level": record.levelname,
            "message": record.getMessage(),
            "fields": getattr(record, "event_dict", None),
        })

collect = Collect()
if host_logs == "stdlib":
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    logging.getLogger().addHandler(collect)

async def main():
    config = Config(
        state_dir=state_dir,
        instances_dir=state_dir + "/defs",
        hvparams={
            "kernel_path": guest_dir + "/vmlinuz",
            "initrd_path": guest_dir + "/initrd.img",
            "kernel_args": kernel_args,
        },
    )
    async with Supervisor(config) as sup:
        spec = decode_spec({"name": "quiet", "memory_mib": int(memory_mib)})
        await sup.start(spec, paused=True)
        await sup.stop("quiet", force=True)

anyio.run(main, backend=backend)
if host_logs == "stdlib":
    print(json.dumps(collect.seen))
"""


def _embed(state_dir: Path, backend: str, host_logs: str) -> subprocess.CompletedProcess[str]:
    if not (GUEST_DIR / "vmlinuz").exists():
        pytest.fail("the test guest is missing: run `make guest`")
    (state_dir / "defs").mkdir(exist_ok=True)
    args = [str(state_dir), str(GUEST_DIR), FAST_KERNEL_ARGS, str(GUEST_MIB), host_logs]
    return run_python(EMBEDDING_PROGRAM, backend, *args)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_unconfigured_the_library_prints_nothing(state_dir: Path, backend: str) -> None:
    result = _embed(state_dir, backend, "none")
    assert (result.stdout, result.stderr) == ("", "")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_host_with_stdlib_logging_gets_the_records(state_dir: Path, backend: str) -> None:
    result = _embed(state_dir, backend, "stdlib")
    records: list[dict[str, Any]] = json.loads(result.stdout)
    ours = [record for record in records if record["logger"].startswith("supervisor.")]
    assert all(record["fields"]["event"] in record["message"] for record in ours)
    [launched] = [
        record
        for record in ours
        if (record["logger"], record["fields"]["event"])
        == ("supervisor.engine.instance", "launched")
    ]
    assert launched["level"] == "INFO"
    assert launched["fields"]["instance"] == "quiet"
    assert launched["message"].startswith("launched ")
    assert "instance='quiet'" in launched["message"]
    # The host's own handler (basicConfig on stderr) printed the same records.
    assert "instance='quiet'" in result.stderr


@pytest.mark.guest
def test_serve_logs_json_lines_with_instance_names(state_dir: Path) -> None:
    daemon = Daemon(state_dir)
    daemon.write_config()
    spec = state_dir / "named.toml"
    spec.write_text(f'name = "named"\nmemory_mib = {GUEST_MIB}\n')
    try:
        daemon.start()
        daemon.cli("start", "--spec", str(spec), "--paused", check=True)
        daemon.cli("stop", "named", "--force", check=True)
    finally:
        daemon.kill(signal.SIGTERM)
    lines = daemon.log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert {"event", "level", "timestamp"} <= entries[0].keys()
    launched = [e for e in entries if e["event"] == "launched"]
    assert [e["instance"] for e in launched] == ["named"]
    assert launched[0]["level"] == "info"
    assert any(e["event"] == "serving" for e in entries)
