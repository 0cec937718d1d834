"""KVM usability and the accelerator each kvm_flag value leads to, with its warnings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from supervisor.model.errors import InvalidConfigError
from supervisor.qemu.accel import Accelerator, KvmAvailability, probe_kvm, resolve_accelerator

STOCK = KvmAvailability(device_openable=True, pvm_host=False)
PVM = KvmAvailability(device_openable=True, pvm_host=True, reason="this is a kvm_pvm host")
MISSING = KvmAvailability(
    device_openable=False, pvm_host=False, reason="/dev/kvm cannot be opened: No such file"
)


def test_probe_stock_host(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    found = probe_kvm(str(device), str(tmp_path / "no-module"))
    assert found == STOCK
    assert found.usable_for_stock_guests


def test_probe_pvm_host(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    module = tmp_path / "kvm_pvm"
    module.mkdir()
    found = probe_kvm(str(device), str(module))
    assert found.device_openable and found.pvm_host
    assert not found.usable_for_stock_guests
    assert "kvm_pvm host" in found.reason and str(module) in found.reason


def test_probe_without_device(tmp_path: Path) -> None:
    found = probe_kvm(str(tmp_path / "kvm"), str(tmp_path / "no-module"))
    assert not found.device_openable
    assert not found.usable_for_stock_guests
    assert found.reason == f"{tmp_path / 'kvm'} cannot be opened: No such file or directory"


def test_probe_this_host() -> None:
    # These machines have a kvm_pvm /dev/kvm: openable, but not for stock guests.
    found = probe_kvm()
    assert found.pvm_host == Path("/sys/module/kvm_pvm").exists()
    if found.pvm_host:
        assert not found.usable_for_stock_guests


@pytest.mark.parametrize(
    ("kvm_flag", "kvm", "accel", "warning"),
    [
        ("", STOCK, Accelerator.KVM, None),
        ("", PVM, Accelerator.TCG, "KVM is not usable for stock guests: using TCG (slow)"),
        ("", MISSING, Accelerator.TCG, "KVM is not usable for stock guests: using TCG (slow)"),
        ("enabled", STOCK, Accelerator.KVM, None),
        (
            "enabled",
            PVM,
            Accelerator.KVM,
            "KVM as requested; only a PVM-enabled guest kernel will boot",
        ),
        ("disabled", STOCK, Accelerator.TCG, None),
        ("disabled", MISSING, Accelerator.TCG, None),
    ],
)
def test_resolve(
    kvm_flag: str,
    kvm: KvmAvailability,
    accel: Accelerator,
    warning: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="supervisor"):
        assert resolve_accelerator(kvm_flag, kvm, instance="vm1") is accel
    logs = [(record.levelname, getattr(record, "event_dict", None)) for record in caplog.records]
    if warning is None:
        assert logs == []
    else:
        assert logs == [("WARNING", {"event": warning, "instance": "vm1", "reason": kvm.reason})]


def test_enabled_without_device_is_a_clear_error() -> None:
    with pytest.raises(InvalidConfigError) as caught:
        resolve_accelerator("enabled", MISSING, instance="vm1")
    assert caught.value.path == "spec.hvparams.kvm_flag"
    assert str(caught.value) == (
        "spec.hvparams.kvm_flag: enabled, but /dev/kvm cannot be opened: No such file"
    )
