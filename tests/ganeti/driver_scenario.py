"""Ganeti's kvm driver on its own, as noded uses it: a fresh driver object for every call.

Run by test_driver.py with Ganeti's own ``/usr/bin/python3`` and the environment a
node's Ganeti daemons get from ``etc/default/ganeti`` (``GANETI_ROOTDIR``,
``GANETI_HOSTNAME``, ``PYTHONUSERBASE``): the driver comes in through the ``.pth`` that
``kvm-supervisor ganeti-install`` wrote, nothing else puts the project on the path.
Prints one JSON object: what each call returned or raised; the test asserts on it.

Usage: driver_scenario.py running KERNEL INITRD KERNEL_ARGS | unreachable
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

sys.path.insert(0, "/usr/share/ganeti/default")

from ganeti import constants, hypervisor, objects

NAME = "drv1"
NODE = "node9"
WAIT_S = 120.0
#: The test guest runs from its initramfs: at 64 MiB the OOM killer takes acpid.
BALLOON_MIB = 80


def driver() -> Any:
    """What noded does for every request: a new object of the registered class."""
    return hypervisor.GetHypervisor(constants.HT_KVM)


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        value = call(*args, **kwargs)
    except Exception as error:  # the test asserts on the type
        return {"error": type(error).__name__, "message": str(error)}
    if hasattr(value, "ToDict"):
        value = value.ToDict()
    return {"ok": value}


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return value


def make_instance(hvparams: dict[str, Any], instance_uuid: str) -> Any:
    return objects.Instance(
        name=NAME,
        uuid=instance_uuid,
        hypervisor=constants.HT_KVM,
        os="noop",
        beparams={
            constants.BE_MAXMEM: 96,
            constants.BE_MINMEM: 80,
            constants.BE_VCPUS: 1,
            constants.BE_AUTO_BALANCE: True,
        },
        hvparams=hvparams,
        nics=[],
        disks=[],
        network_port=None,
        tags=["scenario"],
    )


def serial_log() -> str:
    from supervisor.ganeti.rpc import DaemonClient
    from supervisor.ganeti.settings import load_settings

    with DaemonClient(load_settings().socket) as daemon:
        return str(daemon.call("instance.info", {"name": NAME})["serial_log"])


def booted_after(offset: int) -> Callable[[], bool]:
    """A check for a guest that booted after `offset` of the serial log: its ready line,
    then a heartbeat (it handles the power button by then)."""

    def seen() -> bool:
        with open(serial_log(), "rb") as file:
            file.seek(offset)
            text = file.read()
        ready = text.find(b"KVS-GUEST-READY")
        return ready >= 0 and b"KVS-HEARTBEAT" in text[ready:]

    return seen


def running(kernel: str, initrd: str, kernel_args: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    cls = hypervisor.GetHypervisorClass(constants.HT_KVM)
    results["class"] = f"{cls.__module__}.{cls.__qualname__}"
    hvparams = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
    hvparams.update(kernel_path=kernel, initrd_path=initrd, kernel_args=kernel_args)
    instance = make_instance(hvparams, str(uuid.uuid4()))

    results["verify"] = outcome(driver().Verify, hvparams)
    results["node_info"] = outcome(driver().GetNodeInfo, hvparams)
    results["list_before"] = outcome(driver().ListInstances)
    results["info_before"] = outcome(driver().GetInstanceInfo, NAME)
    results["start"] = outcome(driver().StartInstance, instance, [], False)
    results["start_again"] = outcome(driver().StartInstance, instance, [], False)
    results["info"] = outcome(driver().GetInstanceInfo, NAME, hvparams)
    results["list"] = outcome(driver().ListInstances)
    results["all_info"] = outcome(driver().GetAllInstancesInfo)
    results["verify_instance"] = outcome(driver().VerifyInstance, instance)
    namesake = make_instance(hvparams, str(uuid.uuid4()))
    results["verify_namesake"] = outcome(driver().VerifyInstance, namesake)
    wait_for("a heartbeat", booted_after(0))

    results["balloon"] = outcome(driver().BalloonInstanceMemory, instance, BALLOON_MIB)
    results["ballooned_memory"] = wait_for(
        f"the balloon at {BALLOON_MIB} MiB",
        lambda: (info := driver().GetInstanceInfo(NAME)) and info[2] == BALLOON_MIB and info[2],
    )
    pid = driver().GetInstanceInfo(NAME)[1]
    with open(serial_log(), "rb") as file:
        offset = file.seek(0, 2)
    results["reboot"] = outcome(driver().RebootInstance, instance)
    rebooted = driver().GetInstanceInfo(NAME)
    results["rebooted_pid_changed"] = rebooted is not None and rebooted[1] != pid
    wait_for("a heartbeat after the reboot", booted_after(offset))

    node = objects.Node(name=NODE, ndparams={})
    other = objects.Node(name="node8", ndparams={})
    group = objects.NodeGroup(name="default", ndparams={constants.ND_SSH_PORT: 22})
    beparams = instance.beparams
    results["console"] = outcome(cls.GetInstanceConsole, instance, node, group, hvparams, beparams)
    results["console_other_node"] = outcome(
        cls.GetInstanceConsole, instance, other, group, hvparams, beparams
    )
    no_serial = {**hvparams, constants.HV_SERIAL_CONSOLE: False}
    results["console_none"] = outcome(
        cls.GetInstanceConsole, instance, node, group, no_serial, beparams
    )
    results["hotplug_supported"] = outcome(driver().HotplugSupported, instance)
    results["hotplug_verify"] = outcome(
        driver().VerifyHotplugSupport, instance, constants.HOTPLUG_ACTION_ADD, "disk"
    )
    results["hotadd"] = outcome(driver().HotAddDevice, instance, "disk", None, None, 0)

    results["syntax_ok"] = outcome(cls.CheckParameterSyntax, hvparams)
    results["syntax_unknown"] = outcome(cls.CheckParameterSyntax, {**hvparams, "bogus": 1})
    results["syntax_boot_order"] = outcome(
        cls.CheckParameterSyntax, {**hvparams, "boot_order": "tape"}
    )
    results["syntax_port"] = outcome(cls.CheckParameterSyntax, {**hvparams, "migration_port": 0})
    results["syntax_security"] = outcome(
        cls.CheckParameterSyntax, {**hvparams, "security_model": "user"}
    )
    results["validate_ok"] = outcome(cls.ValidateParameters, hvparams)
    results["validate_kernel"] = outcome(
        cls.ValidateParameters, {**hvparams, "kernel_path": "/nonexistent/vmlinuz"}
    )
    results["validate_user"] = outcome(
        cls.ValidateParameters,
        {**hvparams, "security_model": "user", "security_domain": "no-such-user-kvs"},
    )

    info = outcome(driver().MigrationInfo, instance)
    results["migration_info"] = {"ok": isinstance(info.get("ok"), str) and bool(info["ok"])}
    results["migration_status_idle"] = outcome(driver().GetMigrationStatus, instance)

    results["stop"] = outcome(driver().StopInstance, instance, timeout=60)
    results["info_after_stop"] = outcome(driver().GetInstanceInfo, NAME)
    results["list_after_stop"] = outcome(driver().ListInstances)
    results["cleanup"] = outcome(driver().CleanupInstance, NAME)
    results["cleanup_again"] = outcome(driver().CleanupInstance, NAME)
    results["stop_by_name_unforced"] = outcome(driver().StopInstance, None, name=NAME)
    results["kill_by_name_unknown"] = outcome(driver().StopInstance, None, force=True, name=NAME)
    results["stop_unknown"] = outcome(driver().StopInstance, instance, timeout=5)
    results["migration_info_unknown"] = outcome(driver().MigrationInfo, instance)
    return results


def unreachable() -> dict[str, Any]:
    """The same driver with no daemon behind its socket."""
    return {
        "verify": outcome(driver().Verify),
        "info": outcome(driver().GetInstanceInfo, NAME),
        "list": outcome(driver().ListInstances),
    }


def main() -> None:
    mode = sys.argv[1]
    results = running(*sys.argv[2:5]) if mode == "running" else unreachable()
    json.dump(results, sys.stdout, default=list)


if __name__ == "__main__":
    main()
