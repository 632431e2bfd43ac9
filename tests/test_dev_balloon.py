# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""virtio-balloon driver: PFN and statistics encoding (no QEMU), and inflate/deflate, the
target set through QMP, ``actual`` and the stats queue on real QEMU in every transport mode,
split and packed."""

from __future__ import annotations

import pytest
from conftest import qmp_object, ring_of
from pytest_qtest_virtio.plugin import MachineFactory

from qtest_virtio import Machine, MachineSpec, modes
from qtest_virtio.devices.balloon.driver import VirtioBalloon
from qtest_virtio.devices.balloon.encoding import (
    BALLOON_CONFIG,
    BALLOON_STAT,
    PAGE_SIZE,
    BalloonConfig,
    BalloonError,
    StatTag,
    decode_pfns,
    decode_stats,
    encode_pfns,
    encode_stats,
    page_frame,
)
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.introspect import device_view
from qtest_virtio.pci import regs as pci_regs
from qtest_virtio.transport.layout import feature_names
from qtest_virtio.virtqueue import PackedVirtqueue, SplitVirtqueue

LEGACY_LAYOUT = {modes.LEGACY, modes.TRANSITIONAL_LEGACY}
RAM = 256 << 20
#: QEMU's names for the statistics in the guest-stats property, by spec tag.
QEMU_STAT_NAMES = {
    StatTag.SWAP_IN: "stat-swap-in",
    StatTag.SWAP_OUT: "stat-swap-out",
    StatTag.MAJFLT: "stat-major-faults",
    StatTag.MINFLT: "stat-minor-faults",
    StatTag.MEMFREE: "stat-free-memory",
    StatTag.MEMTOT: "stat-total-memory",
    StatTag.AVAIL: "stat-available-memory",
    StatTag.CACHES: "stat-disk-caches",
    StatTag.HTLB_PGALLOC: "stat-htlb-pgalloc",
    StatTag.HTLB_PGFAIL: "stat-htlb-pgfail",
}
UNSET = (1 << 64) - 1  # QEMU's value for a statistic the driver did not supply

# -- encoding (no QEMU) ----------------------------------------------------------------------


def hexs(*fields: str) -> bytes:
    return b"".join(bytes.fromhex(f) for f in fields)


def test_pfn_array() -> None:
    """PFNs are addresses / 4096 as le32 (§5.5.6)."""
    data = encode_pfns([0x1000, 0x10_0000, 0xFFFF_F000_000])
    assert data == hexs("01000000", "00010000", "00f0ffff")
    assert decode_pfns(data) == [0x1000, 0x10_0000, 0xFFFF_F000_000]
    assert page_frame(0x2000) == 2
    with pytest.raises(BalloonError, match="0x1800 is not 4096-byte aligned"):
        encode_pfns([0x1000, 0x1800])
    with pytest.raises(BalloonError, match="past the 32-bit PFN range"):
        page_frame(1 << 44)
    with pytest.raises(BalloonError, match="not a whole number of le32"):
        decode_pfns(bytes(6))


def test_stats_entries() -> None:
    """struct virtio_balloon_stat is packed: le16 tag then le64 val, 10 bytes (§5.5.6.3)."""
    assert [(f.name, f.offset, f.width) for f in BALLOON_STAT] == [("tag", 0, 2), ("val", 2, 8)]
    data = encode_stats([(StatTag.MEMFREE, 0x0102030405060708), (StatTag.SWAP_IN, 1)])
    assert data == hexs("0400", "0807060504030201", "0000", "0100000000000000")
    assert decode_stats(data) == [(4, 0x0102030405060708), (0, 1)]
    with pytest.raises(BalloonError, match="not a whole number of 10-byte entries"):
        decode_stats(bytes(12))
    assert [t.value for t in StatTag] == list(range(10))


def test_config_layout() -> None:
    assert [(f.name, f.offset, f.width) for f in BALLOON_CONFIG] == [
        ("num_pages", 0, 4),
        ("actual", 4, 4),
        ("free_page_hint_cmd_id", 8, 4),
        ("poison_val", 12, 4),
    ]


# -- real QEMU -------------------------------------------------------------------------------


def balloon_machine(machine_factory: MachineFactory, mode: str, extra_args=(), **props: str) -> Machine:
    """A machine with more than the virtio_device marker starts (an iothread object); the
    marker's machines have the same 256M."""
    spec = MachineSpec(memory="256M", extra_args=list(extra_args))
    spec.add_virtio("virtio-balloon-pci", {"id": "bal0", **props}, mode=mode)
    return machine_factory(spec)


def pages_in_balloon(vm: Machine) -> int:
    """query-balloon's ``actual`` is the guest size: RAM minus the balloon."""
    actual: int = qmp_object(vm, "query-balloon")["actual"]
    return (RAM - actual) // PAGE_SIZE


def guest_stats(vm: Machine, dev_id: str = "bal0") -> dict[str, int]:
    path = f"/machine/peripheral/{dev_id}"
    stats: dict[str, int] = qmp_object(vm, "qom-get", path=path, property="guest-stats")["stats"]
    return stats


@pytest.mark.virtio_device("virtio-balloon-pci")
def test_target_inflate_deflate_actual(virtio_device: VirtioDriver, qemu: Machine, request) -> None:
    target_inflate_deflate_actual(virtio_device, qemu, ring_of(request))


@pytest.mark.virtio_device(
    "virtio-balloon-pci", transports=sorted(LEGACY_LAYOUT), rings=["split"], flags={"packed": "on"}
)
def test_target_inflate_deflate_actual_packed_flag_on_legacy_layout(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """packed=on where the legacy register layout cannot negotiate RING_PACKED: split rings."""
    target_inflate_deflate_actual(virtio_device, qemu, "packed")


def target_inflate_deflate_actual(bal: VirtioDriver, vm: Machine, ring: str) -> None:
    assert isinstance(bal, VirtioBalloon)
    packed = ring == "packed" and bal.mode not in LEGACY_LAYOUT
    assert all(isinstance(vq, PackedVirtqueue if packed else SplitVirtqueue) for vq in bal.queues)
    # QEMU 7.2's virtio-balloon-pci has no MSI-X, so "auto" picks INTx; 10.0 gives it two vectors.
    has_msix = bal.fn.find_capability(pci_regs.CAP_ID_MSIX) is not None
    assert has_msix is (vm.binary.version >= (10, 0, 0))
    assert bal.interrupts == ("msix" if has_msix else "intx") and (bal.msix is None) is not has_msix
    assert {"STATS_VQ", "PAGE_POISON"} <= bal.negotiated <= device_view(vm, bal.dev_id).guest_features | {"ANY_LAYOUT"}
    assert len(bal.queues) == 3
    assert bal.config() == BalloonConfig(num_pages=0, actual=0, free_page_hint_cmd_id=None, poison_val=0)

    # The target, in bytes of guest RAM, becomes num_pages with a config change notification.
    vm.qmp.cmd("balloon", value=RAM - 24 * PAGE_SIZE)
    bal.wait_config_change(timeout=2)
    assert bal.num_pages == 24
    assert bal.follow_target() == 24
    assert bal.actual == 24 and pages_in_balloon(vm) == 24

    vm.qmp.cmd("balloon", value=RAM - 10 * PAGE_SIZE)
    bal.wait_config_change(timeout=2)
    assert bal.follow_target() == 10
    assert bal.actual == 10 and pages_in_balloon(vm) == 10

    # More pages than one request holds, without updating actual until asked.
    bal.PFNS_PER_REQUEST = 4
    bal.inflate(9, update_actual=False)
    assert pages_in_balloon(vm) == 10 and len(bal.pages) == 19
    bal.set_actual()
    assert pages_in_balloon(vm) == 19
    bal.deflate(19)
    assert bal.actual == 0 and pages_in_balloon(vm) == 0
    with pytest.raises(BalloonError, match="cannot deflate 1 pages, the balloon holds 0"):
        bal.deflate(1)
    bal.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-balloon-pci", rings=["split"])
def test_inflate_hands_exactly_those_pages_to_the_device(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """QEMU discards inflated pages (they read back as zeros): the PFNs name the right pages,
    and the neighbours are untouched."""
    vm, bal = qemu, virtio_device
    assert isinstance(bal, VirtioBalloon)
    pages = [vm.memory.alloc(PAGE_SIZE, PAGE_SIZE) for _ in range(4)]
    for i, page in enumerate(pages):
        vm.memory.write(page, bytes([0x50 + i]) * PAGE_SIZE)
    bal.inflate_pages(pages[1:3])
    assert [vm.memory.read(p, PAGE_SIZE) == bytes(PAGE_SIZE) for p in pages] == [False, True, True, False]
    assert vm.memory.read(pages[3], 4) == b"SSSS"
    # PAGE_POISON: deflated pages are written with poison_val before the driver reuses them.
    bal.deflate(2)
    assert vm.memory.read(pages[1], 8) == bal.poison_val.to_bytes(4, "little") * 2
    for p in (pages[0], pages[3]):
        vm.memory.free(p)
    with pytest.raises(BalloonError, match="not 4096-byte aligned"):
        bal.inflate_pages([pages[0] + 16])


@pytest.mark.virtio_device("virtio-balloon-pci")
def test_stats_queue(virtio_device: VirtioDriver, qemu: Machine) -> None:
    stats_queue(virtio_device, qemu)


@pytest.mark.virtio_device(
    "virtio-balloon-pci", transports=sorted(LEGACY_LAYOUT), rings=["split"], flags={"packed": "on"}
)
def test_stats_queue_packed_flag_on_legacy_layout(virtio_device: VirtioDriver, qemu: Machine) -> None:
    stats_queue(virtio_device, qemu)


def stats_queue(device: VirtioDriver, vm: Machine) -> None:
    """The first statsq buffer goes in at initialization; once a polling interval is set the
    device uses it, the driver answers with fresh statistics and QEMU shows them."""
    device.close()  # this test drives the device with statistics of its own from the start
    bal = vm.virtio(device.dev_id, VirtioBalloon, stats={StatTag.MEMTOT: RAM, StatTag.MEMFREE: 1234})
    assert guest_stats(vm, bal.dev_id)["stat-free-memory"] == 1234  # QEMU reads the very first buffer too
    assert bal.poll_stats() is False and bal.stats_requests == 0
    with pytest.raises(BalloonError, match=r"statistics \[1, 4, 9\] differ from the subset \[4, 5\] already sent"):
        bal.stats = [(StatTag.MEMFREE, 5555), (StatTag.SWAP_OUT, 7), (StatTag.HTLB_PGFAIL, 1 << 40)]
    bal.stats = {StatTag.MEMFREE: 4321, StatTag.MEMTOT: RAM}  # new values, same tags: fine
    bal.reset()
    bal.stats = [(StatTag.MEMFREE, 5555), (StatTag.SWAP_OUT, 7), (StatTag.HTLB_PGFAIL, 1 << 40)]
    bal.initialize()
    assert guest_stats(vm, bal.dev_id)["stat-free-memory"] == 5555
    vm.qmp.cmd("qom-set", path=f"/machine/peripheral/{bal.dev_id}", property="guest-stats-polling-interval", value=1)
    bal.wait_stats_request(timeout=2)
    assert bal.stats_requests == 1
    stats = guest_stats(vm, bal.dev_id)
    assert (stats["stat-free-memory"], stats["stat-swap-out"], stats["stat-htlb-pgfail"]) == (5555, 7, 1 << 40)
    assert stats["stat-total-memory"] == UNSET  # not in this buffer: QEMU forgets the old value
    # Every name we know is shown; a newer QEMU shows more (10.0: stat-oom-kills, ...), all unset.
    assert set(QEMU_STAT_NAMES.values()) <= set(stats)
    assert all(stats[name] == UNSET for name in set(stats) - set(QEMU_STAT_NAMES.values()))
    bal.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-balloon-pci", transports=[modes.MODERN], rings=["split"])
def test_default_stats_describe_the_allocator(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm = qemu
    stats = guest_stats(vm, virtio_device.dev_id)
    assert stats["stat-total-memory"] == vm.memory.end
    assert 0 < stats["stat-free-memory"] < vm.memory.end


@pytest.mark.virtio_device(
    "virtio-balloon-pci", transports=[modes.LEGACY, modes.MODERN], rings=["split"], refuse={"STATS_VQ"}
)
def test_refusing_stats_vq(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm, bal = qemu, virtio_device
    assert isinstance(bal, VirtioBalloon)
    assert "STATS_VQ" not in bal.negotiated and len(bal.queues) == 2
    assert guest_stats(vm, bal.dev_id)["stat-free-memory"] == UNSET
    assert bal.poll_stats() is False
    bal.inflate(2)
    assert pages_in_balloon(vm) == 2


@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_optional_features(machine_factory, mode: str) -> None:
    """deflate-on-oom and free-page-hint (which needs an iothread) are offered when set and
    negotiated unless refused; FREE_PAGE_HINT adds free_page_vq (queue 3) and the command id;
    PAGE_POISON makes the driver write poison_val before DRIVER_OK."""
    vm = balloon_machine(
        machine_factory,
        mode,
        extra_args=["-object", "iothread,id=io0"],
        iothread="io0",
        **{"deflate-on-oom": "on", "free-page-hint": "on"},
    )
    bal = vm.virtio("bal0", VirtioBalloon, poison_val=0xA5A5_5A5A)
    assert {"DEFLATE_ON_OOM", "FREE_PAGE_HINT", "PAGE_POISON", "STATS_VQ"} <= bal.negotiated
    assert "MUST_TELL_HOST" not in bal.negotiated  # QEMU never offers it
    assert len(bal.queues) == 4 and "free_page_vq (queue 3)" in bal.queues[3].name
    assert bal.config() == BalloonConfig(0, 0, free_page_hint_cmd_id=0, poison_val=0xA5A5_5A5A)
    bal.close()
    bal = VirtioBalloon(bal.fn, mode, vm.memory, refuse={"FREE_PAGE_HINT", "PAGE_POISON", "DEFLATE_ON_OOM"})
    assert not bal.initialized and not bal.queues  # construction does no I/O
    bal.initialize()
    assert not {"DEFLATE_ON_OOM", "FREE_PAGE_HINT", "PAGE_POISON"} & bal.negotiated
    assert not {"DEFLATE_ON_OOM", "FREE_PAGE_HINT", "PAGE_POISON"} & device_view(vm, "bal0").guest_features
    assert len(bal.queues) == 3
    assert bal.config() == BalloonConfig(0, 0, None, None)
    bal.close()
    # free_page_vq keeps index 3 without STATS_VQ (§5.5.2); queue 2 is set up but idle.
    bal = VirtioBalloon(bal.fn, mode, vm.memory, refuse={"STATS_VQ"})
    assert not bal.initialized and not bal.queues  # construction does no I/O
    bal.initialize()
    assert "STATS_VQ" not in bal.negotiated and "FREE_PAGE_HINT" in bal.negotiated
    assert len(bal.queues) == 4 and not bal.queues[2].in_flight
    assert bal.poll_stats() is False
    bal.inflate(3)
    assert pages_in_balloon(vm) == 3
    bal.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device(
    "virtio-balloon-pci", transports=[modes.MODERN], rings=["split"], flags={"page-poison": "off"}
)
def test_features_off_by_property(virtio_device: VirtioDriver) -> None:
    """page-poison=off: PAGE_POISON is neither offered nor negotiated; poison_val is not read."""
    bal = virtio_device
    assert isinstance(bal, VirtioBalloon)
    offered = set(feature_names(bal.negotiated.offered, bal.device_bits))
    assert not offered & {"PAGE_POISON", "DEFLATE_ON_OOM", "FREE_PAGE_HINT"} and "STATS_VQ" in offered
    assert bal.config().poison_val is None
    bal.inflate(1)
    bal.deflate(1)  # no poisoning without PAGE_POISON


@pytest.mark.parametrize("interrupts", ["isr", "intx"])
@pytest.mark.virtio_device("virtio-balloon-pci", transports=[modes.TRANSITIONAL_MODERN], rings=["split"])
def test_config_change_without_msix(virtio_device: VirtioDriver, qemu: Machine, interrupts: str) -> None:
    vm = qemu
    virtio_device.close()  # the marker starts its driver with the default interrupts: drive it again
    bal = vm.virtio(virtio_device.dev_id, VirtioBalloon, interrupts=interrupts)
    assert bal.interrupts == interrupts
    with pytest.raises(BalloonError, match=r"no configuration change notification within 0\.02 s"):
        bal.wait_config_change(timeout=0.02)
    vm.qmp.cmd("balloon", value=RAM - PAGE_SIZE)
    bal.wait_config_change(timeout=2)
    assert bal.num_pages == 1
