"""Error types: one per application code, with the RPC error's data."""

from __future__ import annotations

import msgspec
import pytest

from supervisor.model.errors import (
    Busy,
    HypervisorError,
    InstanceExists,
    InstanceNotFound,
    InstanceNotRunning,
    InvalidConfigError,
    InvalidParams,
    MigrationError,
    MonitorError,
    NetworkError,
    OperationTimeout,
    SupervisorError,
)


@pytest.mark.parametrize(
    ("error", "code", "message", "data"),
    [
        (InstanceNotFound("vm"), 1, "instance 'vm' not found", {"name": "vm"}),
        (InstanceExists("vm"), 2, "instance 'vm' already exists", {"name": "vm"}),
        (
            InstanceNotRunning("vm", "paused"),
            3,
            "instance 'vm' is not running (state paused)",
            {"name": "vm"},
        ),
        (
            HypervisorError("qemu died", stderr="boom", exit_status=1),
            4,
            "qemu died",
            {"stderr": "boom", "exit_status": 1},
        ),
        (
            MonitorError("CommandNotFound", "no such command"),
            5,
            "CommandNotFound: no such command",
            {"class": "CommandNotFound", "desc": "no such command"},
        ),
        (OperationTimeout("stop", 2.5), 6, "stop timed out after 2.5 s", {"timeout_s": 2.5}),
        (
            InvalidConfigError("spec.vcpus", "too many"),
            7,
            "spec.vcpus: too many",
            {"path": "spec.vcpus", "reason": "too many"},
        ),
        (MigrationError("cancelled"), 8, "cancelled", {}),
        (
            Busy("vm", "migration"),
            9,
            "instance 'vm' is busy with migration",
            {"name": "vm", "operation": "migration"},
        ),
        (
            NetworkError("tap0", "no such bridge br9"),
            10,
            "tap0: no such bridge br9",
            {"interface": "tap0", "reason": "no such bridge br9"},
        ),
        (
            InvalidParams("spec.name", "bad"),
            -32602,
            "spec.name: bad",
            {"path": "spec.name", "reason": "bad"},
        ),
    ],
)
def test_codes_messages_and_data(
    error: SupervisorError, code: int, message: str, data: dict[str, object]
) -> None:
    assert error.code == code
    assert str(error) == message
    assert error.data == data
    assert isinstance(error, SupervisorError)


def test_application_codes_are_one_to_ten() -> None:
    classes: list[type[SupervisorError]] = [
        InstanceNotFound,
        InstanceExists,
        InstanceNotRunning,
        HypervisorError,
        MonitorError,
        OperationTimeout,
        InvalidConfigError,
        MigrationError,
        Busy,
        NetworkError,
    ]
    assert [cls.code for cls in classes] == list(range(1, 11))


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    port: int


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    items: list[Inner] = []


@pytest.mark.parametrize(
    ("value", "root", "path", "reason"),
    [
        ({"name": 1}, "spec", "spec.name", "Expected `str`, got `int`"),
        ({"name": "x", "items": [{"port": 1}, {"port": "a"}]}, "spec", "spec.items[1].port", None),
        ({"name": "x", "extra": 1}, "spec", "spec.extra", "unknown field"),
        ({"name": "x", "items": [{}]}, "spec", "spec.items[0].port", "missing required field"),
        ({}, "", "name", "missing required field"),
        ({"name": 1}, "", "name", "Expected `str`, got `int`"),
        ([], "", "$", "Expected `object`, got `array`"),
    ],
)
def test_paths_from_msgspec_errors(value: object, root: str, path: str, reason: str | None) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(value, Outer)
    error = InvalidParams.from_validation_error(caught.value, root)
    assert error.path == path
    if reason is not None:
        assert error.reason == reason
