"""virtio-blk regression scenarios on QEMU's error policy (``werror`` / ``rerror``), plus the
requests the device refuses (a write to a read-only device, zone commands on a device that is not
zoned, SCSI packet commands).

The faults come from QEMU's blkdebug driver between the device and its raw image
(``backend="blkdebug,write@SECTOR:once"``, qtest_virtio.backends.BlockFault): the I/O that touches
that sector fails with the given errno, once. What the device then does is QEMU's policy, not the
spec's (hw/block/virtio-blk.c ``virtio_blk_handle_rw_error``): ``report`` completes the request
with VIRTIO_BLK_S_IOERR (§5.2.6), ``ignore`` completes it with OK, ``stop`` keeps it, stops the VM
(run state ``io-error``, QMP BLOCK_IO_ERROR and STOP) and submits it again once the VM runs
(``virtio_blk_dma_restart_cb``/``_bh``); ``enospc``, the default of ``werror``, stops only on
ENOSPC. The machine is RUNNING when a driver is made (``Machine.resume``, also on TCG builds), so
the stop and the QMP ``cont`` after it are the same on every build.
"""

from __future__ import annotations

import os
import time

import pytest

from qtest_virtio import Machine, modes
from qtest_virtio.backends import blkdebug_kind
from qtest_virtio.devices.blk.driver import PendingBlk, VirtioBlk
from qtest_virtio.devices.blk.encoding import (
    SCSI_INHDR,
    SCSI_SENSE_BYTES,
    SECTOR_SIZE,
    ZONE_APPEND_SECTOR_BYTES,
    ZONE_DESCRIPTOR_BYTES,
    ZONE_REPORT_HEADER_BYTES,
    ZONE_REQUEST_TYPES,
    BlkReqType,
    BlkRequest,
    BlkStatus,
    encode_dwz_segment,
    encode_header,
)
from qtest_virtio.introspect import device_view
from qtest_virtio.transport import feature_bit
from qtest_virtio.transport.layout import STATUS
from qtest_virtio.virtqueue.base import VirtqueueTimeout

#: The sectors the faults of these scenarios sit on (nothing else touches them).
BAD_WRITE = 2048
BAD_READ = 4096
#: How long a request the VM holds is watched before concluding it stays held.
HELD_WINDOW = 0.2

#: The error policies live in the block layer, not in the rings: no refusal changes what these
#: scenarios check, so they stay out of the --virtio-refuse-each runs (refuse_each=False).
pytestmark = pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False)


def _status(qemu: Machine) -> dict[str, object]:
    status = qemu.qmp.cmd("query-status")
    assert isinstance(status, dict)
    return status


def _wait_run_state(qemu: Machine, state: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := _status(qemu))["status"] != state:
        assert time.monotonic() < deadline, f"run state {now['status']!r}, expected {state!r} within {timeout} s"
        time.sleep(0.01)


def _io_errors(qemu: Machine) -> list[dict[str, object]]:
    """The BLOCK_IO_ERROR events' data so far (QEMU sends at most one a second); a command
    first, so that every event QEMU sent before its reply has been read."""
    qemu.qmp.cmd("query-status")
    return [e["data"] for e in qemu.qmp.get_events(wait=False) if e["event"] == "BLOCK_IO_ERROR"]


def _io_status(qemu: Machine, blk: VirtioBlk) -> object:
    """query-block's io-status of the device (present where the policy can stop the VM)."""
    devices = qemu.qmp.cmd("query-block")
    assert isinstance(devices, list)
    for dev in devices:
        if str(dev.get("qdev", "")).startswith(f"/machine/peripheral/{blk.dev_id}/"):
            return dev.get("io-status")
    raise AssertionError(f"query-block lists no device {blk.dev_id}")


def _assert_held(blk: VirtioBlk, pending: PendingBlk) -> None:
    with pytest.raises(VirtqueueTimeout):
        blk.complete(pending, timeout=HELD_WINDOW)


def _stop_then_retry(blk: VirtioBlk, qemu: Machine, req: BlkRequest, operation: str) -> BlkStatus:
    """Submit ``req`` (whose I/O fails once), see the VM stop with the request held, ``cont``,
    return the status the retried request completes with."""
    assert _status(qemu)["running"] is True  # and QMP is negotiated before the error's events
    pending = blk.submit(req)
    _wait_run_state(qemu, "io-error")
    assert _status(qemu)["running"] is False
    (event,) = _io_errors(qemu)
    assert (event["operation"], event["action"], event["nospace"]) == (operation, "stop", False)
    assert _io_status(qemu, blk) == "failed"
    _assert_held(blk, pending)  # not completed while the VM is stopped
    qemu.qmp.cmd("cont")
    status = blk.complete(pending).status
    assert _status(qemu)["status"] == "running"
    return status


@pytest.mark.virtio_device(
    "virtio-blk-pci",
    refuse_each=False,
    flags={"werror": "stop", "rerror": "stop"},
    backend=blkdebug_kind(f"write@{BAD_WRITE}:once", f"read@{BAD_READ}:once"),
)
def test_stop_policy_holds_the_request_and_retries_it_after_cont(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """werror=stop: a write that fails stops the VM (io-error, BLOCK_IO_ERROR for a write, io-status
    failed) and is not completed while stopped; after ``cont`` it is submitted again, now succeeds,
    completes with OK and the image holds it. rerror=stop does the same with a read, which then
    returns what the image holds."""
    blk = virtio_device
    data = os.urandom(2 * SECTOR_SIZE)
    req = BlkRequest(BlkReqType.OUT, BAD_WRITE - 1, data_out=data)
    assert _stop_then_retry(blk, qemu, req, "write") is BlkStatus.OK
    assert blk.image.read((BAD_WRITE - 1) * SECTOR_SIZE, len(data)) == data
    assert blk.read(BAD_WRITE - 1, 2) == data
    data = os.urandom(SECTOR_SIZE)
    blk.image.write(BAD_READ * SECTOR_SIZE, data)
    pending = blk.submit(BlkRequest(BlkReqType.IN, BAD_READ, data_in_len=SECTOR_SIZE))
    _wait_run_state(qemu, "io-error")  # its BLOCK_IO_ERROR may wait: QEMU sends one a second
    _assert_held(blk, pending)
    qemu.qmp.cmd("cont")
    resp = blk.complete(pending)
    assert resp.ok and resp.data == data


@pytest.mark.virtio_device(
    "virtio-blk-pci", refuse_each=False, flags={"werror": "stop"}, backend=blkdebug_kind(f"write@{BAD_WRITE}")
)
def test_werror_stop_keeps_a_failing_write_until_reset(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """werror=stop with a fault that persists: the retry after ``cont`` fails again and the VM
    stops again, the request still held. A device reset drops what the VM holds
    (``virtio_blk_reset``): after the next ``cont`` the VM keeps running (nothing is retried, so
    nothing fails again) and the sector was never written; the re-initialised device works."""
    blk = virtio_device
    assert _status(qemu)["running"] is True
    pending = blk.submit(BlkRequest(BlkReqType.OUT, BAD_WRITE, data_out=b"\x11" * SECTOR_SIZE))
    _wait_run_state(qemu, "io-error")
    qemu.qmp.cmd("cont")
    _wait_run_state(qemu, "io-error")  # the retry met the same fault
    _assert_held(blk, pending)
    blk.reset()
    qemu.qmp.cmd("cont")
    time.sleep(HELD_WINDOW)
    assert _status(qemu)["status"] == "running", "a request dropped by the reset was retried"
    assert blk.image.read(BAD_WRITE * SECTOR_SIZE, SECTOR_SIZE) == bytes(SECTOR_SIZE)
    blk.initialize()
    data = os.urandom(SECTOR_SIZE)
    blk.write(BAD_WRITE + 8, data)
    assert blk.image.read((BAD_WRITE + 8) * SECTOR_SIZE, SECTOR_SIZE) == data


@pytest.mark.virtio_device(
    "virtio-blk-pci",
    refuse_each=False,
    flags={"werror": "report", "rerror": "ignore"},
    backend=blkdebug_kind(f"write@{BAD_WRITE}:once", f"read@{BAD_READ}:once"),
)
def test_report_and_ignore_policies_complete_the_request(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """werror=report: the failing write completes with VIRTIO_BLK_S_IOERR (§5.2.6: a device
    error), stores nothing, the VM keeps running (BLOCK_IO_ERROR with action report); the next
    write to the sector, with the fault gone, succeeds. rerror=ignore: QEMU drops the error and
    completes the failed read with OK although nothing was read from the image; the VM runs on
    and the next read returns the image's data."""
    blk = virtio_device
    assert _status(qemu)["running"] is True
    req = BlkRequest(BlkReqType.OUT, BAD_WRITE, data_out=b"\x44" * SECTOR_SIZE)
    assert blk.execute(req).status is BlkStatus.IOERR
    assert blk.image.read(BAD_WRITE * SECTOR_SIZE, SECTOR_SIZE) == bytes(SECTOR_SIZE)
    assert _status(qemu)["status"] == "running"
    (event,) = _io_errors(qemu)
    assert (event["operation"], event["action"]) == ("write", "report")
    assert blk.execute(req).ok
    assert blk.image.read(BAD_WRITE * SECTOR_SIZE, SECTOR_SIZE) == b"\x44" * SECTOR_SIZE
    data = os.urandom(SECTOR_SIZE)
    blk.image.write(BAD_READ * SECTOR_SIZE, data)
    resp = blk.execute(BlkRequest(BlkReqType.IN, BAD_READ, data_in_len=SECTOR_SIZE))
    assert resp.ok and resp.data != data
    assert _status(qemu)["status"] == "running"
    assert blk.read(BAD_READ, 1) == data


@pytest.mark.virtio_device(
    "virtio-blk-pci",
    refuse_each=False,
    backend=blkdebug_kind(f"write@{BAD_WRITE}:EIO:once", f"write@{BAD_WRITE + 8}:ENOSPC:once"),
)
def test_werror_enospc_default_stops_only_when_the_disk_is_full(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The default werror=enospc: an EIO write error is reported (IOERR, the VM runs on), an
    ENOSPC one stops the VM (io-status nospace) and the write is retried after ``cont``."""
    blk = virtio_device
    assert _status(qemu)["running"] is True
    eio = BlkRequest(BlkReqType.OUT, BAD_WRITE, data_out=b"\x55" * SECTOR_SIZE)
    assert blk.execute(eio).status is BlkStatus.IOERR
    assert _status(qemu)["status"] == "running"
    nospc = blk.submit(BlkRequest(BlkReqType.OUT, BAD_WRITE + 8, data_out=b"\x66" * SECTOR_SIZE))
    _wait_run_state(qemu, "io-error")
    assert _io_status(qemu, blk) == "nospace"
    _assert_held(blk, nospc)
    qemu.qmp.cmd("cont")
    assert blk.complete(nospc).ok
    assert blk.image.read((BAD_WRITE + 8) * SECTOR_SIZE, SECTOR_SIZE) == b"\x66" * SECTOR_SIZE


# -- requests the device refuses ----------------------------------------------------------------


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, backend="image,read-only=on")
@pytest.mark.conformance("blk-read-only-write-ioerr", spec="5.2.6.2")
def test_write_to_read_only_device_gets_ioerr(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """A device MUST set the status to VIRTIO_BLK_S_IOERR for a write request if VIRTIO_BLK_F_RO
    is offered, and MUST NOT write any data (§5.2.6.2): on a read-only image RO is offered, a
    write fails and the image is untouched; reads work."""
    offered = virtio_device.negotiated.offered
    assert offered >> feature_bit("RO", virtio_device.device_bits) & 1
    image = virtio_device.image
    data = os.urandom(SECTOR_SIZE)
    image.write(100 * SECTOR_SIZE, data)
    req = BlkRequest(BlkReqType.OUT, 100, data_out=b"\x77" * SECTOR_SIZE)
    assert virtio_device.execute(req).status is BlkStatus.IOERR
    assert image.read(100 * SECTOR_SIZE, SECTOR_SIZE) == data
    assert virtio_device.read(100, 1) == data


@pytest.mark.conformance("blk-zone-request-without-zoned-unsupp", spec="5.2.6.2")
def test_zone_requests_without_zoned_get_unsupp(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """If VIRTIO_BLK_F_ZONED is not negotiated, the device MUST reject ZONE_REPORT, ZONE_OPEN,
    ZONE_CLOSE, ZONE_FINISH, ZONE_APPEND, ZONE_RESET and ZONE_RESET_ALL with VIRTIO_BLK_S_UNSUPP
    (§5.2.6.2 as virtio 1.3 adds zoned devices): a report with room for a descriptor, an append of
    one sector (its append_sector before the status), the zone commands without data. The image
    is not written and the device keeps working. (The driver never accepts ZONED; the backend
    here is a plain file, so QEMU offers it on no build.)"""
    zoned = feature_bit("ZONED", virtio_device.device_bits)
    assert not virtio_device.negotiated.offered >> zoned & 1, "a plain image offered VIRTIO_BLK_F_ZONED"
    image = virtio_device.image
    before = image.read(0, 8 * SECTOR_SIZE)
    for req_type in ZONE_REQUEST_TYPES:
        if req_type == BlkReqType.ZONE_REPORT:
            req = BlkRequest(req_type, 0, data_in_len=ZONE_REPORT_HEADER_BYTES + ZONE_DESCRIPTOR_BYTES)
        elif req_type == BlkReqType.ZONE_APPEND:
            req = BlkRequest(req_type, 0, data_out=b"\x88" * SECTOR_SIZE, data_in_len=ZONE_APPEND_SECTOR_BYTES)
        else:
            req = BlkRequest(req_type, 0)
        assert virtio_device.execute(req).status is BlkStatus.UNSUPP, req.describe()
    assert image.read(0, 8 * SECTOR_SIZE) == before
    assert virtio_device.read(0, 8) == before


def _scsi_request(blk: VirtioBlk, qemu: Machine, out: list[bytes], writable: list[int]) -> list[bytes]:
    """A SCSI packet command in separate buffers (the legacy framing of §5.2.6.4); the
    device-writable buffers once it is used."""
    vq = blk.queues[0]
    return vq.complete(vq.submit(out, writable))[1]


def test_scsi_packet_command_is_refused(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """VIRTIO_BLK_T_SCSI_CMD: QEMU offers VIRTIO_BLK_F_SCSI only on a legacy-only device (one
    without VERSION_1 in its features: virtio_blk_get_features, kept for migration) and runs no SCSI command anywhere
    (virtio_blk_handle_scsi): a well-formed request (header and CDB, then sense, in-header and
    status) completes with VIRTIO_BLK_S_UNSUPP and a non-zero ``errors`` word, so a guest's
    ioctl fails; one without the sense and in-header buffers completes with IOERR. On the modern
    layouts the type is one the spec does not define, refused the same way (§5.2.6)."""
    blk = virtio_device
    scsi_offered = bool(blk.negotiated.offered >> feature_bit("SCSI", blk.device_bits) & 1)
    assert scsi_offered == (blk.mode == modes.LEGACY)
    inquiry = bytes([0x12, 0, 0, 0, 96, 0])
    header = encode_header(BlkReqType.SCSI_CMD)
    _sense, inhdr, status = _scsi_request(blk, qemu, [header, inquiry], [SCSI_SENSE_BYTES, SCSI_INHDR.size, 1])
    assert status == bytes([BlkStatus.UNSUPP])
    assert SCSI_INHDR.unpack(inhdr)["errors"] != 0
    inhdr, status = _scsi_request(blk, qemu, [header, inquiry], [SCSI_INHDR.size, 1])
    assert status == bytes([BlkStatus.IOERR])
    assert blk.read(0, 1) == blk.image.read(0, SECTOR_SIZE)


#: Requests QEMU cannot parse, and what it says then: no device-writable buffer for the status;
#: a discard segment shorter than struct virtio_blk_discard_write_zeroes.
MALFORMED = [
    ("missing headers", [encode_header(BlkReqType.OUT, 8), b"\x99" * SECTOR_SIZE], []),
    ("header too short", [encode_header(BlkReqType.DISCARD), encode_dwz_segment(8, 1)[:8]], [1]),
]


def test_malformed_request_breaks_the_device_until_reset(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """A request the device cannot even parse (no device-writable buffer for the status; a
    discard segment shorter than struct virtio_blk_discard_write_zeroes) is a driver error QEMU
    does not answer: the device stops using buffers (virtio_error: QMP says broken) and, on the
    modern layouts, sets DEVICE_NEEDS_RESET (§2.1.2: it SHOULD); the legacy layout has no such
    bit. A reset brings it back, and it works."""
    blk = virtio_device
    for what, out, writable in MALFORMED:
        vq = blk.queues[0]
        vq.submit(out, writable)
        deadline = time.monotonic() + 2
        while not device_view(qemu, blk.dev_id).broken:
            assert time.monotonic() < deadline, f"{what}: the device went on as if the request were well formed"
            time.sleep(0.01)
        assert vq.poll_used() is None
        needs_reset = bool(blk.transport.get_status() & STATUS.DEVICE_NEEDS_RESET.mask)
        assert needs_reset == (not blk.transport.uses_legacy_layout)
        assert what in qemu.stderr_text()
        blk.initialize()
        assert not device_view(qemu, blk.dev_id).broken
        assert blk.read(8, 1) == bytes(SECTOR_SIZE)
