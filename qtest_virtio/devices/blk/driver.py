"""The virtio-blk driver (virtio 1.2 §5.2): request queues, MQ, framings and the typed config.

The wire formats (struct virtio_blk_req, struct virtio_blk_config, status codes, framings) are
in :mod:`.encoding`; this module makes requests available, waits for them and checks them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ...backends import ImageBackend
from ...virtqueue import Request, Virtqueue
from ..base import Pending, VirtioDriver
from . import encoding
from .encoding import (
    BLK_CONFIG,
    ID_BYTES,
    SECTOR_SIZE,
    SEPARATE,
    BlkConfig,
    BlkError,
    BlkReqType,
    BlkRequest,
    BlkRequestError,
    BlkResponse,
    Framing,
    decode_id,
    decode_response,
    encode_dwz_segment,
)


@dataclass
class PendingBlk(Pending):
    """A request made available and not yet completed, with the framing it went out in."""

    request: BlkRequest
    framing: Framing
    queue: int
    chain: Request


# -- the driver -----------------------------------------------------------------------------------


class VirtioBlk(VirtioDriver):
    """The virtio-blk driver: one request queue, or ``num_queues`` with MQ (§5.2.2); every
    request method takes ``queue=`` to pick the queue.

    The legacy-only feature bits BARRIER and SCSI (§5.2.3.1) are never accepted: QEMU 7.2's
    legacy-only device offers SCSI even with ``scsi=off``, and the request header is the same
    ``struct virtio_blk_req`` on every layout (guest-native, so little-endian here).
    """

    DEVICE_TYPE = encoding.DEVICE_ID
    CONFIG_LAYOUT = BLK_CONFIG
    FEATURE_BITS = encoding.FEATURE_BITS
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
        return BlkConfig.from_fields(self.read_config())

    def set_writeback(self, enabled: bool) -> None:
        """Switch the cache mode through ``writeback`` (CONFIG_WCE, §5.2.5)."""
        if not self.has("CONFIG_WCE"):
            raise BlkError(f"{self._who()}: writeback is writable only with CONFIG_WCE negotiated")
        self.write_config(BLK_CONFIG.writeback, int(enabled))

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
        kick: bool = True,
    ) -> PendingBlk:
        """Make ``req`` available on request queue ``queue`` (0 by default) and kick (with
        ``kick=False``, the device is not told: a chain available and not yet seen)."""
        index, vq = self._queue(queue)
        self._check_framing(req, framing)
        out, in_sizes = framing.layout(req)
        chain = vq.submit(out, in_sizes, indirect=indirect, kick=kick)
        return PendingBlk(req, framing, index, chain)

    def _check_framing(self, req: BlkRequest, framing: Framing) -> None:
        if framing.needs_any_layout and not (self.has("VERSION_1") or self.has("ANY_LAYOUT")):
            raise BlkError(
                f"{self._who()}: {framing} needs VERSION_1 or ANY_LAYOUT; the legacy framing rules apply (§5.2.6.3)"
            )
        if self.has("SEG_MAX"):
            seg_max = self.initial_config.seg_max or 0
            segments = framing.data_segments(req)
            if segments > seg_max:
                raise BlkError(f"{self._who()}: {segments} data segments exceed seg_max {seg_max} (§5.2.4)")

    def submit_batch(
        self, reqs: list[BlkRequest], *, queue: int | None = None, framing: Framing = SEPARATE
    ) -> list[PendingBlk]:
        """Make every request of ``reqs`` available on one queue, then notify once: the device
        finds them all in one pass (QEMU then merges adjacent reads or writes into one backend
        request, hw/block/virtio-blk.c ``virtio_blk_submit_multireq``)."""
        index, vq = self._queue(queue)
        pending = []
        for req in reqs:
            self._check_framing(req, framing)
            out, in_sizes = framing.layout(req)
            pending.append(PendingBlk(req, framing, index, vq.submit(out, in_sizes, kick=False)))
        vq.kick()
        return pending

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
