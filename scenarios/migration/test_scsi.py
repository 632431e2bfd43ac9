"""virtio-scsi across a live migration: the request queues, the event queue and the SCSI host
carry over (virtio 1.2 §2.7, §5.6; QEMU's docs/devel/migration: device state and guest RAM
move, the guest does not re-initialise).

The requests are READ(10)s of one block of the scsi-hd at target 0, LUN 0, whose contents the
test wrote into the (shared) image; ring and interrupt cases are scenarios/migration/_rings.py.
Each scenario ends with a full round trip and QEMU's view of the device against the driver's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio.devices.scsi.driver import PendingCmd, VirtioScsi
from qtest_virtio.devices.scsi.encoding import RESP_CMD, EventType, Op, ResetReason, cdb_rw10, decode_lun
from qtest_virtio.virtqueue import SplitVirtqueue

from . import _rings
from ._support import assert_view_matches

pytestmark = pytest.mark.virtio_device("virtio-scsi-pci", refuse_each=False)

BLOCK = 512
#: The first request queue (after controlq and eventq, §5.6.2).
REQUEST_QUEUE = 2
#: CAPACITY DATA HAS CHANGED (SPC), as a PARAM_CHANGE reason: asc in bits 0-7, ascq in 8-15.
CAPACITY_CHANGED = 0x2A | 0x09 << 8


@dataclass
class ScsiReads:
    """READ(10)s of one block the test wrote into the image: a command's answer is checked
    whole (response OK, status GOOD, the block's bytes, used length response + data, §5.6.6.1)."""

    drv: VirtioScsi
    queue: int = REQUEST_QUEUE
    lba: int = 40

    def __post_init__(self) -> None:
        self.data = os.urandom(BLOCK)
        self.drv.image.write(self.lba * BLOCK, self.data)

    def submit(self, *, kick: bool = True) -> object:
        return self.drv.submit(cdb_rw10(Op.READ_10, self.lba, 1), data_in_len=BLOCK, kick=kick)

    def complete(self, handle: object) -> int:
        assert isinstance(handle, PendingCmd)
        done = self.drv.complete(handle)
        assert done.good, done.describe()
        assert done.data == self.data
        assert done.used_len == RESP_CMD.size + handle.sense_size + BLOCK
        return done.used_len


def _ready(scsi: VirtioScsi) -> ScsiReads:
    """The LUN past its power-on unit attention (commands then answer GOOD), and its reads."""
    scsi.wait_ready()
    return ScsiReads(scsi)


def test_idle_device_migrates(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """A SCSI host at DRIVER_OK with nothing in flight: on the destination a WRITE(10) and a
    READ(10) through the same rings reach the shared image, and QEMU's view is the driver's."""
    scsi = virtio_device
    reads = _ready(scsi)
    dest = migrate()
    assert_view_matches(dest, scsi)
    data = os.urandom(2 * BLOCK)
    scsi.write10(80, data)
    assert scsi.image.read(80 * BLOCK, len(data)) == data
    assert scsi.read10(80, 2) == data
    _rings.after_migration(dest, reads)


def test_available_commands_complete_on_the_destination(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """Commands made available but not notified before the migration are the destination's:
    after a notify there they complete, in full, with the used length of response and data."""
    scsi = virtio_device
    reads = _ready(scsi)
    handles = [reads.submit(kick=False) for _ in range(2)]
    dest = migrate()
    assert_view_matches(dest, scsi, in_flight=2)
    scsi.queues[REQUEST_QUEUE].kick(force=True)
    for h in handles:
        reads.complete(h)
    _rings.after_migration(dest, reads)


def test_used_entries_survive(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """Commands completed before the migration whose used entries the driver has not taken:
    the driver takes the same ids and lengths on the destination."""
    _rings.used_entries_survive(_ready(virtio_device), migrate)


def test_renegotiated_features_survive(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """Features renegotiated after a reset (EVENT_IDX declined on split rings, INDIRECT_DESC on
    packed ones) are the destination's guest features, and its rings serve."""
    scsi = virtio_device
    refuse = "EVENT_IDX" if isinstance(scsi.queues[0], SplitVirtqueue) else "INDIRECT_DESC"
    _rings.renegotiated_features_survive(_ready(scsi), migrate, refuse, after_reset=scsi.wait_ready)


@pytest.mark.virtio_device("virtio-scsi-pci", refuse_each=False, refuse={"EVENT_IDX"})
@pytest.mark.conformance("mig-suppression-flag-honoured", spec="2.7.7.2")
def test_suppression_flag_survives(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """NO_INTERRUPT (split) or RING_EVENT_FLAGS_DISABLE (packed) on a request queue, set
    before the migration, keeps the destination from notifying; cleared, it notifies."""
    _rings.suppression_flag_survives(_ready(virtio_device), migrate)


@pytest.mark.virtio_device("virtio-scsi-pci", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
@pytest.mark.conformance("mig-used-event-reached-notifies", spec="2.7.7.2")
def test_used_event_reached_notifies(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """used_event written before the migration: the entry the destination places at the
    position it names is notified (MUST)."""
    reads = _ready(virtio_device)
    dest, fired = _rings.used_event_run(reads, migrate, 2)
    assert fired[1], f"notifications per request on the destination: {fired}"
    _rings.after_migration(dest, reads)


@pytest.mark.virtio_device("virtio-scsi-pci", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
@pytest.mark.conformance("mig-used-event-not-reached-quiet", spec="2.7.7.2")
def test_used_event_not_reached_is_quiet(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """used_event two entries ahead, one used on the source: the destination's first used
    entry is not at used_event's position, so it SHOULD NOT be notified."""
    reads = _ready(virtio_device)
    dest, fired = _rings.used_event_run(reads, migrate, 1)
    assert fired == [False], "the destination notified a used buffer before used_event"
    _rings.after_migration(dest, reads)


def test_masked_vector_survives(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """A request queue's masked MSI-X vector with its pending bit migrates as it is;
    unmasking on the destination delivers the held message once."""
    _rings.masked_vector_survives(_ready(virtio_device), migrate)


@pytest.mark.virtio_device("virtio-scsi-pci", refuse_each=False, interrupts="isr")
def test_isr_survives(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """Without MSI-X: a queue interrupt the driver has not acknowledged (ISR not read) is still
    in the destination's ISR; the read there clears it, the next request sets it again."""
    _rings.isr_survives(_ready(virtio_device), migrate)


# -- the event queue ------------------------------------------------------------------------------


def _no_event_yet(scsi: VirtioScsi) -> None:
    """Nothing used on the eventq: every buffer there was posted before the migration (the
    driver posts one more only after taking an event)."""
    assert _rings.peek_used(scsi.eventq) is None


@pytest.mark.virtio_requires("HOTPLUG")
def test_event_buffer_posted_before_receives_a_hotplug_event(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """Regression (hw/scsi/virtio-scsi.c virtio_scsi_hotplug): eventq buffers posted before
    the migration are the destination's; a disk plugged there (target 1, LUN 2) is reported in
    one of them as VIRTIO_SCSI_T_TRANSPORT_RESET / RESCAN naming its address (§5.6.6.3), and
    commands reach the new LUN."""
    scsi = virtio_device
    reads = _ready(scsi)
    _no_event_yet(scsi)
    dest = migrate()
    _no_event_yet(scsi)
    dest.qmp.cmd("blockdev-add", driver="null-co", **{"node-name": "hot", "read-zeroes": True, "size": 1 << 20})
    dest.qmp.cmd(
        "device_add", driver="scsi-hd", bus=f"{scsi.dev_id}.0", drive="hot", id="hot-disk", **{"scsi-id": 1, "lun": 2}
    )
    event = scsi.poll_event(_rings.SHORT)
    assert event is not None and not event.missed
    assert (event.type, event.reason) == (EventType.TRANSPORT_RESET, ResetReason.RESCAN), event
    assert decode_lun(event.lun) == (1, 2)
    scsi.wait_ready(2, target=1)
    assert scsi.checked(cdb_rw10(Op.READ_10, 0, 1), data_in_len=BLOCK, lun=2, target=1).data == bytes(BLOCK)
    scsi.wait_ready()
    _rings.after_migration(dest, reads)


@pytest.mark.virtio_requires("CHANGE")
def test_event_buffer_posted_before_receives_a_param_change(virtio_device: VirtioScsi, migrate: Migrate) -> None:
    """Regression (virtio_scsi_change): growing the disk's node on the destination is reported
    in an eventq buffer posted before the migration as VIRTIO_SCSI_T_PARAM_CHANGE for target 0
    LUN 0 with CAPACITY DATA HAS CHANGED as its reason (§5.6.6.3), then READ CAPACITY shows the
    new size."""
    scsi = virtio_device
    reads = _ready(scsi)
    size = scsi.image.size
    _no_event_yet(scsi)
    dest = migrate()
    dest.qmp.cmd("block_resize", **{"node-name": f"{scsi.dev_id}-backend", "size": 2 * size})
    event = scsi.poll_event(_rings.SHORT)
    assert event is not None and not event.missed
    assert event.type == EventType.PARAM_CHANGE and decode_lun(event.lun) == (0, 0), event
    assert event.reason == CAPACITY_CHANGED, f"reason {event.reason:#06x}"
    scsi.wait_ready()
    assert scsi.read_capacity16() == (2 * size // BLOCK - 1, BLOCK)
    _rings.after_migration(dest, reads)
