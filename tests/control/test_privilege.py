"""Least privilege on the control socket, against a real `kvm-supervisor serve`.

A throwaway user in a throwaway group (the daemon's ``control_group``) talks to the
daemon from a forked child that has dropped to that user's uid and gid: it may list,
start a plain spec whose files lie in ``image_dirs``, query and stop; it is refused every
host-level field, every path outside ``image_dirs`` and every monitor command that is
not a read-only query. Root is refused none of these, except the monitor commands that
bypass the daemon, which everyone is refused. No password shows in an error or a log.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import GUEST_DIR
from core.conftest import GUEST_MIB, kill_leftover_qemus
from core.test_daemon import Daemon

from supervisor.control.privilege import check_member_spec
from supervisor.engine.monitor_commands import hmp_command_name, hmp_refusal
from supervisor.model.config import Config, check_config, load_config
from supervisor.model.errors import InvalidConfigError
from supervisor.model.spec import decode_spec

pytestmark = [pytest.mark.qemu]

PEER_USER = "kvs-priv-user"
PEER_GROUP = "kvs-priv-group"
RPC_TIMEOUT_S = 120
#: The qcow2 header extension that records the backing file's format.
BACKING_FORMAT_EXTENSION = bytes.fromhex("e2792aca")


@dataclass
class Setup:
    daemon: Daemon
    peer: pwd.struct_passwd
    images: Path
    outside: Path


def _remove_peer_user() -> None:
    subprocess.run(["userdel", PEER_USER], check=False, capture_output=True)
    subprocess.run(["groupdel", PEER_GROUP], check=False, capture_output=True)


@pytest.fixture(scope="module")
def peer() -> Iterator[pwd.struct_passwd]:
    """A system user whose only group is a system group made for these tests."""
    _remove_peer_user()  # what a killed run may have left behind
    try:
        subprocess.run(["groupadd", "--system", PEER_GROUP], check=True)
        subprocess.run(
            [
                *("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"),
                *("--gid", PEER_GROUP, PEER_USER),
            ],
            check=True,
        )
        yield pwd.getpwnam(PEER_USER)
    finally:
        _remove_peer_user()


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def setup(peer: pwd.struct_passwd) -> Iterator[Setup]:
    """A daemon with `PEER_GROUP` as control group and an image dir holding the test guest."""
    state_dir = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    images = Path(tempfile.mkdtemp(prefix="kvs-img-", dir="/tmp"))
    outside = Path(tempfile.mkdtemp(prefix="kvs-out-", dir="/tmp"))
    daemon = Daemon(state_dir)
    try:
        # Members reach the control socket through the state dir: 0750, the control group.
        os.chown(state_dir, 0, grp.getgrnam(PEER_GROUP).gr_gid)
        os.chmod(state_dir, 0o750)
        shutil.copy(GUEST_DIR / "vmlinuz", images / "vmlinuz")
        shutil.copy(GUEST_DIR / "initrd.img", images / "initrd.img")
        for directory in (images, outside):
            for image in ("disk.raw", "base.raw"):
                with (directory / image).open("wb") as file:
                    file.truncate(1024 * 1024)
        _qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(images / "ok.qcow2"))
        _qemu_img(
            *("create", "-f", "qcow2", "-b", str(outside / "base.raw"), "-F", "raw"),
            str(images / "evil.qcow2"),
        )
        (images / "link.raw").symlink_to(outside / "disk.raw")
        daemon.write_config(control_group=PEER_GROUP, image_dirs=[str(images)])
        daemon.start()
        yield Setup(daemon=daemon, peer=peer, images=images, outside=outside)
    finally:
        daemon.kill(signal.SIGTERM)
        kill_leftover_qemus(state_dir)
        for directory in (state_dir, images, outside):
            shutil.rmtree(directory, ignore_errors=True)


def _exchange(path: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    responses = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(RPC_TIMEOUT_S)
        sock.connect(path)
        reader = sock.makefile("rb")
        for number, request in enumerate(requests, 1):
            message = {"jsonrpc": "2.0", "id": number, **request}
            sock.sendall(json.dumps(message).encode() + b"\n")
            responses.append(json.loads(reader.readline()))
    return responses


def rpc_as(setup: Setup, requests: list[dict[str, Any]], *, member: bool) -> list[dict[str, Any]]:
    """The responses to `requests`, sent in order on one connection by root or the member.

    The member's requests come from a forked child that has dropped to its uid and gid
    (the credentials SO_PEERCRED reports are taken at connect).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            if member:
                os.setgroups([])
                os.setresgid(setup.peer.pw_gid, setup.peer.pw_gid, setup.peer.pw_gid)
                os.setresuid(setup.peer.pw_uid, setup.peer.pw_uid, setup.peer.pw_uid)
            result: Any = _exchange(str(setup.daemon.socket), requests)
        except BaseException as error:
            result, status = {"child error": repr(error)}, 1
        with contextlib.suppress(BaseException), os.fdopen(write_end, "wb") as out:
            out.write(json.dumps(result).encode())
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert isinstance(result, list), result
    return result


def call(setup: Setup, method: str, params: dict[str, Any] | None = None, *, member: bool) -> Any:
    """One request's response object (``result`` or ``error``)."""
    request: dict[str, Any] = {"method": method}
    if params is not None:
        request["params"] = params
    return rpc_as(setup, [request], member=member)[0]


def plain_spec(setup: Setup, name: str, **fields: Any) -> dict[str, Any]:
    """A spec whose every host file lies in the image dir."""
    hvparams = {
        "kernel_path": str(setup.images / "vmlinuz"),
        "initrd_path": str(setup.images / "initrd.img"),
        **fields.pop("hvparams", {}),
    }
    return {
        "name": name,
        "memory_mib": GUEST_MIB,
        "disks": [{"path": str(setup.images / "disk.raw")}],
        "hvparams": hvparams,
        **fields,
    }


def test_a_member_lists_starts_a_plain_spec_queries_and_stops_it(setup: Setup) -> None:
    spec = plain_spec(
        setup,
        "member-vm",
        disks=[
            {"path": str(setup.images / "disk.raw")},
            {"path": str(setup.images / "ok.qcow2"), "format": "qcow2"},
        ],
        hvparams={"keymap": "en-us", "usb_devices": "tablet"},
    )
    listed, started, status, info, stopped = rpc_as(
        setup,
        [
            {"method": "instance.list"},
            {"method": "instance.start", "params": {"spec": spec, "paused": True}},
            {"method": "instance.qmp", "params": {"name": "member-vm", "command": "query-status"}},
            {"method": "instance.monitor", "params": {"name": "member-vm", "command": "info name"}},
            {"method": "instance.stop", "params": {"name": "member-vm", "force": True}},
        ],
        member=True,
    )
    assert isinstance(listed["result"], list), listed
    assert started["result"]["state"] == "paused", started
    assert status["result"]["return"]["status"] == "prelaunch", status
    assert info["result"]["output"] == "member-vm", info
    assert stopped["result"]["state"] == "stopped", stopped


#: (spec fields over `plain_spec`, the field the refusal names, a word of its reason).
REFUSED_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    *(
        (name, {"hvparams": {name: value}}, f"spec.hvparams.{name}", "may only be set by root")
        for name, value in [
            ("kvm_path", "/usr/bin/qemu-system-x86_64"),
            ("kvm_extra", "-snapshot"),
            ("mem_path", "/dev/hugepages"),
            ("security_model", "none"),
            ("security_domain", "nobody"),
            ("use_chroot", False),
            ("vnc_password_file", "/etc/shadow"),
            ("spice_password_file", "/etc/shadow"),
        ]
    ),
    *(
        (name, {"hvparams": {name: value}}, f"spec.hvparams.{name}", reason)
        for name, value, reason in [
            ("kernel_path", str(GUEST_DIR / "vmlinuz"), "outside image_dirs"),
            ("initrd_path", str(GUEST_DIR / "initrd.img"), "outside image_dirs"),
            ("cdrom_image_path", "/etc/shadow", "outside image_dirs"),
            ("cdrom2_image_path", "http://127.0.0.1:1/boot.iso", "URL"),
            ("floppy_image_path", "/etc/shadow", "outside image_dirs"),
            ("vnc_x509_path", "/etc/ssl", "outside image_dirs"),
            ("vnc_bind_address", "/tmp", "outside image_dirs"),
            ("machine_version", "pc,firmware=/etc/shadow", "','"),
            ("spice_tls_ciphers", "HIGH,x509-key-file=/etc/shadow", "','"),
            ("keymap", "/etc/shadow", "keymap name"),
            ("usb_devices", "tablet,host:1d6b:0002", "host devices"),
        ]
    ),
    ("network_port", {"network_port": 22}, "spec.network_port", "display_port_range"),
]


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [case[1:] for case in REFUSED_SPECS],
    ids=[case[0] for case in REFUSED_SPECS],
)
def test_a_member_is_refused_each_host_level_field(
    setup: Setup, fields: dict[str, Any], path: str, reason: str
) -> None:
    spec = plain_spec(setup, "refused", **fields)
    response = call(setup, "instance.start", {"spec": spec, "paused": True}, member=True)
    error = response.get("error")
    assert error is not None, response
    assert error["code"] == 7, error
    assert error["data"]["path"] == path, error
    assert reason in error["message"], error
    assert call(setup, "instance.info", {"name": "refused"}, member=True)["error"]["code"] == 1


@pytest.mark.parametrize(
    ("disk", "reason"),
    [
        ("/etc/shadow", "outside image_dirs"),
        ("{images}/link.raw", "resolved: {outside}/disk.raw"),
        ("{images}/../{outside_name}/disk.raw", "outside image_dirs"),
        ("{images}/disk.raw,file.filename=/etc/shadow", "','"),
        ("disk.raw", "not an absolute path"),
    ],
    ids=["outside", "symlink-out", "dot-dot", "comma", "relative"],
)
def test_a_member_is_refused_disks_outside_the_image_dirs(
    setup: Setup, disk: str, reason: str
) -> None:
    names = {"images": setup.images, "outside": setup.outside, "outside_name": setup.outside.name}
    spec = plain_spec(setup, "refused", disks=[{"path": disk.format(**names)}])
    error = call(setup, "instance.start", {"spec": spec}, member=True)["error"]
    assert (error["code"], error["data"]["path"]) == (7, "spec.disks[0].path"), error
    assert reason.format(**names) in error["message"], error


def test_a_member_is_refused_a_qcow2_backed_outside_the_image_dirs(setup: Setup) -> None:
    spec = plain_spec(
        setup, "refused", disks=[{"path": str(setup.images / "evil.qcow2"), "format": "qcow2"}]
    )
    error = call(setup, "instance.start", {"spec": spec}, member=True)["error"]
    assert (error["code"], error["data"]["path"]) == (7, "spec.disks[0].path"), error
    assert f"backing file {setup.outside}/base.raw" in error["message"], error


def test_root_is_refused_none_of_them(setup: Setup) -> None:
    spec = plain_spec(
        setup,
        "root-vm",
        disks=[
            {"path": str(setup.outside / "disk.raw")},
            {"path": str(setup.images / "evil.qcow2"), "format": "qcow2"},
        ],
        hvparams={
            "kvm_path": "/usr/bin/qemu-system-x86_64",
            "kernel_path": str(GUEST_DIR / "vmlinuz"),
        },
    )
    started, stopped = rpc_as(
        setup,
        [
            {"method": "instance.start", "params": {"spec": spec, "paused": True}},
            {"method": "instance.stop", "params": {"name": "root-vm", "force": True}},
        ],
        member=False,
    )
    assert started["result"]["state"] == "paused", started
    assert stopped["result"]["state"] == "stopped", stopped


@pytest.fixture(scope="module")
def running(setup: Setup) -> Iterator[str]:
    """An instance started paused by root, for the monitor tests."""
    name = "monitored"
    started = call(
        setup,
        "instance.start",
        {"spec": plain_spec(setup, name, disks=[]), "paused": True},
        member=False,
    )
    assert started["result"]["state"] == "paused", started
    try:
        yield name
    finally:
        call(setup, "instance.stop", {"name": name, "force": True}, member=False)


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        ("screendump", {"filename": "{out}/screen"}),
        ("system_reset", None),
        ("qom-set", {"path": "/machine", "property": "x", "value": 1}),
        ("quit", None),
    ],
)
def test_a_member_may_run_read_only_qmp_queries_only(
    setup: Setup, running: str, command: str, arguments: dict[str, Any] | None
) -> None:
    if arguments is not None:
        arguments = {
            key: value.format(out=setup.outside) if isinstance(value, str) else value
            for key, value in arguments.items()
        }
    params = {"name": running, "command": command, "arguments": arguments}
    error = call(setup, "instance.qmp", params, member=True)["error"]
    assert (error["code"], error["data"]["path"]) == (7, "command"), error
    assert command in error["message"], error
    assert not (setup.outside / "screen").exists()


def test_root_keeps_the_qmp_passthrough(setup: Setup, running: str) -> None:
    status = call(setup, "instance.qmp", {"name": running, "command": "query-status"}, member=False)
    assert status["result"]["return"]["status"] == "prelaunch", status
    commands = call(
        setup, "instance.qmp", {"name": running, "command": "query-commands"}, member=True
    )
    assert {"name": "screendump"} in commands["result"]["return"], commands
    refused = call(setup, "instance.qmp", {"name": running, "command": "cont"}, member=False)
    assert "instance.resume" in refused["error"]["message"], refused


@pytest.mark.parametrize(
    "command", ["info history", "info registers", "x /4x 0", "help", "i /b 0x60", "sendkey a"]
)
def test_a_member_may_run_read_only_info_commands_only(
    setup: Setup, running: str, command: str
) -> None:
    params = {"name": running, "command": command}
    error = call(setup, "instance.monitor", params, member=True)["error"]
    assert (error["code"], error["data"]["path"]) == (7, "command"), error


#: HMP commands that bypass the daemon, and what the refusal points to.
BYPASSING_HMP = [
    ("quit", "instance.stop"),
    ("q", "instance.stop"),
    ("  quit", "instance.stop"),
    ("stop", "instance.pause"),
    ("s", "instance.pause"),
    ("cont", "instance.resume"),
    ("c", "instance.resume"),
    ("system_reset", "instance.reboot"),
    ("system_powerdown", "instance.stop"),
    ("balloon 64", "instance.balloon"),
    ("migrate -d tcp:127.0.0.1:1", "migration"),
    ("migrate_set_parameter max-bandwidth 1", "migration"),
    ("change ide1-cd0 /etc/shadow", "host"),
    ("drive_add 0 file=/etc/shadow,if=none,id=x", "host"),
    ("device_add e1000", "host"),
    ("netdev_add user,id=n0", "host"),
    ("savevm snap", "host"),
    ("screendump {out}/screen", "host"),
    ("pmemsave 0 4096 {out}/mem", "host"),
    ("dump-guest-memory {out}/mem", "host"),
    ("chardev-add file,id=f,path={out}/chr", "host"),
    ("object_add secret,id=s0,file=/etc/shadow", "host"),
    ("block_resize x 1", "host"),
    ("snapshot_blkdev x", "host"),
    ("nbd_server_start 127.0.0.1:1", "host"),
    ("getfd fd0", "host"),
    ("logfile {out}/log", "host"),
    ("gdbserver", "host"),
]


@pytest.mark.parametrize(("command", "instead"), BYPASSING_HMP, ids=[c for c, _ in BYPASSING_HMP])
def test_hmp_commands_that_bypass_the_daemon_are_refused_to_root(
    setup: Setup, running: str, command: str, instead: str
) -> None:
    command = command.format(out=setup.outside)
    error = call(setup, "instance.monitor", {"name": running, "command": command}, member=False)[
        "error"
    ]
    assert (error["code"], error["data"]["path"]) == (7, "command"), error
    assert instead in error["message"], error
    for leftover in ("screen", "mem", "chr", "log"):
        assert not (setup.outside / leftover).exists()
    info = call(setup, "instance.info", {"name": running}, member=False)["result"]
    assert info["state"] == "paused", info


def test_root_may_run_other_hmp_commands(setup: Setup, running: str) -> None:
    for command in ("info status", "info history", "help info"):
        response = call(
            setup, "instance.monitor", {"name": running, "command": command}, member=False
        )
        assert "result" in response, response


def test_no_password_in_errors_or_the_log(setup: Setup, running: str) -> None:
    secret = "s3cr3t-pw"
    monitor = [
        f"change vnc password {secret}",
        f"set_password vnc {secret}",
        f"set_password {secret} vnc",
        f"set_password vnc {secret}\x07",
    ]
    requests: list[dict[str, Any]] = [
        {"method": "instance.monitor", "params": {"name": running, "command": command}}
        for command in monitor
    ]
    requests += [
        {
            "method": "instance.qmp",
            "params": {"name": running, "command": "set_password", "arguments": arguments},
        }
        for arguments in (
            {"protocol": "vnc", "password": secret},
            {"protocol": secret, "password": secret},
        )
    ]
    for member in (False, True):
        responses = rpc_as(setup, requests, member=member)
        for response in responses:
            assert "error" in response, response
            assert secret not in json.dumps(response), response
    assert secret not in setup.daemon.log.read_text()


# -- the rules on their own ----------------------------------------------------------------


def _member_config(images: Path) -> Config:
    return Config(image_dirs=[str(images)])


def test_a_qcow2_whose_backing_format_is_not_recorded_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"\0" * 4096)
    image = tmp_path / "probed.qcow2"
    _qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(image))
    # Rename the backing-format header extension to an unknown one (QEMU skips those).
    data = image.read_bytes()
    image.write_bytes(data.replace(BACKING_FORMAT_EXTENSION, b"\x12\x34\x56\x78", 1))
    spec = decode_spec({"name": "vm", "disks": [{"path": str(image), "format": "qcow2"}]})
    with pytest.raises(InvalidConfigError, match="no recorded format") as refused:
        check_member_spec(spec, _member_config(tmp_path))
    assert refused.value.path == "spec.disks[0].path"


def test_a_backing_chain_inside_the_image_dirs_is_followed_to_its_end(tmp_path: Path) -> None:
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    (images / "base.raw").write_bytes(b"\0" * 4096)
    previous, previous_format = "base.raw", "raw"
    for depth in range(3):
        name = f"layer{depth}.qcow2"
        _qemu_img(
            "create", "-f", "qcow2", "-b", previous, "-F", previous_format, str(images / name)
        )
        previous, previous_format = name, "qcow2"
    spec = decode_spec(
        {"name": "vm", "disks": [{"path": str(images / previous), "format": "qcow2"}]}
    )
    check_member_spec(spec, _member_config(images))
    # The same chain, its base moved out of the image dir behind a symlink.
    (images / "base.raw").rename(outside / "base.raw")
    (images / "base.raw").symlink_to(outside / "base.raw")
    with pytest.raises(InvalidConfigError, match=r"its backing file .*base\.raw") as refused:
        check_member_spec(spec, _member_config(images))
    assert refused.value.path == "spec.disks[0].path"
    assert f"resolved: {outside / 'base.raw'}" in str(refused.value)


@pytest.mark.parametrize(
    ("nic", "field", "reason"),
    [
        ({"mode": "routed", "ip": "192.0.2.7"}, "mode", "routed NIC adds host routes"),
        ({"link": "br-admin"}, "link", "'br-admin' is not in member_links"),
        ({"mode": "openvswitch", "link": "ovs-admin"}, "link", "not in member_links"),
        ({"link": "br-members", "vlan": 7}, "vlan", "only root may choose a VLAN"),
    ],
)
def test_a_member_attaches_nics_to_member_links_only(
    tmp_path: Path, nic: dict[str, object], field: str, reason: str
) -> None:
    config = Config(image_dirs=[str(tmp_path)], member_links=["br-members"])
    check_member_spec(decode_spec({"name": "vm", "nics": [{"link": "br-members"}]}), config)
    spec = decode_spec({"name": "vm", "nics": [{"link": "br-members"}, nic]})
    with pytest.raises(InvalidConfigError, match=reason) as refused:
        check_member_spec(spec, config)
    assert refused.value.path == f"spec.nics[1].{field}"


def test_image_dirs_are_resolved_against_the_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "supervisor.toml"
    config_file.write_text('image_dirs = ["images", "/srv/images"]\n')
    assert load_config(config_file).image_dirs == [str(tmp_path / "images"), "/srv/images"]
    with pytest.raises(InvalidConfigError) as refused:
        check_config(Config(image_dirs=["images"]))
    assert refused.value.path == "image_dirs[0]"


@pytest.mark.parametrize(
    ("line", "name"),
    [("quit", "quit"), ("  q  ", "q"), ("x/4x 0", "x"), ("info\tstatus", "info"), ("", "")],
)
def test_hmp_command_names_are_read_as_qemu_reads_them(line: str, name: str) -> None:
    assert hmp_command_name(line)[0] == name


def test_hmp_info_subcommands_are_read_as_qemu_reads_them() -> None:
    assert hmp_refusal("info   status", read_only=True) is None
    assert hmp_refusal("info history", read_only=True) is not None
    assert hmp_refusal("x/4x 0", read_only=True) is not None
    assert hmp_refusal("x/4x 0") is None
