"""virtio-blk (block device, virtio 1.2 §5.2): requests, status codes and the config structure.

A request is ``struct virtio_blk_req`` (§5.2.6): a 16-byte device-readable header (type,
reserved, sector), the data (device-readable for writes, discard and write-zeroes segments;
device-writable for reads and GET_ID) and one device-writable status byte. The legacy layout
uses the same struct in guest-native (little) endian. How the request is cut into descriptors is
a :class:`Framing`: header, data and status in separate buffers (always allowed), the data in
several segments, or with VERSION_1 / ANY_LAYOUT header and data in one buffer (§2.7.4).

The config structure (§5.2.4) and the request structures are declared once as layouts and read
or packed by field name. Fields that only exist with a feature are read only when it was
negotiated.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..backends import ImageBackend
from ..errors import QtestVirtioError
from ..registers import BitLayout, Bits, Field, Layout
from ..transport import TransportError, VirtioTransport
from ..virtqueue import Request, Virtqueue
from .base import VirtioDriver

SECTOR_SIZE = 512
#: GET_ID returns a NUL-padded ASCII string of up to 20 bytes (§5.2.6).
ID_BYTES = 20

# -- layouts as data (§5.2.4, §5.2.6) -----------------------------------------------------------


#: struct virtio_blk_config (§5.2.4), the fields QEMU 7.2 and virtio 1.2 define.
class BlkConfigLayout(Layout, struct="virtio_blk_config", size=72):
    capacity = Field(0, 8, "device size in 512-byte sectors")
    size_max = Field(8, 4, "maximum size of one segment (SIZE_MAX)")
    seg_max = Field(12, 4, "maximum number of data segments in a request (SEG_MAX)")
    geometry_cylinders = Field(16, 2, name="geometry.cylinders")
    geometry_heads = Field(18, 1, name="geometry.heads")
    geometry_sectors = Field(19, 1, name="geometry.sectors")
    blk_size = Field(20, 4, "optimal block size (BLK_SIZE)")
    topology_physical_block_exp = Field(24, 1, name="topology.physical_block_exp")
    topology_alignment_offset = Field(25, 1, name="topology.alignment_offset")
    topology_min_io_size = Field(26, 2, name="topology.min_io_size")
    topology_opt_io_size = Field(28, 4, name="topology.opt_io_size")
    writeback = Field(32, 1, "0 writethrough, 1 writeback (CONFIG_WCE)")
    unused0 = Field(33, 1)
    num_queues = Field(34, 2, "number of request queues (MQ)")
    max_discard_sectors = Field(36, 4)
    max_discard_seg = Field(40, 4)
    discard_sector_alignment = Field(44, 4)
    max_write_zeroes_sectors = Field(48, 4)
    max_write_zeroes_seg = Field(52, 4)
    write_zeroes_may_unmap = Field(56, 1)
    unused1_0 = Field(57, 1, name="unused1[0]")
    unused1_1 = Field(58, 1, name="unused1[1]")
    unused1_2 = Field(59, 1, name="unused1[2]")
    max_secure_erase_sectors = Field(60, 4)
    max_secure_erase_seg = Field(64, 4)
    secure_erase_sector_alignment = Field(68, 4)


BLK_CONFIG = BlkConfigLayout()

#: Which config fields exist with which feature (§5.2.4: only capacity is always present).
CONFIG_FIELDS_BY_FEATURE: dict[str, tuple[str, ...]] = {
    "SIZE_MAX": ("size_max",),
    "SEG_MAX": ("seg_max",),
    "GEOMETRY": ("geometry.cylinders", "geometry.heads", "geometry.sectors"),
    "BLK_SIZE": ("blk_size",),
    "TOPOLOGY": (
        "topology.physical_block_exp",
        "topology.alignment_offset",
        "topology.min_io_size",
        "topology.opt_io_size",
    ),
    "CONFIG_WCE": ("writeback",),
    "MQ": ("num_queues",),
    "DISCARD": ("max_discard_sectors", "max_discard_seg", "discard_sector_alignment"),
    "WRITE_ZEROES": ("max_write_zeroes_sectors", "max_write_zeroes_seg", "write_zeroes_may_unmap"),
}


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
#: The status byte ends the device-writable part (struct virtio_blk_req.status).
STATUS_BYTES = 1


class BlkReqType(enum.IntEnum):
    """VIRTIO_BLK_T_* (§5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


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


# -- packing by field name ------------------------------------------------------------------------


def pack_fields(layout: Layout, values: Mapping[str, int]) -> bytes:
    """The little-endian bytes of ``layout`` with ``values`` by field name (others zero)."""
    out = bytearray(layout.size)
    for name, value in values.items():
        f = layout[name]
        out[f.offset : f.end] = value.to_bytes(f.width, "little")
    return bytes(out)


def unpack_fields(layout: Layout, data: bytes) -> dict[str, int]:
    """Every field of ``layout`` that ``data`` covers, by name."""
    return {f.name: int.from_bytes(data[f.offset : f.end], "little") for f in layout if f.end <= len(data)}


def read_config_fields(transport: VirtioTransport, layout: Layout, names: Iterable[str]) -> dict[str, int]:
    """A consistent snapshot of config fields, each read at its own width: re-read while the
    config generation moves (§2.5.1; legacy has none). 64-bit fields are read as two 32-bit
    halves (§4.1.3.1), which the legacy I/O BAR needs anyway."""
    fields = [layout[n] for n in names]
    for _ in range(100):
        before = transport.config_generation()
        values = {}
        for f in fields:
            if f.width == 8:
                values[f.name] = transport.config_read(f.offset, 4) | transport.config_read(f.offset + 4, 4) << 32
            else:
                values[f.name] = transport.config_read(f.offset, f.width)
        if transport.config_generation() == before:
            return values
    raise TransportError(f"{transport}: config generation never settled while reading {layout.name}")


# -- requests as data -----------------------------------------------------------------------------


def encode_header(req_type: int, sector: int = 0, reserved: int = 0) -> bytes:
    """struct virtio_blk_req's 16-byte header (§5.2.6)."""
    return pack_fields(REQ_HEADER, {"type": req_type, "reserved": reserved, "sector": sector})


def encode_dwz_segment(sector: int, num_sectors: int, *, unmap: bool = False, flags: int | None = None) -> bytes:
    """One struct virtio_blk_discard_write_zeroes; ``flags`` overrides the whole flags word."""
    word = DWZ_FLAGS.unmap.set(0, int(unmap)) if flags is None else flags
    return pack_fields(DWZ_SEGMENT, {"sector": sector, "num_sectors": num_sectors, "flags": word})


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


def config_fields_for(features: Iterable[str]) -> list[str]:
    """The config fields the negotiated ``features`` make available, in layout order."""
    names = {"capacity"}
    for feature in features:
        names.update(CONFIG_FIELDS_BY_FEATURE.get(feature, ()))
    return [f.name for f in BLK_CONFIG if f.name in names]


@dataclass
class PendingBlk:
    """A request made available and not yet completed."""

    request: BlkRequest
    framing: Framing
    queue: int
    chain: Request

    @property
    def token(self) -> int:
        return self.chain.token


# -- the driver -----------------------------------------------------------------------------------


class VirtioBlk(VirtioDriver):
    """The virtio-blk driver: one request queue, or ``num_queues`` with MQ (§5.2.2); every
    request method takes ``queue=`` to pick the queue.

    The legacy-only feature bits BARRIER and SCSI (§5.2.3.1) are never accepted: QEMU 7.2's
    legacy-only device offers SCSI even with ``scsi=off``, and the request header is the same
    ``struct virtio_blk_req`` on every layout (guest-native, so little-endian here).
    """

    DEVICE_TYPE = 2
    FEATURES = frozenset(
        {
            "SIZE_MAX",
            "SEG_MAX",
            "GEOMETRY",
            "RO",
            "BLK_SIZE",
            "FLUSH",
            "TOPOLOGY",
            "CONFIG_WCE",
            "MQ",
            "DISCARD",
            "WRITE_ZEROES",
        }
    )
    QUEUES = 1

    #: The config as read between FEATURES_OK and DRIVER_OK (§3.1.1 step 7).
    initial_config: BlkConfig

    def setup_device(self) -> None:
        """Read the config once the features are final; MQ decides the queue count (§5.2.5)."""
        self.initial_config = self.config()
        self.QUEUES = 1
        if self.has("MQ"):
            n = self.initial_config.num_queues or 0
            if n < 1:
                raise BlkError(f"{self._who()}: MQ negotiated but num_queues is {n} (§5.2.4)")
            self.QUEUES = n

    # -- config ---------------------------------------------------------------------------

    def _who(self) -> str:
        return f"{type(self).__name__} {self.dev_id or self.fn.bdf} ({self.mode})"

    def config(self) -> BlkConfig:
        """The config fields the negotiated features make available (§5.2.4)."""
        return BlkConfig.from_fields(self.read_config(config_fields_for(self.negotiated)))

    def read_config(self, names: Iterable[str]) -> dict[str, int]:
        """Named config fields, as one consistent snapshot (whether available or not)."""
        return read_config_fields(self.transport, BLK_CONFIG, names)

    def set_writeback(self, enabled: bool) -> None:
        """Switch the cache mode through ``writeback`` (CONFIG_WCE, §5.2.5)."""
        if not self.has("CONFIG_WCE"):
            raise BlkError(f"{self._who()}: writeback is writable only with CONFIG_WCE negotiated")
        f = BLK_CONFIG.writeback
        self.transport.config_write(f.offset, f.width, int(enabled))

    @property
    def capacity(self) -> int:
        """Device size in 512-byte sectors."""
        return self.read_config(["capacity"])["capacity"]

    @property
    def image(self) -> ImageBackend:
        """The host end of the default backend (a raw image the test can read and write)."""
        if not isinstance(self.backend, ImageBackend):
            raise BlkError(f"{self._who()}: the backend is not an image the harness holds ({self.backend!r})")
        return self.backend

    # -- requests -------------------------------------------------------------------------

    def _where(self, queue: int, req: BlkRequest, token: int) -> str:
        return f"{self._who()}: queue {queue}, request {token} ({req.describe()})"

    def _queue(self, queue: int | None) -> tuple[int, Virtqueue]:
        index = 0 if queue is None else queue
        if not 0 <= index < len(self.queues):
            raise BlkError(f"{self._who()}: no request queue {index} (the driver set up {len(self.queues)})")
        return index, self.queues[index]

    def submit(
        self,
        req: BlkRequest,
        *,
        queue: int | None = None,
        framing: Framing = SEPARATE,
        indirect: bool | None = None,
    ) -> PendingBlk:
        """Make ``req`` available on request queue ``queue`` (0 by default) and kick."""
        index, vq = self._queue(queue)
        if framing.needs_any_layout and not (self.has("VERSION_1") or self.has("ANY_LAYOUT")):
            raise BlkError(
                f"{self._who()}: {framing} needs VERSION_1 or ANY_LAYOUT; the legacy framing rules apply (§5.2.6.3)"
            )
        if self.has("SEG_MAX"):
            seg_max = self.initial_config.seg_max or 0
            segments = framing.data_segments(req)
            if segments > seg_max:
                raise BlkError(f"{self._who()}: {segments} data segments exceed seg_max {seg_max} (§5.2.4)")
        out, in_sizes = framing.layout(req)
        chain = vq.submit(out, in_sizes, indirect=indirect)
        return PendingBlk(req, framing, index, chain)

    def complete(self, pending: PendingBlk, timeout: float = 5.0) -> BlkResponse:
        """Wait for ``pending``; decode its status (an unknown byte is a protocol error)."""
        vq = self.queues[pending.queue]
        used_len, in_data = vq.complete(pending.chain, timeout)
        where = self._where(pending.queue, pending.request, pending.token)
        return decode_response(
            pending.request, in_data, used_len, where=where, queue=pending.queue, token=pending.token
        )

    def execute(
        self,
        req: BlkRequest,
        *,
        queue: int | None = None,
        framing: Framing = SEPARATE,
        indirect: bool | None = None,
        timeout: float = 5.0,
    ) -> BlkResponse:
        """Submit one request and wait for it, whatever its status."""
        return self.complete(self.submit(req, queue=queue, framing=framing, indirect=indirect), timeout)

    def _checked(self, req: BlkRequest, *, queue: int | None, framing: Framing, timeout: float) -> BlkResponse:
        resp = self.execute(req, queue=queue, framing=framing, timeout=timeout)
        if not resp.ok:
            raise BlkRequestError(f"{self._where(resp.queue, req, resp.token)}: status {resp.status.name}", resp.status)
        return resp

    def _require(self, feature: str, what: str) -> None:
        if not self.has(feature):
            raise BlkError(f"{self._who()}: {what} needs {feature}, which was not negotiated")

    # -- the driver's API -----------------------------------------------------------------

    def read(
        self,
        sector: int,
        count: int,
        *,
        queue: int | None = None,
        framing: Framing | None = None,
        timeout: float = 5.0,
    ) -> bytes:
        """``count`` sectors from ``sector`` (VIRTIO_BLK_T_IN)."""
        if count <= 0:
            raise ValueError(f"count must be positive, not {count}")
        req = BlkRequest(BlkReqType.IN, sector, data_in_len=count * SECTOR_SIZE)
        return self._checked(req, queue=queue, framing=framing or self._default_framing(), timeout=timeout).data

    def write(
        self,
        sector: int,
        data: bytes,
        *,
        queue: int | None = None,
        framing: Framing | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Write ``data`` (a whole number of sectors) at ``sector`` (VIRTIO_BLK_T_OUT)."""
        if not data or len(data) % SECTOR_SIZE:
            raise ValueError(f"write data must be a positive multiple of {SECTOR_SIZE} bytes, not {len(data)}")
        req = BlkRequest(BlkReqType.OUT, sector, data_out=bytes(data))
        self._checked(req, queue=queue, framing=framing or self._default_framing(), timeout=timeout)

    def flush(self, *, queue: int | None = None, timeout: float = 5.0) -> None:
        """VIRTIO_BLK_T_FLUSH: completed writes become stable (§5.2.6.2)."""
        self._require("FLUSH", "a flush")
        self._checked(BlkRequest(BlkReqType.FLUSH), queue=queue, framing=SEPARATE, timeout=timeout)

    def get_id(self, *, queue: int | None = None, timeout: float = 5.0) -> str:
        """The device ID string (the ``serial`` property in QEMU), VIRTIO_BLK_T_GET_ID."""
        req = BlkRequest(BlkReqType.GET_ID, data_in_len=ID_BYTES)
        return decode_id(self._checked(req, queue=queue, framing=SEPARATE, timeout=timeout).data)

    def discard(self, sector: int, count: int, *, queue: int | None = None, timeout: float = 5.0) -> None:
        """VIRTIO_BLK_T_DISCARD of one segment (the device may deallocate the range)."""
        self._require("DISCARD", "a discard")
        req = BlkRequest(BlkReqType.DISCARD, data_out=encode_dwz_segment(sector, count))
        self._checked(req, queue=queue, framing=SEPARATE, timeout=timeout)

    def write_zeroes(
        self, sector: int, count: int, unmap: bool = False, *, queue: int | None = None, timeout: float = 5.0
    ) -> None:
        """VIRTIO_BLK_T_WRITE_ZEROES of one segment: the range reads back as zeroes (§5.2.6.2)."""
        self._require("WRITE_ZEROES", "write zeroes")
        req = BlkRequest(BlkReqType.WRITE_ZEROES, data_out=encode_dwz_segment(sector, count, unmap=unmap))
        self._checked(req, queue=queue, framing=SEPARATE, timeout=timeout)

    def _default_framing(self) -> Framing:
        """Data in buffers of at most size_max bytes when the device limits segments."""
        if self.has("SIZE_MAX") and self.initial_config.size_max:
            return Framing(segment_size=self.initial_config.size_max)
        return SEPARATE

    def round_robin(self) -> itertools.cycle[int]:
        """Queue indices to spread requests over every request queue."""
        return itertools.cycle(range(len(self.queues)))
