"""The embedded supervisor with the real test guest: start, info, pause, stop, reboot, crash."""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import anyio
import msgspec
import pytest
from helpers import wait_gone

from supervisor import Supervisor
from supervisor.engine.events import SupervisorEvent
from supervisor.engine.instance import backoff_delay
from supervisor.model.config import Config
from supervisor.model.errors import (
    HypervisorError,
    InstanceExists,
    InstanceNotFound,
    InvalidConfigError,
    InvalidParams,
    OperationTimeout,
)

from .conftest import READY, guest_spec, wait_for_serial

pytestmark = [pytest.mark.anyio, pytest.mark.guest]


async def next_state(events: object, state: str, timeout_s: float = 60) -> SupervisorEvent:
    with anyio.fail_after(timeout_s):
        async for event in events:  # type: ignore[attr-defined]
            if event.kind == "instance.state" and event.data["state"] == state:
                return event  # type: ignore[no-any-return]
    raise AssertionError(f"no {state} event")


async def test_start_info_uuid_pause_resume_and_acpi_stop(config: Config) -> None:
    async with Supervisor(config) as sup, sup.events(kinds=["instance.state", "qmp."]) as events:
        info = await sup.start(guest_spec("vm1", vcpus=2))
        assert info.state == "running"
        assert info.pid is not None
        assert info.uuid is not None
        paths = sup.instance("vm1").paths
        await wait_for_serial(paths.serial_log, READY)

        live = sup.info("vm1")
        assert (live.memory_mib, live.vcpus, live.pid) == (96, 2, info.pid)
        uuid = await sup.qmp("vm1", "query-uuid")
        assert uuid["UUID"] == info.uuid

        assert (await sup.pause("vm1")).state == "paused"
        assert (await sup.qmp("vm1", "query-status"))["status"] == "paused"
        assert (await sup.resume("vm1")).state == "running"

        with pytest.raises(InstanceExists):
            await sup.start(guest_spec("vm1"))

        stopped = await sup.stop("vm1", timeout_s=60)
        assert stopped.state == "stopped"
        assert stopped.reason == "guest-shutdown"
        assert stopped.pid is None
        event = await next_state(events, "stopped")
        assert event.data["reason"] == "guest-shutdown"
        wait_gone(info.pid)


async def test_typed_poweroff_force_stop_and_reboot_keeps_uuid(config: Config) -> None:
    async with Supervisor(config) as sup, sup.events(kinds=["instance.state"]) as events:
        info = await sup.start(guest_spec("vm2"))
        paths = sup.instance("vm2").paths
        await wait_for_serial(paths.serial_log, READY)

        stream = await anyio.connect_unix(paths.serial_socket)
        async with stream:
            await stream.send(b"\npoweroff\n")
            event = await next_state(events, "stopped")
        assert event.data["reason"] == "guest-shutdown"

        info = await sup.start(name="vm2")
        first_uuid = info.uuid
        # A reboot is an ACPI stop first: it needs the booted guest's acpid.
        await wait_for_serial(paths.serial_log, READY, since_end=True)
        rebooted = await sup.reboot("vm2")
        assert rebooted.uuid == first_uuid
        assert rebooted.pid != info.pid
        assert (await sup.qmp("vm2", "query-uuid"))["UUID"] == first_uuid

        killed = await sup.stop("vm2", force=True)
        assert (killed.state, killed.reason) == ("stopped", "killed")


async def test_kill_9_is_a_crash_and_restart_policy_restarts(config: Config) -> None:
    async with Supervisor(config) as sup, sup.events(kinds=["instance.state"]) as events:
        info = await sup.start(guest_spec("vm3", restart="on-crash"))
        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)
        crashed = await next_state(events, "crashed")
        assert crashed.data["signal"] == signal.SIGKILL
        restarted = await next_state(events, "running")
        assert restarted.data["reason"] == "started"
        again = sup.info("vm3")
        assert again.restarts == 1
        assert again.pid not in (None, info.pid)
        await sup.stop("vm3", force=True)


async def test_bad_specs_are_refused_with_the_field(config: Config) -> None:
    async with Supervisor(config) as sup:
        with pytest.raises(InvalidConfigError) as error:
            await sup.start(guest_spec("bad", hvparams={"serial_speed": 1234}))
        assert error.value.path == "spec.hvparams.serial_speed"
        with pytest.raises(InstanceNotFound):
            await sup.start(name="nope")
        # A failed start leaves no trace: no instance, no runtime dir.
        assert sup.list() == []
        assert not (Path(config.state_dir) / "instances" / "bad").exists()


async def test_cpu_pinning_and_balloon(config: Config) -> None:
    async with Supervisor(config) as sup:
        info = await sup.start(
            guest_spec("vm4", vcpus=2, hvparams={"cpu_mask": "1:0"}),
        )
        assert info.pid is not None
        vcpus = await sup.qmp("vm4", "query-cpus-fast")
        allowed = {cpu["cpu-index"]: _cpus_allowed(info.pid, cpu["thread-id"]) for cpu in vcpus}
        assert allowed == {0: "1", 1: "0"}

        await wait_for_serial(sup.instance("vm4").paths.serial_log, READY)
        # 80 of 96 MiB: the guest has ~40 MiB free, and a deeper balloon starves it.
        async with sup.events(instances=["vm4"], kinds=["qmp.BALLOON_CHANGE"]) as changes:
            await sup.balloon("vm4", 80)
            with anyio.fail_after(60):
                async for change in changes:
                    if change.data["actual"] <= 80 * 2**20:
                        break
        # The instance takes in each BALLOON_CHANGE before publishing it.
        assert sup.info("vm4").memory_mib == 80
        await sup.stop("vm4", force=True)


def _cpus_allowed(pid: int, tid: int) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


async def test_a_qemu_that_fails_to_start_is_reported_with_its_stderr(config: Config) -> None:
    async with Supervisor(config) as sup:
        spec = guest_spec("broken", hvparams={"kvm_extra": "-no-such-option"})
        with pytest.raises(HypervisorError) as error:
            await sup.start(spec)
        assert "-no-such-option" in error.value.data["stderr"]
        assert error.value.data["exit_status"] == 1
        assert sup.list() == []  # rolled back: no record, no runtime dir


async def test_a_qemu_that_never_answers_is_killed_after_the_start_timeout(
    config: Config, state_dir: Path
) -> None:
    # Fault injection: answers the capability probe like QEMU, then hangs.
    hanging = state_dir / "hanging-qemu"
    hanging.write_text(
        "#!/bin/sh\n"
        'case "$1" in --help|-machine|-device) exec /usr/bin/qemu-system-x86_64 "$@";; esac\n'
        "echo $$ > " + str(state_dir / "hanging.pid") + "\n"
        "exec sleep 600\n"
    )
    hanging.chmod(0o755)
    config = msgspec.structs.replace(config, start_timeout_s=1.0, qmp_timeout_s=5.0)
    async with Supervisor(config) as sup:
        spec = guest_spec("hangs", hvparams={"kvm_path": str(hanging)})
        with pytest.raises(OperationTimeout) as error:
            await sup.start(spec)
        assert "start_timeout_s" in str(error.value)
        assert sup.list() == []
    wait_gone(int((state_dir / "hanging.pid").read_text()))


async def test_a_corrupt_runtime_record_is_skipped_and_the_rest_adopted(
    config: Config, state_dir: Path
) -> None:
    async with Supervisor(config) as sup:
        info = await sup.start(guest_spec("good"), paused=True)
    corrupt = state_dir / "instances" / "bad"
    corrupt.mkdir()
    (corrupt / "runtime.json").write_text('{"version": 1, "name": ')
    (state_dir / "instances" / "empty").mkdir()
    async with Supervisor(config) as sup:
        await sup.instance("good").monitor_ready.wait()  # adoption goes on in the background
        assert [(i.name, i.state, i.pid) for i in sup.list()] == [("good", "paused", info.pid)]
        await sup.stop("good", force=True)


async def test_errors_leave_the_embedding_block_bare_not_in_a_group(config: Config) -> None:
    with pytest.raises(InstanceNotFound):
        async with Supervisor(config) as sup:
            await sup.stop("nope")


async def test_stop_of_a_crashed_instance_cancels_its_restart(config: Config) -> None:
    async with Supervisor(config) as sup, sup.events(kinds=["instance.state"]) as events:
        info = await sup.start(guest_spec("vm5", restart="on-crash"), paused=True)
        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)
        await next_state(events, "crashed")
        stopped = await sup.stop("vm5")
        assert (stopped.state, stopped.reason) == ("stopped", "stop requested")
        # What is tested is that nothing happens when the restart's backoff ends: the
        # one wait of this suite that is time itself.
        await anyio.sleep(backoff_delay(1) + 1)
        again = sup.info("vm5")
        assert (again.state, again.restarts) == ("stopped", 0)


async def test_a_cancelled_stop_gives_the_instance_back_its_state(config: Config) -> None:
    async with (
        Supervisor(config) as sup,
        sup.events(instances=["vm6"], kinds=["qmp.POWERDOWN"]) as powerdowns,
    ):
        await sup.start(guest_spec("vm6"))  # not booted yet: ACPI goes unanswered
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sup.stop, "vm6", timeout_s=60))
            with anyio.fail_after(60):
                await anext(powerdowns)  # the stop pressed the power button
            tg.cancel_scope.cancel()
        assert sup.info("vm6").state == "running"
        assert (await sup.pause("vm6")).state == "paused"
        await sup.stop("vm6", force=True)


async def test_monitor_and_qmp_refuse_what_would_bypass_the_supervisor(config: Config) -> None:
    async with Supervisor(config) as sup:
        await sup.start(guest_spec("vm7"), paused=True)
        with pytest.raises(InvalidParams) as bad_command:
            await sup.monitor("vm7", "info status\nquit")
        assert bad_command.value.path == "command"
        with pytest.raises(InvalidConfigError) as refused:
            await sup.qmp("vm7", "human-monitor-command", {"command-line": "quit"})
        assert "instance.monitor" in str(refused.value)
        assert sup.info("vm7").state == "paused"
        await sup.stop("vm7", force=True)


async def test_instance_files_added_or_removed_while_running_show_at_once(
    config: Config,
) -> None:
    definition = Path(config.instances_dir) / "late.toml"
    async with Supervisor(config) as sup:
        assert sup.list() == []
        definition.write_text('name = "late"\nmemory_mib = 96\n')
        assert [(i.name, i.state) for i in sup.list()] == [("late", "stopped")]
        assert sup.info("late").memory_mib == 96
        definition.unlink()
        assert sup.list() == []
        with pytest.raises(InstanceNotFound):
            sup.info("late")
