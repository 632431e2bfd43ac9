# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""A newcomer's tests: written only against design.md's "Stable Python surface" and its pytest
plugin section (names, fixtures, markers, options), as a user who read nothing else would.
If one of these fails, the documented contract is broken, whatever the rest of the suite says.
(The modern-layout mode set is the library's own; tests/test_testing.py pins it to design.md's names.)"""

from __future__ import annotations

import collections.abc
import os

import pytest

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.testing import MODERN_LAYOUT_MODES


@pytest.fixture
def qemu_path(request: pytest.FixtureRequest) -> str:
    """The binary under test as design.md names it: --qemu PATH, else $QEMU, else PATH's."""
    return str(request.config.getoption("--qemu") or os.environ.get("QEMU") or "qemu-system-x86_64")


def test_machine_surface(qemu_path: str) -> None:
    spec = MachineSpec(qemu=qemu_path, machine="q35", memory="256M")
    spec.add_device("virtio-blk-pci", event_idx="off")
    data = bytes(range(256)) * 4
    with Machine(spec) as vm:
        assert vm.pid > 0
        vm.qtest.outl(0xCF8, 0x80000000)  # bus 0, device 0, function 0, register 0: the host bridge
        vendor_device = vm.qtest.inl(0xCFC)
        assert vendor_device not in (0, 0xFFFFFFFF)
        vm.qtest.writel(0x100000, 1)
        assert vm.qtest.readl(0x100000) == 1
        vm.qtest.memwrite(0x200000, data)
        assert vm.qtest.memread(0x200000, len(data)) == data
        status = vm.qmp.cmd("query-status")  # qemu.qmp types a command's result as object
        assert isinstance(status, dict) and status["status"] in ("prelaunch", "running", "paused")
        devices = list(vm.pci.devices())
        assert devices[0].bdf == "00:00.0" and devices[0].vendor_id == vendor_device & 0xFFFF
        blk = [d for d in devices if (d.vendor_id, d.device_id) == (0x1AF4, 0x1001)]
        assert len(blk) == 1 and blk[0].class_code >> 8 == 0x0100  # transitional virtio-blk: SCSI storage


def test_virtio_surface_negotiated_is_a_set_of_names(qemu_path: str) -> None:
    spec = MachineSpec(qemu=qemu_path, machine="q35")
    spec.add_virtio("virtio-rng-pci", mode="modern", id="rng0", packed="on")
    with Machine(spec) as vm:
        rng = vm.virtio("rng0", refuse={"EVENT_IDX"})
        assert len(rng.read(64)) == 64  # type: ignore[attr-defined]  # design.md's vm.virtio(id) types the base driver
        assert rng.transport.mode == "modern"
        negotiated = rng.negotiated
        assert isinstance(negotiated, collections.abc.Set)
        assert "VERSION_1" in negotiated and "RING_PACKED" in negotiated
        assert "EVENT_IDX" not in negotiated  # refused
        names = set(negotiated)
        assert {"VERSION_1", "RING_PACKED"} <= names and "EVENT_IDX" not in names
        # mypy's strict equality does not see that a collections.abc.Set compares with a set
        assert negotiated == names and names == negotiated and len(negotiated) == len(names)  # type: ignore[comparison-overlap]
        assert all(isinstance(n, str) and n.isupper() for n in negotiated)
        assert not negotiated & {"EVENT_IDX"} and negotiated - {"VERSION_1"} == names - {"VERSION_1"}


@pytest.mark.virtio_device("virtio-rng-pci")
def test_plugin_surface(virtio_device, qemu, qtest, qmp) -> None:
    """The fixtures of design.md's plugin section, on each selected transport mode and ring."""
    assert len(virtio_device.read(16)) == 16
    mode = virtio_device.transport.mode
    assert ("VERSION_1" in virtio_device.negotiated) == (mode in MODERN_LAYOUT_MODES)
    assert "BAD_FEATURE" not in set(virtio_device.negotiated)
    assert qemu.pid > 0 and qtest is qemu.qtest and qmp is qemu.qmp
