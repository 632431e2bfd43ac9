# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""Hot(un)plug below the scenarios: the PCI layer's slot and ACPI registers against real QEMU,
the machine layer's QMP part (device_add typing, DEVICE_DELETED and its absence), PciBus's
reserved windows and rescan, bad input, and the plugin's ``virtio_device(hotplug=True)``."""

from __future__ import annotations

from typing import Any

import pytest

from qtest_virtio import MachineSpec
from qtest_virtio.machine.qdev import HotplugError, device_add_arguments, wait_event
from qtest_virtio.pci import Msix, regs
from qtest_virtio.pci.hotplug import AcpiPciHotplug, HotplugSlotError, PcieSlot

pytest_plugins = ["pytester"]
INNER = ["-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:cacheprovider", "-p", "no:xdist"]


def _spec(machine: str, **kw: Any) -> tuple[MachineSpec, str]:
    spec = MachineSpec(machine=machine)
    dev = spec.add_virtio("virtio-rng-pci", mode="modern", hotplug=True, **kw)
    return spec, dev.id


# -- q35: native PCI Express hot-plug ---------------------------------------------------------


def test_spec_adds_a_native_hotplug_root_port() -> None:
    spec, dev_id = _spec("q35")
    port = spec.device(spec.device(dev_id).props["bus"])
    assert port.driver == "pcie-root-port" and spec.device(dev_id).hotplug_port == port.id
    assert port.props["io-reserve"] == "4K" and port.props["mem-reserve"] == "2M"
    assert spec.extra_args == ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    second = spec.add_virtio("virtio-rng-pci", hotplug=True)
    assert second.props["bus"] != port.id and spec.extra_args.count("-global") == 1
    assert spec.device(second.props["bus"]).props["chassis"] != port.props["chassis"]
    with pytest.raises(ValueError, match=r"hotplug=True needs a machine with PCI hot-plug: q35 .* or pc"):
        MachineSpec(machine="microvm").add_virtio("virtio-rng-pci", hotplug=True)


def test_slot_registers_through_plug_and_unplug(machine_factory) -> None:
    """The slot as QEMU presents it: hot-plug capable with an attention button, power
    controller and indicators, empty and powered off after reset; device_add shows Presence
    Detect Changed with the device present and the link active, and raises the port's MSI-X
    hot-plug interrupt; device_del presses the attention button; powering off removes it."""
    spec, dev_id = _spec("q35")
    vm = machine_factory(spec)
    vm.pci.assign_bars()
    port = vm.pci_function(spec.device(dev_id).hotplug_port)
    assert port.reserved is not None, "the empty hot-plug port got no reserved windows"
    msix = Msix(port)
    slot = PcieSlot(port, msix)
    msix.route_to_ram(vm.memory, slot.vector + 1)
    caps = slot.capabilities
    assert {k: caps[k] for k in ("HPC", "ABP", "PCP", "PIP", "AIP")} == dict.fromkeys(
        ("HPC", "ABP", "PCP", "PIP", "AIP"), 1
    )
    assert not slot.present and not slot.link_active()
    assert regs.SLTCTL.PCC.get(slot.control()) == regs.POWER_OFF, "an empty slot is powered off after reset"
    slot.enable_notifications()
    ctl = regs.SLTCTL.decode(slot.control())
    assert (ctl["PDCE"], ctl["ABPE"], ctl["HPIE"], ctl["CCIE"]) == (1, 1, 1, 1)
    assert slot.status() & regs.SLTSTA_EVENTS == 0
    assert not msix.fired(slot.vector)
    vm.device_add(vm.hotplug_options(dev_id)[0])
    msix.wait(slot.vector, timeout=2)
    status = regs.SLTSTA.decode(slot.status())
    assert (status["PDC"], status["PDS"]) == (1, 1) and slot.link_active()
    slot.msix = None  # the interrupt was taken above
    slot.handle_plug()
    assert slot.status() & regs.SLTSTA_EVENTS == 0, "the RW1C write left events set"
    ctl = regs.SLTCTL.decode(slot.control())
    assert (ctl["PCC"], ctl["PIC"]) == (regs.POWER_ON, regs.INDICATOR_ON)
    assert vm.pci.rescan(port.secondary_bus)[0].vendor_id == 0x1AF4
    vm.device_del(dev_id)
    assert regs.SLTSTA.ABP.get(slot.status()), "device_del pressed no attention button"
    assert vm.wait_event("DEVICE_DELETED", 0.2, device=dev_id) is None, "deleted before the guest answered"
    slot.handle_unplug_request()
    vm.wait_device_deleted(dev_id, timeout=2)
    removal = slot.handle_removal()
    assert removal.has("PDC") and not removal.has("PDS") and not removal.link_active
    assert vm.pci.rescan(port.secondary_bus) == [] and vm.pci.devices().count(port) == 1


def test_plugged_device_gets_bars_inside_the_reserved_window(machine_factory) -> None:
    spec, dev_id = _spec("q35")
    vm = machine_factory(spec)
    before = vm.pci.assign_bars()
    fn = vm.plug(dev_id)
    port = vm.pci.bridge_of(fn)
    assert port is not None and port.reserved is not None
    lo, hi = port.reserved.mmio
    io_lo, io_hi = port.reserved.io
    assert (hi - lo, io_hi - io_lo) == (2 << 20, 0x1000), "not the port's mem-reserve=2M, io-reserve=4K hints"
    assert (
        port.config.read(regs.TYPE1_HEADER.memory_base) << 16,
        port.config.read(regs.TYPE1_HEADER.io_base) << 8,
    ) == (
        lo,
        io_lo,
    ), "the bridge does not forward the reserved windows"
    assert all(lo <= b.address < hi for b in fn.bars if b.address is not None and not b.is_io)
    assert all(a is b for a, b in zip(before, [f for f in vm.pci.devices() if f is not fn], strict=True)), (
        "the rescan replaced objects of functions that were there before"
    )
    vm.unplug(dev_id)
    assert port.reserved.mmio_next == lo, "the emptied slot's window was not rewound"


def test_unplug_from_a_port_without_hotplug_is_refused(machine_factory) -> None:
    spec = MachineSpec(machine="q35")
    spec.add_device("pcie-root-port", id="rp9", chassis=9, slot=9, hotplug=False)
    dev = spec.add_virtio("virtio-rng-pci", mode="modern", bus="rp9")
    vm = machine_factory(spec)
    with pytest.raises(
        HotplugError,
        match=r"^device_del rng0: (Bus 'rp9' does not support hotplugging|Hot-unplug failed: unsupported by)",
    ):
        vm.unplug(dev.id)
    assert vm.pci_function(dev.id).vendor_id == 0x1AF4


def test_no_device_deleted_is_a_clear_error(machine_factory) -> None:
    """A guest that never answers the unplug request: QEMU keeps the device, and the wait says
    which device and why."""
    spec, dev_id = _spec("q35")
    vm = machine_factory(spec)
    vm.plug(dev_id)
    vm.request_unplug(dev_id)
    with pytest.raises(HotplugError, match=rf"QEMU did not delete device '{dev_id}' within 0.3 s"):
        vm.wait_device_deleted(dev_id, timeout=0.3)
    assert vm.pci_address(dev_id) is not None


def test_bad_input_is_named(machine_factory) -> None:
    spec, dev_id = _spec("q35")
    cold = spec.add_virtio("virtio-rng-pci", mode="modern")
    vm = machine_factory(spec)
    with pytest.raises(HotplugError, match=r"'rng1' was not declared for hot-plug; add it with spec\.add_virtio"):
        vm.plug(cold.id)
    with pytest.raises(HotplugError, match=rf"'{dev_id}' is not plugged .*; plug it first"):
        vm.unplug(dev_id)
    vm.plug(dev_id)
    with pytest.raises(HotplugError, match=f"'{dev_id}' is already plugged; unplug it first"):
        vm.plug(dev_id)
    with pytest.raises(HotplugSlotError, match="no PCI Express port"):
        PcieSlot(vm.pci_function(cold.id))


# -- pc: ACPI PCI hot-plug --------------------------------------------------------------------


def test_acpi_bitmaps_through_plug_and_unplug(machine_factory) -> None:
    """PIIX4's registers: the GPE is raised for device_add with the slot's bit in PCIU (read
    once: reading clears it), for device_del with it in PCID, and the eject clears PCID."""
    spec, dev_id = _spec("pc")
    vm = machine_factory(spec)
    vm.pci.assign_bars()
    acpi = AcpiPciHotplug(vm.qtest)
    acpi.enable()
    removable = acpi.removable()
    assert not removable & 0b11, "the host bridge and the ISA bridge are not removable"
    assert not acpi.gpe_pending()
    vm.device_add(vm.hotplug_options(dev_id)[0])
    bus, slot, _ = vm.pci_address(dev_id)
    assert bus == 0 and removable >> slot & 1
    assert acpi.gpe_pending()
    up, down = acpi.handle_event()
    assert (up, down) == (1 << slot, 0)
    assert not acpi.gpe_pending(), "writing 1 to GPE0_STS bit 1 did not clear it"
    assert acpi.regs.read(regs.ACPI_PCIHP.PCIU) == 0, "PCIU not cleared by the read"
    vm.pci.rescan(0)
    vm.device_del(dev_id)
    assert acpi.gpe_pending()
    assert acpi.regs.read(regs.ACPI_PCIHP.PCID) == 1 << slot
    acpi.unplug_requested(slot)
    vm.wait_device_deleted(dev_id, timeout=2)
    assert acpi.regs.read(regs.ACPI_PCIHP.PCID) == 0
    with pytest.raises(HotplugSlotError, match="no PCI hot-plug GPE pending"):
        acpi.handle_event()


# -- the QMP part: pure logic -----------------------------------------------------------------


def test_device_add_arguments_are_typed(qemu_binary) -> None:
    args = device_add_arguments("virtio-blk-pci,id=b0,drive=b0-backend,event_idx=off,num-queues=2,bus=rp0", qemu_binary)
    assert args == {
        "driver": "virtio-blk-pci",
        "id": "b0",
        "drive": "b0-backend",
        "event_idx": False,
        "num-queues": 2,
        "bus": "rp0",
    }
    assert device_add_arguments("pcie-root-port,io-reserve=4K,serial=a,,b", qemu_binary)["io-reserve"] == 4096


def test_wait_event_keeps_what_it_skips() -> None:
    events: list[dict[str, Any]] = [{"event": "RESUME"}]
    events.append({"event": "DEVICE_DELETED", "data": {"path": "/x/virtio-backend"}})
    events.append({"event": "DEVICE_DELETED", "data": {"device": "d0", "path": "/machine/peripheral/d0"}})

    def pull(timeout: float) -> dict[str, Any] | None:
        if not events:
            raise TimeoutError
        return events.pop(0)

    backlog: list[dict[str, Any]] = []
    found = wait_event(pull, "DEVICE_DELETED", {"device": "d0"}, 1.0, backlog)
    assert found is not None and found["data"]["device"] == "d0"
    assert [e["event"] for e in backlog] == ["RESUME", "DEVICE_DELETED"]
    assert wait_event(pull, "RESUME", {}, 1.0, backlog) == {"event": "RESUME"} and len(backlog) == 1
    assert wait_event(pull, "DEVICE_DELETED", {"device": "d1"}, 0.1, backlog) is None


# -- the plugin keyword -----------------------------------------------------------------------

PLUGGED = """
import pytest

@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"], rings=("split",), hotplug=True)
def test_plugged(virtio_device, qemu):
    bus = virtio_device.fn.bdf_addr.bus
    assert (bus != 0) == ("q35" in qemu.spec.machine)
    assert len(virtio_device.request(8)) > 0
    qemu.unplug(virtio_device.dev_id)
    assert qemu.pci.config.read(virtio_device.fn.bdf_addr, 0, 2) == 0xFFFF
"""

NOT_A_BOOL = """
import pytest

@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"], rings=("split",), hotplug="yes")
def test_not_a_bool(virtio_device):
    pass
"""


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_plugin_hotplug_keyword(pytester: pytest.Pytester, qemu_binary, machine: str) -> None:
    pytester.makepyfile(test_plugged=PLUGGED, test_not_a_bool=NOT_A_BOOL)
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", f"--qemu-machine={machine}", "test_plugged.py")
    res.assert_outcomes(passed=1)
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "test_not_a_bool.py")
    res.stdout.fnmatch_lines(["*virtio_device(hotplug='yes') takes True or False*"])
