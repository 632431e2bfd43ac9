"""Virtqueues against real QEMU, with virtio-rng as the simplest device (a request is one
device-writable buffer): every transport mode x {split, packed} x event_idx x indirect_desc."""

from __future__ import annotations

import struct

import pytest

from qtest_virtio import Machine, MachineSpec, modes
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.transport.layout import STATUS
from qtest_virtio.virtqueue import Buf, PackedVirtqueue, SplitVirtqueue, VirtqueueError
from qtest_virtio.virtqueue.layout import DESC_F, PACKED_DESC, PACKED_F, SPLIT_DESC

LEGACY_LAYOUT = {modes.LEGACY, modes.TRANSITIONAL_LEGACY}


def rng_machine(machine_factory, mode: str, **props: str) -> Machine:
    spec = MachineSpec()
    spec.add_virtio("virtio-rng-pci", mode=mode, id="rng0", **props)
    return machine_factory(spec)


@pytest.mark.parametrize("indirect", ["on", "off"], ids=lambda v: f"indirect_desc={v}")
@pytest.mark.parametrize("event_idx", ["on", "off"], ids=lambda v: f"event_idx={v}")
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_rng_matrix(machine_factory, mode: str, ring: str, event_idx: str, indirect: str) -> None:
    vm = rng_machine(
        machine_factory, mode, packed="on" if ring == "packed" else "off", event_idx=event_idx, indirect_desc=indirect
    )
    rng = vm.virtio("rng0")
    vq = rng.queues[0]
    names = rng.negotiated.names

    # Initialization reached DRIVER_OK, and QEMU agrees on status and features.
    assert rng.transport.get_status() & STATUS.DRIVER_OK.mask
    view = device_view(vm, "rng0")
    assert {"ACKNOWLEDGE", "DRIVER", "DRIVER_OK"} <= view.status
    assert ("FEATURES_OK" in view.status) == (mode not in LEGACY_LAYOUT)  # legacy has no FEATURES_OK
    assert {n for n in names if n != "ANY_LAYOUT"} <= view.guest_features | {"ANY_LAYOUT"}

    # A feature the device does not offer is never asked for; the legacy layout cannot see
    # RING_PACKED (bit 34) and falls back to split rings; modern always has VERSION_1.
    assert ("EVENT_IDX" in names) == (event_idx == "on")
    assert ("INDIRECT_DESC" in names) == (indirect == "on")
    packed = ring == "packed" and mode not in LEGACY_LAYOUT
    assert ("RING_PACKED" in names) == packed
    assert isinstance(vq, PackedVirtqueue if packed else SplitVirtqueue)
    assert ("VERSION_1" in names) == (mode not in LEGACY_LAYOUT)
    assert rng.transport.driver_features() == rng.negotiated.accepted

    # Requests complete with the right lengths, and each raises the queue's MSI-X vector.
    for size in (1, 7, 64, 4096):
        data = rng.request(size)
        assert len(data) == size
        rng.wait_queue_interrupt(0)
    assert rng.read(10000) != bytes(10000)

    # A three-buffer chain: with INDIRECT_DESC it takes one ring slot, marked INDIRECT.
    bufs = [Buf(vm.memory.alloc(n, tag="test"), n, writable=True) for n in (3, 5, 9)]
    free_before = vq.free_descriptors
    token = vq.add(bufs)
    vq.flush()
    used_slots = free_before - vq.free_descriptors
    assert used_slots == (1 if indirect == "on" else 3)
    head = next(iter(vq.in_flight.values())).descriptors[0]  # the chain's first ring slot
    if packed:
        flags = vm.qtest.readw(vq.ring + PACKED_DESC.size * head + PACKED_DESC.flags.offset)
        assert bool(flags & PACKED_F.INDIRECT.mask) == (indirect == "on")
    else:
        flags = vm.qtest.readw(vq.desc + SPLIT_DESC.size * head + SPLIT_DESC.flags.offset)
        assert bool(flags & DESC_F.INDIRECT.mask) == (indirect == "on")
    vq.kick()
    elem = vq.wait_for(token)
    assert elem.length == 17 and vq.free_descriptors == free_before
    for b in bufs:
        vm.memory.free(b.addr)

    # The device's queue indices agree with the driver's.
    q = queue_view(vm, "rng0", 0)
    if packed:
        assert (q.last_avail_idx, q.used_idx) == (vq.next_avail, vq.next_used)
    else:
        assert (q.last_avail_idx, q.used_idx) == (vq.avail_idx, vq.last_used)
    rng.close()
    vm.memory.check_leaks()


@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_split_index_wraps_past_2_16(machine_factory, mode: str) -> None:
    """65 552 requests: avail.idx and used.idx wrap around 16 bits (§2.7.6, §2.7.8)."""
    vm = rng_machine(machine_factory, mode, event_idx="on")
    rng = vm.virtio("rng0")
    vq = rng.queues[0]
    n = vq.size
    buf = Buf(vm.memory.alloc(8 * n), 8, writable=True)
    total, rounds = 0, (65536 + 16) // n
    for _ in range(rounds):
        tokens = [vq.add([Buf(buf.addr + 8 * i, 8, True)]) for i in range(n)]
        vq.kick()
        for t in tokens:
            assert vq.wait_for(t).length == 8
        total += n
    assert total > 65536
    assert isinstance(vq, SplitVirtqueue)
    assert vq.avail_idx == total & 0xFFFF and vq.last_used == total & 0xFFFF
    assert vq.avail_idx < n * 4  # it really wrapped
    q = queue_view(vm, "rng0", 0)
    assert (q.last_avail_idx, q.used_idx) == (vq.avail_idx, vq.last_used)
    assert len(rng.request(32)) == 32
    vm.memory.free(buf.addr)


@pytest.mark.parametrize("mode", [modes.TRANSITIONAL_MODERN, modes.MODERN])
def test_packed_wrap_counters(machine_factory, mode: str) -> None:
    """Chains of mixed lengths make the ring wrap at odd positions many times (§2.8.1)."""
    vm = rng_machine(machine_factory, mode, packed="on", indirect_desc="off")
    rng = vm.virtio("rng0")
    vq = rng.queues[0]
    assert isinstance(vq, PackedVirtqueue)
    region = vm.memory.alloc(4096)
    wraps = 0
    last_wrap = vq.used_wrap
    for i in range(600):
        parts = 1 + i % 3
        bufs = [Buf(region + 64 * k, 4 + k, writable=True) for k in range(parts)]
        token = vq.add(bufs)
        vq.kick()
        assert vq.wait_for(token).length == sum(b.length for b in bufs)
        if vq.used_wrap != last_wrap:
            wraps, last_wrap = wraps + 1, vq.used_wrap
    assert wraps > 100
    assert vq.avail_wrap == vq.used_wrap and vq.next_avail == vq.next_used
    vm.memory.free(region)


@pytest.mark.parametrize("machine", ["q35", "pc"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_intx_line_rises_and_falls(machine_factory, machine: str, mode: str) -> None:
    """INTx through the PIRQ router programmed as firmware would, seen on the IOAPIC line."""
    spec = MachineSpec(machine=machine)
    spec.add_virtio("virtio-rng-pci", mode=mode, id="rng0")
    vm = machine_factory(spec)
    rng = vm.virtio("rng0", interrupts="intx")
    assert rng.msix is None and rng.intx is not None
    assert rng.intx.gsi in ((10, 11) if machine == "pc" else range(16, 24))
    assert not rng.intx.level()
    rng.request(16)
    rng.wait_queue_interrupt(0)  # line up, ISR says queue, reading it drops the line
    assert not rng.intx.level()
    assert rng.transport.read_isr() == 0  # reading ISR cleared it


@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_intx_isr_polling_fallback(machine_factory, mode: str) -> None:
    vm = rng_machine(machine_factory, mode)
    rng = vm.virtio("rng0", interrupts="isr")
    rng.request(16)
    rng.wait_queue_interrupt(0)
    assert rng.transport.read_isr() == 0


@pytest.mark.parametrize("feature", ["EVENT_IDX", "INDIRECT_DESC"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_driver_side_refusal(machine_factory, mode: str, feature: str) -> None:
    vm = rng_machine(machine_factory, mode)
    rng = vm.virtio("rng0", refuse={feature})
    assert feature not in rng.negotiated.names
    assert rng.negotiated.refused  # offered, declined
    assert feature not in device_view(vm, "rng0").guest_features
    assert feature in device_view(vm, "rng0").host_features
    assert len(rng.read(100)) == 100
    vq = rng.queues[0]
    assert vq.event_idx == (feature != "EVENT_IDX") and vq.indirect == (feature != "INDIRECT_DESC")
    with pytest.raises(ValueError, match="unknown feature 'EVENT_IDXX'"):
        vm.virtio("rng0", refuse={"EVENT_IDXX"})


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", [modes.TRANSITIONAL_MODERN, modes.MODERN])
def test_queue_reset_mid_traffic(machine_factory, mode: str, ring: str) -> None:
    """RING_RESET (§2.6.1): reset a queue with chains in flight, set it up again, use it."""
    vm = rng_machine(machine_factory, mode, packed="on" if ring == "packed" else "off")
    rng = vm.virtio("rng0")
    assert "RING_RESET" in rng.negotiated.names
    vq = rng.queues[0]
    region = vm.memory.alloc(64)
    vq.add([Buf(region, 8, True)])
    vq.add([Buf(region + 8, 8, True)])
    vq.flush()  # published, never kicked: in flight as far as the driver knows
    rng.transport.reset_queue(0)
    assert not rng.transport.queue_enabled(0)
    vq.release()
    vm.memory.free(region)
    rng.queues[0] = rng.create_queue(0)
    assert rng.transport.queue_enabled(0)
    assert len(rng.read(64)) == 64
    q = queue_view(vm, "rng0", 0)
    assert q.last_avail_idx == q.used_idx


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_device_reset_mid_traffic(machine_factory, mode: str, ring: str) -> None:
    vm = rng_machine(machine_factory, mode, packed="on" if ring == "packed" else "off")
    rng = vm.virtio("rng0")
    region = vm.memory.alloc(64)
    rng.queues[0].add([Buf(region, 8, True)])
    rng.queues[0].flush()
    rng.reset()
    assert rng.transport.get_status() == 0
    assert "DRIVER_OK" not in device_view(vm, "rng0").status
    vm.memory.free(region)
    rng.initialize()
    assert rng.transport.get_status() & STATUS.DRIVER_OK.mask
    assert len(rng.read(256)) == 256
    rng.close()
    vm.memory.check_leaks()


def test_device_bugs_are_reported_by_name(machine_factory) -> None:
    """A used length longer than the chain, or an id not in flight, names device, queue and
    descriptor instead of failing somewhere deep (§2.7.8.2)."""
    vm = rng_machine(machine_factory, modes.MODERN)
    rng = vm.virtio("rng0")
    vq = rng.queues[0]
    assert isinstance(vq, SplitVirtqueue)
    region = vm.memory.alloc(16)
    token = vq.add([Buf(region, 8, True)])
    head = next(iter(vq.in_flight))
    # Play a broken device: write a used element claiming 4096 bytes, then bump used.idx.
    vm.qtest.memwrite(vq.used + 4, struct.pack("<II", head, 4096))
    vm.qtest.writew(vq.used + 2, 1)
    with pytest.raises(VirtqueueError, match=r"queue 0: descriptor \d+: used length 4096 is longer than the 8"):
        vq.wait_for(token)
    vm.qtest.memwrite(vq.used + 12, struct.pack("<II", 5, 1))
    vm.qtest.writew(vq.used + 2, 2)
    vq.last_used = 1
    with pytest.raises(VirtqueueError, match="device returned id 5, which is not in flight"):
        vq.poll_used()


@pytest.mark.parametrize("event_idx", ["on", "off"], ids=lambda v: f"event_idx={v}")
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", [modes.TRANSITIONAL_LEGACY, modes.MODERN])
def test_driver_suppresses_interrupts(machine_factory, mode: str, ring: str, event_idx: str) -> None:
    """NO_INTERRUPT / used_event (split) and driver event flags (packed) stop the queue's MSI-X
    message; enabling them again brings it back. Completion is found by polling either way."""
    vm = rng_machine(machine_factory, mode, packed="on" if ring == "packed" else "off", event_idx=event_idx)
    rng = vm.virtio("rng0")
    assert rng.msix is not None
    vq = rng.queues[0]
    # QEMU signals the first used buffer after queue setup whatever used_event says (it has no
    # previous signalled index yet); suppression is a hint (§2.7.10), so warm the queue up.
    rng.request(16)
    rng.msix.wait(1)
    vq.set_interrupts(False)
    for _ in range(3):
        assert len(rng.request(16)) == 16
    vm.qtest.readl(rng.msix.mailboxes[1])  # a round trip after the last completion
    assert not rng.msix.fired(1)
    vq.set_interrupts(True)
    rng.request(16)
    rng.msix.wait(1)


@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_msix_vectors_and_no_vector(machine_factory, mode: str) -> None:
    """A queue on VIRTIO_MSI_NO_VECTOR raises nothing; a vector past the table is refused
    (reads back NO_VECTOR, §4.1.5.1.2); a valid one delivers to its own mailbox."""
    vm = rng_machine(machine_factory, mode)
    rng = vm.virtio("rng0")
    assert rng.msix is not None
    t = rng.transport
    assert t.set_queue_vector(0, 0xFFFF) == 0xFFFF
    rng.request(16)
    vm.qtest.readl(rng.msix.mailboxes[1])
    assert not rng.msix.fired(1) and not rng.msix.fired(0)
    assert t.set_queue_vector(0, rng.msix.table_size + 5) == 0xFFFF
    assert t.set_queue_vector(0, 0) == 0  # share the config vector
    rng.request(16)
    rng.msix.wait(0)
    assert not rng.msix.fired(1)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_readable_and_writable_buffers_in_one_chain(machine_factory, ring: str) -> None:
    """The used length counts only what the device wrote into the writable part (§2.7.8)."""
    vm = rng_machine(machine_factory, modes.MODERN, packed="on" if ring == "packed" else "off")
    rng = vm.virtio("rng0")
    length, (data,) = rng.queues[0].exchange([b"driver-to-device"], [24])
    assert length == 24 and len(data) == 24
    with pytest.raises(VirtqueueError, match="at least one buffer"):
        rng.queues[0].add([])
