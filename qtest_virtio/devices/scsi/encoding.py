"""virtio-scsi (SCSI host device, virtio 1.2 §5.6): the encoding of requests, responses, events,
LUNs and CDBs.

A command request is ``struct virtio_scsi_req_cmd`` (§5.6.6.1): a device-readable header (lun,
id, task attribute, priority, crn, a ``cdb_size`` CDB) and the data out, then a device-writable
response (sense_len, residual, status qualifier, SCSI status, virtio response, a ``sense_size``
sense buffer) and the data in. Task management and asynchronous notification requests go on the
controlq (§5.6.6.2); the eventq holds device-writable buffers the device fills with
``struct virtio_scsi_event`` (§5.6.6.3).

LUNs are 8 bytes: 1, the target, a single-level LUN structure (flat space addressing,
``0x40 | lun >> 8``, or peripheral addressing for LUNs below 256), four zero bytes (§5.6.6.1).
Everything is declared once as layouts and packed or parsed by field name. Pure data and
functions (no I/O): unit-testable without QEMU.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from ...errors import QtestVirtioError
from ...registers import Field, Layout

#: Virtio device ID of the SCSI host device (virtio 1.2 §5).
DEVICE_ID = 8
#: Feature bits (§5.6.3), named without the VIRTIO_SCSI_F_ prefix.
FEATURE_BITS: dict[int, str] = {0: "INOUT", 1: "HOTPLUG", 2: "CHANGE", 3: "T10_PI"}

CONTROLQ = 0
EVENTQ = 1
FIRST_REQUEST_QUEUE = 2
#: Defaults the device MUST put in config after reset (§5.6.4).
DEFAULT_SENSE_SIZE = 96
DEFAULT_CDB_SIZE = 32

# -- layouts as data -------------------------------------------------------------------------------


#: struct virtio_scsi_config (§5.6.4).
class ScsiConfigLayout(Layout, struct="virtio_scsi_config", size=36):
    num_queues = Field(0, 4, "request queues")
    seg_max = Field(4, 4)
    max_sectors = Field(8, 4)
    cmd_per_lun = Field(12, 4)
    event_info_size = Field(16, 4)
    sense_size = Field(20, 4, "driver-writable; 96 after reset")
    cdb_size = Field(24, 4, "driver-writable; 32 after reset")
    max_channel = Field(28, 2)
    max_target = Field(30, 2)
    max_lun = Field(32, 4)


SCSI_CONFIG = ScsiConfigLayout()


#: The fixed device-readable head of struct virtio_scsi_req_cmd; the CDB (cdb_size bytes) follows.
class ReqCmdLayout(Layout, struct="virtio_scsi_req_cmd", size=19):
    lun = Field(0, 8)
    id = Field(8, 8)
    task_attr = Field(16, 1)
    prio = Field(17, 1)
    crn = Field(18, 1)


REQ_CMD = ReqCmdLayout()


#: The fixed device-writable head of the response; the sense buffer (sense_size bytes) follows.
class RespCmdLayout(Layout, struct="virtio_scsi_resp_cmd", size=12):
    sense_len = Field(0, 4)
    residual = Field(4, 4)
    status_qualifier = Field(8, 2)
    status = Field(10, 1)
    response = Field(11, 1)


RESP_CMD = RespCmdLayout()


#: struct virtio_scsi_ctrl_tmf (§5.6.6.2): device-readable part, then the response byte.
class CtrlTmfLayout(Layout, struct="virtio_scsi_ctrl_tmf", size=24):
    type = Field(0, 4)
    subtype = Field(4, 4)
    lun = Field(8, 8)
    id = Field(16, 8)


CTRL_TMF = CtrlTmfLayout()


class CtrlTmfRespLayout(Layout, struct="virtio_scsi_ctrl_tmf response", size=1):
    response = Field(0, 1)


CTRL_TMF_RESP = CtrlTmfRespLayout()


#: struct virtio_scsi_ctrl_an (§5.6.6.2): AN_QUERY / AN_SUBSCRIBE.
class CtrlAnLayout(Layout, struct="virtio_scsi_ctrl_an", size=16):
    type = Field(0, 4)
    lun = Field(4, 8)
    event_requested = Field(12, 4)


CTRL_AN = CtrlAnLayout()


class CtrlAnRespLayout(Layout, struct="virtio_scsi_ctrl_an response", size=5):
    event_actual = Field(0, 4)
    response = Field(4, 1)


CTRL_AN_RESP = CtrlAnRespLayout()


#: struct virtio_scsi_event (§5.6.6.3).
class EventLayout(Layout, struct="virtio_scsi_event", size=16):
    event = Field(0, 4)
    lun = Field(4, 8)
    reason = Field(12, 4)


EVENT = EventLayout()
VIRTIO_SCSI_T_EVENTS_MISSED = 0x8000_0000


class ScsiResponse(enum.IntEnum):
    """The virtio ``response`` byte (§5.6.6.1, §5.6.6.2)."""

    OK = 0  # also FUNCTION_COMPLETE for a TMF
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


#: The TMF name of response 0 (§5.6.6.2).
FUNCTION_COMPLETE = ScsiResponse.OK


class ScsiStatus(enum.IntEnum):
    """SAM status codes, as the device writes them in ``status`` (§5.6.6.1.1)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class TaskAttr(enum.IntEnum):
    SIMPLE = 0
    ORDERED = 1
    HEAD = 2
    ACA = 3


class CtrlType(enum.IntEnum):
    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(enum.IntEnum):
    """VIRTIO_SCSI_T_TMF_* (§5.6.6.2)."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class EventType(enum.IntEnum):
    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


class ResetReason(enum.IntEnum):
    """``reason`` of a TRANSPORT_RESET event."""

    HARD = 0
    RESCAN = 1
    REMOVED = 2


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


class Op(enum.IntEnum):
    """The SCSI operation codes the helpers use (SPC, SBC)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0


READ_CAPACITY_16_SA = 0x10
#: The REPORT LUNS well-known logical unit (§5.6.6.1): 0xC1, 0x01 and six zero bytes.
REPORT_LUNS_WLUN = bytes([0xC1, 0x01, 0, 0, 0, 0, 0, 0])


# -- errors ------------------------------------------------------------------------------------------


class ScsiError(QtestVirtioError):
    """A virtio-scsi request could not be made or did not succeed."""


class ScsiProtocolError(ScsiError):
    """The device broke the protocol: an unknown response or status byte, a sense length past
    the sense buffer, a residual past the data."""


class ScsiCommandError(ScsiError):
    """A command did not end with response OK and status GOOD; the result is attached."""

    def __init__(self, message: str, result: ScsiResult) -> None:
        super().__init__(message)
        self.result = result


# -- encoding ------------------------------------------------------------------------------------------


def encode_lun(target: int = 0, lun: int = 0, *, fmt: str = "flat") -> bytes:
    """The 8-byte LUN field: 1, target, a single-level LUN structure, four zero bytes (§5.6.6.1).

    ``fmt="flat"`` uses flat space addressing (``0x40 | lun >> 8``, as Linux does); ``"peripheral"``
    the peripheral device addressing method (first byte 0), for LUNs below 256.
    """
    if not 0 <= target <= 255:
        raise ValueError(f"target {target} does not fit in one byte (0..255)")
    if not 0 <= lun <= 0x3FFF:
        raise ValueError(f"LUN {lun} does not fit in a single-level LUN structure (0..16383)")
    if fmt == "flat":
        level = bytes([0x40 | lun >> 8, lun & 0xFF])
    elif fmt == "peripheral":
        if lun > 255:
            raise ValueError(f"peripheral device addressing holds LUNs 0..255, not {lun}")
        level = bytes([0, lun])
    else:
        raise ValueError(f"LUN format must be 'flat' or 'peripheral', not {fmt!r}")
    return bytes([1, target]) + level + bytes(4)


def decode_lun(lun: bytes) -> tuple[int, int]:
    """(target, lun) of an 8-byte LUN field in the format :func:`encode_lun` writes."""
    if len(lun) != 8 or lun[0] != 1:
        raise ValueError(f"LUN field {lun.hex()} is not 1, target, single-level LUN, 0, 0, 0, 0")
    method = lun[2] >> 6
    if method not in (0, 1):
        raise ValueError(f"LUN field {lun.hex()}: address method {method} is not peripheral (0) or flat (1)")
    return lun[1], ((lun[2] & 0x3F) << 8) | lun[3]


def encode_cmd(
    lun: bytes,
    cdb: bytes,
    cdb_size: int,
    *,
    tag: int = 0,
    task_attr: int = TaskAttr.SIMPLE,
    prio: int = 0,
    crn: int = 0,
) -> bytes:
    """The device-readable header of a command request, the CDB zero-padded to ``cdb_size``."""
    if len(cdb) > cdb_size:
        raise ValueError(f"CDB of {len(cdb)} bytes is longer than cdb_size {cdb_size}")
    head = REQ_CMD.pack(
        {"lun": int.from_bytes(lun, "little"), "id": tag, "task_attr": task_attr, "prio": prio, "crn": crn}
    )
    return head + cdb.ljust(cdb_size, b"\0")


def encode_tmf(subtype: int, lun: bytes, tag: int = 0) -> bytes:
    return CTRL_TMF.pack({"type": CtrlType.TMF, "subtype": subtype, "lun": int.from_bytes(lun, "little"), "id": tag})


def encode_an(an_type: int, lun: bytes, event_requested: int) -> bytes:
    return CTRL_AN.pack({"type": an_type, "lun": int.from_bytes(lun, "little"), "event_requested": event_requested})


@dataclass(frozen=True)
class Sense:
    """The key, ASC and ASCQ of fixed (0x70/0x71) or descriptor (0x72/0x73) sense data (SPC)."""

    key: int
    asc: int
    ascq: int
    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> Sense | None:
        if len(data) < 2:
            return None
        code = data[0] & 0x7F
        if code in (0x70, 0x71) and len(data) >= 14:
            return cls(data[2] & 0x0F, data[12], data[13], data)
        if code in (0x72, 0x73) and len(data) >= 4:
            return cls(data[1] & 0x0F, data[2], data[3], data)
        return None

    def __str__(self) -> str:
        try:
            key = SenseKey(self.key).name
        except ValueError:
            key = f"key {self.key:#x}"
        return f"{key} asc={self.asc:#04x} ascq={self.ascq:#04x}"


@dataclass(frozen=True)
class ScsiResult:
    """A completed command: unpacks as ``(response, status, sense, data)``."""

    response: ScsiResponse
    status: int
    sense: bytes
    data: bytes
    residual: int = 0
    status_qualifier: int = 0
    used_len: int = 0
    token: int = -1

    def __iter__(self) -> Iterator[object]:
        return iter((self.response, self.status, self.sense, self.data))

    @property
    def good(self) -> bool:
        return self.response is ScsiResponse.OK and self.status == ScsiStatus.GOOD

    @property
    def sense_data(self) -> Sense | None:
        return Sense.parse(self.sense)

    def is_unit_attention(self) -> bool:
        sense = self.sense_data
        return (
            self.response is ScsiResponse.OK
            and self.status == ScsiStatus.CHECK_CONDITION
            and sense is not None
            and sense.key == SenseKey.UNIT_ATTENTION
        )

    def describe(self) -> str:
        try:
            status = ScsiStatus(self.status).name
        except ValueError:
            status = f"{self.status:#04x}"
        sense = self.sense_data
        return f"response {self.response.name}, status {status}" + (f", sense {sense}" if sense else "")


def parse_response(value: int, where: str) -> ScsiResponse:
    try:
        return ScsiResponse(value)
    except ValueError:
        raise ScsiProtocolError(f"{where}: unknown response byte {value:#04x}") from None


def decode_cmd_response(
    resp: bytes,
    data_in: bytes,
    *,
    sense_size: int,
    data_in_len: int,
    data_out_len: int,
    where: str,
    used_len: int = 0,
    token: int = -1,
) -> ScsiResult:
    """Parse the device-writable part of a command request (§5.6.6.1), checking what the device
    claims against what the driver gave it."""
    if len(resp) != RESP_CMD.size + sense_size:
        raise ScsiProtocolError(f"{where}: response header is {len(resp)} bytes, expected {RESP_CMD.size + sense_size}")
    head = RESP_CMD.unpack(resp)
    response = parse_response(head["response"], where)
    status = head["status"]
    if response is ScsiResponse.OK and status not in ScsiStatus._value2member_map_:
        raise ScsiProtocolError(f"{where}: unknown SAM status byte {status:#04x} with response OK")
    sense_len = head["sense_len"]
    if sense_len > sense_size:
        raise ScsiProtocolError(f"{where}: sense_len {sense_len} is past the {sense_size}-byte sense buffer")
    residual = head["residual"]
    if response is ScsiResponse.OK and residual > data_in_len + data_out_len:
        raise ScsiProtocolError(
            f"{where}: residual {residual} exceeds the {data_in_len + data_out_len} bytes of data of the request"
        )
    sense = resp[RESP_CMD.size : RESP_CMD.size + sense_len]
    transferred = max(0, data_in_len - residual) if data_in_len else 0
    return ScsiResult(
        response, status, sense, data_in[:transferred], residual, head["status_qualifier"], used_len, token
    )


@dataclass(frozen=True)
class ScsiEvent:
    """One event from the eventq (§5.6.6.3)."""

    event: int
    lun: bytes
    reason: int

    @property
    def missed(self) -> bool:
        """Bit 31: the device dropped events for want of buffers."""
        return bool(self.event & VIRTIO_SCSI_T_EVENTS_MISSED)

    @property
    def type(self) -> int:
        return self.event & ~VIRTIO_SCSI_T_EVENTS_MISSED

    @classmethod
    def parse(cls, data: bytes) -> ScsiEvent:
        f = EVENT.unpack(data)
        return cls(f["event"], data[4:12], f["reason"])


@dataclass(frozen=True)
class InquiryData:
    """Standard INQUIRY data (SPC): the fields the tests look at."""

    peripheral_qualifier: int
    peripheral_type: int
    version: int
    response_format: int
    vendor: str
    product: str
    revision: str
    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> InquiryData:
        if len(data) < 36:
            raise ScsiError(f"standard INQUIRY data is at least 36 bytes, got {len(data)}")
        return cls(
            data[0] >> 5,
            data[0] & 0x1F,
            data[2],
            data[3] & 0x0F,
            data[8:16].decode("ascii", "replace").strip(),
            data[16:32].decode("ascii", "replace").strip(),
            data[32:36].decode("ascii", "replace").strip(),
            data,
        )


@dataclass(frozen=True)
class ScsiConfig:
    num_queues: int
    seg_max: int
    max_sectors: int
    cmd_per_lun: int
    event_info_size: int
    sense_size: int
    cdb_size: int
    max_channel: int
    max_target: int
    max_lun: int


# -- CDBs ---------------------------------------------------------------------------------------------


def cdb_inquiry(alloc_len: int = 36, *, evpd: bool = False, page: int = 0) -> bytes:
    return bytes([Op.INQUIRY, int(evpd), page]) + alloc_len.to_bytes(2, "big") + b"\0"


def cdb_test_unit_ready() -> bytes:
    return bytes(6)


def cdb_request_sense(alloc_len: int = 96) -> bytes:
    return bytes([Op.REQUEST_SENSE, 0, 0, 0, alloc_len, 0])


def cdb_read_capacity10() -> bytes:
    return bytes([Op.READ_CAPACITY_10]) + bytes(9)


def cdb_read_capacity16(alloc_len: int = 32) -> bytes:
    return bytes([Op.SERVICE_ACTION_IN_16, READ_CAPACITY_16_SA]) + bytes(8) + alloc_len.to_bytes(4, "big") + bytes(2)


def cdb_rw10(op: int, lba: int, blocks: int) -> bytes:
    if not 0 <= lba <= 0xFFFF_FFFF or not 0 <= blocks <= 0xFFFF:
        raise ValueError(f"READ/WRITE(10) holds a 32-bit LBA and a 16-bit length, not {lba}/{blocks}")
    return bytes([op, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def cdb_report_luns(alloc_len: int = 256) -> bytes:
    return bytes([Op.REPORT_LUNS, 0, 0, 0, 0, 0]) + alloc_len.to_bytes(4, "big") + b"\0\0"
