# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""Virtqueues against real QEMU, with virtio-rng as the simplest device (a request is one
device-writable buffer): every transport mode x {split, packed} x event_idx x indirect_desc."""

from __future__ import annotations

import struct
import time

import pytest
from pytest_qtest_virtio.plugin import MachineFactory

from qtest_virtio import Machine, MachineSpec, modes
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.testing import LEGACY_LAYOUT_MODES, MODERN_LAYOUT_MODES, PackedDesc, PackedRing, SplitRing
from qtest_virtio.transport.layout import STATUS
from qtest_virtio.virtqueue import Buf, PackedVirtqueue, SplitVirtqueue, UsedElem, Virtqueue, VirtqueueError
from qtest_virtio.virtqueue.layout import DESC_F, PACKED_F


def rng_machine(machine_factory: MachineFactory, mode: str, **props: str) -> Machine:
    spec = MachineSpec()
    spec.add_virtio("virtio-rng-pci", {"id": "rng0", **props}, mode=mode)
    return machine_factory(spec)


@pytest.mark.parametrize("indirect", ["on", "off"], ids=lambda v: f"indirect_desc={v}")
@pytest.mark.parametrize("event_idx", ["on", "off"], ids=lambda v: f"event_idx={v}")
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_rng_matrix(machine_factory, mode: str, ring: str, event_idx: str, indirect: str) -> None:
    vm = rng_machine(
        machine_factory, mode, packed="on" if ring == "packed" else "off", event_idx=event_idx, indirect_desc=indirect
    )
    rng = vm.virtio("rng0", VirtioRng)
    vq = rng.queues[0]
    names = rng.negotiated

    # Initialization reached DRIVER_OK, and QEMU agrees on status and features.
    assert rng.transport.get_status() & STATUS.DRIVER_OK.mask
    view = device_view(vm, "rng0")
    assert {"ACKNOWLEDGE", "DRIVER", "DRIVER_OK"} <= view.status
    assert ("FEATURES_OK" in view.status) == (mode not in LEGACY_LAYOUT_MODES)  # legacy has no FEATURES_OK
    assert {n for n in names if n != "ANY_LAYOUT"} <= view.guest_features | {"ANY_LAYOUT"}

    # A feature the device does not offer is never asked for; the legacy layout cannot see
    # RING_PACKED (bit 34) and falls back to split rings; modern always has VERSION_1.
    assert ("EVENT_IDX" in names) == (event_idx == "on")
    assert ("INDIRECT_DESC" in names) == (indirect == "on")
    packed = ring == "packed" and mode not in LEGACY_LAYOUT_MODES
    assert ("RING_PACKED" in names) == packed
    assert isinstance(vq, PackedVirtqueue if packed else SplitVirtqueue)
    assert ("VERSION_1" in names) == (mode not in LEGACY_LAYOUT_MODES)
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
    if isinstance(vq, PackedVirtqueue):  # packed, as asserted above
        flags = PackedRing.of(vq).flags(head)
        assert bool(flags & PACKED_F.INDIRECT.mask) == (indirect == "on")
    else:
        flags = SplitRing.of(vq).read_desc(head).flags
        assert bool(flags & DESC_F.INDIRECT.mask) == (indirect == "on")
    vq.kick()
    elem = vq.wait_for(token)
    assert elem.length == 17 and vq.free_descriptors == free_before
    for b in bufs:
        vm.memory.free(b.addr)

    # The device's queue indices agree with the driver's.
    q = queue_view(vm, "rng0", 0)
    if isinstance(vq, PackedVirtqueue):
        assert (q.last_avail_idx, q.used_idx) == (vq.next_avail, vq.next_used)
    else:
        assert (q.last_avail_idx, q.used_idx) == (vq.avail_idx, vq.last_used)
    rng.close()
    vm.memory.check_leaks()


@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_split_index_wraps_past_2_16(machine_factory, mode: str) -> None:
    """65 552 requests: avail.idx and used.idx wrap around 16 bits (§2.7.6, §2.7.8)."""
    vm = rng_machine(machine_factory, mode, event_idx="on")
    rng = vm.virtio("rng0", VirtioRng)
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


@pytest.mark.parametrize("mode", MODERN_LAYOUT_MODES)
def test_packed_wrap_counters(machine_factory, mode: str) -> None:
    """Chains of mixed lengths make the ring wrap at odd positions many times (§2.8.1)."""
    vm = rng_machine(machine_factory, mode, packed="on", indirect_desc="off")
    rng = vm.virtio("rng0", VirtioRng)
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
    rng = vm.virtio("rng0", VirtioRng, interrupts="intx")
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
    rng = vm.virtio("rng0", VirtioRng, interrupts="isr")
    rng.request(16)
    rng.wait_queue_interrupt(0)
    assert rng.transport.read_isr() == 0


@pytest.mark.parametrize("feature", ["EVENT_IDX", "INDIRECT_DESC"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
def test_driver_side_refusal(machine_factory, mode: str, feature: str) -> None:
    vm = rng_machine(machine_factory, mode)
    rng = vm.virtio("rng0", VirtioRng, refuse={feature})
    assert feature not in rng.negotiated
    assert rng.negotiated.refused  # offered, declined
    assert feature not in device_view(vm, "rng0").guest_features
    assert feature in device_view(vm, "rng0").host_features
    assert len(rng.read(100)) == 100
    vq = rng.queues[0]
    assert vq.event_idx == (feature != "EVENT_IDX") and vq.indirect == (feature != "INDIRECT_DESC")
    with pytest.raises(ValueError, match="unknown feature 'EVENT_IDXX'"):
        vm.virtio("rng0", refuse={"EVENT_IDXX"})


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", MODERN_LAYOUT_MODES)
def test_queue_reset_mid_traffic(machine_factory, mode: str, ring: str) -> None:
    """RING_RESET (§2.6.1): reset a queue with chains in flight, set it up again, use it."""
    vm = rng_machine(machine_factory, mode, packed="on" if ring == "packed" else "off")
    rng = vm.virtio("rng0", VirtioRng)
    assert "RING_RESET" in rng.negotiated
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
    rng = vm.virtio("rng0", VirtioRng)
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
    rng = vm.virtio("rng0", VirtioRng)
    vq = rng.queues[0]
    assert isinstance(vq, SplitVirtqueue)
    region = vm.memory.alloc(16)
    token = vq.add([Buf(region, 8, True)])
    head = next(iter(vq.in_flight))
    # Play a broken device: write a used element claiming 4096 bytes, then bump used.idx.
    ring = SplitRing.of(vq)
    ring.set_used_entry(0, head, 4096)
    ring.set_used_idx(1)
    with pytest.raises(VirtqueueError, match=r"queue 0: descriptor \d+: used length 4096 is longer than the 8"):
        vq.wait_for(token)
    ring.set_used_entry(1, 5, 1)
    ring.set_used_idx(2)
    vq.consumed_by_hand()  # past the bad entry
    with pytest.raises(VirtqueueError, match="device returned id 5, which is not in flight"):
        vq.poll_used()


@pytest.mark.parametrize("event_idx", ["on", "off"], ids=lambda v: f"event_idx={v}")
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", [modes.TRANSITIONAL_LEGACY, modes.MODERN])
def test_driver_suppresses_interrupts(machine_factory, mode: str, ring: str, event_idx: str) -> None:
    """NO_INTERRUPT / used_event (split) and driver event flags (packed) stop the queue's MSI-X
    message; enabling them again brings it back. Completion is found by polling either way."""
    vm = rng_machine(machine_factory, mode, packed="on" if ring == "packed" else "off", event_idx=event_idx)
    rng = vm.virtio("rng0", VirtioRng)
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
    rng = vm.virtio("rng0", VirtioRng)
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
    rng = vm.virtio("rng0", VirtioRng)
    length, (data,) = rng.queues[0].exchange([b"driver-to-device"], [24])
    assert length == 24 and len(data) == 24
    with pytest.raises(VirtqueueError, match="at least one buffer"):
        rng.queues[0].add([])


# -- VIRTIO_F_IN_ORDER (§6.2, §2.7.9, §2.8.8) ------------------------------------------------------

IN_ORDER_BINARIES = ["debian-10.0", "src-newest"]


def _in_order_rng(
    provided_qemu, machine_factory: MachineFactory, name: str, mode: str, ring: str = "split", **props: str
) -> Machine:
    spec = MachineSpec(qemu=provided_qemu(name).path)
    spec.add_virtio("virtio-rng-pci", {"id": "rng0", "packed": "on" if ring == "packed" else "off", **props}, mode=mode)
    return machine_factory(spec)


@pytest.mark.parametrize("in_order", ["on", "off"], ids=lambda v: f"in_order={v}")
@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("mode", modes.ALL_MODES)
@pytest.mark.parametrize("name", IN_ORDER_BINARIES)
def test_in_order_is_negotiated_where_offered(provided_qemu, machine_factory, name, mode, ring, in_order) -> None:
    """10.0 and later offer IN_ORDER (bit 35) with in_order=on; the driver takes it on the modern
    layouts (the legacy one shows bits 0-31 only), QEMU agrees, and the queue runs in-order: split
    descriptors handed out in ring order, requests served on both rings."""
    vm = _in_order_rng(provided_qemu, machine_factory, name, mode, ring, in_order=in_order)
    rng = vm.virtio("rng0", VirtioRng)
    negotiated = in_order == "on" and mode not in LEGACY_LAYOUT_MODES
    assert ("IN_ORDER" in rng.negotiated) == negotiated
    assert ("IN_ORDER" in device_view(vm, "rng0").guest_features) == negotiated
    vq = rng.queues[0]
    assert vq.in_order == negotiated
    for size in (1, 7, 64, 4096):
        assert len(rng.request(size)) == size
    tokens = [vq.add([Buf(vm.memory.alloc(8, tag="test"), 8, True)]) for _ in range(5)]
    vq.kick()
    elems = [vq.wait_used() for _ in tokens]
    if negotiated:
        assert [e.token for e in elems] == tokens
    if negotiated and isinstance(vq, SplitVirtqueue):
        assert [e.id for e in elems] == [(4 + i) % vq.size for i in range(5)]  # ring order, after 4 requests
    for e in elems:
        vm.memory.free(e.bufs[0].addr)
    rng.close()
    vm.memory.check_leaks()


def test_in_order_is_unknown_to_7_2(provided_qemu, machine_factory) -> None:
    """7.2 has no in_order property and never offers bit 35: the driver runs without it."""
    binary = provided_qemu("system")
    assert "in_order" not in binary.device_properties("virtio-rng-pci")
    spec = MachineSpec(qemu=binary.path)
    spec.add_virtio("virtio-rng-pci", mode=modes.MODERN, id="rng0")
    vm = machine_factory(spec)
    rng = vm.virtio("rng0", VirtioRng)
    assert not rng.negotiated.offered >> 35 & 1
    assert "IN_ORDER" not in rng.negotiated and not rng.queues[0].in_order
    assert len(rng.read(100)) == 100


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("name", IN_ORDER_BINARIES)
def test_in_order_can_be_refused(provided_qemu, machine_factory, name, ring) -> None:
    """refuse={"IN_ORDER"} (--refuse IN_ORDER, --virtio-refuse IN_ORDER): offered, declined,
    and the queue runs as without the feature."""
    vm = _in_order_rng(provided_qemu, machine_factory, name, modes.MODERN, ring, in_order="on")
    rng = vm.virtio("rng0", VirtioRng, refuse={"IN_ORDER"})
    assert "IN_ORDER" not in rng.negotiated
    assert rng.negotiated.refused >> 35 & 1
    view = device_view(vm, "rng0")
    assert "IN_ORDER" in view.host_features and "IN_ORDER" not in view.guest_features
    assert not rng.queues[0].in_order
    assert len(rng.read(100)) == 100


def _held_read_then_get_id(vm: Machine, blk) -> tuple[list[int], list[UsedElem], bytes]:
    """A READ held by the I/O throttle, a GET_ID behind it, one kick; what the driver reports
    while the READ is held (with the READ's status byte as it was then), then the rest once the
    throttle is lifted. Returns the tokens, every element in the order reported, and the status
    byte the READ had when the first element was reported."""
    vq = blk.queues[0]
    vm.throttle_reads(blk.dev_id, 1)
    blk.read(8, 1)  # spends the budget: the next read waits
    reqs = []
    for req_type, data_len in ((0, 4096), (8, 20)):  # VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID
        hdr = vm.memory.alloc(16, tag="test header")
        vm.memory.write(hdr, struct.pack("<IIQ", req_type, 0, 0))
        data, status = vm.memory.alloc(data_len, tag="test data"), vm.memory.alloc(1, tag="test status")
        vm.qtest.memset(status, 1, 0xEE)
        reqs.append([Buf(hdr, 16), Buf(data, data_len, True), Buf(status, 1, True)])
    tokens = [vq.add(bufs) for bufs in reqs]
    vq.kick()
    reported: list[UsedElem] = []
    read_status_then = b""
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        elem = vq.poll_used()
        if elem is not None:
            read_status_then = read_status_then or vm.memory.read(reqs[0][2].addr, 1)
            reported.append(elem)
    vm.throttle_reads(blk.dev_id, 0)
    while len(reported) < 2:
        reported.append(vq.wait_used(2.0))
    return tokens, reported, read_status_then


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("name", IN_ORDER_BINARIES)
def test_blk_completes_out_of_order_unless_in_order(provided_qemu, machine_factory, name, ring) -> None:
    """What the in-order scenario rests on: without IN_ORDER, QEMU answers a GET_ID made available
    behind a held READ at once; with it, nothing is used until the READ goes, then the READ
    first."""
    for in_order in ("off", "on"):
        spec = MachineSpec(qemu=provided_qemu(name).path)
        packed = "on" if ring == "packed" else "off"
        spec.add_virtio("virtio-blk-pci", mode=modes.MODERN, id="blk0", packed=packed, in_order=in_order)
        vm = machine_factory(spec)
        blk = vm.virtio("blk0")
        tokens, reported, _ = _held_read_then_get_id(vm, blk)
        expected = tokens if in_order == "on" else tokens[::-1]
        assert [e.token for e in reported] == expected, f"in_order={in_order}"


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("name", IN_ORDER_BINARIES)
def test_device_out_of_order_is_caught(provided_qemu, machine_factory, monkeypatch, name, ring) -> None:
    """A driver that believes IN_ORDER against a device that does not keep it (QEMU with
    in_order=off) sees the GET_ID overtake the held READ: on a split ring the used entry naming
    the GET_ID does not cover the batch it would stand for, which is an error; on a packed ring
    the READ is reported as used completely while its status byte is still unwritten, which is
    what the in-order scenario checks for every chain reported."""
    spec = MachineSpec(qemu=provided_qemu(name).path)
    spec.add_virtio("virtio-blk-pci", mode=modes.MODERN, id="blk0", packed="on" if ring == "packed" else "off")
    vm = machine_factory(spec)
    blk = vm.virtio("blk0")
    assert "IN_ORDER" not in blk.negotiated
    negotiated = blk.has
    monkeypatch.setattr(blk, "has", lambda feature: feature == "IN_ORDER" or negotiated(feature))
    blk.initialize()
    assert blk.queues[0].in_order
    if ring == "split":
        with pytest.raises(VirtqueueError, match=r"IN_ORDER: used ring entry \d+ names id \d+, chain 2 .* before id"):
            _held_read_then_get_id(vm, blk)
    else:
        tokens, reported, read_status_then = _held_read_then_get_id(vm, blk)
        assert [e.token for e in reported] == tokens and reported[0].skipped
        assert read_status_then == b"\xee", "the READ was done when the GET_ID's used descriptor was seen"


# -- the in-order ring logic on rings the test writes itself (the device never looks at them) -----


def _detached_queue(machine_factory, cls: type[Virtqueue], size: int = 8) -> tuple[Machine, Virtqueue]:
    """A queue with IN_ORDER on the driver side, set up after a device reset: the device is
    never told DRIVER_OK nor notified, so it leaves the rings alone and the test plays the
    device by writing the used side itself. Any QEMU will do."""
    vm = rng_machine(machine_factory, modes.MODERN)
    rng = vm.virtio("rng0", VirtioRng)
    rng.reset()
    vq = cls(rng.transport, vm.memory, 0, size, in_order=True, indirect=True)
    vq.setup()
    return vm, vq


def _chains(vm: Machine, vq: Virtqueue, lengths: list[int]) -> list[int]:
    """One chain per entry of ``lengths``, that many 4-byte writable buffers each; published."""
    tokens = [vq.add([Buf(vm.memory.alloc(4, tag="test"), 4, True) for _ in range(n)], indirect=False) for n in lengths]
    vq.flush()
    return tokens


def _split_used(vq: SplitVirtqueue, slot: int, used_id: int, length: int, idx: int) -> None:
    ring = SplitRing.of(vq)
    ring.set_used_entry(slot, used_id, length)
    ring.set_used_idx(idx)


def _packed_used(vq: PackedVirtqueue, slot: int, buffer_id: int, length: int) -> None:
    flags = PACKED_F.AVAIL.mask | PACKED_F.USED.mask  # used in the first lap (wrap counter 1)
    PackedRing.of(vq).write_desc(slot, PackedDesc(0, length, buffer_id, flags))


def _heads(vq: Virtqueue) -> list[int]:
    """Ring ids in flight, oldest first."""
    return list(vq.in_flight)


def test_split_in_order_descriptors_go_in_ring_order(machine_factory) -> None:
    """With IN_ORDER the driver hands out descriptors from 0 up and round again, each next being
    x + 1 and 0 after the last (§2.7.5.2); used chains come back to the end of the run."""
    vm, vq = _detached_queue(machine_factory, SplitVirtqueue)
    assert isinstance(vq, SplitVirtqueue)
    _chains(vm, vq, [2, 1, 3])
    assert [c.descriptors for c in vq.in_flight.values()] == [[0, 1], [2], [3, 4, 5]]
    _split_used(vq, 0, 3, 12, 3)  # one entry for the batch of all three
    elems = [vq.poll_used() for _ in range(3)]
    assert [e.skipped for e in elems if e] == [True, True, False]
    _chains(vm, vq, [3])
    assert [c.descriptors for c in vq.in_flight.values()] == [[6, 7, 0]]
    nxt = [(desc.flags, desc.next) for desc in map(SplitRing.of(vq).read_desc, (6, 7))]
    assert nxt == [(DESC_F.WRITE.mask | DESC_F.NEXT.mask, 7), (DESC_F.WRITE.mask | DESC_F.NEXT.mask, 0)]


def test_split_in_order_batches_are_taken_whole(machine_factory) -> None:
    """One used entry at the batch's first position names its last chain and used.idx moves by
    the batch (§2.7.9): the earlier chains come back as used completely (skipped, length = their
    writable bytes), in order, and the descriptors are all free again."""
    vm, vq = _detached_queue(machine_factory, SplitVirtqueue)
    assert isinstance(vq, SplitVirtqueue)
    tokens = _chains(vm, vq, [1, 2, 1, 1])
    heads = _heads(vq)
    _split_used(vq, 0, heads[2], 3, 3)  # a batch of three
    _split_used(vq, 3, heads[3], 2, 4)  # then one on its own
    elems = [vq.wait_used(1.0) for _ in tokens]
    assert [(e.token, e.length, e.skipped) for e in elems] == [
        (tokens[0], 4, True),
        (tokens[1], 8, True),
        (tokens[2], 3, False),
        (tokens[3], 2, False),
    ]
    assert vq.last_used == 4 and vq.free_descriptors == vq.size and not vq.in_flight
    for e in elems:
        for b in e.bufs:
            vm.memory.free(b.addr)


def test_split_in_order_wrong_order_is_caught(machine_factory) -> None:
    """A used entry naming a later chain while used.idx covers less than its batch means the
    device used it before the earlier ones; an entry naming a chain already covered by a batch
    is one used twice, or out of order. Both are errors that say so."""
    vm, vq = _detached_queue(machine_factory, SplitVirtqueue)
    assert isinstance(vq, SplitVirtqueue)
    _chains(vm, vq, [1, 1, 1])
    heads = _heads(vq)
    _split_used(vq, 0, heads[1], 4, 1)  # chain 1 used, chain 0 not
    with pytest.raises(VirtqueueError, match=rf"IN_ORDER: used ring entry 0 names id {heads[1]}, chain 2 .*batch of 2"):
        vq.poll_used()
    _split_used(vq, 0, heads[1], 4, 2)  # now a batch of two: fine
    assert None not in (vq.poll_used(), vq.poll_used())
    _split_used(vq, 2, heads[0], 4, 3)  # chain 0 again, where chain 2 belongs
    with pytest.raises(
        VirtqueueError,
        match=rf"id {heads[0]}, which is not in flight.*IN_ORDER: the next chain to be used is id {heads[2]}",
    ):
        vq.poll_used()


def test_split_without_in_order_reads_the_same_ring_as_an_error(machine_factory) -> None:
    """Without IN_ORDER nothing changes: the batch entry of the test above names one chain only,
    and the zeroed entries after it name a chain twice."""
    vm = rng_machine(machine_factory, modes.MODERN)
    rng = vm.virtio("rng0", VirtioRng)
    rng.reset()
    vq = SplitVirtqueue(rng.transport, vm.memory, 0, 8)
    vq.setup()
    _chains(vm, vq, [1, 1, 1])
    heads = _heads(vq)
    assert heads == [0, 1, 2]
    _split_used(vq, 0, heads[2], 4, 3)
    # Entry 1 reads id 0 (chain 0, in flight), entry 2 id 0 again: not in flight any more.
    with pytest.raises(VirtqueueError, match="device returned id 0, which is not in flight") as err:
        vq.poll_used()
    assert "IN_ORDER" not in str(err.value)
    elems = [vq.poll_used(), vq.poll_used()]
    assert [(e.id, e.skipped) for e in elems if e] == [(heads[2], False), (heads[0], False)]


def test_packed_in_order_batches_are_taken_whole(machine_factory) -> None:
    """One used descriptor where the batch began, with the buffer id of its last chain: the
    driver skips the slots of the whole batch (§2.8.8), so the next used descriptor is read after
    them, and the earlier chains come back as used completely."""
    vm, vq = _detached_queue(machine_factory, PackedVirtqueue)
    assert isinstance(vq, PackedVirtqueue)
    tokens = _chains(vm, vq, [2, 1, 3, 1])
    ids = _heads(vq)
    _packed_used(vq, 0, ids[2], 5)  # chains 0-2: slots 0..5
    _packed_used(vq, 6, ids[3], 1)
    elems = [vq.wait_used(1.0) for _ in tokens]
    assert [(e.token, e.length, e.skipped) for e in elems] == [
        (tokens[0], 8, True),
        (tokens[1], 4, True),
        (tokens[2], 5, False),
        (tokens[3], 1, False),
    ]
    assert (vq.next_used, vq.used_wrap) == (7, 1) and vq.free_descriptors == vq.size and not vq.in_flight
    for e in elems:
        for b in e.bufs:
            vm.memory.free(b.addr)


def test_packed_in_order_wrong_order_is_caught(machine_factory) -> None:
    """A used descriptor after a batch that names a chain the batch already covered: the device
    used that chain after a later one. An error that says IN_ORDER and which chain was due."""
    vm, vq = _detached_queue(machine_factory, PackedVirtqueue)
    assert isinstance(vq, PackedVirtqueue)
    _chains(vm, vq, [1, 2, 1])
    ids = _heads(vq)
    _packed_used(vq, 0, ids[1], 4)  # reads as a batch of chains 0 and 1 (slots 0..2)
    assert None not in (vq.poll_used(), vq.poll_used())
    _packed_used(vq, 3, ids[0], 4)  # chain 0 once more, where chain 2's slot is
    with pytest.raises(
        VirtqueueError,
        match=rf"id {ids[0]}, which is not in flight.*IN_ORDER: the next chain to be used is id {ids[2]}",
    ):
        vq.poll_used()
