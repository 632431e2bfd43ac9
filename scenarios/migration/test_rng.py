"""virtio-rng across a live migration: the request queue carries over, and requests waiting
for entropy are the destination's to fill (virtio 1.2 §2.7, §5.4; QEMU's docs/devel/migration).

The device reads its entropy from a FIFO the test writes (``backend="fifo"``). A FIFO is a host
resource, not guest state: the destination has a new one (the driver's ``backend`` is the
destination's after the migration), and bytes left unread in the source's are gone with it.
QEMU's virtio-rng never takes a buffer off the ring before it has entropy for it
(hw/virtio/virtio-rng.c chr_read pops only when bytes arrive), and its post-load hook asks the
new backend for what the available buffers want.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio.backends import RngFifo
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.testing import alloc_bufs, free_bufs
from qtest_virtio.virtqueue import Buf, SplitVirtqueue

from . import _rings
from ._support import assert_view_matches

pytestmark = pytest.mark.virtio_device("virtio-rng-pci", backend="fifo", refuse_each=False)

#: Bytes asked for per request.
REQUEST = 16
#: How long a request with no entropy behind it is watched before concluding it stays pending.
PENDING_WINDOW = 0.05


def _fifo(drv: VirtioRng) -> RngFifo:
    """The FIFO of the QEMU the driver talks to now (a new one after each migration)."""
    assert isinstance(drv.backend, RngFifo), drv.backend
    return drv.backend


@dataclass
class RngReads:
    """Requests of REQUEST device-writable bytes, each with REQUEST fresh random bytes written
    to the FIFO first: what a completed request holds must be bytes the test wrote, and at
    least one (§5.4.6.2)."""

    drv: VirtioRng
    queue: int = 0
    written: bytearray = field(default_factory=bytearray)

    def submit(self, *, kick: bool = True) -> object:
        """The buffer first, then its bytes: QEMU drops bytes that reach an entropy request of
        its backend while no buffer is available (chr_read pops nothing), and after a migration
        it holds such requests (one each from the run-state change and the status load)."""
        (buf,) = alloc_bufs(self.drv.memory, [REQUEST], fill=0xEE, tag="rng migration")
        vq = self.drv.queues[self.queue]
        token = vq.add([buf])
        if kick:
            vq.kick()
        else:
            vq.flush()
        self.feed(REQUEST)
        return token, buf

    def feed(self, n: int) -> None:
        """``n`` fresh random bytes into the FIFO of the QEMU the driver talks to now."""
        data = os.urandom(n)
        _fifo(self.drv).write(data)
        self.written += data

    def complete(self, handle: object) -> int:
        assert isinstance(handle, tuple)
        token, buf = handle
        assert isinstance(token, int) and isinstance(buf, Buf)
        elem = self.drv.queues[self.queue].wait_for(token, timeout=_rings.SHORT)
        assert 1 <= elem.length <= REQUEST, f"used length {elem.length}"
        got = self.drv.memory.read(buf.addr, elem.length)
        free_bufs(self.drv.memory, [buf])
        assert got in self.written, f"{got.hex()} is not from the entropy source"
        return elem.length


def test_idle_device_migrates(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """A device at DRIVER_OK with nothing in flight: on the destination the same ring serves
    requests from the destination's FIFO, in order, and QEMU's view is the driver's."""
    rng = virtio_device
    reads = RngReads(rng)
    _rings.round_trip(reads)
    dest = migrate()
    assert_view_matches(dest, rng)
    data = os.urandom(REQUEST)
    _fifo(rng).write(data)
    got = rng.request(REQUEST)
    assert 1 <= len(got) <= REQUEST and got == data[: len(got)]
    _rings.after_migration(dest, reads)


@pytest.mark.conformance("mig-rng-waiting-request-filled", spec="5.4.6.2")
def test_requests_waiting_for_entropy_complete_on_the_destination(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """Requests made available (and notified) while the FIFO is empty wait; they move with
    the ring, and once the destination's FIFO gets bytes they are filled from it, with at least
    one byte each and only bytes of that FIFO (MUST: the device returns a buffer only with
    entropy in it)."""
    rng = virtio_device
    vq = rng.queues[0]
    bufs = alloc_bufs(rng.memory, [REQUEST, REQUEST], fill=0xEE, tag="rng migration")
    tokens = [vq.add([b]) for b in bufs]
    vq.kick()
    _rings.quiet(rng.memory.qtest, PENDING_WINDOW)
    assert _rings.peek_used(vq) is None, "a request completed with no entropy behind it"
    dest = migrate()
    assert_view_matches(dest, rng)
    _rings.quiet(dest.qtest, PENDING_WINDOW)
    assert _rings.peek_used(vq) is None, "a request completed on the destination before its FIFO had bytes"
    data = os.urandom(2 * REQUEST)
    _fifo(rng).write(data)
    got = b""
    for token, buf in zip(tokens, bufs, strict=True):
        elem = vq.wait_for(token, timeout=_rings.SHORT)
        assert 1 <= elem.length <= REQUEST, f"used length {elem.length}"
        got += rng.memory.read(buf.addr, elem.length)
    assert data.startswith(got), "the waiting requests hold bytes that are not the destination FIFO's, in order"
    free_bufs(rng.memory, bufs)
    _rings.after_migration(dest, RngReads(rng))


def test_available_requests_complete_on_the_destination(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """A request made available but not notified before the migration (its bytes in the
    source's FIFO, which QEMU reads only for a notified request): the destination serves it
    after a notify there, from its own FIFO."""
    rng = virtio_device
    reads = RngReads(rng)
    handle = reads.submit(kick=False)
    dest = migrate()
    assert_view_matches(dest, rng)
    reads.feed(REQUEST)
    rng.queues[0].kick(force=True)
    reads.complete(handle)
    _rings.after_migration(dest, reads)


def test_used_entries_survive(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """Requests filled before the migration whose used entries the driver has not taken: the
    driver takes the same ids and lengths on the destination, with the bytes filled there."""
    _rings.used_entries_survive(RngReads(virtio_device), migrate)


def test_renegotiated_features_survive(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """Features renegotiated after a reset (EVENT_IDX declined on split rings, INDIRECT_DESC on
    packed ones) are the destination's guest features, and its ring serves."""
    rng = virtio_device
    refuse = "EVENT_IDX" if isinstance(rng.queues[0], SplitVirtqueue) else "INDIRECT_DESC"
    _rings.renegotiated_features_survive(RngReads(rng), migrate, refuse)


@pytest.mark.virtio_device("virtio-rng-pci", backend="fifo", refuse_each=False, refuse={"EVENT_IDX"})
@pytest.mark.conformance("mig-suppression-flag-honoured", spec="2.7.7.2")
def test_suppression_flag_survives(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """NO_INTERRUPT (split) or RING_EVENT_FLAGS_DISABLE (packed), set before the migration,
    keeps the destination from notifying; cleared there, it notifies."""
    _rings.suppression_flag_survives(RngReads(virtio_device), migrate)


@pytest.mark.virtio_device("virtio-rng-pci", backend="fifo", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
@pytest.mark.conformance("mig-used-event-reached-notifies", spec="2.7.7.2")
def test_used_event_reached_notifies(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """used_event written before the migration: the entry the destination places at the
    position it names is notified (MUST)."""
    reads = RngReads(virtio_device)
    dest, fired = _rings.used_event_run(reads, migrate, 2)
    assert fired[1], f"notifications per request on the destination: {fired}"
    _rings.after_migration(dest, reads)


@pytest.mark.virtio_device("virtio-rng-pci", backend="fifo", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
@pytest.mark.conformance("mig-used-event-not-reached-quiet", spec="2.7.7.2")
def test_used_event_not_reached_is_quiet(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """used_event two entries ahead, one used on the source: the destination's first used
    entry is not at used_event's position, so it SHOULD NOT be notified."""
    reads = RngReads(virtio_device)
    dest, fired = _rings.used_event_run(reads, migrate, 1)
    assert fired == [False], "the destination notified a used buffer before used_event"
    _rings.after_migration(dest, reads)


def test_masked_vector_survives(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """A masked MSI-X vector with its pending bit migrates as it is; unmasking on the
    destination delivers the held message once."""
    _rings.masked_vector_survives(RngReads(virtio_device), migrate)


@pytest.mark.virtio_device("virtio-rng-pci", backend="fifo", refuse_each=False, interrupts="isr")
def test_isr_survives(virtio_device: VirtioRng, migrate: Migrate) -> None:
    """Without MSI-X: a queue interrupt the driver has not acknowledged (ISR not read) is still
    in the destination's ISR; the read there clears it, the next request sets it again."""
    _rings.isr_survives(RngReads(virtio_device), migrate)
