"""virtio-scsi (SCSI host device, virtio 1.2 §5.6): the registration."""

from __future__ import annotations

from ..base import DriverError
from ..registry import DeviceInfo, FuzzProfile
from .driver import VirtioScsi
from .encoding import (
    CONTROLQ,
    CTRL_TMF_RESP,
    DEFAULT_CDB_SIZE,
    DEFAULT_SENSE_SIZE,
    FIRST_REQUEST_QUEUE,
    RESP_CMD,
    InquiryData,
    TmfSubtype,
    cdb_inquiry,
    cdb_test_unit_ready,
    encode_cmd,
    encode_lun,
    encode_tmf,
)


def _check(driver: VirtioScsi, timeout: float) -> None:
    """INQUIRY of target 0 LUN 0 names a vendor."""
    result = driver.checked(cdb_inquiry(96), data_in_len=96, timeout=timeout)
    inquiry = InquiryData.parse(result.data)
    if not inquiry.vendor:
        raise DriverError(f"virtio-scsi INQUIRY came back empty: {inquiry!r}")


#: TEST UNIT READY to target 0 LUN 0 (virtio_scsi_req_cmd with the reset cdb_size), then its
#: response with the reset sense_size (§5.6.4, §5.6.6.1).
_CMD = encode_cmd(encode_lun(0, 0), cdb_test_unit_ready(), DEFAULT_CDB_SIZE)
_TUR = ((len(_CMD), False, _CMD), (RESP_CMD.size + DEFAULT_SENSE_SIZE, True, b""))
#: VIRTIO_SCSI_T_TMF / LOGICAL_UNIT_RESET, then the response byte (§5.6.6.2).
_TMF = encode_tmf(TmfSubtype.LOGICAL_UNIT_RESET, encode_lun(0, 0))
_LUN_RESET = ((len(_TMF), False, _TMF), (CTRL_TMF_RESP.size, True, b""))

DEVICE = DeviceInfo(
    name="scsi",
    model="virtio-scsi-pci",
    driver=VirtioScsi,
    # the first request queue, then the controlq
    fuzz=FuzzProfile(queues={FIRST_REQUEST_QUEUE: _TUR, CONTROLQ: _LUN_RESET}, check=_check),
)
