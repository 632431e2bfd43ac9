"""virtio-scsi conformance (virtio 1.2 §5.6): the SCSI host device's device-side requirements that
a driver can check.

The controller has a ``scsi-hd`` at target 0, LUN 0 on a raw image the test reads and writes from
the host. Initialization resets the device, so the disk holds a unit attention until a command
consumes it; scenarios that are not about it call ``wait_ready()`` first. Hot-plugged disks are
added over QMP with a null-co backend.
"""

from __future__ import annotations

import os

import pytest

from qtest_virtio import Machine, modes
from qtest_virtio.devices.scsi.driver import VirtioScsi
from qtest_virtio.devices.scsi.encoding import (
    DEFAULT_CDB_SIZE,
    DEFAULT_SENSE_SIZE,
    REPORT_LUNS_WLUN,
    RESP_CMD,
    EventType,
    Op,
    ResetReason,
    ScsiResponse,
    ScsiStatus,
    SenseKey,
    TmfSubtype,
    cdb_inquiry,
    cdb_report_luns,
    cdb_rw10,
    cdb_test_unit_ready,
    decode_lun,
)

pytestmark = pytest.mark.virtio_device("virtio-scsi-pci")

#: Layouts where the used length is a rule: legacy drivers SHOULD ignore it (§5.6.6).
#: How long the eventq is watched for an event that must not come.
QUIET_WINDOW = 0.05


def _hotplug_disk(qemu: Machine, bus: str, node: str, target: int) -> str:
    """A scsi-hd at ``target`` (LUN 0) on the controller's bus, backed by null-co; its qdev id."""
    qemu.qmp.cmd("blockdev-add", driver="null-co", **{"node-name": node, "read-zeroes": True, "size": 1 << 20})
    dev_id = f"{node}-disk"
    qemu.qmp.cmd("device_add", driver="scsi-hd", bus=f"{bus}.0", drive=node, id=dev_id, **{"scsi-id": target})
    return dev_id


@pytest.mark.conformance("scsi-config-defaults", spec="5.6.4")
def test_sense_and_cdb_size_defaults(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The default sense_size MUST be 96 and cdb_size 32 (§5.6.4), as written by the device.
    Nothing more: §5.6.4 sets no bound on num_queues or event_info_size."""
    cfg = virtio_device.config()
    assert (cfg.sense_size, cfg.cdb_size) == (DEFAULT_SENSE_SIZE, DEFAULT_CDB_SIZE)


@pytest.mark.conformance("scsi-config-reset-restores-sizes", spec="5.6.4")
def test_reset_restores_sense_and_cdb_size(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """On reset, the device MUST set sense_size to 96 and cdb_size to 32 (§5.6.4): the driver
    changes both, they read back changed, and a device reset restores them."""
    virtio_device.set_sense_size(64)
    virtio_device.set_cdb_size(16)
    cfg = virtio_device.config()
    assert (cfg.sense_size, cfg.cdb_size) == (64, 16)
    virtio_device.initialize()  # reset, then the whole initialization again
    cfg = virtio_device.config()
    assert (cfg.sense_size, cfg.cdb_size) == (DEFAULT_SENSE_SIZE, DEFAULT_CDB_SIZE)


@pytest.mark.conformance("scsi-inquiry", spec="5.6.6.1.1")
def test_inquiry_is_answered(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """A command completed by the LUN gets response VIRTIO_SCSI_S_OK and the SAM status in status
    (§5.6.6.1.1): INQUIRY (exempt from unit attentions, SPC) returns GOOD and standard data of
    a direct-access device."""
    result = virtio_device.command(cdb_inquiry(96), data_in_len=96)
    assert result.response is ScsiResponse.OK and result.status == ScsiStatus.GOOD and result.sense == b""
    data = result.data
    assert len(data) >= 36
    assert data[0] == 0x00  # peripheral qualifier 0 (connected), device type 0 (direct access)
    assert data[8:16].strip() and data[16:32].strip()  # vendor and product identification


@pytest.mark.conformance("scsi-read-capacity-matches-image", spec="5.6.6.1.1")
def test_read_capacity_matches_the_image(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """READ CAPACITY(10) and (16) complete with OK/GOOD and describe the image behind the LUN:
    last LBA = size / block length - 1 (§5.6.6.1.1)."""
    virtio_device.wait_ready()
    size = virtio_device.image.size
    last10, block10 = virtio_device.read_capacity10()
    last16, block16 = virtio_device.read_capacity16()
    assert block10 == block16 == 512
    assert last10 == last16 == size // 512 - 1


@pytest.mark.conformance("scsi-tur-after-unit-attention", spec="5.6.6.1.1")
def test_test_unit_ready_reports_then_clears_the_unit_attention(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The device writes the SAM status of the command (§5.6.6.1.1): the first TEST UNIT READY
    after the device reset is CHECK CONDITION with UNIT ATTENTION (reset occurred, ASC 29h) in
    the sense buffer, with sense_len saying how much; the next one is GOOD."""
    first = virtio_device.test_unit_ready()
    assert first.response is ScsiResponse.OK and first.status == ScsiStatus.CHECK_CONDITION
    sense = first.sense_data
    assert sense is not None and sense.key == SenseKey.UNIT_ATTENTION and sense.asc == 0x29
    assert 8 <= len(first.sense) <= DEFAULT_SENSE_SIZE
    second = virtio_device.test_unit_ready()
    assert second.good and second.sense == b""


@pytest.mark.conformance("scsi-read-write-round-trip", spec="5.6.6.1")
def test_write_then_read_through_the_lun(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """WRITE(10) data out reaches the LUN's medium and READ(10) data in returns it (§5.6.6.1):
    the host image holds the bytes written, and bytes the host puts there read back."""
    virtio_device.wait_ready()
    image = virtio_device.image
    data = os.urandom(4 * 512)
    virtio_device.write10(123, data)
    assert image.read(123 * 512, len(data)) == data
    assert virtio_device.read10(123, 4) == data
    host = os.urandom(512)
    image.write(9 * 512, host)
    result = virtio_device.command(cdb_rw10(Op.READ_10, 9, 1), data_in_len=512)
    assert result.good and result.data == host and result.residual == 0


@pytest.mark.conformance("scsi-tmf-logical-unit-reset", spec="5.6.6.2")
def test_logical_unit_reset_completes(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """A LOGICAL UNIT RESET task management function on the controlq is answered with
    FUNCTION_COMPLETE or FUNCTION_SUCCEEDED (§5.6.6.2), and it did reset the LUN: the next
    command reports the reset as a unit attention."""
    virtio_device.wait_ready()
    response = virtio_device.tmf(TmfSubtype.LOGICAL_UNIT_RESET, 0)
    assert response in (ScsiResponse.OK, ScsiResponse.FUNCTION_SUCCEEDED)
    after = virtio_device.test_unit_ready()
    assert after.is_unit_attention() and after.sense_data is not None and after.sense_data.asc == 0x29
    assert virtio_device.test_unit_ready().good


@pytest.mark.conformance("scsi-bad-target", spec="5.6.6.1.1")
def test_request_to_missing_target_gets_bad_target(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The device MUST write VIRTIO_SCSI_S_BAD_TARGET if the request was never processed because
    the target indicated by lun does not exist (§5.6.6.1.1); a WRITE to it stores nothing."""
    virtio_device.wait_ready()
    max_target = virtio_device.config().max_target
    for target in {1, 7, min(200, max_target)}:
        assert virtio_device.command(cdb_test_unit_ready(), target=target).response is ScsiResponse.BAD_TARGET
    result = virtio_device.command(cdb_rw10(Op.WRITE_10, 0, 1), data_out=b"\x77" * 512, target=3)
    assert result.response is ScsiResponse.BAD_TARGET
    assert virtio_device.image.read(0, 512) == bytes(512)
    assert virtio_device.test_unit_ready().good


@pytest.mark.virtio_device("virtio-scsi-pci", refuse={"INOUT"})
@pytest.mark.conformance("scsi-inout-without-feature-fails", spec="5.6.6.1.1")
def test_bidirectional_request_without_inout_gets_failure(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """If neither dataout nor datain is empty and VIRTIO_SCSI_F_INOUT was not negotiated, the
    request is returned with VIRTIO_SCSI_S_FAILURE (§5.6.6.1.1), and the write is not done."""
    virtio_device.wait_ready()
    assert not virtio_device.has("INOUT")
    result = virtio_device.command(cdb_rw10(Op.WRITE_10, 5, 1), data_out=b"\x42" * 512, data_in_len=512)
    assert result.response is ScsiResponse.FAILURE
    assert virtio_device.image.read(5 * 512, 512) == bytes(512)


@pytest.mark.conformance("scsi-overrun", spec="5.6.6.1.1")
def test_transfer_larger_than_buffers_gets_overrun(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The device MUST write VIRTIO_SCSI_S_OVERRUN if the CDB's transfer size requires more data
    than the datain and dataout buffers hold (§5.6.6.1.1): READ(10) of 8 blocks into 1024
    bytes, WRITE(10) of 4 blocks from 512."""
    virtio_device.wait_ready()
    assert virtio_device.command(cdb_rw10(Op.READ_10, 0, 8), data_in_len=1024).response is ScsiResponse.OVERRUN
    write = virtio_device.command(cdb_rw10(Op.WRITE_10, 0, 4), data_out=b"\x13" * 512)
    assert write.response is ScsiResponse.OVERRUN
    assert virtio_device.image.read(0, 512) == bytes(512)


@pytest.mark.virtio_device("virtio-scsi-pci", transports=modes.MODERN_LAYOUT_MODES)
@pytest.mark.conformance("scsi-sense-size-honoured", spec="5.6.4")
def test_sense_is_cut_to_the_drivers_sense_size(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """sense_size is the maximum size of the sense data the device will write (§5.6.4): with it
    set to 8, a CHECK CONDITION's sense_len is at most 8 and the used length stays within the
    smaller response (§2.7.8.2)."""
    virtio_device.set_sense_size(8)
    result = virtio_device.test_unit_ready()  # the unit attention of the reset, with sense data
    assert result.status == ScsiStatus.CHECK_CONDITION
    assert 0 < len(result.sense) <= 8
    assert result.sense[0] & 0x7F in (0x70, 0x72)
    assert result.used_len <= RESP_CMD.size + 8


@pytest.mark.conformance("scsi-report-luns-wlun", spec="5.6.6.1")
def test_report_luns_well_known_lun(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The virtio-scsi device SHOULD implement the REPORT LUNS well-known logical unit, addressed
    as 0xC1, 0x01 and six zero bytes (§5.6.6.1): REPORT LUNS there lists LUN 0."""
    virtio_device.wait_ready()
    result = virtio_device.command(cdb_report_luns(256), data_in_len=256, lun=REPORT_LUNS_WLUN)
    assert result.response is ScsiResponse.OK and result.status == ScsiStatus.GOOD
    assert int.from_bytes(result.data[0:4], "big") >= 8


@pytest.mark.virtio_device("virtio-scsi-pci", transports=modes.MODERN_LAYOUT_MODES)
@pytest.mark.conformance("scsi-write-used-length", spec="2.7.8.2")
def test_write_used_length_counts_only_device_written_bytes(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The device MUST write at least len bytes to the buffers, from the first device-writable one
    (§2.7.8.2): a WRITE(10) has only the response header to write, so its used length cannot
    exceed the device-writable bytes (driver-side tolerance of QEMU's quirk shows the raw value)."""
    virtio_device.wait_ready()
    result = virtio_device.command(cdb_rw10(Op.WRITE_10, 1, 2), data_out=os.urandom(1024))
    assert result.good
    writable = RESP_CMD.size + virtio_device.sense_size
    assert result.used_len <= writable, f"used length {result.used_len} > {writable} device-writable bytes"


@pytest.mark.virtio_requires("HOTPLUG")
@pytest.mark.conformance("scsi-hotplug-rescan-event", spec="5.6.6.3")
def test_hotplug_reports_transport_reset_rescan(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """With VIRTIO_SCSI_F_HOTPLUG the host SHOULD report hot-plug events (§5.6.3): a disk plugged
    at target 2 gives a VIRTIO_SCSI_T_TRANSPORT_RESET event with reason RESCAN for that LUN
    (§5.6.6.3), and unplugging it gives reason REMOVED."""
    dev_id = _hotplug_disk(qemu, virtio_device.dev_id, "hp2", 2)
    event = virtio_device.poll_event(2.0)
    assert event is not None and not event.missed
    assert (event.type, event.reason) == (EventType.TRANSPORT_RESET, ResetReason.RESCAN)
    assert decode_lun(event.lun) == (2, 0)
    qemu.qmp.cmd("device_del", id=dev_id)
    event = virtio_device.poll_event(2.0)
    assert event is not None and (event.type, event.reason) == (EventType.TRANSPORT_RESET, ResetReason.REMOVED)
    assert decode_lun(event.lun) == (2, 0)


@pytest.mark.virtio_device("virtio-scsi-pci", refuse={"HOTPLUG"})
@pytest.mark.conformance("scsi-no-rescan-without-hotplug", spec="5.6.6.3.2")
def test_no_rescan_or_removed_events_without_hotplug(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The device MUST NOT send VIRTIO_SCSI_T_TRANSPORT_RESET with reason REMOVED or RESCAN
    unless VIRTIO_SCSI_F_HOTPLUG was negotiated (§5.6.6.3.2): plugging and unplugging a disk
    with it declined leaves the eventq's buffers alone."""
    assert not virtio_device.has("HOTPLUG")
    dev_id = _hotplug_disk(qemu, virtio_device.dev_id, "hp3", 3)
    qemu.qmp.cmd("device_del", id=dev_id)
    while (event := virtio_device.poll_event(QUIET_WINDOW)) is not None:
        assert not (
            event.type == EventType.TRANSPORT_RESET and event.reason in (ResetReason.RESCAN, ResetReason.REMOVED)
        ), event


@pytest.mark.virtio_requires("HOTPLUG")
@pytest.mark.conformance("scsi-events-missed-flag", spec="5.6.6.3.2")
def test_lost_events_are_flagged(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """The device MUST set bit 31 in event if events were lost due to missing buffers
    (§5.6.6.3.2): with the eventq empty a hot-plug event is lost, and the first buffer made
    available afterwards comes back with VIRTIO_SCSI_T_EVENTS_MISSED set."""
    virtio_device.event_buffers = 0
    virtio_device.initialize()  # the same device, now with nothing on the eventq
    _hotplug_disk(qemu, virtio_device.dev_id, "hp4", 4)
    assert virtio_device.poll_event(QUIET_WINDOW) is None
    virtio_device.fill_eventq(1)
    event = virtio_device.poll_event(2.0)
    assert event is not None and event.missed
