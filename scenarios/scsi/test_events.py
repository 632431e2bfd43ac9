"""virtio-scsi asynchronous notification requests (virtio 1.2 §5.6.6.2) and the eventq events
that scenarios/scsi/test_scsi.py does not cover (§5.6.6.3): LUN parameter changes, and the
address of a hot-plugged LUN past 255.

A parameter change is made the way a management stack makes one: QMP ``block_resize`` of the
node behind the scsi-hd at target 0, LUN 0 (the harness names it ``<controller id>-backend``).
"""

from __future__ import annotations

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.scsi.driver import VirtioScsi
from qtest_virtio.devices.scsi.encoding import CtrlType, EventType, ResetReason, ScsiResponse, decode_lun

#: Only the event features change what these scenarios check.
pytestmark = pytest.mark.virtio_device("virtio-scsi-pci", refuse_each=["CHANGE", "HOTPLUG"])

#: VIRTIO_SCSI_EVT_ASYNC_* (§5.6.6.2): every event an AN request can name.
ASYNC_EVENTS = {
    "OPERATIONAL_CHANGE": 2,
    "POWER_MGMT": 4,
    "EXTERNAL_REQUEST": 8,
    "MEDIA_CHANGE": 16,
    "MULTI_HOST": 32,
    "DEVICE_BUSY": 64,
}
ALL_ASYNC = sum(ASYNC_EVENTS.values())
#: CAPACITY DATA HAS CHANGED (SPC), as a PARAM_CHANGE reason: asc in bits 0-7, ascq in 8-15.
CAPACITY_CHANGED = (0x2A, 0x09)
#: REPORTED LUNS DATA HAS CHANGED, the sense code of a rescan (§5.6.6.3).
REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
QUIET_WINDOW = 0.05


def _resize(qemu: Machine, scsi: VirtioScsi, size: int) -> None:
    qemu.qmp.cmd("block_resize", **{"node-name": f"{scsi.dev_id}-backend", "size": size})


@pytest.mark.parametrize("subscribe", [False, True], ids=["query", "subscribe"])
def test_an_requests_report_no_supported_events(virtio_device: VirtioScsi, qemu: Machine, subscribe: bool) -> None:
    """Regression (QEMU's virtio_scsi_handle_ctrl_req): an AN_QUERY or AN_SUBSCRIBE, for any set
    of events and any LUN, is answered VIRTIO_SCSI_S_OK with event_actual 0: the device writes
    the events it supports there (§5.6.6.2), and QEMU's scsi-hd supports none, so it never sends
    VIRTIO_SCSI_T_ASYNC_NOTIFY. The five-byte response is all the device writes."""
    scsi = virtio_device
    scsi.wait_ready()
    kind = CtrlType.AN_SUBSCRIBE if subscribe else CtrlType.AN_QUERY
    for requested in (ALL_ASYNC, ASYNC_EVENTS["MEDIA_CHANGE"], 0):
        assert scsi.an_query(requested, 0, subscribe=subscribe) == (ScsiResponse.OK, 0), (kind.name, requested)
    assert scsi.an_query(ALL_ASYNC, 0, target=9, subscribe=subscribe) == (ScsiResponse.OK, 0)
    assert scsi.poll_event(QUIET_WINDOW) is None
    assert scsi.test_unit_ready().good  # no unit attention came of it


@pytest.mark.virtio_requires("CHANGE")
@pytest.mark.conformance("scsi-param-change-capacity", spec="5.6.6.3")
def test_capacity_change_is_a_param_change_event(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """With VIRTIO_SCSI_F_CHANGE the device signals a change of a LUN's parameters with a
    VIRTIO_SCSI_T_PARAM_CHANGE event for that LUN whose reason holds asc and ascq (a capacity
    change: 0x2a, 0x09), and SHOULD also report it as a unit attention (§5.6.6.3): growing the
    disk's node gives that event for target 0 LUN 0, then the unit attention, then READ
    CAPACITY shows the new size."""
    scsi = virtio_device
    scsi.wait_ready()
    size = scsi.image.size
    _resize(qemu, scsi, 2 * size)
    event = scsi.poll_event(2.0)
    assert event is not None and not event.missed
    assert event.type == EventType.PARAM_CHANGE, event
    assert decode_lun(event.lun) == (0, 0)
    asc, ascq = CAPACITY_CHANGED
    assert event.reason == asc | ascq << 8, f"reason {event.reason:#06x}"
    after = scsi.test_unit_ready()
    assert after.is_unit_attention() and after.sense_data is not None
    assert (after.sense_data.asc, after.sense_data.ascq) == CAPACITY_CHANGED
    assert scsi.read_capacity16() == (2 * size // 512 - 1, 512)


@pytest.mark.virtio_device("virtio-scsi-pci", refuse={"CHANGE"}, refuse_each=False)
def test_no_param_change_event_without_change(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """Regression: with VIRTIO_SCSI_F_CHANGE declined, the same resize sends no event (QEMU's
    virtio_scsi_change checks the feature); the unit attention still tells the initiator."""
    scsi = virtio_device
    assert not scsi.has("CHANGE")
    scsi.wait_ready()
    _resize(qemu, scsi, 2 * scsi.image.size)
    assert scsi.poll_event(QUIET_WINDOW) is None
    after = scsi.test_unit_ready()
    assert after.is_unit_attention() and after.sense_data is not None
    assert (after.sense_data.asc, after.sense_data.ascq) == CAPACITY_CHANGED


@pytest.mark.virtio_requires("HOTPLUG")
@pytest.mark.conformance("scsi-hotplug-event-lun-address", spec="5.6.6.3")
def test_hotplug_event_addresses_a_lun_past_255(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The lun of a VIRTIO_SCSI_T_TRANSPORT_RESET event addresses a logical unit in the SCSI host
    (§5.6.6.3), in the format of the request queues (§5.6.6.1): a disk plugged at target 1, LUN
    300 is named with flat space addressing (0x40 | 300 >> 8, 300 & 0xff), and commands sent to
    that address reach it. The rescan is also reported as a unit attention, REPORTED LUNS DATA
    HAS CHANGED (asc 0x3f, ascq 0x0e), on the LUN already there."""
    scsi = virtio_device
    scsi.wait_ready()
    qemu.qmp.cmd("blockdev-add", driver="null-co", **{"node-name": "lun300", "read-zeroes": True, "size": 1 << 20})
    qemu.qmp.cmd(
        "device_add", driver="scsi-hd", bus=f"{scsi.dev_id}.0", drive="lun300", id="lun300-disk",
        **{"scsi-id": 1, "lun": 300},
    )  # fmt: skip
    event = scsi.poll_event(2.0)
    assert event is not None and (event.type, event.reason) == (EventType.TRANSPORT_RESET, ResetReason.RESCAN)
    assert event.lun[:4] == bytes([1, 1, 0x40 | 300 >> 8, 300 & 0xFF]), event.lun.hex()
    assert decode_lun(event.lun) == (1, 300)
    ua = scsi.test_unit_ready()
    assert ua.is_unit_attention() and ua.sense_data is not None
    assert (ua.sense_data.asc, ua.sense_data.ascq) == REPORTED_LUNS_CHANGED
    inquiry = scsi.inquiry(300, target=1)
    assert (inquiry.peripheral_qualifier, inquiry.peripheral_type) == (0, 0) and inquiry.vendor
