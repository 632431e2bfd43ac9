"""virtio-scsi: request encoding and decoding (no QEMU), then the driver against a real
virtio-scsi-pci with a scsi-hd on a raw image, on every transport mode, split and packed rings
(virtio 1.2 §5.6)."""

from __future__ import annotations

import os

import pytest

from qtest_virtio import Machine, modes
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.scsi.driver import VirtioScsi
from qtest_virtio.devices.scsi.encoding import (
    CTRL_AN,
    CTRL_TMF,
    REQ_CMD,
    RESP_CMD,
    SCSI_CONFIG,
    EventType,
    InquiryData,
    Op,
    ResetReason,
    ScsiCommandError,
    ScsiError,
    ScsiEvent,
    ScsiProtocolError,
    ScsiResponse,
    ScsiResult,
    ScsiStatus,
    Sense,
    SenseKey,
    TmfSubtype,
    cdb_inquiry,
    cdb_read_capacity16,
    cdb_rw10,
    cdb_test_unit_ready,
    decode_cmd_response,
    decode_lun,
    encode_an,
    encode_cmd,
    encode_lun,
    encode_tmf,
)
from qtest_virtio.virtqueue import VirtqueueError

IMAGE = 64 << 20


# -- encoding and decoding, no QEMU -----------------------------------------------------------------


def test_lun_encoding() -> None:
    """First byte 1, the target, a single-level LUN structure, four zero bytes (§5.6.6.1)."""
    assert encode_lun(0, 0) == bytes([1, 0, 0x40, 0, 0, 0, 0, 0])
    assert encode_lun(5, 0x123) == bytes([1, 5, 0x41, 0x23, 0, 0, 0, 0])
    assert encode_lun(255, 16383) == bytes([1, 255, 0x7F, 0xFF, 0, 0, 0, 0])
    assert encode_lun(2, 7, fmt="peripheral") == bytes([1, 2, 0, 7, 0, 0, 0, 0])
    for target, lun, fmt in ((0, 0, "flat"), (9, 300, "flat"), (3, 200, "peripheral")):
        assert decode_lun(encode_lun(target, lun, fmt=fmt)) == (target, lun)
    for bad in ({"target": 256}, {"lun": 16384}, {"lun": 256, "fmt": "peripheral"}, {"fmt": "extended"}):
        with pytest.raises(ValueError):
            encode_lun(**bad)
    with pytest.raises(ValueError, match="not 1, target"):
        decode_lun(bytes([0xC1, 1, 0, 0, 0, 0, 0, 0]))


def test_request_layouts() -> None:
    lun = encode_lun(1, 2)
    cdb = cdb_rw10(Op.READ_10, 0x01020304, 8)
    assert cdb == bytes([0x28, 0, 1, 2, 3, 4, 0, 0, 8, 0])
    req = encode_cmd(lun, cdb, 32, tag=0x1122, task_attr=1, prio=2, crn=3)
    assert len(req) == REQ_CMD.size + 32 == 51
    assert req[:8] == lun and req[8:16] == (0x1122).to_bytes(8, "little") and req[16:19] == bytes([1, 2, 3])
    assert req[19:29] == cdb and req[29:] == bytes(22)
    with pytest.raises(ValueError, match="longer than cdb_size"):
        encode_cmd(lun, bytes(17), 16)
    tmf = encode_tmf(TmfSubtype.LOGICAL_UNIT_RESET, lun, 9)
    assert len(tmf) == CTRL_TMF.size == 24 and tmf[:8] == bytes([0, 0, 0, 0, 5, 0, 0, 0]) and tmf[8:16] == lun
    an = encode_an(1, lun, 0x10)
    assert len(an) == CTRL_AN.size == 16 and an[4:12] == lun and an[12:] == bytes([0x10, 0, 0, 0])
    assert SCSI_CONFIG.size == 36 and RESP_CMD.size == 12
    assert len(cdb_read_capacity16()) == 16 and cdb_read_capacity16()[13] == 32
    assert cdb_inquiry(96) == bytes([0x12, 0, 0, 0, 96, 0])


def response(response: int = 0, status: int = 0, sense: bytes = b"", residual: int = 0, sense_size: int = 96) -> bytes:
    head = RESP_CMD.pack({"sense_len": len(sense), "residual": residual, "status": status, "response": response})
    return head + sense.ljust(sense_size, b"\0")


def test_response_decoding() -> None:
    fixed = bytes([0x70, 0, 0x06]) + bytes(9) + bytes([0x29, 0x02]) + bytes(4)
    r = decode_cmd_response(
        response(0, 2, fixed), b"", sense_size=96, data_in_len=0, data_out_len=0, where="w", used_len=108
    )
    assert (r.response, r.status, r.sense) == (ScsiResponse.OK, ScsiStatus.CHECK_CONDITION, fixed)
    assert r.is_unit_attention() and not r.good and str(r.sense_data) == "UNIT_ATTENTION asc=0x29 ascq=0x02"
    response_, status, sense, data = r  # unpacks as the four-tuple
    assert (response_, status, sense, data) == (ScsiResponse.OK, 2, fixed, b"")

    r = decode_cmd_response(response(residual=12), bytes(range(48)), sense_size=96, data_in_len=48,
                            data_out_len=0, where="w")  # fmt: skip
    assert r.good and r.data == bytes(range(36)) and r.residual == 12

    with pytest.raises(ScsiProtocolError, match=r"w: unknown response byte 0x2a"):
        decode_cmd_response(response(42), b"", sense_size=96, data_in_len=0, data_out_len=0, where="w")
    with pytest.raises(ScsiProtocolError, match="unknown SAM status byte 0x03"):
        decode_cmd_response(response(0, 3), b"", sense_size=96, data_in_len=0, data_out_len=0, where="w")
    with pytest.raises(ScsiProtocolError, match="sense_len 40 is past the 32-byte sense buffer"):
        decode_cmd_response(response(sense=bytes(40), sense_size=40)[:44], b"", sense_size=32, data_in_len=0,
                            data_out_len=0, where="w")  # fmt: skip
    with pytest.raises(ScsiProtocolError, match="residual 600 exceeds the 512 bytes"):
        decode_cmd_response(response(residual=600), b"", sense_size=96, data_in_len=512, data_out_len=0, where="w")
    with pytest.raises(ScsiProtocolError, match="response header is 50 bytes"):
        decode_cmd_response(bytes(50), b"", sense_size=96, data_in_len=0, data_out_len=0, where="w")
    # A failed request carries no SCSI status worth checking.
    bad_target = decode_cmd_response(response(3, 0x77), b"", sense_size=96, data_in_len=0, data_out_len=0, where="w")
    assert bad_target.response is ScsiResponse.BAD_TARGET and not bad_target.good


def test_sense_event_and_inquiry_parsing() -> None:
    desc = bytes([0x72, 0x05, 0x24, 0x00]) + bytes(4)
    assert Sense.parse(desc) == Sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0, desc)
    assert Sense.parse(b"") is None and Sense.parse(bytes([0x70, 0, 6])) is None
    ev = ScsiEvent.parse((0x8000_0001).to_bytes(4, "little") + encode_lun(3, 0) + (2).to_bytes(4, "little"))
    assert ev.missed and ev.type == EventType.TRANSPORT_RESET and ev.reason == ResetReason.REMOVED
    assert decode_lun(ev.lun) == (3, 0)
    inq = InquiryData.parse(bytes([0x00, 0, 5, 0x12, 31, 0, 0, 0x12]) + b"QEMU    QEMU HARDDISK   2.5+")
    assert (inq.peripheral_type, inq.vendor, inq.product, inq.revision) == (0, "QEMU", "QEMU HARDDISK", "2.5+")
    with pytest.raises(ScsiError, match="at least 36 bytes"):
        InquiryData.parse(bytes(20))
    assert ScsiResult(ScsiResponse.OK, 0, b"", b"").describe() == "response OK, status GOOD"


# -- against QEMU ------------------------------------------------------------------------------------


@pytest.mark.virtio_device("virtio-scsi-pci")
def test_commands_on_a_disk(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm = qemu
    assert isinstance(virtio_device, VirtioScsi)
    scsi = virtio_device
    cfg = scsi.config()
    assert (cfg.sense_size, cfg.cdb_size, cfg.num_queues, cfg.event_info_size) == (96, 32, 1, 16)
    assert len(scsi.queues) == 3 and len(scsi.request_queues) == 1

    # The reset at initialization leaves a unit attention; the next TUR is GOOD.
    results = scsi.wait_ready()
    assert [r.good for r in results] == [False, True]
    assert results[0].is_unit_attention() and results[0].sense_data is not None
    assert results[0].sense_data.asc == 0x29  # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED

    inq = scsi.inquiry()
    assert (inq.peripheral_qualifier, inq.peripheral_type, inq.vendor) == (0, 0, "QEMU")
    assert scsi.read_capacity10() == (IMAGE // 512 - 1, 512)
    assert scsi.read_capacity16() == (IMAGE // 512 - 1, 512)
    assert scsi.report_luns() == [0]

    data = os.urandom(2048)
    scsi.write10(40, data)
    assert scsi.image.read(40 * 512, 2048) == data
    assert scsi.read10(40, 4) == data
    host = os.urandom(512)
    scsi.image.write(3 * 512, host)
    assert scsi.read10(3, 1) == host
    sense = scsi.request_sense()
    assert sense is None or sense.key == SenseKey.NO_SENSE
    scsi.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-scsi-pci", rings=["split"])
def test_error_responses(virtio_device: VirtioDriver) -> None:
    assert isinstance(virtio_device, VirtioScsi)
    scsi = virtio_device
    scsi.wait_ready()
    # No target 4: the request is never processed.
    assert scsi.command(cdb_test_unit_ready(), target=4).response is ScsiResponse.BAD_TARGET
    # Target 0 exists but LUN 3 does not: the target answers (SPC), LOGICAL UNIT NOT SUPPORTED.
    r = scsi.command(cdb_test_unit_ready(), lun=3)
    assert r.response is ScsiResponse.OK and r.status == ScsiStatus.CHECK_CONDITION
    assert r.sense_data is not None and (r.sense_data.key, r.sense_data.asc) == (SenseKey.ILLEGAL_REQUEST, 0x25)
    # READ(10) of 8 blocks into 512 bytes: more data than the buffers hold.
    assert scsi.command(cdb_rw10(Op.READ_10, 0, 8), data_in_len=512).response is ScsiResponse.OVERRUN
    # Data out and data in in one request without INOUT.
    assert not scsi.has("INOUT")
    r = scsi.command(cdb_rw10(Op.WRITE_10, 0, 1), data_out=bytes(512), data_in_len=512)
    assert r.response is ScsiResponse.FAILURE
    with pytest.raises(ScsiCommandError, match=rf"VirtioScsi {scsi.dev_id} .*response BAD_TARGET") as err:
        scsi.checked(cdb_test_unit_ready(), target=9)
    assert err.value.result.response is ScsiResponse.BAD_TARGET
    with pytest.raises(ScsiError, match="no request queue 1"):
        scsi.command(cdb_test_unit_ready(), queue=1)
    assert scsi.test_unit_ready().good  # the device carries on


@pytest.mark.virtio_device("virtio-scsi-pci")
def test_task_management(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm = qemu
    assert isinstance(virtio_device, VirtioScsi)
    scsi = virtio_device
    scsi.wait_ready()
    assert scsi.logical_unit_reset() is ScsiResponse.OK  # FUNCTION_COMPLETE
    after = scsi.test_unit_ready()
    assert after.is_unit_attention() and after.sense_data is not None and after.sense_data.asc == 0x29
    assert scsi.abort_task(0xDEAD) is ScsiResponse.OK  # no such task: nothing to abort
    assert scsi.tmf(TmfSubtype.LOGICAL_UNIT_RESET, target=7) is ScsiResponse.BAD_TARGET
    assert scsi.tmf(TmfSubtype.LOGICAL_UNIT_RESET, lun=5) is ScsiResponse.INCORRECT_LUN
    assert scsi.tmf(TmfSubtype.I_T_NEXUS_RESET) is ScsiResponse.OK
    response, actual = scsi.an_query(0x10)
    assert response is ScsiResponse.OK and actual & ~0x10 == 0
    assert scsi.an_query(0x10, subscribe=True)[0] is ScsiResponse.OK
    scsi.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-scsi-pci", rings=["split"])
def test_hotplug_events(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm = qemu
    assert isinstance(virtio_device, VirtioScsi)
    scsi = virtio_device
    assert scsi.has("HOTPLUG") and scsi.poll_event() is None
    vm.qmp.cmd("blockdev-add", driver="null-co", **{"node-name": "hp", "read-zeroes": True, "size": 1 << 20})
    vm.qmp.cmd(
        "device_add", driver="scsi-hd", bus=f"{scsi.dev_id}.0", drive="hp", id="hp-disk", **{"scsi-id": 2, "lun": 0}
    )
    ev = scsi.poll_event(2.0)
    assert ev is not None and not ev.missed
    assert (ev.type, ev.reason, decode_lun(ev.lun)) == (EventType.TRANSPORT_RESET, ResetReason.RESCAN, (2, 0))
    assert scsi.inquiry(target=2).product == "QEMU HARDDISK"
    assert scsi.read_capacity10(0) == (IMAGE // 512 - 1, 512)
    vm.qmp.cmd("device_del", id="hp-disk")
    ev = scsi.poll_event(2.0)
    assert ev is not None and (ev.type, ev.reason) == (EventType.TRANSPORT_RESET, ResetReason.REMOVED)
    assert scsi.command(cdb_test_unit_ready(), target=2).response is ScsiResponse.BAD_TARGET
    assert len(scsi._event_allocs) == scsi.EVENT_BUFFERS  # every buffer went back on the eventq
    scsi.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-scsi-pci", transports=[modes.LEGACY, modes.MODERN], rings=["split"])
def test_events_missed_without_buffers(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm = qemu
    virtio_device.close()  # this test drives the device with its own options
    scsi = vm.virtio(virtio_device.dev_id, VirtioScsi, event_buffers=0)
    vm.qmp.cmd("blockdev-add", driver="null-co", **{"node-name": "hp", "size": 1 << 20})
    vm.qmp.cmd("device_add", driver="scsi-hd", bus=f"{scsi.dev_id}.0", drive="hp", **{"scsi-id": 1})
    assert scsi.poll_event(0.05) is None  # nowhere to put it
    scsi.fill_eventq(1)
    ev = scsi.poll_event(2.0)
    assert ev is not None and ev.missed and ev.type == EventType.NO_EVENT


@pytest.mark.virtio_device("virtio-scsi-pci", rings=["split"])
def test_write_used_length_quirk(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """QEMU 7.2 counts the data out in a write's used length; tolerated and recorded by default,
    a clear virtqueue error with strict_used_len."""
    vm = qemu
    assert isinstance(virtio_device, VirtioScsi)
    scsi = virtio_device
    scsi.wait_ready()
    scsi.write10(0, bytes(1024))
    assert scsi.used_len_overruns == [(2, scsi.used_len_overruns[0][1], 108 + 1024, 108)]
    r = scsi.command(cdb_rw10(Op.READ_10, 0, 2), data_in_len=1024)
    assert r.used_len == 108 + 1024 and len(scsi.used_len_overruns) == 1
    strict = vm.virtio(scsi.dev_id, VirtioScsi, strict_used_len=True)
    with pytest.raises(
        VirtqueueError, match=r"VirtioScsi queue 2: descriptor \d+: used length 620 is longer than the 108"
    ):
        strict.command(cdb_rw10(Op.WRITE_10, 0, 1), data_out=bytes(512))


@pytest.mark.virtio_device(
    "virtio-scsi-pci", transports=[modes.TRANSITIONAL_LEGACY, modes.MODERN], rings=["split"], flags={"num_queues": "2"}
)
def test_config_sizes_and_queues(virtio_device: VirtioDriver) -> None:
    assert isinstance(virtio_device, VirtioScsi)
    scsi = virtio_device
    assert len(scsi.request_queues) == 2 and scsi.config().num_queues == 2
    scsi.wait_ready()
    assert scsi.command(cdb_test_unit_ready(), queue=1).good
    scsi.set_sense_size(32)
    scsi.set_cdb_size(16)
    assert (scsi.config().sense_size, scsi.config().cdb_size) == (32, 16)
    r = scsi.command(cdb_test_unit_ready(), lun=1, queue=1)  # sense fits the smaller buffer
    assert r.status == ScsiStatus.CHECK_CONDITION and 0 < len(r.sense) <= 32
    assert r.used_len <= RESP_CMD.size + 32
    assert scsi.inquiry().vendor == "QEMU"  # 16-byte CDBs are enough for a 6-byte one
    scsi.initialize()  # reset restores the defaults (§5.6.4)
    assert (scsi.config().sense_size, scsi.config().cdb_size) == (96, 32)
    assert scsi.sense_size == 96 and scsi.cdb_size == 32
