# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""Transport layer against real QEMU: the legacy I/O BAR and the modern capabilities, the rules
that differ between them, and the initialization sequence of virtio 1.2 §3.1.1."""

from __future__ import annotations

import struct

import pytest
from pytest_qtest_virtio.plugin import MachineFactory

from qtest_virtio import Machine, MachineSpec, modes
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view
from qtest_virtio.pci import Msix, PciFunction
from qtest_virtio.pci.regs import MSIX_ENTRY
from qtest_virtio.testing import SplitDesc, SplitRing
from qtest_virtio.transport import (
    Access,
    DeviceKind,
    DeviceNeedsReset,
    LegacyTransport,
    ModernTransport,
    TransportError,
    VirtioPciMap,
    device_kind,
    driver_ok,
    negotiate,
    open_transport,
)
from qtest_virtio.transport.layout import COMMON_CFG, LEGACY_CFG, STATUS, VIRTIO_PCI_VENDOR_ID
from qtest_virtio.transport.legacy import legacy_ring_offsets
from qtest_virtio.virtqueue import SplitVirtqueue
from qtest_virtio.virtqueue.layout import DESC_F

ALL_BITS = (1 << 64) - 1
IMAGE = 64 << 20  # the scratch image MachineSpec makes for virtio-blk


def machine_with(machine_factory: MachineFactory, driver: str, mode: str, **props: str) -> Machine:
    spec = MachineSpec()
    spec.add_virtio(driver, {"id": "dev0", **props}, mode=mode)
    vm = machine_factory(spec)
    vm.pci.assign_bars()
    return vm


def transport_of(vm: Machine, mode: str, **kw: str):
    return open_transport(vm.pci_function("dev0"), mode, **kw)


@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_mode_picks_the_layout(machine_factory, mode: str) -> None:
    vm = machine_with(machine_factory, "virtio-rng-pci", mode)
    t = transport_of(vm, mode)
    assert isinstance(t, LegacyTransport if mode in (modes.LEGACY, modes.TRANSITIONAL_LEGACY) else ModernTransport)
    assert t.mode == mode


@pytest.mark.parametrize(
    ("built", "driven", "message"),
    [
        (modes.LEGACY, modes.MODERN, "is a legacy virtio device but mode 'modern'"),
        (modes.MODERN, modes.LEGACY, "is a modern virtio device but mode 'legacy'"),
        (modes.MODERN, modes.TRANSITIONAL_LEGACY, "is a modern virtio device"),
        (modes.TRANSITIONAL_MODERN, modes.LEGACY, "is a transitional virtio device"),
    ],
)
def test_wrong_mode_is_refused_not_guessed(machine_factory, built: str, driven: str, message: str) -> None:
    vm = machine_with(machine_factory, "virtio-rng-pci", built)
    with pytest.raises(TransportError, match=message):
        transport_of(vm, driven)


@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_initialization_sequence(machine_factory, mode: str) -> None:
    """§3.1.1: reset reads back 0, ACKNOWLEDGE, DRIVER, features (FEATURES_OK on 1.x), DRIVER_OK."""
    vm = machine_with(machine_factory, "virtio-rng-pci", mode)
    t = transport_of(vm, mode)
    t.set_status(STATUS.ACKNOWLEDGE.mask)
    t.reset()
    assert t.get_status() == 0
    n = negotiate(t, driver_supports=ALL_BITS)
    legacy = t.uses_legacy_layout
    expected = {"ACKNOWLEDGE", "DRIVER"} | (set() if legacy else {"FEATURES_OK"})
    assert set(t.status_names()) == expected
    assert ("VERSION_1" in n) == (not legacy)  # modern requires it; legacy cannot have it
    assert "BAD_FEATURE" not in n  # offered to legacy drivers, never to be accepted
    assert n.accepted & ~n.offered == 0  # nothing the device did not offer
    assert t.driver_features() == n.accepted
    driver_ok(t)
    assert "DRIVER_OK" in device_view(vm, "dev0").status


def test_modern_cannot_refuse_version_1(machine_factory) -> None:
    vm = machine_with(machine_factory, "virtio-rng-pci", modes.MODERN)
    with pytest.raises(TransportError, match="VERSION_1 cannot be refused"):
        negotiate(transport_of(vm, modes.MODERN), driver_supports=ALL_BITS, refuse=1 << 32)


# -- legacy-only rules -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [modes.LEGACY, modes.TRANSITIONAL_LEGACY])
def test_legacy_queue_size_is_fixed_and_rings_sit_at_a_page_frame(machine_factory, mode: str) -> None:
    vm = machine_with(machine_factory, "virtio-rng-pci", mode)
    rng = vm.virtio("dev0", VirtioRng, mode=mode)
    t = rng.transport
    assert isinstance(t, LegacyTransport)
    size = t.queue_max_size(0)
    t.regs.write(LEGACY_CFG.queue_size, size * 2)  # read-only in the legacy layout
    assert t.queue_max_size(0) == size
    with pytest.raises(TransportError, match="fixed size"):
        t.setup_queue(0, size // 2, 0x200000, 0x200000, 0x201000)
    avail, used = legacy_ring_offsets(size)
    with pytest.raises(TransportError, match="4096-byte page"):
        t.setup_queue(0, size, 0x200800, 0x200800 + avail, 0x200800 + used)
    with pytest.raises(TransportError, match="contiguous"):
        t.setup_queue(0, size, 0x200000, 0x300000, 0x400000)
    vq = rng.queues[0]
    assert isinstance(vq, SplitVirtqueue)  # the legacy layout has no packed ring
    assert vq.desc % 4096 == 0 and vq.used % 4096 == 0  # used ring on the next page boundary
    t.regs.write(LEGACY_CFG.queue_select, 0)
    assert t.regs.read(LEGACY_CFG.queue_address) == vq.desc >> 12  # the PFN
    assert len(rng.read(32)) == 32


@pytest.mark.parametrize("mode", [modes.LEGACY, modes.TRANSITIONAL_LEGACY])
def test_legacy_device_config_moves_with_msix(machine_factory, mode: str) -> None:
    """The device config starts at 0x14, or 0x18 once MSI-X is enabled (§4.1.4.10)."""
    vm = machine_with(machine_factory, "virtio-blk-pci", mode)
    t = transport_of(vm, mode)
    assert isinstance(t, LegacyTransport)
    msix = Msix(t.fn)
    msix.enable(False)
    assert t.device_config_offset == 0x14
    assert t.config_read(0, 8) == IMAGE // 512  # virtio_blk_config.capacity, in sectors
    assert t.fn.bar_read(0, 0x14, 4) == IMAGE // 512
    msix.enable(True)
    assert t.device_config_offset == 0x18
    assert t.config_read(0, 8) == IMAGE // 512
    assert t.set_config_vector(0) == 0
    assert t.fn.bar_read(0, LEGACY_CFG.config_msix_vector.offset, 2) == 0  # 0x14 is a vector now
    msix.enable(False)
    with pytest.raises(TransportError, match="only while MSI-X is enabled"):
        t.set_config_vector(0)


# -- modern-only rules -----------------------------------------------------------------------


def test_modern_queue_size_is_writable(machine_factory) -> None:
    vm = machine_with(machine_factory, "virtio-blk-pci", modes.MODERN)
    t = transport_of(vm, modes.MODERN)
    assert isinstance(t, ModernTransport)
    assert t.queue_max_size(0) == 256
    t.common.write(COMMON_CFG.queue_size, 16)
    assert t.common.read(COMMON_CFG.queue_size) == 16
    rng_vm = machine_with(machine_factory, "virtio-rng-pci", modes.MODERN)
    rng = rng_vm.virtio("dev0", VirtioRng, queue_size=4)
    assert rng.queues[0].size == 4
    assert len(rng.read(100)) == 100


@pytest.mark.parametrize("page_per_vq", ["off", "on"])
def test_modern_notify_offsets(machine_factory, page_per_vq: str) -> None:
    vm = machine_with(
        machine_factory, "virtio-blk-pci", modes.MODERN, **{"num-queues": "4", "page-per-vq": page_per_vq}
    )
    t = transport_of(vm, modes.MODERN)
    assert isinstance(t, ModernTransport)
    mult = t.map.notify_off_multiplier
    assert mult == (0x1000 if page_per_vq == "on" else 4)
    assert t.num_queues() == 4
    for q in range(4):
        t.select_queue(q)
        off = t.common.read(COMMON_CFG.queue_notify_off)
        assert t.notify_address(q) == (t.notify_window.bar, t.notify_window.offset + off * mult)
    # and notifying through those addresses works
    rng_vm = machine_with(machine_factory, "virtio-rng-pci", modes.MODERN, **{"page-per-vq": page_per_vq})
    assert len(rng_vm.virtio("dev0", VirtioRng).read(64)) == 64


def test_modern_pio_notify(machine_factory) -> None:
    vm = machine_with(machine_factory, "virtio-rng-pci", modes.MODERN, **{"modern-pio-notify": "on"})
    rng = vm.virtio("dev0", VirtioRng, notify_via="pio")
    t = rng.transport
    assert isinstance(t, ModernTransport) and t.notify_window.bar is not None
    assert t.notify_window.access == Access.IO and rng.fn.bar(t.notify_window.bar).is_io
    assert t.notify_window == t.map.notify_io != t.map.notify  # the I/O structure, not the memory one
    assert len(rng.read(64)) == 64
    plain = machine_with(machine_factory, "virtio-rng-pci", modes.MODERN)
    with pytest.raises(TransportError, match="modern-pio-notify=on"):
        transport_of(plain, modes.MODERN, notify_via="pio")


def test_config_generation_follows_a_config_change(machine_factory) -> None:
    vm = machine_with(machine_factory, "virtio-blk-pci", modes.MODERN)
    t = transport_of(vm, modes.MODERN)
    negotiate(t, driver_supports=ALL_BITS)
    driver_ok(t)
    gen = t.config_generation()
    assert t.config_read(0, 8) == IMAGE // 512
    vm.qmp.cmd("block_resize", **{"node-name": "dev0-backend", "size": 2 * IMAGE})
    assert t.config_generation() != gen  # §2.5.1: the device changed its config
    assert struct.unpack("<Q", t.read_config_bytes(0, 8))[0] == 2 * IMAGE // 512


def test_pci_cfg_access_capability_reaches_the_bars(machine_factory) -> None:
    """§4.1.4.9: the same registers read and written through config space alone."""
    vm = machine_with(machine_factory, "virtio-blk-pci", modes.MODERN, **{"num-queues": "3"})
    t = transport_of(vm, modes.MODERN)
    assert isinstance(t, ModernTransport) and t.map.pci_cfg is not None
    common, isr = t.map.common, t.map.isr
    assert common is not None and common.bar is not None and isr is not None and isr.bar is not None
    num_queues = t.pci_cfg_read(common.bar, common.offset + COMMON_CFG.num_queues.offset, 2)
    assert num_queues == t.common.read(COMMON_CFG.num_queues) == 3
    t.pci_cfg_write(common.bar, common.offset + COMMON_CFG.queue_select.offset, 2, 2)
    assert t.common.read(COMMON_CFG.queue_select) == 2
    t.common.write(COMMON_CFG.device_feature_select, 1)
    assert t.pci_cfg_read(common.bar, common.offset + COMMON_CFG.device_feature.offset, 4) & 1  # VERSION_1
    assert t.pci_cfg_read(isr.bar, isr.offset, 1) == 0


def _publish_broken_chain(vm: Machine, rng) -> None:
    """A descriptor whose NEXT points past the table: QEMU must give up on the device."""
    vq = rng.queues[0]
    slot = vq._free[-1]
    ring = SplitRing.of(vq)
    ring.write_desc(slot, SplitDesc(0x200000, 8, DESC_F.NEXT.mask | DESC_F.WRITE.mask, 200))
    ring.set_avail_entry(0, slot)
    ring.set_avail_idx(1)
    rng.transport.notify(0)


def test_device_needs_reset_is_reported_then_reset_recovers(machine_factory) -> None:
    """A 1.x device that detects an error sets DEVICE_NEEDS_RESET (§2.1.2); we report it, and a
    reset brings the device back."""
    vm = machine_with(machine_factory, "virtio-rng-pci", modes.MODERN, packed="off")
    rng = vm.virtio("dev0", VirtioRng)
    _publish_broken_chain(vm, rng)
    with pytest.raises(DeviceNeedsReset, match="DEVICE_NEEDS_RESET"):
        rng.check_status()
    assert device_view(vm, "dev0").broken
    rng.initialize()
    assert not device_view(vm, "dev0").broken
    assert len(rng.read(64)) == 64


def test_legacy_device_breaks_silently_on_the_same_error(machine_factory) -> None:
    """What QEMU does where the spec gives legacy devices no NEEDS_RESET bit: it stops
    answering the queue (QMP says broken); a reset recovers it."""
    vm = machine_with(machine_factory, "virtio-rng-pci", modes.LEGACY)
    rng = vm.virtio("dev0", VirtioRng, mode=modes.LEGACY)
    _publish_broken_chain(vm, rng)
    assert rng.check_status() & STATUS.DEVICE_NEEDS_RESET.mask == 0
    assert device_view(vm, "dev0").broken
    rng.initialize()
    assert len(rng.read(64)) == 64


def test_vendor_is_virtio(machine_factory) -> None:
    vm = machine_with(machine_factory, "virtio-rng-pci", modes.MODERN)
    assert vm.pci_function("dev0").vendor_id == VIRTIO_PCI_VENDOR_ID
    with pytest.raises(KeyError, match="no PCI device with id 'nope'"):
        vm.pci_function("nope")


@pytest.mark.parametrize("mode", [modes.TRANSITIONAL_LEGACY, modes.MODERN])
def test_config_change_interrupt_on_the_config_vector(machine_factory, mode: str) -> None:
    vm = machine_with(machine_factory, "virtio-blk-pci", mode)
    t = transport_of(vm, mode)
    msix = Msix(t.fn)
    msix.route_to_ram(vm.memory)
    negotiate(t, driver_supports=ALL_BITS)
    assert t.set_config_vector(0) == 0
    driver_ok(t)
    vm.qmp.cmd("block_resize", **{"node-name": "dev0-backend", "size": 2 * IMAGE})
    msix.wait(0)
    assert t.config_read(0, 8) == 2 * IMAGE // 512


# -- the virtio-pci map (§4.1.4) -----------------------------------------------------------------


def _raw_caps(fn: PciFunction) -> list[dict[str, int]]:
    """The capability list walked with plain config reads at the specs' byte offsets (PCI 3.0
    §6.7: next pointer at +1; virtio 1.2 §4.1.4: struct virtio_pci_cap; PCI 3.0 §6.8.2: MSI-X),
    independent of the decoders under test."""
    read = fn.read_config
    caps: list[dict[str, int]] = []
    ptr = read(0x34, 1) & 0xFC if read(0x06, 2) & 0x10 else 0
    while ptr:
        cap = {"at": ptr, "id": read(ptr, 1)}
        if cap["id"] == 0x09:
            cap |= {"cap_len": read(ptr + 2, 1), "cfg_type": read(ptr + 3, 1), "bar": read(ptr + 4, 1)}
            cap |= {"offset": read(ptr + 8, 4), "length": read(ptr + 12, 4)}
            if cap["cfg_type"] == 2:
                cap["multiplier"] = read(ptr + 16, 4)
        elif cap["id"] == 0x11:
            cap |= {"control": read(ptr + 2, 2), "table": read(ptr + 4, 4), "pba": read(ptr + 8, 4)}
        caps.append(cap)
        ptr = read(ptr + 1, 1) & 0xFC
    return caps


def _bar_is_io(fn: PciFunction, index: int) -> bool:
    return bool(fn.read_config(0x10 + 4 * index, 4) & 1)


def _expected_windows(fn: PciFunction) -> dict[str, tuple[str, int | None, int, int]]:
    """name -> (access, BAR, offset, length) as the raw capability list and BAR registers say."""
    want: dict[str, tuple[str, int | None, int, int]] = {}
    raw = _raw_caps(fn)
    names = {1: "common", 3: "isr", 4: "device"}
    for cap in (c for c in raw if c["id"] == 0x09):
        bar, io = cap["bar"], _bar_is_io(fn, cap["bar"]) if cap["bar"] < 6 else False
        access = "io" if io else "mem"
        if cap["cfg_type"] == 5:
            want.setdefault("pci_cfg", ("config", None, cap["at"], cap["cap_len"]))
        elif cap["cfg_type"] == 2:
            want.setdefault("notify_io" if io else "notify", (access, bar, cap["offset"], cap["length"]))
        elif cap["cfg_type"] in names:
            want.setdefault(names[cap["cfg_type"]], (access, bar, cap["offset"], cap["length"]))
    if _bar_is_io(fn, 0) and fn.device_id < 0x1040:
        want["legacy"] = ("io", 0, 0, fn.bar(0).size)
    for cap in (c for c in raw if c["id"] == 0x11):
        vectors = (cap["control"] & 0x7FF) + 1
        table_bar, pba_bar = cap["table"] & 7, cap["pba"] & 7
        table_access = "io" if _bar_is_io(fn, table_bar) else "mem"
        pba_access = "io" if _bar_is_io(fn, pba_bar) else "mem"
        want["msix_table"] = (table_access, table_bar, cap["table"] & ~7, vectors * 16)
        want["msix_pba"] = (pba_access, pba_bar, cap["pba"] & ~7, (vectors + 63) // 64 * 8)
    return want


_KIND_OF_MODE = {
    modes.LEGACY: DeviceKind.LEGACY,
    modes.TRANSITIONAL_LEGACY: DeviceKind.TRANSITIONAL,
    modes.TRANSITIONAL_MODERN: DeviceKind.TRANSITIONAL,
    modes.MODERN: DeviceKind.MODERN,
}


@pytest.mark.parametrize("machine", ["q35", "pc"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_pci_map_matches_the_capability_list(machine_factory, machine: str, mode: str) -> None:
    """The map of virtio-blk (with MSI-X) and virtio-balloon (without) names the windows the
    capability list and BAR registers hold, each with its BAR, offset, length and layout."""
    spec = MachineSpec(machine=machine)
    spec.add_virtio("virtio-blk-pci", mode=mode, id="blk0")
    spec.add_virtio("virtio-balloon-pci", mode=mode, id="balloon0")
    vm = machine_factory(spec)
    unsized = next(f for f in vm.pci.devices() if f.vendor_id == VIRTIO_PCI_VENDOR_ID)
    before = VirtioPciMap.of(unsized)
    assert set(before.windows()) <= {"pci_cfg"}  # no BAR sized yet: only config space is reached
    for dev_id, has_msix in (("blk0", True), ("balloon0", False)):
        fn = vm.pci_function(dev_id)
        vmap = VirtioPciMap.of(fn)
        assert vmap is VirtioPciMap.of(fn) and vmap is not before  # built once per sizing
        got = {name: (w.access, w.bar, w.offset, w.length) for name, w in vmap.windows().items()}
        want = _expected_windows(fn)
        assert got == want, f"{dev_id} {mode}"
        raw_bar_caps = [c for c in _raw_caps(fn) if c["id"] == 0x09 and c["cfg_type"] != 5]
        assert [(w.cap and w.cap.cfg_type, w.bar, w.offset, w.length) for w in vmap.cap_windows] == [
            (c["cfg_type"], c["bar"], c["offset"], c["length"]) for c in raw_bar_caps
        ]
        modern_layout = mode != modes.LEGACY
        assert {"common", "notify", "isr", "device", "pci_cfg"} <= set(got) if modern_layout else "common" not in got
        assert vmap.has_legacy_bar == (mode != modes.MODERN) == ("legacy" in got)
        assert ("msix_table" in got) == has_msix, f"{dev_id}: MSI-X expected {has_msix}"
        assert vmap.kind == _KIND_OF_MODE[modes.Mode(mode)] == device_kind(fn)
        # Each window carries its typed layout, and its bytes are reached through it.
        if vmap.common is not None:
            assert vmap.common.layout is COMMON_CFG and vmap.device is not None and vmap.device.layout is None
            assert vmap.notify_off_multiplier == next(c["multiplier"] for c in _raw_caps(fn) if c.get("cfg_type") == 2)
            common = vmap.block(vmap.common)
            assert common.read(COMMON_CFG.num_queues) == fn.bar_read(4, vmap.common.offset + 0x12, 2)
        if vmap.legacy is not None:
            assert vmap.legacy.layout is LEGACY_CFG
            offered = vmap.block(vmap.legacy).read(LEGACY_CFG.device_features)
            assert offered == fn.bar_read(0, 0, 4) and not offered >> 32
            assert vmap.legacy_device(False).offset == 0x14 and vmap.legacy_device(True).offset == 0x18
        if dev_id == "blk0":  # capacity, in sectors, at the start of the device config
            for window in (w for w in (vmap.device, vmap.legacy and vmap.legacy_device()) if w is not None):
                assert vmap.read(window, 0, 4) == IMAGE // 512, window.name
        if vmap.msix_table is not None:
            assert vmap.msix_table.layout is MSIX_ENTRY and not vmap.msix_enabled()
