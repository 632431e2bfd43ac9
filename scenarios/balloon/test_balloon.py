"""virtio-balloon conformance (virtio 1.2 §5.5): the traditional memory balloon's device-side
requirements, driven through QMP (``balloon``, ``query-balloon``, the ``guest-stats``
properties) as a management stack would.

QEMU's virtio-balloon-pci has no MSI-X capability, so the driver runs on INTx. The machine has
``-m 256M``; ``balloon value=<bytes>`` asks for that guest size, i.e. (RAM - value) / 4096 pages
in the balloon, and ``query-balloon`` answers RAM - actual * 4096.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.balloon.driver import VirtioBalloon
from qtest_virtio.devices.balloon.encoding import BALLOON_CONFIG, PAGE_SIZE, StatTag
from qtest_virtio.transport.layout import ISR

pytestmark = pytest.mark.virtio_device("virtio-balloon-pci")

LEGACY_TRANSPORTS = ["legacy", "transitional-legacy"]
MODERN_TRANSPORTS = ["transitional-modern", "modern"]
#: QEMU's names for the statistics it shows in guest-stats, by spec tag.
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
UNSET = (1 << 64) - 1  # what QEMU shows for a statistic the last buffer did not carry


def _assert_stats(stats: dict[str, int], sent: dict[StatTag, int]) -> None:
    """guest-stats shows each statistic sent under its name, and every other name unset. Names
    are checked for the tags sent (virtio 1.2 §5.5.6.4 defines tags 0-9); a newer QEMU shows
    more (10.0 adds e.g. stat-alloc-stalls for tags of later specs), which must stay unset."""
    missing = sorted(QEMU_STAT_NAMES[t] for t in sent if QEMU_STAT_NAMES[t] not in stats)
    assert not missing, f"guest-stats lacks {', '.join(missing)}: {sorted(stats)}"
    assert {k: v for k, v in stats.items() if v != UNSET} == {QEMU_STAT_NAMES[t]: v for t, v in sent.items()}


def _ram(qemu: Machine) -> int:
    return int(qemu.spec.memory_bytes)


def _set_target(qemu: Machine, pages: int) -> None:
    """QMP ``balloon``: the guest should shrink by ``pages`` pages."""
    qemu.qmp.cmd("balloon", value=_ram(qemu) - pages * PAGE_SIZE)


def _balloon_pages(qemu: Machine) -> int:
    """The balloon size QEMU reports (query-balloon's actual is the guest size in bytes)."""
    info = qemu.qmp.cmd("query-balloon")
    assert isinstance(info, dict), f"query-balloon returned {info!r}"
    actual: int = info["actual"]
    return (_ram(qemu) - actual) // PAGE_SIZE


def _guest_stats(qemu: Machine, dev_id: str) -> dict[str, int]:
    result = qemu.qmp.cmd("qom-get", path=f"/machine/peripheral/{dev_id}", property="guest-stats")
    assert isinstance(result, dict), f"guest-stats is {result!r}"
    stats: dict[str, int] = result["stats"]
    return stats


def _request_stats(bal: VirtioBalloon, qemu: Machine, stats: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Initialize the device again so that every statsq buffer carries ``stats`` (the driver
    MUST keep the same subset, §5.5.6.3.1), make the device ask for statistics (a polling
    interval), answer, and return what QEMU then shows."""
    bal.reset()
    bal.stats = stats
    bal.initialize()
    qemu.qmp.cmd("qom-set", path=f"/machine/peripheral/{bal.dev_id}", property="guest-stats-polling-interval", value=1)
    bal.wait_stats_request(timeout=2)
    return _guest_stats(qemu, bal.dev_id)


@pytest.mark.conformance("balloon-target-in-num-pages", spec="5.5.6")
def test_target_appears_in_num_pages(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """The device asks for memory through num_pages: a target set by the host is what the
    driver reads there (§5.5.6 item 1), and shrinking the request lowers it again.
    Level: device behaviour the spec describes, without a MUST keyword."""
    bal: VirtioBalloon = virtio_device
    assert bal.num_pages == 0
    _set_target(qemu, 40)
    assert bal.num_pages == 40
    _set_target(qemu, 3)
    assert bal.num_pages == 3
    assert bal.config().actual == 0  # the device does not move actual itself


@pytest.mark.virtio_device("virtio-balloon-pci", interrupts="intx")
@pytest.mark.conformance("balloon-config-change-isr", spec="4.1.4.5.1")
def test_target_change_sets_the_config_bit_in_isr(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """Without MSI-X, the device MUST set the Device Configuration Interrupt bit in ISR status
    before sending a configuration change notification: a new target raises INTx with ISR
    bit 1 set, and the ISR read deasserts it."""
    bal: VirtioBalloon = virtio_device
    assert bal.msix is None and bal.intx is not None
    bal.transport.read_isr()  # start from a clear ISR
    _set_target(qemu, 8)
    bal.intx.wait(True, timeout=2)
    isr = bal.transport.read_isr()
    assert isr & ISR.config_change.mask, f"INTx raised for the new target but ISR is {isr:#x}"
    bal.intx.wait(False, timeout=2)
    assert bal.num_pages == 8


@pytest.mark.virtio_device("virtio-balloon-pci", transports=MODERN_TRANSPORTS)
@pytest.mark.conformance("balloon-config-generation", spec="4.1.4.3.1")
def test_target_change_moves_config_generation(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """The device MUST present a changed config_generation after the driver has read a
    device-specific configuration value which has changed since (num_pages here)."""
    bal: VirtioBalloon = virtio_device
    before = bal.transport.config_generation()
    assert bal.num_pages == 0
    _set_target(qemu, 5)
    assert bal.num_pages == 5
    assert bal.transport.config_generation() != before


@pytest.mark.conformance("balloon-inflate-deflate-acknowledged", spec="5.5.6")
def test_inflate_and_deflate_requests_are_used(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """The device acknowledges inflate and deflate requests by using the descriptor (§5.5.6
    item 4), writing nothing into these device-readable buffers (used length 0, §2.7.8.2).
    Level: device behaviour the spec describes, without a MUST keyword."""
    bal: VirtioBalloon = virtio_device
    pages = bal.inflate(6, update_actual=False)  # waits for the used element; checks its length
    assert bal.pages == pages and not bal.queues[0].in_flight
    assert bal.deflate(6, update_actual=False) == pages
    assert bal.pages == [] and not bal.queues[1].in_flight


@pytest.mark.conformance("balloon-actual-reflected", spec="5.5.6")
def test_actual_written_by_the_driver_is_what_the_device_reports(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """Once the driver updates actual after an inflation, the device holds that value: it reads
    back from the config and the host sees the balloon at that size (query-balloon); likewise
    after a deflation. Level: device behaviour the spec describes, without a MUST keyword."""
    bal: VirtioBalloon = virtio_device
    _set_target(qemu, 12)
    bal.inflate(bal.num_pages, update_actual=False)
    assert _balloon_pages(qemu) == 0  # not before the driver says so
    bal.set_actual()
    assert bal.actual == 12 and _balloon_pages(qemu) == 12
    _set_target(qemu, 4)
    assert bal.follow_target() == 4
    assert bal.actual == 4 and _balloon_pages(qemu) == 4


@pytest.mark.virtio_requires("STATS_VQ")
@pytest.mark.conformance("balloon-stats-consumed", spec="5.5.6.3")
def test_stats_buffer_is_used_and_its_statistics_consumed(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """A request for statistics: the device uses the one statsq buffer, the driver answers with
    a fresh buffer, and the device pops it and consumes the statistics (guest-stats shows them).
    Level: device behaviour the spec describes, without a MUST keyword."""
    bal: VirtioBalloon = virtio_device
    assert bal.stats_requests == 0
    stats = _request_stats(bal, qemu, [(StatTag.MEMFREE, 0x1234_5000), (StatTag.MAJFLT, 77), (StatTag.AVAIL, 9)])
    assert bal.stats_requests == 1
    got = {k: v for k, v in stats.items() if v != UNSET}
    assert got == {"stat-free-memory": 0x1234_5000, "stat-major-faults": 77, "stat-available-memory": 9}


@pytest.mark.virtio_requires("STATS_VQ")
@pytest.mark.conformance("balloon-stats-unknown-tags-ignored", spec="5.5.6.3.2")
def test_unknown_stat_tags_are_ignored(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """Within a statsq buffer the device MUST ignore entries with tags it does not recognize:
    tags no spec defines, around known ones, change nothing but the known statistics (names a
    newer QEMU adds for tags of its own stay unset)."""
    bal: VirtioBalloon = virtio_device
    stats = _request_stats(
        bal,
        qemu,
        [(0x7FFF, 1), (StatTag.SWAP_IN, 11), (0xFFFF, 3), (StatTag.MEMTOT, 22), (200, 4)],
    )
    _assert_stats(stats, {StatTag.SWAP_IN: 11, StatTag.MEMTOT: 22})


@pytest.mark.virtio_requires("STATS_VQ")
@pytest.mark.conformance("balloon-stats-any-order", spec="5.5.6.3.2")
def test_stat_entries_are_accepted_in_any_order(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """The device MUST accept struct virtio_balloon_stat entries in any order: every tag, in
    descending order, each with a distinct value, arrives under its own name."""
    bal: VirtioBalloon = virtio_device
    entries = [(tag, 1000 + tag) for tag in sorted(StatTag, reverse=True)]
    stats = _request_stats(bal, qemu, entries)
    _assert_stats(stats, {StatTag(tag): value for tag, value in entries})


@pytest.mark.virtio_device("virtio-balloon-pci", transports=LEGACY_TRANSPORTS)
@pytest.mark.conformance("balloon-legacy-actual-whole-value", spec="5.5.6.2.1")
def test_legacy_actual_is_used_only_once_complete(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """Legacy interface: the device SHOULD NOT use the actual value until the last, most
    significant byte has been written. Writing actual = 0x00000105 byte by byte from the least
    significant end, the host must not see 5 pages after the first byte."""
    bal: VirtioBalloon = virtio_device
    f = BALLOON_CONFIG.actual
    for i, byte in enumerate((0x05, 0x01, 0x00)):
        bal.transport.config_write(f.offset + i, 1, byte)
        assert _balloon_pages(qemu) == 0, f"the device used actual after byte {i} of 4"
    bal.transport.config_write(f.offset + 3, 1, 0x00)
    assert _balloon_pages(qemu) == 0x105


@pytest.mark.virtio_device("virtio-balloon-pci", transports=LEGACY_TRANSPORTS)
@pytest.mark.virtio_requires("STATS_VQ")
@pytest.mark.conformance("balloon-legacy-first-stats-ignored", spec="5.5.6.3.3")
def test_legacy_first_stats_buffer_is_ignored(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """Legacy interface: the device SHOULD ignore all values in the first statsq buffer the
    driver supplies after initialization (historically uninitialized), so guest-stats shows no
    statistic until the first requested buffer."""
    bal: VirtioBalloon = virtio_device
    stats = _guest_stats(qemu, bal.dev_id)
    assert all(v == UNSET for v in stats.values()), f"first-buffer values taken: {stats}"
