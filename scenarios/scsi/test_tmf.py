"""virtio-scsi task management functions on the controlq (virtio 1.2 §5.6.6.2): their responses
on an idle LUN, on a missing target or LUN, and their effect on commands in flight.

A command stays in flight through QEMU's I/O throttling on the scsi-hd (QMP
``block_set_io_throttle``, 4 KiB/s of reads): the first 64 KiB READ passes and fills the bucket,
and the next one waits about 16 s of the throttle's clock (the real-time clock, or under the qtest
accelerator the virtual clock, which does not move unless stepped). Lifting the limit lets it go.
``inuse`` of the request queue in QMP ``x-query-virtio-queue-status`` tells when the device has
taken a command (a notification is an ioeventfd QEMU handles on its own time).

The TMF responses map 1-to-1 to SAM's service responses (§5.6.6.2): FUNCTION_COMPLETE (0),
FUNCTION_SUCCEEDED (10), FUNCTION_REJECTED (11), and the transport's BAD_TARGET / INCORRECT_LUN.
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.scsi.driver import PendingCmd, PendingTmf, VirtioScsi
from qtest_virtio.devices.scsi.encoding import (
    CTRL_AN_RESP,
    FIRST_REQUEST_QUEUE,
    CtrlType,
    Op,
    ScsiResponse,
    TmfSubtype,
    cdb_rw10,
    encode_an,
    encode_lun,
    encode_tmf,
)
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.transport.layout import STATUS

#: A TMF is answered by the SCSI layer whatever optional feature is refused (HOTPLUG and CHANGE
#: are about events), and the 10.0 deadlock would cost seconds per refusal run: none of them.
pytestmark = pytest.mark.virtio_device("virtio-scsi-pci", refuse_each=False)

#: A READ(10) of this many 512-byte blocks fills the throttle bucket for ~16 s at READ_BPS.
HELD_BLOCKS = 128
READ_BPS = 4096
#: How long QEMU may take to answer qtest while a TMF runs: a deadlocked QEMU (see the deviation
#: table) is told apart from a slow one within this, instead of the 30 s default.
TMF_QTEST_TIMEOUT = 1.0
#: TMFs that address one logical unit (all but I_T NEXUS RESET, which addresses the target).
LUN_TMFS = (
    TmfSubtype.ABORT_TASK,
    TmfSubtype.ABORT_TASK_SET,
    TmfSubtype.CLEAR_TASK_SET,
    TmfSubtype.LOGICAL_UNIT_RESET,
    TmfSubtype.QUERY_TASK,
    TmfSubtype.QUERY_TASK_SET,
)


def _throttle(qemu: Machine, scsi: VirtioScsi, bps_rd: int) -> None:
    """Limit the reads of the scsi-hd at target 0 LUN 0 (0 lifts the limit, held reads go)."""
    limits = {"bps": 0, "bps_rd": bps_rd, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    qemu.qmp.cmd("block_set_io_throttle", id=f"{scsi.dev_id}-hd", **limits)


def _in_use(qemu: Machine, scsi: VirtioScsi) -> int:
    return queue_view(qemu, scsi.dev_id, FIRST_REQUEST_QUEUE).inuse


def _hold_reads(qemu: Machine, scsi: VirtioScsi, tags: list[int]) -> list[PendingCmd]:
    """READ(10)s with these tags that stay in flight: the device has taken each (inuse), and
    none has completed."""
    scsi.wait_ready()
    _throttle(qemu, scsi, READ_BPS)
    assert scsi.command(cdb_rw10(Op.READ_10, 0, HELD_BLOCKS), data_in_len=HELD_BLOCKS * 512).good
    held = [
        scsi.submit(cdb_rw10(Op.READ_10, 8 * i, HELD_BLOCKS), data_in_len=HELD_BLOCKS * 512, tag=tag)
        for i, tag in enumerate(tags)
    ]
    deadline = time.monotonic() + 2.0
    while (taken := _in_use(qemu, scsi)) < len(tags):
        assert time.monotonic() < deadline, f"the device took {taken} of {len(tags)} reads within 2 s"
    assert taken == len(tags)
    return held


def _submit_tmf(qemu: Machine, scsi: VirtioScsi, subtype: TmfSubtype, tag: int = 0) -> PendingTmf:
    """Make a TMF available, then check that QEMU still answers, within TMF_QTEST_TIMEOUT: a
    QEMU that deadlocks on it fails here at once instead of after the default timeouts."""
    qemu.qtest.timeout = TMF_QTEST_TIMEOUT
    qemu.qmp.settimeout(TMF_QTEST_TIMEOUT)
    tmf = scsi.submit_tmf(subtype, 0, tag=tag)
    for _ in range(2):  # the notification is an ioeventfd: give QEMU's main loop a turn
        qemu.qtest.readb(0)
        time.sleep(0.02)
    return tmf


def _done_now(scsi: VirtioScsi, pending: PendingCmd) -> ScsiResponse:
    """The response of a command that must already be used (no waiting)."""
    return scsi.complete(pending, timeout=0).response


def test_tmf_responses_on_an_idle_lun(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """Regression (QEMU's virtio_scsi_do_tmf): with nothing in flight every TMF on the disk's LUN
    is FUNCTION_COMPLETE, except CLEAR ACA, which QEMU does not implement (FUNCTION_REJECTED);
    the two resets reset the LUN (a unit attention follows), the others leave it alone."""
    scsi = virtio_device
    scsi.wait_ready()
    for subtype in TmfSubtype:
        response = scsi.tmf(subtype, 0, tag=99)
        expected = ScsiResponse.FUNCTION_REJECTED if subtype is TmfSubtype.CLEAR_ACA else ScsiResponse.OK
        assert response is expected, f"{subtype.name} on an idle LUN: {response.name}"
        after = scsi.test_unit_ready()
        resets = subtype in (TmfSubtype.LOGICAL_UNIT_RESET, TmfSubtype.I_T_NEXUS_RESET)
        assert after.is_unit_attention() == resets, f"after {subtype.name}: {after.describe()}"
        if resets:
            assert after.sense_data is not None and after.sense_data.asc == 0x29
            assert scsi.test_unit_ready().good


def test_tmf_to_a_missing_target_or_lun(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """Regression: a TMF for a LUN of a target that does not exist is BAD_TARGET, one for a
    LUN that does not exist on target 0 is INCORRECT_LUN; I_T NEXUS RESET addresses the target
    and ignores the LUN (§5.6.6.2), so it completes there too, and CLEAR ACA is rejected before
    any address is looked at. The disk at target 0 LUN 0 is untouched (no unit attention)."""
    scsi = virtio_device
    scsi.wait_ready()
    for subtype in LUN_TMFS:
        assert scsi.tmf(subtype, 0, target=3, tag=1) is ScsiResponse.BAD_TARGET, subtype.name
        assert scsi.tmf(subtype, 5, target=0, tag=1) is ScsiResponse.INCORRECT_LUN, subtype.name
    assert scsi.tmf(TmfSubtype.I_T_NEXUS_RESET, 0, target=3) is ScsiResponse.OK
    assert scsi.tmf(TmfSubtype.I_T_NEXUS_RESET, 5, target=3) is ScsiResponse.OK
    assert scsi.tmf(TmfSubtype.CLEAR_ACA, 0, target=3) is ScsiResponse.FUNCTION_REJECTED
    assert scsi.test_unit_ready().good


@pytest.mark.conformance("scsi-tmf-query-task", spec="5.6.6.2")
def test_query_task_finds_the_command_in_flight(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """TMF responses map 1-to-1 to SAM's (§5.6.6.2): QUERY TASK is FUNCTION SUCCEEDED when the
    command with that id is in the task set and FUNCTION COMPLETE when not; QUERY TASK SET is
    FUNCTION SUCCEEDED while any command is. Neither disturbs the command, which then
    completes with its data."""
    scsi = virtio_device
    scsi.image.write(0, bytes(range(256)) * 256)
    (held,) = _hold_reads(qemu, scsi, [77])
    assert scsi.tmf(TmfSubtype.QUERY_TASK, 0, tag=77) is ScsiResponse.FUNCTION_SUCCEEDED
    assert scsi.tmf(TmfSubtype.QUERY_TASK, 0, tag=78) is ScsiResponse.OK
    assert scsi.tmf(TmfSubtype.QUERY_TASK_SET, 0) is ScsiResponse.FUNCTION_SUCCEEDED
    _throttle(qemu, scsi, 0)
    result = scsi.complete(held)
    assert result.good and result.data == scsi.image.read(0, HELD_BLOCKS * 512)
    assert scsi.tmf(TmfSubtype.QUERY_TASK, 0, tag=77) is ScsiResponse.OK
    assert scsi.tmf(TmfSubtype.QUERY_TASK_SET, 0) is ScsiResponse.OK


@pytest.mark.conformance("scsi-tmf-abort-completes-commands", spec="5.6.6.2")
def test_aborts_complete_the_selected_commands_first(virtio_device: VirtioScsi, qemu: Machine) -> None:
    """Upon an ABORT TASK or ABORT TASK SET the device MUST complete the selected commands
    (possibly with ABORTED), and that MUST take place before the TMF itself completes
    (§5.6.6.2). With two reads in flight: ABORT TASK selects the one with its id, which is
    already used, ABORTED (§5.6.6.1.1), once the TMF is used, while the other completes
    normally; ABORT TASK SET, and CLEAR TASK SET which QEMU handles alike, select both."""
    scsi = virtio_device
    for subtype in (TmfSubtype.ABORT_TASK, TmfSubtype.ABORT_TASK_SET, TmfSubtype.CLEAR_TASK_SET):
        first, second = _hold_reads(qemu, scsi, [41, 42])
        tmf = _submit_tmf(qemu, scsi, subtype, tag=41)
        _throttle(qemu, scsi, 0)  # the reads' I/O may end now; their cancellation completes them
        assert scsi.complete_tmf(tmf) is ScsiResponse.OK, subtype.name
        assert _done_now(scsi, first) is ScsiResponse.ABORTED, subtype.name
        if subtype is TmfSubtype.ABORT_TASK:
            assert scsi.complete(second).good
        else:
            assert _done_now(scsi, second) is ScsiResponse.ABORTED, subtype.name


@pytest.mark.parametrize(
    "subtype", [TmfSubtype.LOGICAL_UNIT_RESET, TmfSubtype.I_T_NEXUS_RESET], ids=lambda s: s.name.lower()
)
@pytest.mark.conformance("scsi-tmf-reset-completes-commands", spec="5.6.6.2")
def test_resets_complete_the_commands_in_flight_first(
    virtio_device: VirtioScsi, qemu: Machine, subtype: TmfSubtype
) -> None:
    """Upon a LOGICAL UNIT RESET or I_T NEXUS RESET the device MUST complete all active commands
    on the LUN or target (possibly with VIRTIO_SCSI_S_RESET) before the TMF itself completes
    (§5.6.6.2): the read in flight is used by the time the TMF is FUNCTION_COMPLETE, either
    cancelled with RESET (§5.6.6.1.1) or finished, and the LUN then reports the reset as a unit
    attention."""
    scsi = virtio_device
    (held,) = _hold_reads(qemu, scsi, [61])
    assert scsi.complete_tmf(_submit_tmf(qemu, scsi, subtype)) is ScsiResponse.OK
    result = scsi.complete(held, timeout=0)  # already used: no waiting
    # 7.2 cancels it (RESET); 10.2 lets the drain of the reset finish the read first (OK, GOOD).
    assert result.response is ScsiResponse.RESET or result.good, result.describe()
    _throttle(qemu, scsi, 0)
    after = scsi.test_unit_ready()
    assert after.is_unit_attention() and after.sense_data is not None and after.sense_data.asc == 0x29


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"\0\0", id="shorter-than-type"),
        pytest.param(encode_tmf(TmfSubtype.QUERY_TASK_SET, encode_lun(0, 0))[:12], id="short-tmf"),
        pytest.param(encode_an(CtrlType.AN_QUERY, encode_lun(0, 0), 0)[:8], id="short-an"),
    ],
)
def test_truncated_control_request_breaks_the_device(
    virtio_device: VirtioScsi, qemu: Machine, request_bytes: bytes
) -> None:
    """Regression (QEMU's virtio_scsi_bad_req): a controlq request shorter than its type's
    device-readable part is never used; QEMU reports "wrong size for virtio-scsi headers" and
    marks the device broken, with DEVICE_NEEDS_RESET where VERSION_1 was negotiated (§2.1.2).
    After a device reset the controlq serves TMFs again."""
    scsi = virtio_device
    scsi.controlq.submit([request_bytes], [CTRL_AN_RESP.size])
    deadline = time.monotonic() + 2.0
    while not device_view(qemu, scsi.dev_id).broken:
        assert time.monotonic() < deadline, "the device took the truncated request without an error"
    assert scsi.controlq.poll_used() is None
    needs_reset = bool(scsi.transport.get_status() & STATUS.DEVICE_NEEDS_RESET.mask)
    assert needs_reset == scsi.has("VERSION_1")
    scsi.initialize()
    assert not device_view(qemu, scsi.dev_id).broken
    assert scsi.tmf(TmfSubtype.QUERY_TASK_SET, 0) is ScsiResponse.OK
