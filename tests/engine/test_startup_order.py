"""`serve` is ready once its socket serves; autostart runs behind it, a few at a time."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from conftest import QEMU, REPO
from helpers import wait_gone, wait_until

from supervisor.engine.instance import KILL_WAIT_S
from supervisor.engine.supervisor import AUTOSTART_CONCURRENCY
from supervisor.model.config import Config

from .conftest import DEADLINE_S, EngineDaemon, qemus_started_in

pytestmark = [pytest.mark.qemu]

#: Fault injection: a QEMU launch (the probes have no -pidfile) waits for the gate file.
GATED_QEMU = """#!/bin/sh
case " $* " in
*" -pidfile "*) while [ ! -e "{gate}" ]; do sleep 0.02; done ;;
esac
exec {qemu} "$@"
"""


def test_ready_comes_when_the_socket_serves_and_autostart_runs_a_few_at_a_time(
    engine_daemon: EngineDaemon,
) -> None:
    state_dir = engine_daemon.state_dir
    gate = state_dir / "gate"
    wrapper = state_dir / "gated-qemu"
    wrapper.write_text(GATED_QEMU.format(gate=gate, qemu=QEMU))
    wrapper.chmod(0o755)
    # The gated starts must outlast the test's waits, not fail on their own.
    engine_daemon.write_config(start_timeout_s=300, qmp_timeout_s=300)
    names = [f"auto{i}" for i in range(AUTOSTART_CONCURRENCY + 2)]
    for name in names:
        engine_daemon.define(name, autostart=True, hvparams={"kvm_path": str(wrapper)})

    engine_daemon.spawn()
    try:
        # Every autostart waits at the gate: READY=1 must not wait for them.
        engine_daemon.wait_ready(timeout_s=30)
        wait_until(
            lambda: len(qemus_started_in(state_dir)) >= AUTOSTART_CONCURRENCY,
            what=f"{AUTOSTART_CONCURRENCY} autostarts at the gate at once",
            timeout_s=DEADLINE_S,
        )
        for _ in range(3):  # round trips through the daemon: the others had every chance
            states = [item["state"] for item in engine_daemon.call("instance.list")]
            assert states.count("starting") == AUTOSTART_CONCURRENCY, states
            assert len(qemus_started_in(state_dir)) == AUTOSTART_CONCURRENCY
    finally:
        # Shutdown waits for the starts under way (up to start_timeout_s): let them end.
        gate.touch()
    listed = wait_until(
        lambda: (
            (items := engine_daemon.settled())
            and all(item["state"] == "running" for item in items)
            and items
        ),
        what="every autostart running",
        timeout_s=DEADLINE_S,
    )
    assert sorted(item["name"] for item in listed) == names
    for item in listed:
        engine_daemon.call("instance.stop", name=item["name"], force=True)
        wait_gone(item["pid"])


def test_the_systemd_unit_waits_for_shutdown_on_exit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "config" / "kvm-supervisor.service")
    stop_s = float(unit["Service"]["TimeoutStopSec"].removesuffix("s"))
    defaults = Config()
    assert stop_s > defaults.start_timeout_s + defaults.stop_timeout_s + KILL_WAIT_S
    assert Path(unit["Service"]["ExecStart"].split()[0]).name == "kvm-supervisor"
