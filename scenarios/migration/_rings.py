"""Ring and interrupt state across a migration, written once for every device file.

A device file hands these cases a :class:`Traffic`: how to make one request of that device
available (kicked or not) and how to complete it, checking the device's answer. The cases then
put a queue into some state before the migration (used entries not yet taken, notifications
suppressed, a masked MSI-X vector with its pending bit, renegotiated features) and check that
the destination continues from exactly that state (virtio 1.2 §2.7.7, §2.7.10, §2.8.10; PCI 3.0
§6.8.2.9-10), then that a full round trip works and QEMU's view is the driver's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio import Machine
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.introspect import device_view
from qtest_virtio.pci.msix import Msix
from qtest_virtio.testing import PackedRing, SplitRing
from qtest_virtio.transport import LegacyTransport, ModernTransport, VirtioTransport
from qtest_virtio.transport.layout import COMMON_CFG, ISR, LEGACY_CFG
from qtest_virtio.virtqueue import PackedVirtqueue, SplitVirtqueue, Virtqueue
from qtest_virtio.virtqueue.layout import AVAIL_F_NO_INTERRUPT, PACKED_F

from ._support import assert_view_matches

#: Timeout for work that must happen (a failure should not cost the default 5 s).
SHORT = 2.0
#: How long "no interrupt" is watched: the device's work runs in QEMU's main loop, and each
#: qtest command is one turn of it.
QUIET_WINDOW = 0.02
#: RING_EVENT_FLAGS_DISABLE (§2.8.10): the driver asks for no used-buffer notifications.
PACKED_EVENT_DISABLE = 1


class Traffic(Protocol):
    """One device's requests on one of its queues, for ring-level cases."""

    @property
    def drv(self) -> VirtioDriver: ...

    @property
    def queue(self) -> int:
        """The driver's index of the queue the requests go to."""
        ...

    def submit(self, *, kick: bool = True) -> object:
        """Make one request available (and notify the device unless ``kick=False``)."""

    def complete(self, handle: object) -> int:
        """Wait for the request ``handle`` names, assert the device's answer, return its used
        length."""


class _Bus(Protocol):
    def readl(self, addr: int) -> int: ...


def quiet(bus: _Bus, seconds: float = QUIET_WINDOW) -> None:
    """Give the device's main loop a few turns (each qtest command is one) to do anything."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        bus.readl(0)


def read_vectors(transport: VirtioTransport, queue: int) -> tuple[int, int]:
    """(config vector, queue ``queue``'s vector) as the device reads them back (§4.1.4.3,
    §4.1.4.8)."""
    if isinstance(transport, LegacyTransport):
        transport.regs.write(LEGACY_CFG.queue_select, queue)
        return transport.regs.read(LEGACY_CFG.config_msix_vector), transport.regs.read(LEGACY_CFG.queue_msix_vector)
    assert isinstance(transport, ModernTransport)
    transport.select_queue(queue)
    return transport.common.read(COMMON_CFG.config_msix_vector), transport.common.read(COMMON_CFG.queue_msix_vector)


def queue_of(t: Traffic) -> Virtqueue:
    return t.drv.queues[t.queue]


def msix_of(t: Traffic) -> tuple[Msix, int]:
    """The driver's MSI-X and the vector of the traffic's queue."""
    msix = t.drv.msix
    assert msix is not None, "these cases need MSI-X (the marker's interrupts='msix')"
    return msix, t.drv.queue_vector(t.queue)


def peek_used(vq: Virtqueue) -> tuple[int, int] | None:
    """The next used element in guest RAM, (id, len), that the driver has not taken yet, or
    None; the driver's state is left alone."""
    entries = _used_entries(vq, 1)
    return entries[0] if entries else None


def round_trip(t: Traffic) -> int:
    """One request from submit to its checked answer; its used length."""
    return t.complete(t.submit())


def after_migration(dest: Machine, t: Traffic, *, in_flight: int = 0) -> None:
    """What every case checks last: QEMU's view is the driver's, and a full round trip works."""
    assert_view_matches(dest, t.drv, in_flight=in_flight)
    round_trip(t)
    assert not device_view(dest, t.drv.dev_id).broken


def warm_up(t: Traffic) -> tuple[Msix, int]:
    """One request and its interrupt: QEMU notifies the first used buffer after queue setup
    whatever the suppression fields say (it has no earlier notification to compare with)."""
    msix, vector = msix_of(t)
    queue_of(t).set_interrupts(True)
    round_trip(t)
    msix.wait(vector, timeout=SHORT)
    return msix, vector


# -- the cases ----------------------------------------------------------------------------------


def used_entries_survive(t: Traffic, migrate: Migrate, count: int = 2) -> None:
    """``count`` requests the device has used, their entries in guest RAM and not taken by the
    driver: on the destination the driver takes the same ids with the same lengths, and the
    next request works."""
    vq = queue_of(t)
    handles = [t.submit() for _ in range(count)]
    deadline = time.monotonic() + SHORT
    while _used_not_taken(vq) < count:
        assert time.monotonic() < deadline, f"{count} requests not all used; {vq.describe_state()}"
    before = _used_entries(vq, count)
    dest = migrate()
    assert_view_matches(dest, t.drv)
    assert _used_entries(vq, count) == before, "used entries changed across the migration"
    lengths = [t.complete(h) for h in handles]
    assert sorted(lengths) == sorted(length for _, length in before)
    after_migration(dest, t)


def _used_not_taken(vq: Virtqueue) -> int:
    if isinstance(vq, SplitVirtqueue):
        return (SplitRing.of(vq).used_idx() - vq.last_used) & 0xFFFF
    assert isinstance(vq, PackedVirtqueue)
    return len(_used_entries(vq, len(vq.in_flight)))


def _used_entries(vq: Virtqueue, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` used elements, (id, len), from the driver's next one on, without taking
    them: split ring entries up to used.idx (§2.7.8), or packed descriptors whose AVAIL and USED
    flags both equal the driver's used wrap counter, each chain's slots skipped (§2.8.6)."""
    if isinstance(vq, SplitVirtqueue):
        split_ring = SplitRing.of(vq)
        n = min(count, (split_ring.used_idx() - vq.last_used) & 0xFFFF)
        return [split_ring.used_entry(vq.last_used + i) for i in range(n)]
    assert isinstance(vq, PackedVirtqueue)
    ring = PackedRing.of(vq)
    out: list[tuple[int, int]] = []
    slot, wrap = vq.next_used, vq.used_wrap
    while len(out) < count:
        desc = ring.read_desc(slot)
        avail = 1 if desc.flags & PACKED_F.AVAIL.mask else 0
        used = 1 if desc.flags & PACKED_F.USED.mask else 0
        if not avail == used == wrap:
            break
        out.append((desc.id, desc.len))
        slot += getattr(vq.in_flight.get(desc.id), "slots", 1)
        if slot >= vq.size:
            slot, wrap = slot - vq.size, wrap ^ 1
    return out


def renegotiated_features_survive(
    t: Traffic, migrate: Migrate, refuse: str, *, after_reset: Callable[[], object] = lambda: None
) -> None:
    """Reset and initialise again with ``refuse`` declined (§3.1.1): QEMU's guest features on
    the destination are the new set, without the refused one, and the rings laid out for it
    serve requests (an indirect table only where INDIRECT_DESC still holds). ``after_reset``:
    what the device needs once initialised again (a SCSI LUN's unit attention)."""
    drv = t.drv
    if refuse not in drv.negotiated:
        pytest.skip(f"{refuse} is not negotiated in this run: nothing to renegotiate away")
    before = set(drv.negotiated)
    round_trip(t)
    drv.refused_names.add(refuse)
    drv.reset()
    drv.initialize()
    after_reset()
    assert refuse not in drv.negotiated and set(drv.negotiated) < before
    round_trip(t)
    dest = migrate()
    view = device_view(dest, drv.dev_id)
    assert refuse not in view.guest_features, f"{refuse} is back on the destination: {sorted(view.guest_features)}"
    assert set(drv.negotiated) <= view.guest_features
    vq = queue_of(t)
    assert vq.event_idx == ("EVENT_IDX" in drv.negotiated) and vq.indirect == ("INDIRECT_DESC" in drv.negotiated)
    after_migration(dest, t)
    if refuse == "EVENT_IDX" and isinstance(vq, SplitVirtqueue):
        # Without EVENT_IDX the device has no avail_event to keep (§2.7.10): QEMU writes it
        # on each pop only when the guest features it loaded have EVENT_IDX. The ring was
        # laid out zeroed at the renegotiation.
        assert SplitRing.of(vq).avail_event() == 0, "the destination writes avail_event without EVENT_IDX"


def suppression_flag_survives(t: Traffic, migrate: Migrate) -> None:
    """Without EVENT_IDX the driver suppresses used-buffer notifications with a flag in guest
    RAM: NO_INTERRUPT in the available ring's flags (split, §2.7.7.2: the device SHOULD NOT
    notify while it is set) or RING_EVENT_FLAGS_DISABLE (packed, §2.8.10). Set before the
    migration, the destination honours it; cleared there, the next request interrupts."""
    drv = t.drv
    assert "EVENT_IDX" not in drv.negotiated
    msix, vector = warm_up(t)
    vq = queue_of(t)
    vq.set_interrupts(False)
    round_trip(t)
    quiet(drv.memory.qtest)
    assert not msix.fired(vector), "notified with notifications suppressed (before the migration)"
    dest = migrate()
    _assert_suppressed_in_ram(vq)
    for i in range(2):
        round_trip(t)
        quiet(dest.qtest)
        assert not msix.fired(vector), f"request {i} on the destination notified despite the suppression"
    vq.set_interrupts(True)
    round_trip(t)
    msix.wait(vector, timeout=SHORT)
    after_migration(dest, t)


def _assert_suppressed_in_ram(vq: Virtqueue) -> None:
    if isinstance(vq, SplitVirtqueue):
        assert SplitRing.of(vq).avail_flags() == AVAIL_F_NO_INTERRUPT
    else:
        assert isinstance(vq, PackedVirtqueue)
        assert PackedRing.of(vq).driver_event_fields()[1] == PACKED_EVENT_DISABLE


def used_event_run(t: Traffic, migrate: Migrate, count: int) -> tuple[Machine, list[bool]]:
    """Split ring, EVENT_IDX, used_event = S + 2 where S is the next used index: the device
    notifies for the entry it places at position used_event (§2.7.7.2: MUST), and SHOULD NOT
    for the others. The entry at S is used on the source (checked quiet there), then the
    migration, then ``count`` requests on the destination one at a time (positions S + 1,
    S + 2, ...): whether each was notified. The first SHOULD NOT be, the second MUST be."""
    vq = queue_of(t)
    assert isinstance(vq, SplitVirtqueue) and vq.event_idx
    msix, vector = warm_up(t)
    vq.set_interrupts(False)  # the library stops writing used_event; the case owns it now
    ring = SplitRing.of(vq)
    start = vq.last_used
    ring.set_used_event(start + 2)
    handles = [t.submit()]
    _wait_used_idx(vq, start + 1)
    quiet(t.drv.memory.qtest, 0.002)
    assert not msix.fired(vector), "the source notified a used buffer before used_event (no migration yet)"
    dest = migrate()
    assert ring.used_event() == (start + 2) & 0xFFFF
    fired = []
    for i in range(count):
        handles.append(t.submit())
        _wait_used_idx(vq, start + i + 2)
        quiet(dest.qtest, 0.002)
        fired.append(msix.fired(vector))
    for h in handles:
        t.complete(h)
    vq.set_interrupts(True)
    return dest, fired


def _wait_used_idx(vq: SplitVirtqueue, value: int) -> None:
    ring = SplitRing.of(vq)
    deadline = time.monotonic() + SHORT
    while ring.used_idx() != value & 0xFFFF:
        assert time.monotonic() < deadline, f"used.idx stays {ring.used_idx()}, expected {value & 0xFFFF}"


def masked_vector_survives(t: Traffic, migrate: Migrate) -> None:
    """A masked MSI-X vector whose interrupt came while masked (PBA bit set, no message,
    PCI 3.0 §6.8.2.9-10) migrates masked and pending: still no message on the destination,
    also after another request; unmasking there sends the message once and clears the bit.
    The config vector and the queue's vector are the ones the driver set (§4.1.5.1.2)."""
    drv = t.drv
    msix, vector = warm_up(t)
    msix.mask_vector(vector)
    round_trip(t)
    assert msix.pending(vector) and not msix.fired(vector)
    table = {v: msix.read_vector(v) for v in msix.mailboxes}
    dest = migrate()
    assert {v: msix.read_vector(v) for v in msix.mailboxes} == table, "the MSI-X table moved"
    assert read_vectors(drv.transport, t.queue) == (0, vector)
    assert msix.pending(vector), "the pending bit was lost in the migration"
    round_trip(t)
    quiet(dest.qtest)
    assert not msix.fired(vector), "a masked vector's message was sent on the destination"
    msix.mask_vector(vector, masked=False)
    msix.wait(vector, timeout=SHORT)
    assert not msix.pending(vector)
    quiet(dest.qtest)
    assert not msix.fired(vector), "more than one message for the pending interrupt"
    round_trip(t)
    msix.wait(vector, timeout=SHORT)
    after_migration(dest, t)


def isr_survives(t: Traffic, migrate: Migrate) -> None:
    """Without MSI-X (``interrupts='isr'``): a used buffer sets the ISR's queue interrupt bit,
    which stays set until the driver reads the ISR (§4.1.4.5). Not read before the migration,
    the destination's ISR still has it; the read clears it there, and the next used buffer sets
    it again."""
    drv = t.drv
    assert drv.msix is None, "an ISR case: the marker must say interrupts='isr'"
    drv.transport.read_isr()  # whatever initialisation left there is cleared by the read
    round_trip(t)
    dest = migrate()
    assert drv.transport.read_isr() & ISR.queue_interrupt.mask, "the queue interrupt bit was lost in the migration"
    assert not drv.transport.read_isr() & ISR.queue_interrupt.mask, "reading the ISR did not clear it"
    round_trip(t)
    assert drv.transport.read_isr() & ISR.queue_interrupt.mask
    after_migration(dest, t)
