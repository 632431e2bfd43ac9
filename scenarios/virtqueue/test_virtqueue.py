"""Virtqueue conformance (virtio 1.2 §2.1.2, §2.4, §2.6.1, §2.7 split, §2.8 packed): what the
device does with the rings the driver lays out, on virtio-rng (a request is one or more
device-writable buffers, so every byte the device writes is visible).

Some scenarios write ring entries by hand to build chains the library's driver never builds
(a descriptor made available only halfway, an indirect descriptor behind a direct one).
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import RngFifo
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.testing import (
    MODERN_LAYOUT_MODES,
    PackedDesc,
    PackedRing,
    SplitDesc,
    SplitRing,
    alloc_bufs,
    pattern,
    publish_by_hand,
    take_used_by_hand,
    write_desc_table,
)
from qtest_virtio.transport import ModernTransport, layout
from qtest_virtio.transport.layout import STATUS
from qtest_virtio.virtqueue import Buf, PackedVirtqueue, SplitVirtqueue
from qtest_virtio.virtqueue.layout import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F,
    PACKED_DESC,
    PACKED_F,
    SPLIT_AVAIL,
    SPLIT_DESC,
    SPLIT_USED,
    USED_F_NO_NOTIFY,
)

pytestmark = pytest.mark.virtio_device("virtio-rng-pci")

#: How long "nothing happens" is watched (the device's work runs in QEMU's main loop).
QUIET_WINDOW = 0.02
#: Timeout for work that must happen (a failure should not cost the default 5 s).
SHORT = 2.0
FILL = 0xEE


# -- helpers ----------------------------------------------------------------------------------


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give the device's main loop a few turns (each qtest command is one) to do anything."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vm.qtest.readl(0)


def buffers(vm: Machine, sizes: list[int], *, writable: bool = True, fill: int = FILL) -> list[Buf]:
    return alloc_bufs(vm.memory, sizes, writable=writable, fill=fill, tag="virtqueue scenario")


def split(drv: VirtioDriver) -> SplitVirtqueue:
    """The split queue a split-ring scenario drives (``--virtio-flags packed=on`` overrides the
    marker's ring choice: such a run has nothing to check here)."""
    vq = drv.queues[0]
    if not isinstance(vq, SplitVirtqueue):
        pytest.skip("a split-ring scenario; this run uses packed rings")
    return vq


def packed(drv: VirtioDriver) -> PackedVirtqueue:
    vq = drv.queues[0]
    if not isinstance(vq, PackedVirtqueue):
        pytest.skip("a packed-ring scenario; this run uses split rings")
    return vq


def warm_up(drv: VirtioRng) -> None:
    """One request and its interrupt: QEMU notifies the first used buffer after queue setup
    whatever the suppression fields say (it has no earlier notification to compare with)."""
    assert drv.msix is not None
    drv.request(8, timeout=SHORT)
    drv.msix.wait(drv.queue_vector(0), timeout=SHORT)


def wait_used_idx(vq: SplitVirtqueue, value: int, timeout: float = SHORT) -> None:
    ring = SplitRing.of(vq)
    deadline = time.monotonic() + timeout
    while ring.used_idx() != value & 0xFFFF:
        assert time.monotonic() < deadline, f"used.idx stays {ring.used_idx()}, expected {value & 0xFFFF}"


def raw_used(vm: Machine, vq: SplitVirtqueue, timeout: float = SHORT, *, dev_id: str = "") -> tuple[int, int]:
    """The next used element of a chain published by hand: (id, len). Fails fast, naming the
    reason, if the device gives up on the queue instead."""
    deadline = time.monotonic() + timeout
    while (entry := take_used_by_hand(vq)) is None:
        status = vq.transport.get_status()
        broken = bool(dev_id) and device_view(vm, dev_id).broken
        assert not status & STATUS.DEVICE_NEEDS_RESET.mask and not broken, (
            f"the device gave up on the queue (status {status:#x}, QMP broken={broken}); "
            f"QEMU said: {vm.stderr_tail().strip().splitlines()[-1:]}"
        )
        assert time.monotonic() < deadline, f"nothing used within {timeout} s; {vq.describe_state()}"
    return entry


# -- device status and resets (§2.1.2, §2.4.1) --------------------------------------------------


@pytest.mark.conformance("vq-no-use-before-driver-ok", spec="2.1.2")
@pytest.mark.virtio_device("virtio-rng-pci", transports=MODERN_LAYOUT_MODES)
def test_no_buffer_is_used_before_driver_ok(
    virtio_device: VirtioRng, qemu: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the driver sets DRIVER_OK the device neither consumes buffers nor sends used buffer
    notifications (MUST): a request made available and notified during initialization stays
    untouched, and is served once DRIVER_OK is set. Modern layouts only: through the legacy
    interface drivers used the device before DRIVER_OK, and a transitional device lets them
    (§3.1.2)."""
    drv = virtio_device
    drv.reset()
    monkeypatch.setattr("qtest_virtio.devices.base.driver_ok", lambda transport: None)
    drv.initialize()  # everything up to, not including, DRIVER_OK
    assert not drv.transport.get_status() & STATUS.DRIVER_OK.mask
    vq = drv.queues[0]
    (buf,) = buffers(qemu, [16])
    token = vq.add([buf])
    vq.kick(force=True)
    quiet(qemu)
    assert vq.poll_used() is None, "a buffer was used before DRIVER_OK"
    assert qemu.memory.read(buf.addr, 16) == bytes([FILL]) * 16
    assert drv.msix is not None and not drv.msix.fired(drv.queue_vector(0))
    drv.transport.add_status(STATUS.DRIVER_OK.mask)
    vq.kick(force=True)
    assert 1 <= vq.wait_for(token, timeout=SHORT).length <= 16


@pytest.mark.conformance("vq-device-reset-stops-queues", spec="2.4.1")
def test_reset_device_leaves_the_rings_alone(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Once a reset has completed (status reads 0) the device neither uses the queues nor
    notifies until the driver initializes it again (MUST): a chain published before the reset
    and notified after it is never used."""
    drv = virtio_device
    vq = drv.queues[0]
    (buf,) = buffers(qemu, [16])
    vq.add([buf])
    vq.flush()
    assert isinstance(vq, SplitVirtqueue | PackedVirtqueue)
    device_area = SplitRing.of(vq).used_area if isinstance(vq, SplitVirtqueue) else PackedRing.of(vq).read_ring
    ring_before = device_area()
    drv.transport.reset()
    drv.transport.notify(0)
    quiet(qemu)
    assert device_area() == ring_before, "the device wrote the used ring after reset"
    assert qemu.memory.read(buf.addr, 16) == bytes([FILL]) * 16
    assert drv.transport.read_isr() == 0
    drv.initialize()
    assert len(drv.request(16, timeout=SHORT)) >= 1


# -- queue reset (§2.6.1) ------------------------------------------------------------------------


def _reset_queue_0(drv: VirtioDriver) -> ModernTransport:
    t = drv.transport
    assert isinstance(t, ModernTransport)
    t.reset_queue(0)
    return t


@pytest.mark.conformance("vq-queue-reset-stops-the-queue", spec="2.6.1.1.1")
@pytest.mark.virtio_device("virtio-rng-pci", transports=MODERN_LAYOUT_MODES, flags={"queue_reset": "on"})
@pytest.mark.virtio_requires("RING_RESET")
def test_reset_queue_is_not_executed(virtio_device: VirtioRng, qemu: Machine) -> None:
    """After the driver resets a queue the device executes no request from it and sends no
    notification for it (MUST): a chain published before the reset and notified after it stays
    unused."""
    drv = virtio_device
    vq = drv.queues[0]
    (buf,) = buffers(qemu, [16])
    vq.add([buf])
    vq.flush()
    t = _reset_queue_0(drv)
    t.notify(0)
    quiet(qemu)
    assert qemu.memory.read(buf.addr, 16) == bytes([FILL]) * 16, "a request of the reset queue was executed"
    assert vq.poll_used() is None
    assert drv.msix is not None and not drv.msix.fired(drv.queue_vector(0))
    vq.release()
    drv.queues[0] = drv.create_queue(0)
    assert len(drv.request(16, timeout=SHORT)) >= 1


@pytest.mark.conformance("vq-queue-reset-default-state", spec="2.6.1.1.1")
@pytest.mark.virtio_device("virtio-rng-pci", transports=MODERN_LAYOUT_MODES, flags={"queue_reset": "on"}, queue_size=4)
@pytest.mark.virtio_requires("RING_RESET")
def test_reset_queue_returns_to_its_default_state(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A queue reset puts the queue back in its default state, available and used state
    included (MUST): queue_size reads the device's maximum again, QEMU's own indices are 0, and
    fresh rings are served from their first entry."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, ModernTransport)
    t.reset()
    maximum = t.queue_max_size(0)
    drv.initialize()  # again with the 4-entry queue the marker asks for
    assert drv.queues[0].size == 4 < maximum
    for _ in range(3):
        drv.request(8, timeout=SHORT)
    _reset_queue_0(drv)
    t.select_queue(0)
    assert t.common.read(layout.COMMON_CFG.queue_size) == maximum
    view = queue_view(qemu, drv.dev_id, 0)
    assert (view.last_avail_idx, view.used_idx, view.inuse) == (0, 0, 0)
    drv.queues[0].release()
    drv.queues[0] = drv.create_queue(0)
    assert len(drv.request(8, timeout=SHORT)) >= 1


@pytest.mark.conformance("vq-queue-reenable-new-size", spec="2.6.1.2.1")
@pytest.mark.virtio_device("virtio-rng-pci", transports=MODERN_LAYOUT_MODES, flags={"queue_reset": "on"})
@pytest.mark.virtio_requires("RING_RESET")
def test_reenabled_queue_runs_at_the_new_size(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Re-enabling a reset queue, the device follows the configuration the driver wrote this
    time, such as a smaller queue size (MUST): a 2-entry queue in new memory is served
    correctly across several wraps."""
    drv = virtio_device
    first = drv.queues[0].size
    for _ in range(3):
        drv.request(8, timeout=SHORT)
    _reset_queue_0(drv)
    drv.queues[0].release()
    drv.queue_size = 2
    drv.queues[0] = drv.create_queue(0)
    assert drv.queues[0].size == 2 < first
    assert queue_view(qemu, drv.dev_id, 0).num == 2
    for _ in range(7):
        assert len(drv.request(8, timeout=SHORT)) >= 1


# -- buffers and descriptors (§2.7.5, §2.7.8, §2.8.15) ------------------------------------------


@pytest.mark.conformance("vq-readable-buffer-not-written", spec="2.7.5.1")
def test_device_readable_buffer_is_not_written(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device never writes a device-readable buffer (MUST; the packed ring's §2.8.15 says
    the same): in a chain of a readable then a writable buffer, the readable one is intact."""
    drv = virtio_device
    vq = drv.queues[0]
    (readable,) = buffers(qemu, [32], writable=False, fill=0x5A)
    (writable,) = buffers(qemu, [16])
    token = vq.add([readable, writable])
    vq.kick()
    vq.wait_for(token, timeout=SHORT)
    assert qemu.memory.read(readable.addr, 32) == bytes([0x5A]) * 32


@pytest.mark.conformance("vq-used-len-counts-written-bytes", spec="2.7.8.2")
def test_used_length_counts_only_device_written_bytes(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The used length is what the device wrote into the writable part of the chain: never more
    than the writable bytes, readable bytes not counted, and at least that many bytes written
    from the first writable buffer on (MUST)."""
    drv = virtio_device
    vq = drv.queues[0]
    (readable,) = buffers(qemu, [32], writable=False)
    (writable,) = buffers(qemu, [24])
    token = vq.add([readable, writable])
    vq.kick()
    elem = vq.wait_for(token, timeout=SHORT)
    assert 1 <= elem.length <= 24
    written = qemu.memory.read(writable.addr, elem.length)
    assert written != bytes([FILL]) * elem.length, "used length claims bytes the device did not write"


@pytest.mark.conformance("vq-split-descriptor-table-not-written", spec="2.7.5.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), refuse={"INDIRECT_DESC"})
def test_descriptor_table_is_not_written(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device never writes a descriptor table entry (MUST): the table reads the same after
    the device has used every chain in it."""
    drv = virtio_device
    vq = split(drv)
    chains = [buffers(qemu, [4, 4, 4]), buffers(qemu, [8]), buffers(qemu, [2, 6])]
    tokens = [vq.add(bufs) for bufs in chains]
    vq.flush()
    ring = SplitRing.of(vq)
    table = ring.read_table()
    vq.kick()
    for token in tokens:
        vq.wait_for(token, timeout=SHORT)
    assert ring.read_table() == table


@pytest.mark.conformance("vq-split-no-use-past-avail-idx", spec="2.7.6")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
def test_entry_past_avail_idx_is_not_used(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Only ring entries below avail.idx are available: a descriptor and ring entry written but
    not yet counted in idx are left alone even when the device is notified, so used.idx never
    runs ahead of avail.idx; counting it makes the device use it."""
    drv = virtio_device
    vq = split(drv)
    (buf,) = buffers(qemu, [8])
    head = vq.size - 1  # a slot the library does not hand out first
    publish_by_hand(vq, head, {head: SplitDesc(buf.addr, 8, DESC_F.WRITE.mask)}, make_available=False)
    drv.transport.notify(0)
    quiet(qemu)
    ring = SplitRing.of(vq)
    assert ring.used_idx() == vq.last_used == vq.avail_idx
    assert qemu.memory.read(buf.addr, 8) == bytes([FILL]) * 8
    publish_by_hand(vq, head, {})
    drv.transport.notify(0)
    used_id, length = raw_used(qemu, vq, dev_id=drv.dev_id)
    assert used_id == head
    assert 1 <= length <= 8
    assert ring.used_idx() == vq.avail_idx


@pytest.mark.conformance("vq-packed-no-use-without-avail-flag", spec="2.8.15")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("packed",), transports=MODERN_LAYOUT_MODES)
def test_packed_descriptor_is_not_used_until_marked_available(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device uses a packed descriptor only after it sees the descriptor's AVAIL flag change
    (MUST): a fully written descriptor whose flags still have AVAIL at its initial value is not
    used when the device is notified."""
    drv = virtio_device
    vq = packed(drv)
    (buf,) = buffers(qemu, [8])
    slot = vq.next_avail
    assert vq.avail_wrap == 1  # a fresh ring: available means AVAIL=1, USED=0
    vq.flush()
    ring = PackedRing.of(vq)
    ring.write_desc(slot, PackedDesc(buf.addr, 8, 0, PACKED_F.WRITE.mask))
    drv.transport.notify(0)
    quiet(qemu)
    flags = ring.flags(slot)
    assert flags == PACKED_F.WRITE.mask, f"the device changed the descriptor's flags to {flags:#x}"
    assert qemu.memory.read(buf.addr, 8) == bytes([FILL]) * 8
    assert queue_view(qemu, drv.dev_id, 0).last_avail_idx == 0
    token = vq.add([buf])  # the same slot, now really made available
    vq.kick()
    assert 1 <= vq.wait_for(token, timeout=SHORT).length <= 8


@pytest.mark.conformance("vq-packed-used-flags-match-wrap", spec="2.8.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("packed",), transports=MODERN_LAYOUT_MODES, queue_size=4)
def test_packed_used_descriptor_flags(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device marks a descriptor used by setting both AVAIL and USED to its ring wrap
    counter, which starts at 1 and flips each time it uses the last descriptor: checked on a
    4-entry ring over three wraps."""
    drv = virtio_device
    vq = packed(drv)
    (buf,) = buffers(qemu, [8])
    for i in range(12):
        slot, wrap = vq.next_used, vq.used_wrap
        token = vq.add([buf])
        vq.kick()
        flags_addr = vq.ring + PACKED_DESC.size * slot + PACKED_DESC.flags.offset
        deadline = time.monotonic() + SHORT
        while True:
            flags = qemu.qtest.readw(flags_addr)
            if bool(flags & PACKED_F.USED.mask) == bool(wrap):
                break
            assert time.monotonic() < deadline, f"request {i}: slot {slot} flags stay {flags:#x}"
        assert bool(flags & PACKED_F.AVAIL.mask) == bool(wrap), f"request {i}: slot {slot} used with flags {flags:#x}"
        vq.wait_for(token, timeout=SHORT)
    assert (vq.used_wrap, vq.next_used) == (0, 0)  # three times round: the counter went 1, 0, 1, 0


# -- indirect descriptors (§2.7.5.3, §2.8.7) -----------------------------------------------------


@pytest.mark.conformance("vq-indirect-table-followed", spec="2.7.5.3")
@pytest.mark.virtio_device("virtio-rng-pci", backend="fifo")
@pytest.mark.virtio_requires("INDIRECT_DESC")
def test_indirect_table_is_followed(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With INDIRECT_DESC, a single ring descriptor flagged INDIRECT stands for the table it
    points at: the device fills the table's buffers, in table order (packed: §2.8.7)."""
    drv = virtio_device
    vq = drv.queues[0]
    bufs = buffers(qemu, [4, 4, 4])
    data = pattern(12, seed=1)
    qemu.backend(drv.dev_id, RngFifo).write(data)
    free = vq.free_descriptors
    token = vq.add(bufs, indirect=True)
    assert free - vq.free_descriptors == 1  # one ring slot for three buffers
    vq.kick()
    elem = vq.wait_for(token, timeout=SHORT)
    assert 1 <= elem.length <= 12
    written = b"".join(qemu.memory.read(b.addr, 4) for b in bufs)
    assert written[: elem.length] == data[: elem.length]


@pytest.mark.conformance("vq-indirect-write-flag-ignored", spec="2.7.5.3.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
@pytest.mark.virtio_requires("INDIRECT_DESC")
def test_write_flag_on_the_indirect_descriptor_is_ignored(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device ignores VIRTQ_DESC_F_WRITE on a descriptor that points at an indirect table
    (MUST): it does not treat the table as a buffer to write, it follows it."""
    drv = virtio_device
    vq = split(drv)
    bufs = buffers(qemu, [4, 4])
    table = qemu.memory.alloc(2 * SPLIT_DESC.size, tag="indirect table")
    entries = [
        SplitDesc(bufs[0].addr, 4, DESC_F.WRITE.mask | DESC_F.NEXT.mask, 1),
        SplitDesc(bufs[1].addr, 4, DESC_F.WRITE.mask),
    ]
    length = write_desc_table(qemu.qtest, table, entries)
    head = vq.size - 1
    flags = DESC_F.INDIRECT.mask | DESC_F.WRITE.mask
    publish_by_hand(vq, head, {head: SplitDesc(table, length, flags)})
    drv.transport.notify(0)
    used_id, used_len = raw_used(qemu, vq, dev_id=drv.dev_id)
    assert used_id == head and 1 <= used_len <= 8
    written = qemu.memory.read(table, length)
    assert written == b"".join(d.pack() for d in entries), "the device wrote into the indirect table"
    # The first writable buffer got entropy; compare all of it (one random byte equals the fill
    # marker once in 256 runs).
    assert qemu.memory.read(bufs[0].addr, 4) != bytes([FILL]) * 4


@pytest.mark.conformance("vq-direct-then-indirect-descriptor", spec="2.7.5.3.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
@pytest.mark.virtio_requires("INDIRECT_DESC")
def test_direct_descriptors_followed_by_an_indirect_one(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device handles a chain of ordinary descriptors ending in one INDIRECT descriptor
    (MUST): a writable direct buffer then a table of two writable buffers is one request of 12
    bytes."""
    drv = virtio_device
    vq = split(drv)
    direct, *tabled = buffers(qemu, [4, 4, 4])
    table = qemu.memory.alloc(2 * SPLIT_DESC.size, tag="indirect table")
    length = write_desc_table(
        qemu.qtest,
        table,
        [
            SplitDesc(tabled[0].addr, 4, DESC_F.WRITE.mask | DESC_F.NEXT.mask, 1),
            SplitDesc(tabled[1].addr, 4, DESC_F.WRITE.mask),
        ],
    )
    head, tail = vq.size - 1, vq.size - 2
    publish_by_hand(
        vq,
        head,
        {
            head: SplitDesc(direct.addr, 4, DESC_F.WRITE.mask | DESC_F.NEXT.mask, tail),
            tail: SplitDesc(table, length, DESC_F.INDIRECT.mask),
        },
    )
    drv.transport.notify(0)
    used_id, length = raw_used(qemu, vq, dev_id=drv.dev_id)
    assert used_id == head and 1 <= length <= 12


# -- packed ring order (§2.8.12, §2.8.18) ---------------------------------------------------------


@pytest.mark.conformance("vq-packed-processed-in-ring-order", spec="2.8.12")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("packed",), transports=MODERN_LAYOUT_MODES, backend="fifo")
def test_packed_descriptors_are_processed_in_ring_order(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device starts processing available descriptors in the order they sit in the ring
    (MUST): four buffers made available at once receive the entropy stream in ring order."""
    drv = virtio_device
    vq = packed(drv)
    bufs = buffers(qemu, [4, 4, 4, 4])
    data = pattern(16, seed=2)
    qemu.backend(drv.dev_id, RngFifo).write(data)
    tokens = [vq.add([b]) for b in bufs]
    vq.kick()
    elems = [vq.wait_for(t, timeout=SHORT) for t in tokens]
    received = b"".join(qemu.memory.read(e.bufs[0].addr, e.length) for e in elems)
    assert all(e.length >= 1 for e in elems)
    assert received == data[: len(received)]


@pytest.mark.conformance("vq-packed-chain-used-in-order", spec="2.8.18")
@pytest.mark.virtio_device(
    "virtio-rng-pci", rings=("packed",), transports=MODERN_LAYOUT_MODES, backend="fifo", refuse={"INDIRECT_DESC"}
)
def test_packed_chain_is_used_in_list_order(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device uses the descriptors of a NEXT-chained list in the order the driver made them
    available (MUST): a three-descriptor chain is filled first to last."""
    drv = virtio_device
    vq = packed(drv)
    bufs = buffers(qemu, [3, 5, 9])
    data = pattern(17, seed=4)
    qemu.backend(drv.dev_id, RngFifo).write(data)
    free = vq.free_descriptors
    token = vq.add(bufs)
    assert free - vq.free_descriptors == 3  # three ring slots: a direct chain
    vq.kick()
    elem = vq.wait_for(token, timeout=SHORT)
    written = b"".join(qemu.memory.read(b.addr, b.length) for b in bufs)
    assert 1 <= elem.length <= 17
    assert written[: elem.length] == data[: elem.length]


# -- notifications (§2.7.7, §2.7.10) --------------------------------------------------------------


@pytest.mark.conformance("vq-spurious-notification-harmless", spec="2.7.10.2")
def test_spurious_notifications_are_handled(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device copes with notifications that announce nothing new (MUST): no buffer is used,
    no error is flagged, and the queue keeps working."""
    drv = virtio_device
    vq = drv.queues[0]
    for _ in range(3):
        drv.transport.notify(0)
    quiet(qemu)
    assert vq.poll_used() is None
    drv.check_status()  # raises on DEVICE_NEEDS_RESET or FAILED
    assert not device_view(qemu, drv.dev_id).broken
    assert len(drv.request(16, timeout=SHORT)) >= 1
    drv.transport.notify(0)
    assert len(drv.request(16, timeout=SHORT)) >= 1


@pytest.mark.conformance("vq-used-flags-valid", spec="2.7.10.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), refuse={"EVENT_IDX"})
def test_used_flags_are_zero_or_one_without_event_idx(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Without EVENT_IDX the device keeps the used ring's flags at 0 or 1 (MUST)."""
    drv = virtio_device
    vq = split(drv)
    for _ in range(4):
        assert qemu.qtest.readw(vq.used + SPLIT_USED.flags.offset) in (0, USED_F_NO_NOTIFY)
        drv.request(8, timeout=SHORT)
    assert qemu.qtest.readw(vq.used + SPLIT_USED.flags.offset) in (0, USED_F_NO_NOTIFY)


@pytest.mark.conformance("vq-used-flags-zero-with-event-idx", spec="2.7.10.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
def test_used_flags_are_zero_with_event_idx(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With EVENT_IDX the device keeps the used ring's flags at 0 (MUST); it suppresses
    notifications through avail_event instead."""
    drv = virtio_device
    vq = split(drv)
    for _ in range(4):
        assert qemu.qtest.readw(vq.used + SPLIT_USED.flags.offset) == 0
        drv.request(8, timeout=SHORT)
    assert qemu.qtest.readw(vq.used + SPLIT_USED.flags.offset) == 0


@pytest.mark.conformance("vq-no-interrupt-clear-notifies", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), refuse={"EVENT_IDX"})
def test_notification_sent_when_flags_ask_for_it(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Without EVENT_IDX, after each used buffer the device notifies if the available ring's
    flags are 0 (MUST), and it ignores used_event (MUST): here used_event holds a value that
    would suppress every notification were it honoured."""
    drv = virtio_device
    vq = split(drv)
    msix = drv.msix
    assert msix is not None and qemu.qtest.readw(vq.avail + SPLIT_AVAIL.flags.offset) == 0
    for i in range(3):
        qemu.qtest.writew(vq.used_event_addr, (vq.last_used - 1) & 0xFFFF)
        drv.request(8, timeout=SHORT)
        assert msix.fired(drv.queue_vector(0)), f"request {i}: no notification"


@pytest.mark.conformance("vq-no-interrupt-set-suppresses", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), refuse={"EVENT_IDX"})
def test_notification_suppressed_by_no_interrupt(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Without EVENT_IDX, the device should not notify while the available ring's flags are 1
    (VIRTQ_AVAIL_F_NO_INTERRUPT) (SHOULD NOT: asserted; spurious interrupts are legal but a
    device that ignores the hint costs every driver an interrupt per buffer, and QEMU honours
    it)."""
    drv = virtio_device
    vq = split(drv)
    msix = drv.msix
    assert msix is not None
    vq.set_interrupts(False)
    assert qemu.qtest.readw(vq.avail + SPLIT_AVAIL.flags.offset) == AVAIL_F_NO_INTERRUPT
    for i in range(3):
        drv.request(8, timeout=SHORT)
        quiet(qemu, 0.005)
        assert not msix.fired(drv.queue_vector(0)), f"request {i}: notified despite NO_INTERRUPT"


def _event_idx_run(drv: VirtioRng, qemu: Machine, *, ahead: int, count: int) -> list[bool]:
    """With used_event set ``ahead`` entries past the next used index, make ``count`` buffers
    available one at a time and say, for each, whether it was notified."""
    vq = split(drv)
    msix = drv.msix
    assert msix is not None
    warm_up(drv)
    vq.set_interrupts(False)  # the library stops writing used_event; the test owns it now
    start = vq.last_used
    qemu.qtest.writew(vq.used_event_addr, (start + ahead) & 0xFFFF)
    (buf,) = buffers(qemu, [8])
    tokens, fired = [], []
    for i in range(count):
        tokens.append(vq.add([buf]))
        vq.kick()
        wait_used_idx(vq, start + i + 1)
        quiet(qemu, 0.002)
        fired.append(msix.fired(drv.queue_vector(0)))
    for token in tokens:
        vq.wait_for(token, timeout=SHORT)
    return fired


@pytest.mark.conformance("vq-used-event-notifies", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
def test_used_event_reached_sends_a_notification(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With EVENT_IDX, when the device places a used entry at the index used_event names, it
    sends a notification (MUST): used_event two entries ahead, the third buffer notifies."""
    fired = _event_idx_run(virtio_device, qemu, ahead=2, count=3)
    assert fired[2], f"notifications per buffer: {fired}"


@pytest.mark.conformance("vq-used-event-suppresses", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
def test_used_event_not_reached_sends_nothing(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With EVENT_IDX, used entries placed before the index used_event names should not be
    notified (SHOULD NOT: asserted, since QEMU implements it and losing it would double the
    interrupt rate of every EVENT_IDX driver)."""
    fired = _event_idx_run(virtio_device, qemu, ahead=2, count=2)
    assert fired == [False, False]


@pytest.mark.conformance("vq-event-idx-ignores-no-interrupt", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
def test_event_idx_device_ignores_the_no_interrupt_flag(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With EVENT_IDX the device ignores the low bit of the available ring's flags (MUST):
    NO_INTERRUPT set while used_event asks for the next entry still gets a notification."""
    drv = virtio_device
    vq = split(drv)
    msix = drv.msix
    assert msix is not None
    warm_up(drv)
    vq.flush()
    qemu.qtest.writew(vq.avail + SPLIT_AVAIL.flags.offset, AVAIL_F_NO_INTERRUPT)
    qemu.qtest.writew(vq.used_event_addr, vq.last_used)
    (buf,) = buffers(qemu, [8])
    token = vq.add([buf])
    vq.kick()
    wait_used_idx(vq, vq.last_used + 1)
    quiet(qemu, 0.002)
    assert msix.fired(drv.queue_vector(0)), "NO_INTERRUPT suppressed a notification used_event asked for"
    vq.wait_for(token, timeout=SHORT)
