# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""PCI layer against real QEMU: enumeration, config mechanisms, BARs, bridges, MSI-X."""

from __future__ import annotations

import pytest

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.errors import QtestVirtioError
from qtest_virtio.pci import Bdf, Cf8Access, EcamAccess, Msix, PciBus, PciError, PciFunction, regs
from qtest_virtio.registers import RegisterBlock
from qtest_virtio.transport import VirtioPciMap, layout

HOST_BRIDGE = {"q35": (0x8086, 0x29C0), "pc": (0x8086, 0x1237)}
VIRTIO = layout.VIRTIO_PCI_VENDOR_ID


def virtio_caps(fn: PciFunction) -> dict[int, dict[str, int]]:
    """cfg_type -> decoded virtio_pci_cap fields, for every virtio vendor capability."""
    out: dict[int, dict[str, int]] = {}
    for cap in fn.vendor_capabilities():

        def read(o: int, w: int, c: int = cap.offset) -> int:
            return fn.read_config(c + o, w)

        block = RegisterBlock(layout.VIRTIO_PCI_CAP, read, lambda *a: None)
        fields = dict(block.dump())
        out[fields["cfg_type"]] = fields
    return out


def common_cfg(fn: PciFunction) -> RegisterBlock[layout.CommonCfgLayout]:
    cap = virtio_caps(fn)[layout.CFG_TYPE_COMMON]
    bar, base = cap["bar"], cap["offset"]
    return RegisterBlock(
        layout.COMMON_CFG,
        lambda off, w: fn.bar_read(bar, base + off, w),
        lambda off, w, v: fn.bar_write(bar, base + off, w, v),
    )


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_enumeration_finds_host_bridge_and_each_device(machine_factory, machine: str) -> None:
    spec = MachineSpec(machine=machine)
    spec.add_virtio("virtio-blk-pci", mode="transitional-modern", backend="null")
    spec.add_virtio("virtio-rng-pci", mode="legacy")
    spec.add_virtio("virtio-net-pci", mode="modern")
    vm = machine_factory(spec)
    devices = vm.pci.devices()
    host = devices[0]
    assert (host.bdf, host.vendor_id, host.device_id) == ("00:00.0", *HOST_BRIDGE[machine])
    assert host.class_code >> 8 == 0x0600  # host bridge
    virtio = [(d.device_id, d.class_code, d.revision_id) for d in devices if d.vendor_id == VIRTIO]
    # transitional blk 0x1001 (mass storage), legacy rng 0x1005, modern net 0x1041 (rev 1, §4.1.2.1)
    assert (0x1001, 0x010000, 0) in virtio
    assert (0x1005, 0x00FF00, 0) in virtio
    assert (0x1041, 0x020000, 1) in virtio
    assert len(virtio) == 3


@pytest.mark.parametrize(
    ("mode", "device_id", "cfg_types", "io_bar"),
    [
        ("transitional-modern", 0x1001, {1, 2, 3, 4, 5}, True),
        ("legacy", 0x1001, set(), True),
        ("modern", 0x1042, {1, 2, 3, 4, 5}, False),
    ],
)
def test_virtio_capabilities_per_device_kind(machine_factory, mode, device_id, cfg_types, io_bar) -> None:
    spec = MachineSpec()
    spec.add_virtio("virtio-blk-pci", mode=mode, backend="null")
    vm = machine_factory(spec)
    vm.pci.assign_bars()
    fn = vm.pci.find(vendor_id=VIRTIO)
    assert fn.device_id == device_id
    # Transitional and legacy devices carry the virtio device type in the subsystem ID
    # (§4.1.2.3); modern-only ones need not, and QEMU puts its own 0x1100 there.
    assert fn.subsystem == (VIRTIO, 2 if io_bar else 0x1100)
    cap_ids = [c.id for c in fn.capabilities()]
    assert regs.CAP_ID_MSIX in cap_ids
    assert set(virtio_caps(fn)) == cfg_types
    assert VirtioPciMap.of(fn).has_legacy_bar == io_bar
    for cfg in virtio_caps(fn).values():
        if cfg["cfg_type"] != layout.CFG_TYPE_PCI:
            bar = fn.bar(cfg["bar"])
            assert cfg["offset"] + cfg["length"] <= bar.size  # each window lies inside its BAR


def test_cf8_and_ecam_agree(machine_factory) -> None:
    spec = MachineSpec(machine="q35")
    spec.add_virtio("virtio-blk-pci", backend="null")
    spec.add_device("pcie-root-port", id="rp1", chassis=1)
    spec.add_virtio("virtio-net-pci", mode="modern", bus="rp1")
    vm = machine_factory(spec)
    bus = PciBus(vm.qtest, "q35", access="ecam")
    cf8, ecam = Cf8Access(vm.qtest), bus.config
    assert isinstance(ecam, EcamAccess)
    functions = bus.devices()
    assert any(f.bdf_addr.bus == 1 for f in functions)  # behind the root port, numbered by us
    for fn in functions:
        for off in range(0, 0x100, 4):
            assert cf8.read(fn.bdf_addr, off, 4) == ecam.read(fn.bdf_addr, off, 4), f"{fn.bdf} +{off:#x}"
        assert cf8.read(fn.bdf_addr, 2, 2) == ecam.read(fn.bdf_addr, 2, 2)
        assert cf8.read(fn.bdf_addr, 0xE, 1) == ecam.read(fn.bdf_addr, 0xE, 1)
    # A write through one is seen through the other.
    blk = next(f for f in functions if f.vendor_id == VIRTIO and f.device_id == 0x1001)
    ecam.write(blk.bdf_addr, regs.TYPE0_HEADER.interrupt_line.offset, 1, 0x5A)
    assert cf8.read(blk.bdf_addr, regs.TYPE0_HEADER.interrupt_line.offset, 1) == 0x5A


def test_ecam_reaches_extended_capabilities(machine_factory) -> None:
    spec = MachineSpec(machine="q35")
    spec.add_device("pcie-root-port", id="rp1", chassis=1)
    vm = machine_factory(spec)
    port = vm.pci.find(vendor_id=0x1B36, device_id=0x000C)
    ext = [c for c in port.capabilities() if c.extended]
    assert ext and ext[0].offset == regs.EXT_CAP_START
    assert "Advanced Error Reporting" in [c.name for c in ext]
    with pytest.raises(ValueError, match="outside"):
        Cf8Access(vm.qtest).read(port.bdf_addr, 0x100, 4)


def test_pc_has_no_ecam(machine_factory) -> None:
    vm = machine_factory(MachineSpec(machine="pc"))
    with pytest.raises(ValueError, match="q35"):
        PciBus(vm.qtest, "pc", access="ecam")
    assert vm.pci.config.name == "CF8/CFC"


@pytest.mark.parametrize("event_idx", ["on", "off"])
def test_legacy_bar_reads_device_features(machine_factory, event_idx: str) -> None:
    spec = MachineSpec()
    spec.add_virtio("virtio-blk-pci", mode="legacy", backend="null", event_idx=event_idx)
    vm = machine_factory(spec)
    vm.pci.assign_bars()
    fn = vm.pci.find(vendor_id=VIRTIO)
    features = fn.bar_read(0, layout.LEGACY_CFG.device_features.offset, 4)
    names = layout.feature_names(features)
    assert ("EVENT_IDX" in names) == (event_idx == "on")
    assert "INDIRECT_DESC" in names and "VERSION_1" not in names  # legacy must not offer VERSION_1


@pytest.mark.parametrize("mmio64", [False, True], ids=["below-4G", "above-4G"])
def test_modern_bar_reads_num_queues(machine_factory, mmio64: bool) -> None:
    spec = MachineSpec()
    spec.add_virtio("virtio-blk-pci", {"num-queues": 3}, mode="modern", backend="null")
    vm = machine_factory(spec)
    bus = PciBus(vm.qtest, "q35", mmio64=mmio64)
    bus.assign_bars()
    fn = bus.find(vendor_id=VIRTIO)
    bar4 = fn.bar(4)
    assert bar4.kind == "mem64"
    assert (bar4.address is not None and bar4.address >= 1 << 32) == mmio64
    assert common_cfg(fn).read(layout.COMMON_CFG.num_queues) == 3
    assert regs.COMMAND.memory_space.get(fn.config.read(regs.TYPE0_HEADER.command))


def test_bar_access_is_checked(machine_factory) -> None:
    spec = MachineSpec()
    spec.add_virtio("virtio-rng-pci", mode="modern")
    vm = machine_factory(spec)
    fn = vm.pci.find(vendor_id=VIRTIO)
    fn.size_bars()
    with pytest.raises(PciError, match="not assigned"):
        fn.bar_read(4, 0, 4)
    vm.pci.assign_bars()
    with pytest.raises(ValueError, match="outside"):
        fn.bar_read(4, fn.bar(4).size, 4)
    with pytest.raises(PciError, match="no BAR0"):
        fn.bar_read(0, 0, 4)


def test_bridges_are_numbered_and_forward(machine_factory) -> None:
    spec = MachineSpec(machine="pc")
    spec.add_device("pci-bridge", id="br0", chassis_nr=1, addr=5)
    spec.add_virtio("virtio-blk-pci", mode="transitional-legacy", backend="null", bus="br0", addr=3)
    vm = machine_factory(spec)
    vm.pci.assign_bars()
    bridge = vm.pci.find(bdf="00:05.0")
    assert bridge.is_bridge and bridge.secondary_bus == 1
    assert (
        bridge.config.read(regs.TYPE1_HEADER.secondary_bus) == 1
        and bridge.config.read(regs.TYPE1_HEADER.subordinate_bus) == 1
    )
    blk = vm.pci.find(vendor_id=VIRTIO)
    assert blk.bdf == "01:03.0"
    io = blk.bar(0)
    assert io.address is not None
    io_base = (bridge.config.read(regs.TYPE1_HEADER.io_base) & 0xF0) << 8
    io_limit = ((bridge.config.read(regs.TYPE1_HEADER.io_limit) & 0xF0) << 8) | 0xFFF
    assert io_base <= io.address and io.address + io.size - 1 <= io_limit
    # The read goes through the bridge's I/O window: VERSION_1 absent, INDIRECT_DESC present.
    names = layout.feature_names(blk.bar_read(0, layout.LEGACY_CFG.device_features.offset, 4))
    assert "INDIRECT_DESC" in names


def test_find_reports_what_exists(machine_factory) -> None:
    vm = machine_factory(MachineSpec())
    with pytest.raises(PciError, match=r"no PCI function with vendor_id=0x1af4.*found 00:00.0 8086:29c0"):
        vm.pci.find(vendor_id=VIRTIO)
    assert issubclass(PciError, QtestVirtioError)  # caught with the library's other failures
    assert Bdf.parse("0000:00:1f.2") == Bdf(0, 0x1F, 2)
    with pytest.raises(ValueError):
        Bdf.parse("nonsense")


def _net_driver_ok(vm: Machine, fn: PciFunction, msix: Msix) -> RegisterBlock[layout.CommonCfgLayout]:
    """Bring a modern virtio-net to DRIVER_OK with its config vector routed to MSI-X vector 0,
    register by register (the transport layer proper comes later; this only needs an interrupt
    source)."""
    cfg = common_cfg(fn)
    status = layout.STATUS
    cfg.write(layout.COMMON_CFG.device_status, 0)
    cfg.write(layout.COMMON_CFG.device_status, status.ACKNOWLEDGE.mask | status.DRIVER.mask)
    cfg.write(layout.COMMON_CFG.driver_feature_select, 0)
    cfg.write(layout.COMMON_CFG.driver_feature, 1 << 16)  # VIRTIO_NET_F_STATUS
    cfg.write(layout.COMMON_CFG.driver_feature_select, 1)
    cfg.write(layout.COMMON_CFG.driver_feature, 1)  # VERSION_1
    cfg.write(layout.COMMON_CFG.device_status, cfg.read(layout.COMMON_CFG.device_status) | status.FEATURES_OK.mask)
    assert cfg.read(layout.COMMON_CFG.device_status) & status.FEATURES_OK.mask
    cfg.write(layout.COMMON_CFG.config_msix_vector, 0)
    assert cfg.read(layout.COMMON_CFG.config_msix_vector) == 0
    cfg.write(layout.COMMON_CFG.device_status, cfg.read(layout.COMMON_CFG.device_status) | status.DRIVER_OK.mask)
    return cfg


def test_msix_message_lands_in_guest_ram(machine_factory) -> None:
    spec = MachineSpec()
    spec.add_virtio("virtio-net-pci", mode="modern", id="net0")
    vm = machine_factory(spec)
    vm.pci.assign_bars()
    fn = vm.pci.find(vendor_id=VIRTIO)
    msix = Msix(fn)
    assert msix.table_size >= 2 and not msix.enabled
    msix.route_to_ram(vm.memory)
    assert msix.enabled
    entry = msix.read_vector(1)
    assert entry["message_address"] == msix.mailboxes[1] and entry["vector_control"] == 0
    _net_driver_ok(vm, fn, msix)
    assert not msix.fired(0)

    vm.qmp.cmd("set_link", name="net0", up=False)  # link change -> config interrupt (§5.1.4.2)
    msix.wait(0, timeout=5)
    assert not msix.fired(0)  # cleared by wait()
    assert not msix.fired(1)  # no queue vector fired

    # Masked: the message is held back and its PBA bit is set; unmasking delivers it.
    msix.mask_vector(0)
    vm.qmp.cmd("set_link", name="net0", up=True)
    vm.qtest.readl(msix.mailboxes[0])  # a round trip, so QEMU has processed the QMP command
    assert msix.pending(0)
    assert not msix.fired(0)
    msix.mask_vector(0, False)
    msix.wait(0, timeout=5)
    assert not msix.pending(0)
    vm.memory.free(msix.mailboxes[0])
    vm.memory.check_leaks()


def test_multifunction_device_is_enumerated(machine_factory) -> None:
    spec = MachineSpec(machine="pc")
    spec.add_virtio("virtio-rng-pci", mode="modern", addr="4.0", multifunction="on")
    spec.add_virtio("virtio-blk-pci", mode="modern", addr="4.3", backend="null")
    vm = machine_factory(spec)
    slot4 = [(f.bdf, f.device_id) for f in vm.pci.devices() if f.bdf_addr.device == 4]
    assert slot4 == [("00:04.0", 0x1044), ("00:04.3", 0x1042)]
    assert vm.pci.find(bdf="00:04.0").header_type & regs.HEADER_MULTIFUNCTION


@pytest.mark.parametrize("mode", ["legacy", "modern"])
def test_bar_sizing_is_two_exchanges_probing_every_register_in_order(machine_factory, mode: str) -> None:
    """The originals first, then each BAR register and the ROM's probed (all ones, read back,
    original restored) in order, decoding off around them: the commands one register at a
    time sends, two waits for the function instead of one per register."""
    spec = MachineSpec()
    spec.add_virtio("virtio-blk-pci", mode=mode, backend="null")
    vm = machine_factory(spec)
    fn = vm.pci.find(vendor_id=VIRTIO)
    sink = vm.qtest.record()
    before = vm.qtest.round_trips
    bars = fn.size_bars()
    assert vm.qtest.round_trips - before == 2
    sizing = b"".join(sink).decode("latin-1").splitlines()
    # the same BARs whichever way they are sized: one register at a time, by hand
    cmd = fn.config.read(regs.TYPE0_HEADER.command)
    fn.config.write(regs.TYPE0_HEADER.command, cmd & ~(regs.COMMAND.io_space.mask | regs.COMMAND.memory_space.mask))
    masks = {}
    for reg in [*range(0x10, 0x28, 4), 0x30]:
        orig = fn.read_config(reg, 4)
        fn.write_config(reg, 4, regs.ROM_ADDRESS_MASK if reg == 0x30 else 0xFFFF_FFFF)
        masks[reg] = fn.read_config(reg, 4)
        fn.write_config(reg, 4, orig)
    fn.config.write(regs.TYPE0_HEADER.command, cmd)
    sized = {b.index: b for b in bars}
    for i in range(6):
        mask = masks[0x10 + 4 * i]
        if i in sized and sized[i].is_io:
            assert sized[i].size == (~(mask & regs.BAR_IO_MASK | 0xFFFF_0000) & 0xFFFF_FFFF) + 1
        elif i in sized:
            low = mask & regs.BAR_MEM_MASK
            full = (masks[0x14 + 4 * i] << 32 | low) if sized[i].kind == "mem64" else (0xFFFF_FFFF << 32 | low)
            assert sized[i].size == (~full & 0xFFFF_FFFF_FFFF_FFFF) + 1
        elif i - 1 not in sized or sized[i - 1].kind != "mem64":
            assert mask == 0  # no BAR here
    assert (4 in sized and sized[4].kind == "mem64") == (mode == "modern")  # the virtio-pci caps' BAR
    assert (0 in sized and sized[0].is_io) == (mode == "legacy")
    # the probes' all-ones writes, in register order
    probes = []
    cf8 = 0
    for line in sizing:
        op, addr, *value = line.split()
        if op == "outl" and int(addr, 16) == 0xCF8:
            cf8 = int(value[0], 16)
            continue
        written = int(value[0], 16) if value else None
        reg = (cf8 if op == "outl" else int(addr, 16)) & 0xFC
        if op in ("outl", "writel") and written in (0xFFFF_FFFF, regs.ROM_ADDRESS_MASK):
            probes.append(reg)
    assert probes == [*range(0x10, 0x28, 4), 0x30]
