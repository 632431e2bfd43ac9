"""virtio-blk (block device, virtio 1.2 §5.2): the encoding of requests, status codes and the config.

A request is ``struct virtio_blk_req`` (§5.2.6): a 16-byte device-readable header (type,
reserved, sector), the data (device-readable for writes, discard and write-zeroes segments;
device-writable for reads and GET_ID) and one device-writable status byte. The legacy layout
uses the same struct in guest-native (little) endian. How the request is cut into descriptors is
a :class:`Framing`: header, data and status in separate buffers (always allowed), the data in
several segments, or with VERSION_1 / ANY_LAYOUT header and data in one buffer (§2.7.4).

The config structure (§5.2.4) and the request structures are declared once as layouts and read
or packed by field name; each config field names the feature it exists with (``requires``). Pure data and functions
(no I/O): unit-testable without QEMU.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...errors import QtestVirtioError
from ...registers import BitLayout, Bits, Field, Layout

#: Virtio device ID of the block device (virtio 1.2 §5).
DEVICE_ID = 2
#: Feature bits (§5.2.3), named without the VIRTIO_BLK_F_ prefix.
FEATURE_BITS: dict[int, str] = {
    0: "BARRIER",  # legacy only
    1: "SIZE_MAX",
    2: "SEG_MAX",
    4: "GEOMETRY",
    5: "RO",
    6: "BLK_SIZE",
    7: "SCSI",  # legacy only
    9: "FLUSH",
    10: "TOPOLOGY",
    11: "CONFIG_WCE",
    12: "MQ",
    13: "DISCARD",
    14: "WRITE_ZEROES",
    15: "LIFETIME",
    16: "SECURE_ERASE",
    17: "ZONED",  # virtio 1.3; this driver never accepts it
}

SECTOR_SIZE = 512
#: GET_ID returns a NUL-padded ASCII string of up to 20 bytes (§5.2.6).
ID_BYTES = 20

# -- layouts as data (§5.2.4, §5.2.6) -----------------------------------------------------------


#: struct virtio_blk_config (§5.2.4), the fields QEMU 7.2 and virtio 1.2 define.
class BlkConfigLayout(Layout, struct="virtio_blk_config", size=72):
    capacity = Field(0, 8, "device size in 512-byte sectors")
    size_max = Field(8, 4, "maximum size of one segment (SIZE_MAX)", requires="SIZE_MAX")
    seg_max = Field(12, 4, "maximum number of data segments in a request (SEG_MAX)", requires="SEG_MAX")
    geometry_cylinders = Field(16, 2, name="geometry.cylinders", requires="GEOMETRY")
    geometry_heads = Field(18, 1, name="geometry.heads", requires="GEOMETRY")
    geometry_sectors = Field(19, 1, name="geometry.sectors", requires="GEOMETRY")
    blk_size = Field(20, 4, "optimal block size (BLK_SIZE)", requires="BLK_SIZE")
    topology_physical_block_exp = Field(24, 1, name="topology.physical_block_exp", requires="TOPOLOGY")
    topology_alignment_offset = Field(25, 1, name="topology.alignment_offset", requires="TOPOLOGY")
    topology_min_io_size = Field(26, 2, name="topology.min_io_size", requires="TOPOLOGY")
    topology_opt_io_size = Field(28, 4, name="topology.opt_io_size", requires="TOPOLOGY")
    writeback = Field(32, 1, "0 writethrough, 1 writeback (CONFIG_WCE)", requires="CONFIG_WCE")
    unused0 = Field(33, 1)
    num_queues = Field(34, 2, "number of request queues (MQ)", requires="MQ")
    max_discard_sectors = Field(36, 4, requires="DISCARD")
    max_discard_seg = Field(40, 4, requires="DISCARD")
    discard_sector_alignment = Field(44, 4, requires="DISCARD")
    max_write_zeroes_sectors = Field(48, 4, requires="WRITE_ZEROES")
    max_write_zeroes_seg = Field(52, 4, requires="WRITE_ZEROES")
    write_zeroes_may_unmap = Field(56, 1, requires="WRITE_ZEROES")
    unused1_0 = Field(57, 1, name="unused1[0]", requires="WRITE_ZEROES")
    unused1_1 = Field(58, 1, name="unused1[1]", requires="WRITE_ZEROES")
    unused1_2 = Field(59, 1, name="unused1[2]", requires="WRITE_ZEROES")
    max_secure_erase_sectors = Field(60, 4, requires="SECURE_ERASE")
    max_secure_erase_seg = Field(64, 4, requires="SECURE_ERASE")
    secure_erase_sector_alignment = Field(68, 4, requires="SECURE_ERASE")


BLK_CONFIG = BlkConfigLayout()


#: The device-readable header of struct virtio_blk_req (§5.2.6).
class ReqHeaderLayout(Layout, struct="virtio_blk_req header", size=16):
    type = Field(0, 4)
    reserved = Field(4, 4)
    sector = Field(8, 8)


REQ_HEADER = ReqHeaderLayout()


#: One segment of a DISCARD / WRITE_ZEROES / SECURE_ERASE request (§5.2.6).
class DwzSegmentLayout(Layout, struct="virtio_blk_discard_write_zeroes", size=16):
    sector = Field(0, 8)
    num_sectors = Field(8, 4)
    flags = Field(12, 4)


DWZ_SEGMENT = DwzSegmentLayout()


class DwzFlagsBits(BitLayout, register="virtio_blk_discard_write_zeroes.flags"):
    unmap = Bits(0)
    reserved = Bits(1, 31)


DWZ_FLAGS = DwzFlagsBits()
#: Legacy SCSI packet commands (struct virtio_scsi_pc_req, §5.2.6.4): the sense buffer, then
#: the four words the device reports in, then the status byte.
SCSI_SENSE_BYTES = 96


class ScsiInhdrLayout(Layout, struct="virtio_scsi_pc_req in-header", size=16):
    errors = Field(0, 4)
    data_len = Field(4, 4)
    sense_len = Field(8, 4)
    residual = Field(12, 4)


SCSI_INHDR = ScsiInhdrLayout()
#: The status byte ends the device-writable part (struct virtio_blk_req.status).
STATUS_BYTES = 1


class BlkReqType(enum.IntEnum):
    """VIRTIO_BLK_T_* (§5.2.6)."""

    IN = 0
    OUT = 1
    SCSI_CMD = 2  # legacy, with VIRTIO_BLK_F_SCSI (§5.2.6.4)
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14
    # zoned block devices, with VIRTIO_BLK_F_ZONED (bit 17; virtio 1.3 §5.2.6)
    ZONE_APPEND = 15
    ZONE_REPORT = 16
    ZONE_OPEN = 18
    ZONE_CLOSE = 20
    ZONE_FINISH = 22
    ZONE_RESET = 24
    ZONE_RESET_ALL = 26


#: The request types of zoned devices, which a device without VIRTIO_BLK_F_ZONED refuses.
ZONE_REQUEST_TYPES = (
    BlkReqType.ZONE_APPEND,
    BlkReqType.ZONE_REPORT,
    BlkReqType.ZONE_OPEN,
    BlkReqType.ZONE_CLOSE,
    BlkReqType.ZONE_FINISH,
    BlkReqType.ZONE_RESET,
    BlkReqType.ZONE_RESET_ALL,
)
#: struct virtio_blk_zone_report's header and one struct virtio_blk_zone_descriptor.
ZONE_REPORT_HEADER_BYTES = 64
ZONE_DESCRIPTOR_BYTES = 64
#: ZONE_APPEND's device-writable append_sector before the status (struct virtio_blk_req_za).
ZONE_APPEND_SECTOR_BYTES = 8


class BlkStatus(enum.IntEnum):
    """VIRTIO_BLK_S_* (§5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: Legacy: the high bit of the type asks for a barrier (VIRTIO_BLK_F_BARRIER, §5.2.6.4).
VIRTIO_BLK_T_BARRIER = 0x8000_0000


# -- errors ---------------------------------------------------------------------------------------


class BlkError(QtestVirtioError):
    """A virtio-blk request could not be made or did not succeed."""


class BlkProtocolError(BlkError):
    """The device broke the request protocol (an unknown status byte, a missing status)."""


class BlkRequestError(BlkError):
    """The device completed a request with IOERR or UNSUPP; ``status`` says which."""

    def __init__(self, message: str, status: BlkStatus) -> None:
        super().__init__(message)
        self.status = status


# -- requests as data -----------------------------------------------------------------------------


def encode_header(req_type: int, sector: int = 0, reserved: int = 0) -> bytes:
    """struct virtio_blk_req's 16-byte header (§5.2.6)."""
    return REQ_HEADER.pack(type=req_type, reserved=reserved, sector=sector)


def encode_dwz_segment(sector: int, num_sectors: int, *, unmap: bool = False, flags: int | None = None) -> bytes:
    """One struct virtio_blk_discard_write_zeroes; ``flags`` overrides the whole flags word."""
    word = DWZ_FLAGS.unmap.set(0, int(unmap)) if flags is None else flags
    return DWZ_SEGMENT.pack(sector=sector, num_sectors=num_sectors, flags=word)


def decode_id(data: bytes) -> str:
    """The device ID string: NUL-padded ASCII, no terminator when it is 20 bytes long."""
    return data[:ID_BYTES].split(b"\0", 1)[0].decode("ascii", errors="replace")


@dataclass(frozen=True)
class BlkRequest:
    """One request: its header, the device-readable data after it and how many bytes the device
    writes before the status byte."""

    type: int
    sector: int = 0
    data_out: bytes = b""
    data_in_len: int = 0
    reserved: int = 0

    def header(self) -> bytes:
        return encode_header(self.type, self.sector, self.reserved)

    @property
    def writable_len(self) -> int:
        """Device-writable bytes of the request: the data read plus the status byte."""
        return self.data_in_len + STATUS_BYTES

    def describe(self) -> str:
        try:
            name = BlkReqType(self.type & ~VIRTIO_BLK_T_BARRIER).name
        except ValueError:
            name = f"type {self.type:#x}"
        return f"{name} sector {self.sector}" + (
            f" ({len(self.data_out)} bytes out, {self.data_in_len} in)" if self.data_out or self.data_in_len else ""
        )


@dataclass(frozen=True)
class Framing:
    """How a request is laid out in descriptors (§2.6.4 message framing, §5.2.6.3 legacy).

    The default (header, data, status each in their own buffers) is valid on every layout.
    ``segment_size`` cuts the data into buffers of at most that many bytes; ``split_header``
    puts the header's type/reserved and sector in two buffers; ``merge`` puts the header and
    the data out in one device-readable buffer and the data in and the status in one
    device-writable buffer (needs VERSION_1 or ANY_LAYOUT).
    """

    segment_size: int | None = None
    split_header: bool = False
    merge: bool = False

    def __post_init__(self) -> None:
        if self.segment_size is not None and self.segment_size <= 0:
            raise ValueError(f"segment_size must be positive, not {self.segment_size}")
        if self.merge and (self.segment_size is not None or self.split_header):
            raise ValueError("merge puts everything in one buffer each way; it excludes segment_size and split_header")

    @property
    def needs_any_layout(self) -> bool:
        return self.merge or self.split_header

    def _segments(self, length: int) -> list[int]:
        if length == 0:
            return []
        size = self.segment_size or length
        return [min(size, length - off) for off in range(0, length, size)]

    def layout(self, req: BlkRequest) -> tuple[list[bytes], list[int]]:
        """The device-readable buffers' contents and the device-writable buffers' sizes."""
        header = req.header()
        if self.merge:
            return [header + req.data_out], [req.writable_len]
        out = [header[:8], header[8:]] if self.split_header else [header]
        pos = 0
        for size in self._segments(len(req.data_out)):
            out.append(req.data_out[pos : pos + size])
            pos += size
        return out, [*self._segments(req.data_in_len), STATUS_BYTES]

    def data_segments(self, req: BlkRequest) -> int:
        """How many buffers carry data (what seg_max limits, §5.2.4)."""
        if self.merge:
            return 1 if req.data_out or req.data_in_len else 0
        return len(self._segments(len(req.data_out))) + len(self._segments(req.data_in_len))


SEPARATE = Framing()
MERGED = Framing(merge=True)


def parse_status(value: int, where: str) -> BlkStatus:
    """The status byte as a :class:`BlkStatus`; anything else is the device's protocol error."""
    try:
        return BlkStatus(value)
    except ValueError:
        known = ", ".join(f"{s.name}={s.value}" for s in BlkStatus)
        raise BlkProtocolError(f"{where}: unknown status byte {value:#04x} (valid: {known})") from None


@dataclass(frozen=True)
class BlkResponse:
    """What the device answered: the status, the data it wrote before it, the used length."""

    status: BlkStatus
    data: bytes
    used_len: int
    queue: int
    token: int

    @property
    def ok(self) -> bool:
        return self.status is BlkStatus.OK


def decode_response(
    req: BlkRequest, in_data: list[bytes], used_len: int, *, where: str, queue: int = 0, token: int = -1
) -> BlkResponse:
    """Split the device-writable buffers into data and status (the last byte, §5.2.6)."""
    joined = b"".join(in_data)
    if len(joined) != req.writable_len:
        raise BlkProtocolError(f"{where}: {len(joined)} device-writable bytes, expected {req.writable_len}")
    status = parse_status(joined[-1], where)
    return BlkResponse(status, joined[:-1], used_len, queue, token)


@dataclass(frozen=True)
class BlkGeometry:
    cylinders: int
    heads: int
    sectors: int


@dataclass(frozen=True)
class BlkTopology:
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int


@dataclass(frozen=True)
class BlkConfig:
    """struct virtio_blk_config as the negotiated features make it available (None: absent)."""

    capacity: int
    size_max: int | None = None
    seg_max: int | None = None
    geometry: BlkGeometry | None = None
    blk_size: int | None = None
    topology: BlkTopology | None = None
    writeback: int | None = None
    num_queues: int | None = None
    max_discard_sectors: int | None = None
    max_discard_seg: int | None = None
    discard_sector_alignment: int | None = None
    max_write_zeroes_sectors: int | None = None
    max_write_zeroes_seg: int | None = None
    write_zeroes_may_unmap: int | None = None
    #: Every field read, by its layout name (padding included when it was read).
    raw: dict[str, int] = field(default_factory=dict, compare=False)

    @classmethod
    def from_fields(cls, values: Mapping[str, int]) -> BlkConfig:
        def get(name: str) -> int | None:
            return values.get(name)

        geometry = None
        if "geometry.cylinders" in values:
            geometry = BlkGeometry(values["geometry.cylinders"], values["geometry.heads"], values["geometry.sectors"])
        topology = None
        if "topology.physical_block_exp" in values:
            topology = BlkTopology(
                values["topology.physical_block_exp"],
                values["topology.alignment_offset"],
                values["topology.min_io_size"],
                values["topology.opt_io_size"],
            )
        return cls(
            capacity=values["capacity"],
            size_max=get("size_max"),
            seg_max=get("seg_max"),
            geometry=geometry,
            blk_size=get("blk_size"),
            topology=topology,
            writeback=get("writeback"),
            num_queues=get("num_queues"),
            max_discard_sectors=get("max_discard_sectors"),
            max_discard_seg=get("max_discard_seg"),
            discard_sector_alignment=get("discard_sector_alignment"),
            max_write_zeroes_sectors=get("max_write_zeroes_sectors"),
            max_write_zeroes_seg=get("max_write_zeroes_seg"),
            write_zeroes_may_unmap=get("write_zeroes_may_unmap"),
            raw=dict(values),
        )
