"""virtio-blk across a live migration: the driver keeps its rings, the destination continues
them (virtio 1.2 §2.7, §5.2; QEMU's docs/devel/migration: device state and guest RAM move, the
guest does not re-initialise).

Each scenario migrates with the ``migrate`` fixture (to ``--migrate-to``, else the same binary)
and then checks a full round trip and QEMU's own view of the device against the driver's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio import Machine
from qtest_virtio.backends import blkdebug_kind
from qtest_virtio.devices.blk.driver import PendingBlk, VirtioBlk
from qtest_virtio.devices.blk.encoding import SECTOR_SIZE, BlkReqType, BlkRequest, BlkStatus
from qtest_virtio.testing import pattern
from qtest_virtio.virtqueue import SplitVirtqueue

from . import _rings
from ._support import assert_view_matches

pytestmark = pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False)


def test_idle_device_migrates(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """A device at DRIVER_OK with nothing in flight: on the destination the same rings serve
    a write and a read, the data is in the (shared) image, and QEMU's view is the driver's."""
    data = os.urandom(1024)
    virtio_device.write(8, data)
    dest = migrate()
    assert_view_matches(dest, virtio_device)
    assert virtio_device.read(8, 2) == data
    more = os.urandom(512)
    virtio_device.write(100, more)
    assert virtio_device.image.read(100 * 512, 512) == more


def test_available_requests_complete_on_the_destination(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """Requests made available but not notified before migration are the destination's to
    serve: after a notify there they complete, with the used length of a read (data + status)."""
    data = os.urandom(512)
    virtio_device.image.write(64 * 512, data)
    vq = virtio_device.queues[0]
    req = BlkRequest(BlkReqType.IN, 64, data_in_len=512)
    pending = virtio_device.submit(req, kick=False)
    dest = migrate()
    assert_view_matches(dest, virtio_device, in_flight=1)
    vq.kick(force=True)
    done = virtio_device.complete(pending)
    assert done.status is BlkStatus.OK and done.data == data
    assert done.used_len == 512 + 1


# -- ring and interrupt state (scenarios/migration/_rings.py) ---------------------------------------


@dataclass
class BlkReads:
    """Reads of one sector whose contents the test wrote into the image: a request's answer is
    checked whole (status OK, the sector's bytes, used length data + status, §5.2.6)."""

    drv: VirtioBlk
    queue: int = 0
    sector: int = 64

    def __post_init__(self) -> None:
        self.data = pattern(SECTOR_SIZE, seed=self.sector)
        self.drv.image.write(self.sector * SECTOR_SIZE, self.data)

    def submit(self, *, kick: bool = True) -> object:
        return self.drv.submit(BlkRequest(BlkReqType.IN, self.sector, data_in_len=SECTOR_SIZE), kick=kick)

    def complete(self, handle: object) -> int:
        assert isinstance(handle, PendingBlk)
        done = self.drv.complete(handle)
        assert done.status is BlkStatus.OK and done.data == self.data
        assert done.used_len == SECTOR_SIZE + 1
        return done.used_len


def test_used_entries_survive(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """Requests used before the migration whose used entries the driver has not taken: the
    destination leaves them as they are, the driver takes the same ids and lengths there."""
    _rings.used_entries_survive(BlkReads(virtio_device), migrate)


def test_renegotiated_features_survive(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """Features renegotiated after a reset (EVENT_IDX declined on split rings, INDIRECT_DESC on
    packed ones) are what the destination holds as the guest's features, and its rings serve."""
    refuse = "EVENT_IDX" if isinstance(virtio_device.queues[0], SplitVirtqueue) else "INDIRECT_DESC"
    _rings.renegotiated_features_survive(BlkReads(virtio_device), migrate, refuse)


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, refuse={"EVENT_IDX"})
@pytest.mark.conformance("mig-suppression-flag-honoured", spec="2.7.7.2")
def test_suppression_flag_survives(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """NO_INTERRUPT (split) or RING_EVENT_FLAGS_DISABLE (packed) set before the migration keeps
    the destination from notifying; cleared there, the next request is notified."""
    _rings.suppression_flag_survives(BlkReads(virtio_device), migrate)


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
@pytest.mark.conformance("mig-used-event-reached-notifies", spec="2.7.7.2")
def test_used_event_reached_notifies(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """used_event written before the migration: the used entry the destination places at the
    position it names is notified (MUST)."""
    dest, fired = _rings.used_event_run(BlkReads(virtio_device), migrate, 2)
    assert fired[1], f"notifications per request on the destination: {fired}"
    _rings.after_migration(dest, BlkReads(virtio_device))


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
@pytest.mark.conformance("mig-used-event-not-reached-quiet", spec="2.7.7.2")
def test_used_event_not_reached_is_quiet(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """used_event written before the migration two entries ahead, one entry used on the source
    (not notified): the destination's first used entry is not at the position used_event
    names either, so it SHOULD NOT be notified (asserted: QEMU honours it without a migration,
    and a migration must not change what the driver sees)."""
    dest, fired = _rings.used_event_run(BlkReads(virtio_device), migrate, 1)
    assert fired == [False], "the destination notified a used buffer before used_event"
    _rings.after_migration(dest, BlkReads(virtio_device))


def test_masked_vector_survives(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """A masked MSI-X vector with its pending bit migrates as it is; unmasking on the
    destination delivers the held message once."""
    _rings.masked_vector_survives(BlkReads(virtio_device), migrate)


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, interrupts="isr")
def test_isr_survives(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """Without MSI-X: a queue interrupt the driver has not acknowledged (ISR not read) is still
    in the destination's ISR; the read there clears it, the next request sets it again."""
    _rings.isr_survives(BlkReads(virtio_device), migrate)


# -- device state ---------------------------------------------------------------------------------


def _host_writeback(vm: Machine, blk: VirtioBlk) -> bool:
    """Whether QEMU runs the device's backend with a writeback cache (query-block's
    cache.writeback)."""
    entries = vm.qmp.cmd("query-block")
    assert isinstance(entries, list)
    for entry in entries:
        if str(entry.get("qdev", "")).startswith(f"/machine/peripheral/{blk.dev_id}/"):
            return bool(entry["inserted"]["cache"]["writeback"])
    raise AssertionError(f"query-block lists no device {blk.dev_id}")


def _cache_mode_survives(blk: VirtioBlk, qemu: Machine, migrate: Migrate) -> None:
    """Switch the cache mode away from the one the device started with, through writeback;
    after the migration writeback reads what the driver wrote and QEMU's backend runs in that
    mode (the destination's command line is the source's: the mode it started with)."""
    started = blk.config().writeback == 1
    assert _host_writeback(qemu, blk) is started
    chosen = not started
    blk.set_writeback(chosen)
    assert blk.config().writeback == int(chosen) and _host_writeback(qemu, blk) is chosen
    dest = migrate()
    got = blk.config().writeback
    host = _host_writeback(dest, blk)
    data = os.urandom(SECTOR_SIZE)
    blk.write(12, data)
    blk.flush()
    assert blk.image.read(12 * SECTOR_SIZE, SECTOR_SIZE) == data
    _rings.after_migration(dest, BlkReads(blk))
    assert got == int(chosen), f"writeback reads {got} on the destination; the driver wrote {int(chosen)}"
    assert host is chosen, f"the destination's backend runs writeback={host}; the driver chose {chosen}"


@pytest.mark.virtio_requires("CONFIG_WCE")
@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, flags={"write-cache": "off"})
@pytest.mark.conformance("mig-blk-writeback-survives", spec="5.2.5")
def test_writeback_chosen_by_the_driver_survives(virtio_device: VirtioBlk, qemu: Machine, migrate: Migrate) -> None:
    """A device started writethrough (write-cache=off) that the driver switched to writeback
    (CONFIG_WCE, §5.2.5: the cache mode can be set through writeback) keeps writeback on the
    destination, in its config and in QEMU's cache mode."""
    _cache_mode_survives(virtio_device, qemu, migrate)


@pytest.mark.virtio_requires("CONFIG_WCE")
@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, flags={"write-cache": "on"})
@pytest.mark.conformance("mig-blk-writeback-survives", spec="5.2.5")
def test_writethrough_chosen_by_the_driver_survives(virtio_device: VirtioBlk, qemu: Machine, migrate: Migrate) -> None:
    """The other way: a device started writeback (write-cache=on) that the driver switched to
    writethrough keeps writethrough on the destination."""
    _cache_mode_survives(virtio_device, qemu, migrate)


#: The sector the write fault of the werror=stop scenario sits on (nothing else touches it).
BAD_WRITE = 2048


def _run_state(vm: Machine) -> str:
    status = vm.qmp.cmd("query-status")
    assert isinstance(status, dict)
    return str(status["status"])


def _wait_run_state(vm: Machine, state: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := _run_state(vm)) != state:
        assert time.monotonic() < deadline, f"run state {now!r}, expected {state!r} within {timeout} s"
        time.sleep(0.01)


#: A migration that QEMU cannot load (deviation mig-blk-held-request-completes) is over in well
#: under a second; the default command timeout (30 s) is what the harness waits otherwise.
MIGRATION_TIMEOUT = 3.0


@pytest.mark.virtio_device(
    "virtio-blk-pci", refuse_each=False, flags={"werror": "stop"}, backend=blkdebug_kind(f"write@{BAD_WRITE}:once")
)
@pytest.mark.conformance("mig-blk-held-request-completes", spec="2.8")
def test_request_held_by_werror_stop_moves_with_the_state(
    virtio_device: VirtioBlk, qemu: Machine, migrate: Migrate
) -> None:
    """Regression (hw/block/virtio-blk.c): werror=stop keeps a failed write in the device's list of requests to retry
    and stops the VM (io-error); migrating the stopped VM puts that request in the stream (virtio_blk_save_device,
    qemu_put_virtqueue_element) and the destination loads it (virtio_blk_load_device) and keeps the source's io-
    error run state. Once ``cont`` runs it, the request is submitted again there (virtio_blk_dma_restart_cb): the
    destination's blkdebug rule fails it once more (a new QEMU, a fresh ``once``), the destination stops in io-
    error, and after ``cont`` it completes with OK and the image holds it. The request is never used on the
    source. (The element is the one the device took from the ring: on a packed ring QEMU puts its ndescs in the
    stream before the element and reads it back after, deviation mig-blk-held-request-completes.)"""
    blk = virtio_device
    vq = blk.queues[0]
    data = os.urandom(2 * SECTOR_SIZE)
    pending = blk.submit(BlkRequest(BlkReqType.OUT, BAD_WRITE - 1, data_out=data))
    _wait_run_state(qemu, "io-error")
    assert _rings.peek_used(vq) is None
    qemu.spec.command_timeout = MIGRATION_TIMEOUT
    dest = migrate()
    # The destination takes the source's run state (migration.c process_incoming_migration_bh:
    # io-error is not a live state, so it is not started); ``cont`` retries the request there.
    assert _run_state(dest) == "io-error"
    assert _rings.peek_used(vq) is None, "the held request was used before the destination retried it"
    dest.cont()
    _wait_run_state(dest, "io-error")
    assert _rings.peek_used(vq) is None, "the held request was used before the destination retried it"
    assert blk.image.read((BAD_WRITE - 1) * SECTOR_SIZE, len(data)) == bytes(len(data))
    dest.cont()
    done = blk.complete(pending)
    assert done.status is BlkStatus.OK and done.used_len == 1
    assert blk.image.read((BAD_WRITE - 1) * SECTOR_SIZE, len(data)) == data
    assert _run_state(dest) == "running"
    _rings.after_migration(dest, BlkReads(blk))
