"""qtest_virtio.testing without QEMU: the fake qtest endpoint itself, then the driver's ring logic
(split §2.7, packed §2.8) played against the device-side helpers over fake guest RAM.

Pure logic only: what a device does is checked in scenarios/ and the other tests, on real QEMU."""

from __future__ import annotations

from typing import TypeVar

import pytest

from qtest_virtio import modes, testing
from qtest_virtio.errors import QtestError
from qtest_virtio.testing import (
    Chain,
    FakeGuest,
    FakeQtest,
    PackedDesc,
    PackedDevice,
    PackedRing,
    RingError,
    SplitDesc,
    SplitDevice,
    SplitRing,
)
from qtest_virtio.virtqueue import Buf, PackedVirtqueue, SplitVirtqueue, VirtqueueError
from qtest_virtio.virtqueue.layout import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F,
    PACKED_DESC,
    PACKED_F,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    SPLIT_AVAIL,
    USED_F_NO_NOTIFY,
)

# -- the fake endpoint ---------------------------------------------------------------------------


def test_words_are_little_endian_and_checked() -> None:
    bus = FakeQtest(4096)
    bus.writel(0x10, 0x11223344)
    assert bus.readb(0x10) == 0x44 and bus.readw(0x12) == 0x1122 and bus.readl(0x10) == 0x11223344
    bus.writeq(0x20, 0x0102030405060708)
    assert bus.memread(0x20, 8) == bytes.fromhex("0807060504030201") and bus.readq(0x20) == 0x0102030405060708
    bus.writeb(0x30, 0xFF)
    bus.writew(0x32, 0xBEEF)
    assert bus.read(0x30, 4) == b"\xff\x00\xef\xbe"
    with pytest.raises(ValueError, match=r"writew: value 0x10000 does not fit in 2 bytes"):
        bus.writew(0, 0x10000)
    with pytest.raises(ValueError, match="memset: value 0x100 is not a byte"):
        bus.memset(0, 1, 0x100)


def test_access_outside_ram_raises_naming_the_command() -> None:
    bus = FakeQtest(4096, base=0x100000)
    bus.writel(0x100FFC, 1)  # the last word fits
    with pytest.raises(QtestError, match=r"'readl 0x100ffe 0x4'.*outside the fake's RAM \[0x100000, 0x101000\)"):
        bus.readl(0x100FFE)
    with pytest.raises(QtestError, match="memwrite 0xfffff"):
        bus.memwrite(0xFFFFF, b"ab")
    with pytest.raises(QtestError, match="memset"):
        bus.memset(0x100800, 0x1000)
    with pytest.raises(ValueError, match="negative"):
        bus.memread(-1, 1)
    assert bus.ram == bytearray(4092) + b"\x01\x00\x00\x00"  # nothing half-written by the failures


def test_buffers_every_form_and_write_log() -> None:
    bus = FakeQtest(4096)
    bus.memwrite(0, b"abc")
    bus.write(3, b"de")
    bus.b64write(5, b"f")
    bus.memset(6, 2, 0x7A)
    assert bus.memread(0, 8) == bus.b64read(0, 8) == bus.read(0, 8) == b"abcdefzz"
    assert bus.writes == [(0, 3), (3, 2), (5, 1), (6, 2)]
    bus.memwrite(9, b"")  # empty writes send nothing
    assert len(bus.writes) == 4
    bus.write_many([("writew", 100, 0x0102), ("writeb", 102, 3)])
    assert bus.memread(100, 3) == b"\x02\x01\x03"
    with pytest.raises(ValueError, match="no I/O ports"):
        bus.write_many([("outl", 0xCF8, 0)])


def test_batch_applies_in_order_at_flush_only() -> None:
    bus = FakeQtest(4096)
    batch = bus.batch()
    batch.memwrite(0, b"\x11\x22")
    batch.writew(0, 0x3344)
    batch.writel(8, 5)
    assert len(batch) == 3 and bus.memread(0, 12) == bytes(12)
    batch.flush()
    assert bus.memread(0, 2) == b"\x44\x33" and bus.readl(8) == 5 and len(batch) == 0
    assert bus.writes == [(0, 2), (0, 2), (8, 4)]
    with pytest.raises(QtestError, match="outside"):
        batch.writeq(4092, 0)  # refused when queued, as CommandBatch validates before sending
    with pytest.raises(ValueError, match="does not fit"):
        batch.writeb(0, 256)


def test_allocator_and_transport_over_the_fake() -> None:
    guest = FakeGuest(2 << 20)
    guest.bus.memset(guest.memory.start, 64, 0xAB)
    addr = guest.memory.alloc(64, zero=True)
    assert guest.bus.memread(addr, 64) == bytes(64)
    vq = SplitVirtqueue(guest.transport, guest.memory, 3, 8)
    vq.setup()
    config = guest.transport.queues[3]
    assert (config.size, config.desc, config.driver, config.device, config.enabled) == (
        8,
        vq.desc,
        vq.avail,
        vq.used,
        True,
    )
    assert repr(vq) == "<SplitVirtqueue 00:00.0 queue 3 size=8>"


def test_mode_sets_are_the_modes_own() -> None:
    assert testing.LEGACY_LAYOUT_MODES is modes.LEGACY_LAYOUT_MODES
    assert testing.MODERN_LAYOUT_MODES is modes.MODERN_LAYOUT_MODES
    assert testing.MODERN_LAYOUT_MODES == ("transitional-modern", "modern")
    assert testing.ALL_MODES is modes.ALL_MODES and testing.RINGS is modes.RINGS


def test_buffer_helpers() -> None:
    guest = FakeGuest(2 << 20)
    bufs = testing.alloc_bufs(guest.memory, [3, 5], fill=0xEE)
    assert [(b.length, b.writable) for b in bufs] == [(3, True), (5, True)]
    assert guest.bus.memread(bufs[1].addr, 5) == b"\xee" * 5
    (ro,) = testing.alloc_bufs(guest.memory, [4], writable=False)
    assert not ro.writable
    data = testing.pattern(460, seed=3)
    assert 0 not in data and 0xEE not in data and len(set(data[:230])) == 230 and data[:230] == data[230:]
    testing.free_bufs(guest.memory, [*bufs, ro])
    guest.memory.check_leaks()


# -- split rings (§2.7) ----------------------------------------------------------------------------


Q = TypeVar("Q", SplitVirtqueue, PackedVirtqueue)


def set_up(cls: type[Q], size: int, **features: bool) -> tuple[FakeGuest, Q]:
    """A queue of ``cls`` set up on fake guest RAM and a fake transport, features as negotiated."""
    guest = FakeGuest(2 << 20)
    get = features.get
    vq = cls(
        guest.transport,
        guest.memory,
        0,
        size,
        event_idx=get("event_idx", False),
        indirect=get("indirect", False),
        in_order=get("in_order", False),
    )
    vq.setup()
    return guest, vq


def split_queue(size: int = 8, **features: bool) -> tuple[FakeGuest, SplitVirtqueue, SplitDevice]:
    guest, vq = set_up(SplitVirtqueue, size, **features)
    ring = SplitRing.at(guest.bus, guest.transport.queues[0])
    return guest, vq, SplitDevice(ring, event_idx=features.get("event_idx", False))


def interrupts_due(
    vq: SplitVirtqueue | PackedVirtqueue, device: SplitDevice | PackedDevice, buf: Buf, enables: list[bool]
) -> list[bool]:
    """For each entry: the driver asks for interrupts or not, one chain goes round, and the
    device says whether the driver wanted to hear of it."""
    due = []
    for enabled in enables:
        vq.set_interrupts(enabled)
        vq.add([buf])
        vq.kick(force=True)
        assert len(device.serve_all()) == 1
        due.append(device.interrupt_due())
        assert vq.wait_used(0).length == buf.length
        vq.flush()  # what the collection queued (split: the used_event write)
    return due


def test_split_chain_round_trip() -> None:
    guest, vq, device = split_queue()
    out, into = testing.alloc_bufs(guest.memory, [6], writable=False), testing.alloc_bufs(guest.memory, [4, 4])
    guest.bus.memwrite(out[0].addr, b"driver")
    token = vq.add([*out, *into])
    assert device.pop() is None, "a chain was visible before the queue's writes were flushed"
    vq.kick()
    chain = device.pop()
    assert chain is not None and chain.bufs == (*out, *into) and chain.slots == 3 and not chain.indirect
    assert chain.read(guest.bus) == b"driver" and device.pop() is None
    assert chain.fill(guest.bus, b"0123456") == 7
    device.push(chain.id, 7)
    elem = vq.poll_used()
    assert elem is not None and (elem.id, elem.length, elem.token, elem.bufs) == (chain.id, 7, token, chain.bufs)
    assert (guest.bus.memread(into[0].addr, 4), guest.bus.memread(into[1].addr, 4)) == (b"0123", b"456\x00")
    assert vq.free_descriptors == 8 and not vq.in_flight and vq.poll_used() is None


def test_split_publishes_descriptors_then_entry_then_idx() -> None:
    """§2.7.13: the avail index is written after the ring entry, and that after the descriptors."""
    guest, vq, _ = split_queue()
    bufs = testing.alloc_bufs(guest.memory, [4, 4])
    vq.add(bufs)
    del guest.bus.writes[:]
    vq.flush()
    ring = SplitRing.of(vq)
    order = [addr for addr, _ in guest.bus.writes]
    head = next(iter(vq.in_flight))
    assert order[-2:] == [vq.avail + SPLIT_AVAIL.size + 2 * 0, vq.avail + SPLIT_AVAIL.idx.offset]
    assert set(order[:-2]) == {vq.desc + 16 * d for d in vq.in_flight[head].descriptors}
    assert ring.avail_idx() == 1 and ring.avail_entry(0) == head


def test_split_indices_wrap_at_queue_size_and_16_bits() -> None:
    """Free-running 16-bit indexes (§2.7.6, §2.7.8), ring positions modulo the size: both sides
    start 10 entries before 2**16 (entries counted by hand) and run 30 chains through 4 slots."""
    guest, vq, device = split_queue(size=4)
    start = 0x10000 - 10
    for count in (0xFFFF, start + 1):  # counts by hand wrap at 16 bits too
        vq.published_by_hand(count)
        vq.consumed_by_hand(count)
    assert vq.avail_idx == vq.last_used == start
    device.ring.set_avail_idx(start)
    device.ring.set_used_idx(start)
    device.last_avail = device.used_idx = start
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    seen = []
    for _ in range(10):
        tokens = [vq.add([buf]) for _ in range(3)]
        assert vq.kick()
        for _ in tokens:
            chain = device.pop()
            assert chain is not None
            seen.append((chain.id, device.ring.used_idx() % 4))
            device.push(chain.id, 8)
        assert [vq.wait_used(0).token for _ in tokens] == tokens
    assert vq.avail_idx == vq.last_used == device.used_idx == device.ring.avail_idx() == 20
    assert {slot for _, slot in seen} == {0, 1, 2, 3} and {i for i, _ in seen} <= {0, 1, 2, 3}
    assert vq.free_descriptors == 4


def test_split_kick_follows_avail_event() -> None:
    """EVENT_IDX (§2.7.10): the driver notifies only when avail.idx passes avail_event."""
    guest, vq, device = split_queue(event_idx=True)
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    device.kick_at(2)
    kicks = []
    for _ in range(4):
        vq.add([buf])
        kicks.append(vq.kick())
    assert kicks == [False, False, True, False]
    assert guest.transport.queues[0].notifications == 1 == vq.notifications and vq.kicks_suppressed == 3
    device.kick_at(0xFFFF)  # one behind where avail.idx wraps to: the next batch crosses it
    vq.add([buf])
    assert not vq.kick()


def test_split_kick_follows_no_notify_without_event_idx() -> None:
    guest, vq, device = split_queue()
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    device.kick_at(100)  # ignored without EVENT_IDX
    vq.add([buf])
    assert vq.kick()
    device.suppress_kicks(True)
    vq.add([buf])
    assert not vq.kick() and vq.kick(force=True)
    device.suppress_kicks(False)
    vq.add([buf])
    assert vq.kick() and vq.notifications == 3


def test_split_interrupts_follow_used_event() -> None:
    """The driver asks for the next used buffer by writing used_event = last_used as it
    consumes (§2.7.10); set_interrupts(False) moves it out of reach."""
    guest, vq, device = split_queue(event_idx=True)
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    assert interrupts_due(vq, device, buf, [True, True, False, False, True]) == [True, True, False, False, True]
    assert device.ring.used_event() == vq.last_used == 5


def test_split_interrupts_follow_no_interrupt_without_event_idx() -> None:
    _, vq, device = split_queue()
    vq.set_interrupts(False)
    assert device.ring.avail_flags() == AVAIL_F_NO_INTERRUPT and not device.interrupt_due()
    vq.set_interrupts(True)
    assert device.ring.avail_flags() == 0 and device.interrupt_due()


def test_split_indirect_table() -> None:
    """§2.7.5.3: one ring descriptor flagged INDIRECT; the table chains its entries with NEXT
    in table order and is freed once the chain is used."""
    guest, vq, device = split_queue(indirect=True)
    bufs = testing.alloc_bufs(guest.memory, [3, 5, 9])
    live = len(guest.memory.allocations)
    vq.add(bufs)
    assert vq.free_descriptors == 7 and len(guest.memory.allocations) == live + 1
    vq.kick()
    head = SplitRing.of(vq).read_desc(next(iter(vq.in_flight)))
    assert head.flags == DESC_F.INDIRECT.mask and head.len == 3 * 16
    table = testing.read_desc_table(guest.bus, head.addr, head.len, SplitDesc)
    assert [(d.flags, d.next) for d in table] == [
        (DESC_F.WRITE.mask | DESC_F.NEXT.mask, 1),
        (DESC_F.WRITE.mask | DESC_F.NEXT.mask, 2),
        (DESC_F.WRITE.mask, 0),
    ]
    chain = device.pop()
    assert chain is not None and chain.indirect and chain.slots == 1 and chain.bufs == tuple(bufs)
    device.push(chain.id, 17)
    assert vq.wait_used(0).length == 17
    assert len(guest.memory.allocations) == live and vq.free_descriptors == 8
    with pytest.raises(VirtqueueError, match="INDIRECT_DESC was not negotiated"):
        split_queue()[1].add(bufs, indirect=True)


def test_split_used_ring_errors_name_the_entry() -> None:
    guest, vq, device = split_queue()
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    vq.add([buf])
    vq.kick()
    chain = device.pop()
    assert chain is not None
    device.push(chain.id, 9)
    with pytest.raises(VirtqueueError, match=r"descriptor 0: used length 9 is longer than the 8 device-writable"):
        vq.poll_used()
    vq.consumed_by_hand()  # skip the bad entry
    device.push(7, 1)
    with pytest.raises(VirtqueueError, match=r"device returned id 7, which is not in flight \(in flight: \[0\]\)"):
        vq.poll_used()
    vq.consumed_by_hand()
    device.push(8, 1)
    with pytest.raises(VirtqueueError, match="used ring entry 2 has id 8, outside the 8 descriptors"):
        vq.poll_used()
    vq.consumed_by_hand()
    device.push(chain.id, 8, covers=9)
    with pytest.raises(VirtqueueError, match=r"used\.idx moved 9 past last_used=3"):
        vq.poll_used()


def test_split_in_order_batch() -> None:
    """IN_ORDER (§2.7.9): one used entry for a batch of three; the first two come back skipped
    with their whole writable length."""
    guest, vq, device = split_queue(in_order=True)
    chains = [testing.alloc_bufs(guest.memory, [4] * n) for n in (2, 1, 3)]
    tokens = [vq.add(bufs) for bufs in chains]
    vq.kick()
    popped = [device.pop() for _ in chains]
    assert [c.id for c in popped if c] == [0, 2, 3] and [c.slots for c in popped if c] == [2, 1, 3]
    device.push(3, 5, covers=3)
    elems = [vq.wait_used(0) for _ in tokens]
    assert [(e.token, e.length, e.skipped) for e in elems] == [
        (tokens[0], 8, True),
        (tokens[1], 4, True),
        (tokens[2], 5, False),
    ]


def test_hand_built_split_chain() -> None:
    """publish_by_hand: a chain the driver does not track, then the driver's own after it."""
    guest, vq, device = split_queue()
    (direct, tabled) = testing.alloc_bufs(guest.memory, [4, 4])
    table = guest.memory.alloc(16)
    length = testing.write_desc_table(guest.bus, table, [SplitDesc(tabled.addr, 4, DESC_F.WRITE.mask)])
    head, tail = 7, 6
    descs = {
        head: SplitDesc(direct.addr, 4, DESC_F.WRITE.mask | DESC_F.NEXT.mask, tail),
        tail: SplitDesc(table, length, DESC_F.INDIRECT.mask),
    }
    testing.publish_by_hand(vq, head, descs, make_available=False)
    assert device.pop() is None
    testing.publish_by_hand(vq, head, {})
    chain = device.pop()
    assert chain == Chain(head, (direct, tabled), slots=2, indirect=True)
    assert testing.take_used_by_hand(vq) is None
    device.push(head, 6)
    assert testing.take_used_by_hand(vq) == (head, 6) and vq.last_used == 1
    token = vq.add([direct])
    assert not vq.kick() or device.ring.used_flags() != USED_F_NO_NOTIFY
    mine = device.pop()
    assert mine is not None and mine.id == 0 and device.last_avail == vq.avail_idx == 2
    device.push(0, 4)
    assert vq.wait_used(0).token == token


def test_split_device_refuses_a_descriptor_loop() -> None:
    _, vq, device = split_queue(size=4)
    testing.publish_by_hand(
        vq, 1, {1: SplitDesc(0x1000, 4, DESC_F.NEXT.mask, 2), 2: SplitDesc(0x1000, 4, DESC_F.NEXT.mask, 1)}
    )
    with pytest.raises(RingError, match="descriptor loop"):
        device.pop()


# -- packed rings (§2.8) ---------------------------------------------------------------------------


def packed_queue(size: int = 8, **features: bool) -> tuple[FakeGuest, PackedVirtqueue, PackedDevice]:
    guest, vq = set_up(PackedVirtqueue, size, **features)
    return guest, vq, PackedDevice(PackedRing.at(guest.bus, guest.transport.queues[0]))


def test_packed_chain_round_trip_and_head_flags_last() -> None:
    """§2.8.21: the head's flags are the last write, so the chain appears whole."""
    guest, vq, device = packed_queue()
    bufs = testing.alloc_bufs(guest.memory, [2, 3])
    token = vq.add(bufs)
    del guest.bus.writes[:]
    assert device.pop() is None
    vq.kick()
    assert guest.bus.writes[-1] == (vq.ring + PACKED_DESC.flags.offset, 2)
    ring = PackedRing.of(vq)
    assert ring.read_desc(0).flags == testing.available_flags(1, writable=True, more=True)
    assert ring.read_desc(1).flags == testing.available_flags(1, writable=True)
    chain = device.pop()
    assert chain is not None and chain.bufs == tuple(bufs) and chain.slots == 2
    device.push(chain.id, 5, chain.slots)
    assert ring.flags(0) == PACKED_F.AVAIL.mask | PACKED_F.USED.mask | PACKED_F.WRITE.mask
    elem = vq.wait_used(0)
    assert (elem.token, elem.length, elem.id) == (token, 5, chain.id) and vq.next_used == 2


def test_packed_wrap_counters_across_laps() -> None:
    """§2.8.1: chains of 1-3 slots on a 4-slot ring wrap at odd positions; each lap flips the
    driver's and the device's counters, and descriptors carry AVAIL = lap, USED = !lap."""
    guest, vq, device = packed_queue(size=4)
    bufs = testing.alloc_bufs(guest.memory, [4, 4, 4])
    flips = 0
    for i in range(60):
        parts = bufs[: 1 + i % 3]
        lap = vq.avail_wrap
        token = vq.add(parts)
        vq.kick()
        first = PackedRing.of(vq).read_desc(device.next_avail)
        assert bool(first.flags & PACKED_F.AVAIL.mask) == bool(lap) != bool(first.flags & PACKED_F.USED.mask)
        chain = device.pop()
        assert chain is not None and chain.slots == len(parts)
        assert (device.next_avail, device.avail_wrap) == (vq.next_avail, vq.avail_wrap)
        device.push(chain.id, 4 * len(parts), chain.slots)
        wrap = vq.used_wrap
        assert vq.wait_used(0).token == token
        flips += wrap != vq.used_wrap
        assert (vq.next_used, vq.used_wrap) == (device.next_used, device.used_wrap)
    assert flips == 60 * 2 // 4  # 120 slots, 4 a lap


def test_packed_stale_descriptor_is_not_available() -> None:
    """A slot whose AVAIL bit still equals its old lap is not available (§2.8.1)."""
    _, vq, device = packed_queue(size=2)
    ring = PackedRing.of(vq)
    ring.write_desc(0, PackedDesc(0x1000, 8, 0, PACKED_F.WRITE.mask))  # AVAIL=0, USED=0: not lap 1
    assert device.pop() is None
    ring.set_flags(0, testing.available_flags(1, writable=True))
    chain = device.pop()
    assert chain is not None and chain.bufs == (Buf(0x1000, 8, True),)


def test_packed_kick_follows_device_event() -> None:
    """§2.8.10: DISABLE stops kicks, ENABLE wants every one, DESC names the slot and lap. The
    device changes its mind between a poll and the next kick here, so the decision is read after
    publishing every time (the poll's snapshot is tested on its own below)."""
    guest, vq, device = packed_queue(size=4, event_idx=True)
    vq.notify_on_snapshot = False
    (buf,) = testing.alloc_bufs(guest.memory, [8])

    def one(suppress: bool | None = None) -> bool:
        if suppress is not None:
            device.suppress_kicks(suppress)
        vq.add([buf])
        kicked = vq.kick()
        assert len(device.serve_all()) == 1
        assert vq.wait_used(0).length == 8
        return kicked

    assert [one(True), one(False), one()] == [False, True, True]
    device.kick_at(1, 0)  # slot 1 of the second lap; slots 3 and 0 come first
    assert [one() for _ in range(4)] == [False, False, True, False]


def test_packed_kick_event_in_the_next_lap() -> None:
    """An event offset with the other wrap counter is a slot of the next lap: passing the same
    slot number in this lap does not notify (§2.8.10)."""
    guest, vq, device = packed_queue(size=4, event_idx=True)
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    device.kick_at(1, 0)
    kicks = []
    for _ in range(6):
        vq.add([buf])
        kicks.append(vq.kick())
        assert len(device.serve_all()) == 1
        assert vq.wait_used(0).length == 8
    assert kicks == [False, False, False, False, False, True]


def test_packed_kick_for_a_chain_across_the_wrap() -> None:
    """A chain from the last slot into the next lap moves the driver's position from (3, lap 1)
    to (1, lap 0): an event at slot 3 of lap 0 is still ahead, reached three chains later."""
    guest, vq, device = packed_queue(size=4, event_idx=True)
    bufs = testing.alloc_bufs(guest.memory, [8, 8])
    for _ in range(3):
        vq.add(bufs[:1])
        vq.kick()
    device.serve_all()
    device.kick_at(3, 0)
    kicks = []
    for parts in (bufs, bufs[:1], bufs[:1], bufs[:1]):
        while vq.poll_used():
            pass
        vq.add(parts)
        kicks.append(vq.kick())
        assert len(device.serve_all()) == 1
    assert kicks == [False, False, False, True]


def test_packed_interrupts_follow_driver_event() -> None:
    guest, vq, device = packed_queue(size=4)
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    assert interrupts_due(vq, device, buf, [False, True]) == [False, True]
    assert PackedRing.of(vq).driver_event_fields()[1] == 0
    device.ring.set_driver_event(RING_EVENT_FLAGS_DESC, 3 | 1 << 15)  # slot 3, lap 1
    device.push(0, 0)  # slot 2
    assert not device.interrupt_due()
    device.push(0, 0)  # slot 3: the one asked for
    assert device.interrupt_due()
    device.ring.set_driver_event(RING_EVENT_FLAGS_DISABLE)
    device.push(0, 0)
    assert not device.interrupt_due()


def test_packed_indirect_table() -> None:
    guest, vq, device = packed_queue(indirect=True)
    bufs = [*testing.alloc_bufs(guest.memory, [6], writable=False), *testing.alloc_bufs(guest.memory, [4, 4])]
    vq.add(bufs)
    vq.kick()
    head = PackedRing.of(vq).read_desc(0)
    assert head.flags & PACKED_F.INDIRECT.mask and head.len == 48 and vq.free_descriptors == 7
    table = testing.read_desc_table(guest.bus, head.addr, head.len, PackedDesc)
    assert [d.flags for d in table] == [0, PACKED_F.WRITE.mask, PACKED_F.WRITE.mask]
    chain = device.pop()
    assert chain is not None and chain.indirect and chain.slots == 1 and chain.bufs == tuple(bufs)
    device.push(chain.id, 8)
    assert vq.wait_used(0).length == 8 and vq.free_descriptors == 8


def test_packed_in_order_batch_skips_every_slot() -> None:
    """IN_ORDER (§2.8.8): one used descriptor with the last chain's id; the driver skips the
    slots of the whole batch and reads the next used descriptor after them."""
    guest, vq, device = packed_queue(in_order=True)
    chains = [testing.alloc_bufs(guest.memory, [4] * n) for n in (2, 1, 3)]
    tokens = [vq.add(bufs) for bufs in chains]
    vq.kick()
    popped = [device.pop() for _ in chains]
    assert all(popped)
    last = popped[-1]
    assert last is not None
    device.push(last.id, 5, slots=6)
    elems = [vq.wait_used(0) for _ in tokens]
    assert [(e.token, e.skipped) for e in elems] == [(tokens[0], True), (tokens[1], True), (tokens[2], False)]
    assert (vq.next_used, vq.used_wrap) == (6, 1) == (device.next_used, device.used_wrap)


def test_packed_used_id_not_in_flight() -> None:
    guest, vq, device = packed_queue()
    (buf,) = testing.alloc_bufs(guest.memory, [8])
    vq.add([buf])
    vq.kick()
    device.push(5, 1)
    with pytest.raises(VirtqueueError, match="device returned id 5, which is not in flight"):
        vq.poll_used()


@pytest.mark.parametrize("kind", ["split", "split-event-idx", "packed"])
def test_kick_goes_by_the_polls_snapshot_only_when_it_says_notify(kind: str) -> None:
    """A kick may notify on the suppression state the last poll read, without reading it again
    after publishing, but only when that snapshot says "notify": a snapshot that says "suppress"
    is read again (§2.7.10, §2.8.10: no notification the device asks for is missed). A
    notification uses the snapshot up; ``notify_on_snapshot = False`` reads every time."""
    if kind == "packed":
        guest, pvq, pdevice = packed_queue(size=8, event_idx=True)
        vq: SplitVirtqueue | PackedVirtqueue = pvq
        device: SplitDevice | PackedDevice = pdevice
    else:
        guest, vq, device = split_queue(event_idx=kind == "split-event-idx")
    (buf,) = testing.alloc_bufs(guest.memory, [8])

    def suppress(on: bool) -> None:
        if isinstance(device, SplitDevice) and device.event_idx:
            device.kick_at(0xFFFF if on else device.ring.avail_idx())  # avail_event out of reach, or due
        else:
            device.suppress_kicks(on)

    def round_trip(*, suppressed_when_polled: bool, suppressed_at_kick: bool) -> bool:
        vq.add([buf])
        vq.kick(force=True)
        device.serve_all()
        suppress(suppressed_when_polled)
        assert vq.wait_used(0).length == 8  # the poll: its snapshot
        suppress(suppressed_at_kick)
        vq.add([buf])
        kicked = vq.kick()
        device.serve_all()
        vq.wait_used(0)
        return kicked

    # The snapshot says suppress: read again after publishing, which decides either way.
    assert round_trip(suppressed_when_polled=True, suppressed_at_kick=False)
    assert not round_trip(suppressed_when_polled=True, suppressed_at_kick=True)
    # The snapshot says notify: notify on it (the device has since asked not to be: one
    # notification it did not need, never one it missed).
    assert round_trip(suppressed_when_polled=False, suppressed_at_kick=False)
    assert round_trip(suppressed_when_polled=False, suppressed_at_kick=True)
    vq.notify_on_snapshot = False
    assert not round_trip(suppressed_when_polled=False, suppressed_at_kick=True)
    vq.notify_on_snapshot = True
    # A notification uses the snapshot up: the next kick, with no poll between, reads again.
    suppress(False)
    vq.add([buf])
    assert vq.kick()
    device.serve_all()
    suppress(True)
    vq.add([buf])
    assert not vq.kick()
