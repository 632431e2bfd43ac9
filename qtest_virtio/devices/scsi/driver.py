"""The virtio-scsi driver (virtio 1.2 §5.6): command requests, task management and events.

Queues: 0 is the controlq, 1 the eventq, 2.. the request queues (``num_queues`` of them, from
the config). The request, response and event structures, LUNs and CDBs are in :mod:`.encoding`;
this module submits them, keeps the eventq populated (§5.6.6.3.1) and checks the answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from ...backends import ImageBackend
from ...memory import GuestMemory
from ...pci import PciFunction
from ...registers import Layout
from ...virtqueue import Buf, Request, Virtqueue
from ...virtqueue.base import InFlight
from ..base import Pending, VirtioDriver
from . import encoding
from .encoding import (
    CONTROLQ,
    CTRL_AN_RESP,
    CTRL_TMF_RESP,
    EVENT,
    EVENTQ,
    FIRST_REQUEST_QUEUE,
    RESP_CMD,
    SCSI_CONFIG,
    CtrlType,
    InquiryData,
    Op,
    ScsiCommandError,
    ScsiConfig,
    ScsiError,
    ScsiEvent,
    ScsiProtocolError,
    ScsiResponse,
    ScsiResult,
    Sense,
    TaskAttr,
    TmfSubtype,
    cdb_inquiry,
    cdb_read_capacity10,
    cdb_read_capacity16,
    cdb_report_luns,
    cdb_request_sense,
    cdb_rw10,
    cdb_test_unit_ready,
    decode_cmd_response,
    encode_an,
    encode_cmd,
    encode_lun,
    encode_tmf,
    parse_response,
)


class SubmitOptions(TypedDict, total=False):
    """The keyword options of :meth:`VirtioScsi.submit` that the wrappers pass through."""

    target: int
    queue: int | None
    tag: int | None
    task_attr: int


class CommandOptions(SubmitOptions, total=False):
    """:meth:`VirtioScsi.command`'s options, as :meth:`VirtioScsi.checked` passes them on."""

    lun: int | bytes
    timeout: float


@dataclass
class PendingCmd(Pending):
    """A command request made available: what decoding its response needs."""

    queue: int
    chain: Request
    data_in_len: int
    data_out_len: int
    sense_size: int
    what: str


@dataclass
class PendingTmf(Pending):
    """A task management function made available on the controlq."""

    queue: int
    chain: Request
    what: str


# -- the driver ---------------------------------------------------------------------------------------


class VirtioScsi(VirtioDriver):
    """The virtio-scsi driver: controlq, eventq (kept populated) and the request queues."""

    DEVICE_TYPE = encoding.DEVICE_ID
    CONFIG_LAYOUT = SCSI_CONFIG
    FEATURE_BITS = encoding.FEATURE_BITS
    FEATURES = frozenset({"HOTPLUG", "CHANGE"})
    QUEUES = 3
    #: Buffers kept on the eventq (§5.6.6.3.1: the driver SHOULD keep it populated).
    EVENT_BUFFERS = 8
    #: How many unit attentions :meth:`checked` consumes before giving up.
    UNIT_ATTENTION_RETRIES = 4

    initial_config: ScsiConfig

    def __init__(
        self,
        fn: PciFunction,
        mode: str,
        memory: GuestMemory,
        *,
        event_buffers: int | None = None,
        strict_used_len: bool = False,
        **kwargs: Any,
    ) -> None:
        self.event_buffers = self.EVENT_BUFFERS if event_buffers is None else event_buffers
        self.strict_used_len = strict_used_len
        #: Used lengths past the chain's device-writable bytes that were tolerated, as
        #: (queue, descriptor id, used length, device-writable bytes).
        self.used_len_overruns: list[tuple[int, int, int, int]] = []
        self._event_allocs: dict[int, int] = {}
        self._next_tag = 1
        super().__init__(fn, mode, memory, **kwargs)

    def _who(self) -> str:
        return f"{type(self).__name__} {self.dev_id or self.fn.bdf} ({self.mode})"

    # -- initialization -------------------------------------------------------------------

    def setup_device(self) -> None:
        """Read the config; one queue per request queue after control and event (§5.6.2)."""
        self.initial_config = self.config()
        n = self.initial_config.num_queues
        if n < 1:
            raise ScsiError(f"{self._who()}: num_queues is {n}; a SCSI host has at least one request queue")
        self.QUEUES = FIRST_REQUEST_QUEUE + n
        self.sense_size = self.initial_config.sense_size
        self.cdb_size = self.initial_config.cdb_size

    def initialize(self) -> None:
        super().initialize()
        if not self.strict_used_len:
            for vq in self.request_queues:
                self._tolerate_data_out_in_used_len(vq)
        self.fill_eventq(self.event_buffers)

    def _tolerate_data_out_in_used_len(self, vq: Virtqueue) -> None:
        """Workaround for QEMU 7.2, which puts the data-out bytes of a command into its used
        length (virtio_scsi_complete_req pushes ``qsgl.size`` + the response header length
        whatever the data direction): a used length past the device-writable bytes, but within
        the chain's total length, is recorded in :attr:`used_len_overruns` and the request
        completes. Anything longer is still the virtqueue's error. ``strict_used_len=True``
        turns this off (the legacy interface's drivers SHOULD ignore used lengths, §5.6.6)."""
        strict = vq._check_used

        def check(used_id: int, length: int) -> InFlight:
            chain = vq.in_flight.get(used_id)
            if chain is not None and length > chain.writable_bytes:
                readable = sum(b.length for b in chain.bufs if not b.writable)
                if length <= chain.writable_bytes + readable:
                    self.used_len_overruns.append((vq.index, used_id, length, chain.writable_bytes))
                    return strict(used_id, chain.writable_bytes)
            return strict(used_id, length)

        setattr(vq, "_check_used", check)  # noqa: B010 - instance-level override of one check

    def release_queues(self) -> None:
        super().release_queues()
        for addr in self._event_allocs.values():
            self.memory.free(addr)
        self._event_allocs.clear()

    # -- config ---------------------------------------------------------------------------

    def config(self) -> ScsiConfig:
        """struct virtio_scsi_config (all fields always present, §5.6.4)."""
        return ScsiConfig(**self.read_config())

    def set_sense_size(self, size: int) -> None:
        """Write sense_size (one of the two driver-writable fields); later requests use it."""
        self.write_config(SCSI_CONFIG.sense_size, size)
        self.sense_size = size

    def set_cdb_size(self, size: int) -> None:
        self.write_config(SCSI_CONFIG.cdb_size, size)
        self.cdb_size = size

    @property
    def image(self) -> ImageBackend:
        """The raw image behind the scsi-hd (target 0, LUN 0) the harness holds."""
        if not isinstance(self.backend, ImageBackend):
            raise ScsiError(f"{self._who()}: the backend is not an image the harness holds ({self.backend!r})")
        return self.backend

    # -- queues ---------------------------------------------------------------------------

    @property
    def controlq(self) -> Virtqueue:
        return self.queues[CONTROLQ]

    @property
    def eventq(self) -> Virtqueue:
        return self.queues[EVENTQ]

    @property
    def request_queues(self) -> list[Virtqueue]:
        return self.queues[FIRST_REQUEST_QUEUE:]

    def _request_queue(self, queue: int | None) -> int:
        index = 0 if queue is None else queue
        if not 0 <= index < len(self.request_queues):
            raise ScsiError(f"{self._who()}: no request queue {index} ({len(self.request_queues)} set up)")
        return FIRST_REQUEST_QUEUE + index

    # -- command requests (§5.6.6.1) --------------------------------------------------------

    def submit(
        self,
        cdb: bytes,
        data_out: bytes = b"",
        data_in_len: int = 0,
        *,
        lun: int | bytes = 0,
        target: int = 0,
        queue: int | None = None,
        tag: int | None = None,
        task_attr: int = TaskAttr.SIMPLE,
        kick: bool = True,
    ) -> PendingCmd:
        """Make a command request available on request queue ``queue`` (0: the first) and kick
        (with ``kick=False``, the device is not told: a request available and not yet seen)."""
        lun_field = lun if isinstance(lun, bytes) else encode_lun(target, lun)
        if tag is None:
            tag, self._next_tag = self._next_tag, self._next_tag + 1
        header = encode_cmd(lun_field, cdb, self.cdb_size, tag=tag, task_attr=task_attr)
        index = self._request_queue(queue)
        in_sizes = [RESP_CMD.size + self.sense_size] + ([data_in_len] if data_in_len else [])
        out = [header] + ([data_out] if data_out else [])
        chain = self.queues[index].submit(out, in_sizes, kick=kick)
        what = f"CDB {cdb[:1].hex()} to LUN {lun_field.hex()} tag {tag}"
        return PendingCmd(index, chain, data_in_len, len(data_out), self.sense_size, what)

    def complete(self, pending: PendingCmd, timeout: float = 5.0) -> ScsiResult:
        used_len, in_data = self.queues[pending.queue].complete(pending.chain, timeout)
        where = f"{self._who()}: queue {pending.queue}, request {pending.token} ({pending.what})"
        return decode_cmd_response(
            in_data[0],
            in_data[1] if len(in_data) > 1 else b"",
            sense_size=pending.sense_size,
            data_in_len=pending.data_in_len,
            data_out_len=pending.data_out_len,
            where=where,
            used_len=used_len,
            token=pending.token,
        )

    def command(
        self,
        cdb: bytes,
        data_out: bytes = b"",
        data_in_len: int = 0,
        lun: int | bytes = 0,
        *,
        timeout: float = 5.0,
        **kw: Unpack[SubmitOptions],
    ) -> ScsiResult:
        """One command request (:meth:`submit`, then :meth:`complete`); unpacks as
        ``(response, status, sense, data)``."""
        pending = self.submit(cdb, data_out, data_in_len, lun=lun, **kw)
        return self.complete(pending, timeout)

    def checked(
        self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0, **kw: Unpack[CommandOptions]
    ) -> ScsiResult:
        """A command that must end with response OK and status GOOD. Unit attentions (after a
        reset, a hotplug on the bus) are consumed and the command retried, as initiators do."""
        for _ in range(1 + self.UNIT_ATTENTION_RETRIES):
            result = self.command(cdb, data_out, data_in_len, **kw)
            if result.good or not result.is_unit_attention():
                break
        if not result.good:
            raise ScsiCommandError(f"{self._who()}: CDB {cdb.hex()}: {result.describe()}", result)
        return result

    # -- SCSI helpers ---------------------------------------------------------------------

    def inquiry(self, lun: int = 0, *, target: int = 0, alloc_len: int = 96) -> InquiryData:
        result = self.checked(cdb_inquiry(alloc_len), data_in_len=alloc_len, lun=lun, target=target)
        return InquiryData.parse(result.data)

    def test_unit_ready(self, lun: int = 0, *, target: int = 0) -> ScsiResult:
        """TEST UNIT READY, once (the first one after a reset reports the unit attention)."""
        return self.command(cdb_test_unit_ready(), lun=lun, target=target)

    def request_sense(self, lun: int = 0, *, target: int = 0, alloc_len: int = 96) -> Sense | None:
        result = self.command(cdb_request_sense(alloc_len), data_in_len=alloc_len, lun=lun, target=target)
        if not result.good:
            raise ScsiCommandError(f"{self._who()}: REQUEST SENSE: {result.describe()}", result)
        return Sense.parse(result.data)

    def wait_ready(self, lun: int = 0, *, target: int = 0, attempts: int = 4) -> list[ScsiResult]:
        """TEST UNIT READY until GOOD, consuming unit attentions; returns every result."""
        results = []
        for _ in range(attempts):
            result = self.test_unit_ready(lun, target=target)
            results.append(result)
            if result.good:
                return results
            if not result.is_unit_attention():
                break
        raise ScsiCommandError(f"{self._who()}: LUN {lun} never ready: {results[-1].describe()}", results[-1])

    def read_capacity10(self, lun: int = 0) -> tuple[int, int]:
        """(last LBA, block length in bytes) from READ CAPACITY(10)."""
        data = self.checked(cdb_read_capacity10(), data_in_len=8, lun=lun).data
        return int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")

    def read_capacity16(self, lun: int = 0) -> tuple[int, int]:
        """(last LBA, block length in bytes) from READ CAPACITY(16)."""
        data = self.checked(cdb_read_capacity16(32), data_in_len=32, lun=lun).data
        return int.from_bytes(data[0:8], "big"), int.from_bytes(data[8:12], "big")

    def read10(self, lba: int, blocks: int, *, lun: int = 0, block_size: int = 512) -> bytes:
        return self.checked(cdb_rw10(Op.READ_10, lba, blocks), data_in_len=blocks * block_size, lun=lun).data

    def write10(self, lba: int, data: bytes, *, lun: int = 0, block_size: int = 512) -> None:
        if not data or len(data) % block_size:
            raise ValueError(f"WRITE(10) data must be a positive multiple of {block_size} bytes, not {len(data)}")
        self.checked(cdb_rw10(Op.WRITE_10, lba, len(data) // block_size), data_out=data, lun=lun)

    def report_luns(self, *, target: int = 0) -> list[int]:
        data = self.checked(cdb_report_luns(256), data_in_len=256, lun=0, target=target).data
        length = int.from_bytes(data[0:4], "big")
        entries = data[8 : 8 + length]
        return [((e[0] & 0x3F) << 8) | e[1] for e in (entries[i : i + 8] for i in range(0, len(entries), 8))]

    # -- controlq (§5.6.6.2) ----------------------------------------------------------------

    def _control(self, out: bytes, resp: Layout, what: str, timeout: float) -> dict[str, int]:
        used_len, (data,) = self.controlq.complete(self.controlq.submit([out], [resp.size]), timeout)
        fields = resp.unpack(data)
        fields["used_len"] = used_len
        parse_response(fields["response"], f"{self._who()}: controlq, {what}")
        return fields

    def tmf(
        self, subtype: int, lun: int | bytes = 0, *, target: int = 0, tag: int = 0, timeout: float = 5.0
    ) -> ScsiResponse:
        """A task management function; returns the device's response (FUNCTION_COMPLETE is 0)."""
        return self.complete_tmf(self.submit_tmf(subtype, lun, target=target, tag=tag), timeout)

    def submit_tmf(self, subtype: int, lun: int | bytes = 0, *, target: int = 0, tag: int = 0) -> PendingTmf:
        """Make a task management function available on the controlq and kick, without
        waiting: a TMF that affects commands in flight completes only after them (§5.6.6.2)."""
        lun_field = lun if isinstance(lun, bytes) else encode_lun(target, lun)
        what = f"TMF {TmfSubtype(subtype).name if subtype in TmfSubtype._value2member_map_ else subtype}"
        what += f" LUN {lun_field.hex()} id {tag}"
        chain = self.controlq.submit([encode_tmf(subtype, lun_field, tag)], [CTRL_TMF_RESP.size])
        return PendingTmf(CONTROLQ, chain, what)

    def complete_tmf(self, pending: PendingTmf, timeout: float = 5.0) -> ScsiResponse:
        """Wait for a TMF :meth:`submit_tmf` made available; its response byte."""
        _, (data,) = self.controlq.complete(pending.chain, timeout)
        value = CTRL_TMF_RESP.unpack(data)["response"]
        return parse_response(value, f"{self._who()}: controlq, {pending.what}")

    def logical_unit_reset(self, lun: int = 0, *, target: int = 0) -> ScsiResponse:
        return self.tmf(TmfSubtype.LOGICAL_UNIT_RESET, lun, target=target)

    def abort_task(self, tag: int, lun: int = 0, *, target: int = 0) -> ScsiResponse:
        return self.tmf(TmfSubtype.ABORT_TASK, lun, target=target, tag=tag)

    def an_query(
        self, event_requested: int, lun: int = 0, *, target: int = 0, subscribe: bool = False
    ) -> tuple[ScsiResponse, int]:
        """Asynchronous notification query (or subscribe): (response, event_actual)."""
        lun_field = encode_lun(target, lun)
        kind = CtrlType.AN_SUBSCRIBE if subscribe else CtrlType.AN_QUERY
        fields = self._control(encode_an(kind, lun_field, event_requested), CTRL_AN_RESP, kind.name, 5.0)
        return ScsiResponse(fields["response"]), fields["event_actual"]

    # -- eventq (§5.6.6.3) -------------------------------------------------------------------

    def fill_eventq(self, count: int) -> None:
        """Make ``count`` device-writable event buffers available."""
        size = max(EVENT.size, self.initial_config.event_info_size)
        for _ in range(count):
            addr = self.memory.alloc(size, 16, tag=f"{self._who()} event")
            token = self.eventq.add([Buf(addr, size, writable=True)])
            self._event_allocs[token] = addr
        if count:
            self.eventq.kick()

    def poll_event(self, timeout: float = 0.0) -> ScsiEvent | None:
        """The next event (its buffer goes back on the eventq), or None within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            elem = self.eventq.poll_used()
            if elem is not None:
                break
            if time.monotonic() >= deadline:
                return None
        addr = self._event_allocs.pop(elem.token)
        if elem.length and elem.length < EVENT.size:
            raise ScsiProtocolError(
                f"{self._who()}: eventq descriptor {elem.id}: used length {elem.length} is shorter than an event"
            )
        event = ScsiEvent.parse(self.memory.read(addr, EVENT.size))
        self.memory.free(addr)
        self.fill_eventq(1)
        return event
