"""Public test support: hand-built rings, the device's side of a ring, buffer helpers, the mode
sets, and an in-memory fake of the qtest guest-memory surface so ring logic is unit-tested
without QEMU. After rust-vmm virtio-queue's mock driver, each type has one job:

- :class:`FakeQtest` is guest RAM in a bytearray behind the guest-memory half of ``QtestClient``
  (its :class:`~qtest_virtio.memory.GuestBus`), with :class:`FakeBatch`; :class:`FakeTransport`
  remembers where a queue's rings are instead of telling a device. They stand for memory and
  registers in unit tests of pure ring logic, never for a device: what a device does is only
  ever checked against real QEMU.
- :class:`SplitRing` and :class:`PackedRing` read and write one ring's entries, indexes and event
  fields at given slots, over any bus (QEMU's or the fake): hand-built (hostile) rings in
  scenarios need no private state of the library's queues.
- :class:`SplitDevice` and :class:`PackedDevice` are the other side of a ring: they pop available
  chains (indirect tables followed), push used entries, keep the packed wrap counters, and
  decide notifications as virtio 1.2 §2.7.7 / §2.8.10 say, so the driver's ring logic is tested
  both ways.
"""

from __future__ import annotations

import contextlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generic, Self, TypeVar

from .errors import QtestError, QtestVirtioError
from .memory import GuestBus, GuestMemory
from .modes import ALL_MODES, LEGACY_LAYOUT_MODES, MODERN_LAYOUT_MODES, RINGS
from .virtqueue import Buf, SplitVirtqueue
from .virtqueue.layout import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F,
    EVENT_SUPPRESS,
    EVENT_WRAP_BIT,
    PACKED_DESC,
    PACKED_F,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    SPLIT_AVAIL,
    SPLIT_DESC,
    SPLIT_USED,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    need_event,
    packed_avail_flags,
    packed_need_event,
)
from .virtqueue.packed import PackedVirtqueue

__all__ = [
    "ALL_MODES",
    "LEGACY_LAYOUT_MODES",
    "MODERN_LAYOUT_MODES",
    "RINGS",
    "Chain",
    "FakeBatch",
    "FakeGuest",
    "FakeQtest",
    "FakeTransport",
    "PackedDesc",
    "PackedDevice",
    "PackedRing",
    "QueueConfig",
    "RingError",
    "SplitDesc",
    "SplitDevice",
    "SplitRing",
    "alloc_bufs",
    "available_flags",
    "free_bufs",
    "pattern",
    "publish_by_hand",
    "read_desc_table",
    "take_used_by_hand",
    "write_desc_table",
]

_WIDTHS = {"b": 1, "w": 2, "l": 4, "q": 8}


class RingError(QtestVirtioError):
    """The device side found a ring no device could follow (a descriptor loop, a chain off the
    ring, an indirect table of a size that is not whole descriptors)."""


class _WordWrites:
    """The client's writeb .. writeq, values checked as it checks them; ``_put`` applies one
    (:class:`FakeQtest`) or queues it (:class:`FakeBatch`)."""

    def _put(self, op: str, addr: int, value: int, width: int) -> None:
        raise NotImplementedError

    def _word(self, op: str, addr: int, value: int) -> None:
        width = _WIDTHS[op[-1]]
        if not 0 <= value < 1 << (8 * width):
            raise ValueError(f"{op}: value {value:#x} does not fit in {width} bytes")
        self._put(op, addr, value, width)

    def writeb(self, addr: int, value: int) -> None:
        self._word("writeb", addr, value)

    def writew(self, addr: int, value: int) -> None:
        self._word("writew", addr, value)

    def writel(self, addr: int, value: int) -> None:
        self._word("writel", addr, value)

    def writeq(self, addr: int, value: int) -> None:
        self._word("writeq", addr, value)


class FakeQtest(_WordWrites):
    """Guest RAM ``[base, base + ram_bytes)`` in a bytearray, behind the client's memory calls.

    Arguments are checked as the client checks them before sending (``ValueError``); an
    access outside RAM raises :class:`~qtest_virtio.errors.QtestError` naming the command, as a
    ``FAIL`` reply would. ``writes`` lists every applied write as ``(addr, size)`` in order, so
    a test can check that a ring was published in the order §2.7.13 asks for."""

    def __init__(self, ram_bytes: int = 16 << 20, *, base: int = 0) -> None:
        if ram_bytes <= 0:
            raise ValueError(f"fake RAM of {ram_bytes} bytes: give a positive size")
        self.base = base
        self.ram = bytearray(ram_bytes)
        self.writes: list[tuple[int, int]] = []

    @property
    def end(self) -> int:
        return self.base + len(self.ram)

    def _span(self, command: str, addr: int, size: int) -> slice:
        if addr < 0 or size < 0:
            raise ValueError(f"{command}: address {addr:#x} and size {size:#x} must not be negative")
        if addr < self.base or addr + size > self.end:
            raise QtestError(
                f"{command} {addr:#x} {size:#x}",
                f"{addr:#x}+{size:#x} is outside the fake's RAM [{self.base:#x}, {self.end:#x})",
            )
        return slice(addr - self.base, addr - self.base + size)

    def _store(self, command: str, addr: int, data: bytes | bytearray | memoryview) -> None:
        where = self._span(command, addr, len(data))
        self.ram[where] = data
        if len(data):
            self.writes.append((addr, len(data)))

    def _put(self, op: str, addr: int, value: int, width: int) -> None:
        self._store(op, addr, value.to_bytes(width, "little"))

    def _load(self, op: str, addr: int) -> int:
        return int.from_bytes(self.ram[self._span(op, addr, _WIDTHS[op[-1]])], "little")

    def readb(self, addr: int) -> int:
        return self._load("readb", addr)

    def readw(self, addr: int) -> int:
        return self._load("readw", addr)

    def readl(self, addr: int) -> int:
        return self._load("readl", addr)

    def readq(self, addr: int) -> int:
        return self._load("readq", addr)

    def memread(self, addr: int, size: int) -> bytes:
        return bytes(self.ram[self._span("memread", addr, size)])

    def memwrite(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._store("memwrite", addr, memoryview(data).cast("B"))

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.ram[self._span("read", addr, size)])

    def write(self, addr: int, data: bytes) -> None:
        self._store("write", addr, data)

    def b64read(self, addr: int, size: int) -> bytes:
        return bytes(self.ram[self._span("b64read", addr, size)])

    def b64write(self, addr: int, data: bytes) -> None:
        self._store("b64write", addr, data)

    def memset(self, addr: int, size: int, value: int = 0) -> None:
        if not 0 <= value <= 0xFF:
            raise ValueError(f"memset: value {value:#x} is not a byte")
        self._store("memset", addr, bytes([value]) * size)

    def write_many(self, writes: Iterable[tuple[str, int, int]]) -> None:
        """Memory writes only: the fake has no I/O ports."""
        for op, addr, value in writes:
            if op not in ("writeb", "writew", "writel", "writeq"):
                raise ValueError(f"write_many: {op!r} is not a memory write (the fake has no I/O ports)")
            self._word(op, addr, value)

    posting = contextlib.nullcontext  # writes apply at once: no replies to wait for

    def batch(self) -> FakeBatch:
        return FakeBatch(self)

    def read_many(self, spans: Iterable[tuple[int, int]]) -> list[bytes]:
        return [self.memread(addr, size) for addr, size in spans]


class FakeBatch(_WordWrites):
    """Writes checked when queued and applied in order at :meth:`flush`, as ``CommandBatch``
    sends them: nothing queued is visible in RAM before then."""

    def __init__(self, bus: FakeQtest) -> None:
        self.bus = bus
        self._queued: list[tuple[str, int, int | bytes]] = []

    def __len__(self) -> int:
        return len(self._queued)

    def _put(self, op: str, addr: int, value: int, width: int) -> None:
        self.bus._span(op, addr, width)
        self._queued.append((op, addr, value))

    def memwrite(self, addr: int, data: bytes) -> None:
        if data:
            self.bus._span("b64write", addr, len(data))
            self._queued.append(("b64write", addr, bytes(data)))

    def flush(self) -> None:
        queued, self._queued = self._queued, []
        for op, addr, value in queued:
            if isinstance(value, bytes):
                self.bus.memwrite(addr, value)
            else:
                self.bus._word(op, addr, value)


@dataclass(frozen=True)
class FakeFunction:
    """The PCI function a fake transport names in messages."""

    bdf: str = "00:00.0"


@dataclass
class QueueConfig:
    """What a driver told the fake transport about one queue (§4.1.4.3: size and the three
    area addresses; legacy puts them in one page frame, reported here by address all the same)."""

    size: int
    desc: int
    driver: int
    device: int
    enabled: bool = False
    notifications: int = 0


class FakeTransport:
    """A transport's queue registers, remembered instead of written to a device (the
    virtqueue's :class:`~qtest_virtio.virtqueue.QueueTransport`): unit tests of ring logic only."""

    mode = "fake"

    def __init__(self, *, legacy_layout: bool = False, bdf: str = "00:00.0", status: int = 0) -> None:
        self.uses_legacy_layout = legacy_layout
        self.fn = FakeFunction(bdf)
        self.status = status
        self.queues: dict[int, QueueConfig] = {}

    def __repr__(self) -> str:
        return f"<FakeTransport {self.fn.bdf} {'legacy' if self.uses_legacy_layout else 'modern'} layout>"

    def setup_queue(self, queue: int, size: int, desc: int, driver: int, device: int) -> None:
        self.queues[queue] = QueueConfig(size, desc, driver, device)

    def enable_queue(self, queue: int) -> None:
        self.queues[queue].enabled = True

    def notify(self, queue: int) -> None:
        self.queues[queue].notifications += 1

    def get_status(self) -> int:
        return self.status


# -- descriptors and hand-built rings ------------------------------------------------------------

D = TypeVar("D", bound="_RingDesc")
_USED = USED_ELEM.struct


@dataclass(frozen=True)
class _RingDesc:
    """A ring descriptor as a value: packed and unpacked with its layout's struct."""

    _STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self._STRUCT.pack(*astuple(self))

    @classmethod
    def unpack(cls, raw: bytes, offset: int = 0) -> Self:
        return cls(*cls._STRUCT.unpack_from(raw, offset))


@dataclass(frozen=True)
class SplitDesc(_RingDesc):
    """struct virtq_desc (§2.7.5), fields as the spec names them."""

    _STRUCT = SPLIT_DESC.struct
    addr: int
    len: int
    flags: int = 0
    next: int = 0


@dataclass(frozen=True)
class PackedDesc(_RingDesc):
    """struct pvirtq_desc (§2.8.13), fields as the spec names them."""

    _STRUCT = PACKED_DESC.struct
    addr: int
    len: int
    id: int = 0
    flags: int = 0


def write_desc_table(bus: GuestBus, addr: int, descs: Sequence[SplitDesc | PackedDesc]) -> int:
    """Write an (indirect) descriptor table at ``addr``; returns its length in bytes, what the
    INDIRECT descriptor's ``len`` says (§2.7.5.3, §2.8.19)."""
    raw = b"".join(d.pack() for d in descs)
    bus.memwrite(addr, raw)
    return len(raw)


def read_desc_table(bus: GuestBus, addr: int, length: int, kind: type[D]) -> list[D]:
    """The ``kind`` descriptors of a table of ``length`` bytes (whole 16-byte entries)."""
    if length <= 0 or length % SPLIT_DESC.size:
        raise RingError(f"indirect table of {length} bytes is not a whole number of {SPLIT_DESC.size}-byte descriptors")
    raw = bus.memread(addr, length)
    return [kind.unpack(raw, off) for off in range(0, length, SPLIT_DESC.size)]


class _DescRing(Generic[D]):
    """What the split and packed views share: a table of ``D`` descriptors, 16 bytes a slot
    (§2.7.5, §2.8.13). Each view is a dataclass of the bus, the size and the queue's three
    areas (§2.6) as its layout names them, and has its own ``slot_addr`` rule."""

    bus: GuestBus
    size: int
    _kind: type[D]

    if TYPE_CHECKING:

        def __init__(self, bus: GuestBus, size: int, desc_area: int, driver_area: int, device_area: int) -> None: ...
        def slot_addr(self, slot: int) -> int: ...

    @classmethod
    def at(cls, bus: GuestBus, config: QueueConfig) -> Self:
        """The rings a driver told a :class:`FakeTransport` about."""
        return cls(bus, config.size, config.desc, config.driver, config.device)

    def write_desc(self, slot: int, desc: D) -> None:
        self.bus.memwrite(self.slot_addr(slot), desc.pack())

    def read_desc(self, slot: int) -> D:
        return self._kind.unpack(self.bus.memread(self.slot_addr(slot), self._kind._STRUCT.size))

    def read_table(self) -> bytes:  # packed: the whole ring
        return self.bus.memread(self.slot_addr(0), self._kind._STRUCT.size * self.size)


@dataclass(frozen=True)
class SplitRing(_DescRing[SplitDesc]):
    """A split virtqueue's descriptor table, available and used rings at given addresses
    (§2.7.5, §2.7.6, §2.7.8), entry by entry. Ring positions are free-running indexes: they
    are taken modulo the size."""

    bus: GuestBus
    size: int
    desc: int
    avail: int
    used: int
    _kind = SplitDesc

    @classmethod
    def of(cls, vq: SplitVirtqueue) -> SplitRing:
        """The rings a set-up queue laid out, on its own bus."""
        return cls(vq.memory.qtest, vq.size, vq.desc, vq.avail, vq.used)

    # descriptor table: slots as the driver numbers them (not taken modulo the size)
    def slot_addr(self, slot: int) -> int:
        return self.desc + SPLIT_DESC.size * slot

    # available ring (driver area)
    def avail_flags(self) -> int:
        return self.bus.readw(self.avail + SPLIT_AVAIL.flags.offset)

    def set_avail_flags(self, flags: int) -> None:
        self.bus.writew(self.avail + SPLIT_AVAIL.flags.offset, flags)

    def avail_idx(self) -> int:
        return self.bus.readw(self.avail + SPLIT_AVAIL.idx.offset)

    def set_avail_idx(self, idx: int) -> None:
        self.bus.writew(self.avail + SPLIT_AVAIL.idx.offset, idx & 0xFFFF)

    def avail_entry(self, pos: int) -> int:
        return self.bus.readw(self.avail + SPLIT_AVAIL.size + 2 * (pos % self.size))

    def set_avail_entry(self, pos: int, head: int) -> None:
        self.bus.writew(self.avail + SPLIT_AVAIL.size + 2 * (pos % self.size), head)

    @property
    def used_event_addr(self) -> int:
        return self.avail + SPLIT_AVAIL.size + 2 * self.size

    def used_event(self) -> int:
        return self.bus.readw(self.used_event_addr)

    def set_used_event(self, idx: int) -> None:
        self.bus.writew(self.used_event_addr, idx & 0xFFFF)

    # used ring (device area)
    def used_flags(self) -> int:
        return self.bus.readw(self.used + SPLIT_USED.flags.offset)

    def set_used_flags(self, flags: int) -> None:
        self.bus.writew(self.used + SPLIT_USED.flags.offset, flags)

    def used_idx(self) -> int:
        return self.bus.readw(self.used + SPLIT_USED.idx.offset)

    def set_used_idx(self, idx: int) -> None:
        self.bus.writew(self.used + SPLIT_USED.idx.offset, idx & 0xFFFF)

    def used_entry(self, pos: int) -> tuple[int, int]:
        """(id, len) of the used element at ``pos``."""
        raw = self.bus.memread(self.used + SPLIT_USED.size + USED_ELEM.size * (pos % self.size), USED_ELEM.size)
        return _USED.unpack(raw)

    def set_used_entry(self, pos: int, used_id: int, length: int) -> None:
        self.bus.memwrite(self.used + SPLIT_USED.size + USED_ELEM.size * (pos % self.size), _USED.pack(used_id, length))

    def used_area(self) -> bytes:
        """flags, idx and every element: what a device writes."""
        return self.bus.memread(self.used, SPLIT_USED.size + USED_ELEM.size * self.size)

    @property
    def avail_event_addr(self) -> int:
        return self.used + SPLIT_USED.size + USED_ELEM.size * self.size

    def avail_event(self) -> int:
        return self.bus.readw(self.avail_event_addr)

    def set_avail_event(self, idx: int) -> None:
        self.bus.writew(self.avail_event_addr, idx & 0xFFFF)


@dataclass(frozen=True)
class PackedRing(_DescRing[PackedDesc]):
    """A packed virtqueue's descriptor ring and its two event suppression structures (§2.8.13,
    §2.8.14), slot by slot."""

    bus: GuestBus
    size: int
    ring: int
    driver_event: int
    device_event: int
    _kind = PackedDesc

    @classmethod
    def of(cls, vq: PackedVirtqueue) -> PackedRing:
        return cls(vq.memory.qtest, vq.size, vq.ring, vq.driver_event, vq.device_event)

    def slot_addr(self, slot: int) -> int:  # modulo the size: a free-running position works too
        return self.ring + PACKED_DESC.size * (slot % self.size)

    def flags(self, slot: int) -> int:
        return self.bus.readw(self.slot_addr(slot) + PACKED_DESC.flags.offset)

    def set_flags(self, slot: int, flags: int) -> None:
        self.bus.writew(self.slot_addr(slot) + PACKED_DESC.flags.offset, flags)

    read_ring = _DescRing.read_table

    def _event(self, addr: int) -> tuple[int, int]:
        raw = self.bus.readl(addr)
        return raw & 0xFFFF, raw >> 16

    def _set_event(self, addr: int, flags: int, off_wrap: int) -> None:
        self.bus.writel(addr, off_wrap | flags << 8 * EVENT_SUPPRESS.flags.offset)

    def driver_event_fields(self) -> tuple[int, int]:
        """(off_wrap, flags) of the driver event suppression structure: what the device reads."""
        return self._event(self.driver_event)

    def device_event_fields(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device event suppression structure: what the driver reads."""
        return self._event(self.device_event)

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        self._set_event(self.driver_event, flags, off_wrap)

    def set_device_event(self, flags: int, off_wrap: int = 0) -> None:
        self._set_event(self.device_event, flags, off_wrap)


def publish_by_hand(
    vq: SplitVirtqueue, head: int, descriptors: Mapping[int, SplitDesc], *, make_available: bool = True
) -> None:
    """Write descriptors and an avail entry for ``head`` at the queue's next position, after the
    library's queued writes; ``make_available`` moves avail.idx over it (and the queue's index
    with it, :meth:`SplitVirtqueue.published_by_hand`). The caller notifies the device itself."""
    vq.flush()
    ring = SplitRing.of(vq)
    for slot, desc in descriptors.items():
        ring.write_desc(slot, desc)
    ring.set_avail_entry(vq.avail_idx, head)
    if make_available:
        vq.published_by_hand()
        ring.set_avail_idx(vq.avail_idx)


def take_used_by_hand(vq: SplitVirtqueue) -> tuple[int, int] | None:
    """The next used element, (id, len), of a chain published by hand, or None if the device
    has used nothing new; the queue's ``last_used`` moves past it."""
    ring = SplitRing.of(vq)
    if ring.used_idx() == vq.last_used:
        return None
    entry = ring.used_entry(vq.last_used)
    vq.consumed_by_hand()
    return entry


# -- the device's side of a ring -------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """A chain as the device sees it: its id (split: head index; packed: buffer id), its
    buffers in order with indirect tables followed, the ring slots it took (packed: §2.8.6
    skips that many), and whether it went through an indirect table."""

    id: int
    bufs: tuple[Buf, ...]
    slots: int = 1
    indirect: bool = False

    @property
    def readable(self) -> list[Buf]:
        return [b for b in self.bufs if not b.writable]

    @property
    def writable(self) -> list[Buf]:
        return [b for b in self.bufs if b.writable]

    def read(self, bus: GuestBus) -> bytes:
        """The device-readable bytes, in chain order."""
        return b"".join(bus.memread(b.addr, b.length) for b in self.readable if b.length)

    def fill(self, bus: GuestBus, data: bytes) -> int:
        """Write ``data`` into the device-writable buffers in order; returns the bytes written
        (the used length a device reports, §2.7.8.2)."""
        done = 0
        for b in self.writable:
            piece = data[done : done + b.length]
            if not piece:
                break
            bus.memwrite(b.addr, piece)
            done += len(piece)
        return done


def _buf(addr: int, length: int, flags: int) -> Buf:
    return Buf(addr, length, writable=bool(flags & DESC_F.WRITE.mask))


class _DeviceSide(ABC):
    """What both device halves share: serving whatever the driver made available."""

    @abstractmethod
    def pop(self) -> Chain | None: ...

    @abstractmethod
    def _use(self, chain: Chain, length: int) -> None: ...

    def serve_all(self, length: int | None = None) -> list[Chain]:
        """Use every available chain, in ring order, each with ``length`` (default: all its
        writable bytes, without writing them): the device end of a unit test's round trip."""
        served = []
        while (chain := self.pop()) is not None:
            self._use(chain, sum(b.length for b in chain.writable) if length is None else length)
            served.append(chain)
        return served


class SplitDevice(_DeviceSide):
    """The device's half of a split ring (§2.7): available chains taken in ring order, used
    elements returned, notification decided from avail.flags or used_event (§2.7.7.2)."""

    def __init__(self, ring: SplitRing, *, event_idx: bool = False) -> None:
        self.ring = ring
        self.event_idx = event_idx
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0

    def pending(self) -> int:
        """Entries the driver made available that the device has not taken."""
        return (self.ring.avail_idx() - self.last_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next available chain, descriptors followed by ``next`` and indirect tables (§2.7.5.3)."""
        if not self.pending():
            return None
        head = self.ring.avail_entry(self.last_avail)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.ring.size:
            raise RingError(f"avail entry names descriptor {head}, outside the {self.ring.size} of the table")
        bufs: list[Buf] = []
        indirect = False
        slot, seen = head, 0
        while True:
            seen += 1
            if seen > self.ring.size:
                raise RingError(f"chain from {head} is longer than the table: a descriptor loop")
            desc = self.ring.read_desc(slot)
            if desc.flags & DESC_F.INDIRECT.mask:
                indirect = True
                bufs += self._indirect(desc)
            else:
                bufs.append(_buf(desc.addr, desc.len, desc.flags))
            if not desc.flags & DESC_F.NEXT.mask:
                return Chain(head, tuple(bufs), seen, indirect)
            slot = desc.next
            if slot >= self.ring.size:
                raise RingError(f"descriptor {desc} chains to {slot}, outside the table")

    def _indirect(self, desc: SplitDesc) -> list[Buf]:
        table = read_desc_table(self.ring.bus, desc.addr, desc.len, SplitDesc)
        bufs: list[Buf] = []
        i = 0
        for _ in table:
            entry = table[i]
            if entry.flags & DESC_F.INDIRECT.mask:
                raise RingError("an indirect table entry is itself INDIRECT (§2.7.5.3.1 forbids it)")
            bufs.append(_buf(entry.addr, entry.len, entry.flags))
            if not entry.flags & DESC_F.NEXT.mask:
                return bufs
            i = entry.next
            if i >= len(table):
                raise RingError(f"indirect entry chains to {i}, outside the table of {len(table)}")
        raise RingError("indirect table chain loops")

    def push(self, chain_id: int, length: int, *, covers: int = 1) -> None:
        """Return a used element; ``covers`` > 1 is an IN_ORDER batch: one entry, used.idx moved
        by the whole batch (§2.7.9)."""
        self.ring.set_used_entry(self.used_idx, chain_id, length)
        self.used_idx = (self.used_idx + covers) & 0xFFFF
        self.ring.set_used_idx(self.used_idx)

    def _use(self, chain: Chain, length: int) -> None:
        self.push(chain.id, length)

    def interrupt_due(self) -> bool:
        """Whether the driver asked to be told of the entries used since the last call."""
        old, self._signalled = self._signalled, self.used_idx
        if self.event_idx:
            return need_event(self.ring.used_event(), self.used_idx, old)
        return not self.ring.avail_flags() & AVAIL_F_NO_INTERRUPT

    def suppress_kicks(self, suppress: bool) -> None:
        """Without EVENT_IDX: set or clear used.flags NO_NOTIFY (§2.7.7)."""
        self.ring.set_used_flags(USED_F_NO_NOTIFY if suppress else 0)

    def kick_at(self, idx: int) -> None:
        """With EVENT_IDX: ask for a kick once avail.idx passes ``idx`` (avail_event, §2.7.10)."""
        self.ring.set_avail_event(idx)


class PackedDevice(_DeviceSide):
    """The device's half of a packed ring (§2.8): available descriptors recognised by their
    AVAIL/USED bits against the wrap counters, used descriptors written over the first slot of
    a chain and the chain's slots skipped, notification decided from the driver event
    structure (§2.8.10)."""

    def __init__(self, ring: PackedRing) -> None:
        self.ring = ring
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self._signalled = (0, 1)

    def _available(self, flags: int, wrap: int) -> bool:
        return bool(flags & PACKED_F.AVAIL.mask) == bool(wrap) and bool(flags & PACKED_F.USED.mask) != bool(wrap)

    def pop(self) -> Chain | None:
        """The next available chain (its buffer id read from the last descriptor, §2.8.6)."""
        slot, wrap = self.next_avail, self.avail_wrap
        if not self._available(self.ring.flags(slot), wrap):
            return None
        bufs: list[Buf] = []
        indirect = False
        for count in range(1, self.ring.size + 1):
            desc = self.ring.read_desc(slot)
            if not self._available(desc.flags, wrap):
                raise RingError(f"slot {slot} inside a chain is not available (flags {desc.flags:#x})")
            if desc.flags & PACKED_F.INDIRECT.mask:
                indirect = True
                table = read_desc_table(self.ring.bus, desc.addr, desc.len, PackedDesc)
                bufs += [_buf(e.addr, e.len, e.flags) for e in table]
            else:
                bufs.append(_buf(desc.addr, desc.len, desc.flags))
            slot += 1
            if slot == self.ring.size:
                slot, wrap = 0, wrap ^ 1
            if not desc.flags & PACKED_F.NEXT.mask:
                self.next_avail, self.avail_wrap = slot, wrap
                return Chain(desc.id, tuple(bufs), count, indirect)
        raise RingError(f"chain from slot {self.next_avail} is longer than the ring")

    def push(self, buffer_id: int, length: int, slots: int = 1) -> None:
        """A used descriptor at the next used slot, flags last (AVAIL = USED = used wrap
        counter, §2.8.1), then ``slots`` skipped (the chain's, or an IN_ORDER batch's, §2.8.8)."""
        at = self.ring.slot_addr(self.next_used)
        self.ring.bus.memwrite(at, PackedDesc(0, length, buffer_id, 0).pack()[: PACKED_DESC.flags.offset])
        used = PACKED_F.AVAIL.mask | PACKED_F.USED.mask if self.used_wrap else 0
        self.ring.set_flags(self.next_used, used | (PACKED_F.WRITE.mask if length else 0))
        self.next_used += slots
        while self.next_used >= self.ring.size:
            self.next_used -= self.ring.size
            self.used_wrap ^= 1

    def _use(self, chain: Chain, length: int) -> None:
        self.push(chain.id, length, chain.slots)

    def interrupt_due(self) -> bool:
        """Driver event suppression (§2.8.10): ENABLE, DISABLE, or DESC naming the used slot
        (and wrap) the driver wants to hear about."""
        (old, old_wrap), new, new_wrap = self._signalled, self.next_used, self.used_wrap
        self._signalled = (new, new_wrap)
        off_wrap, flags = self.ring.driver_event_fields()
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC:
            return True
        return packed_need_event(off_wrap, self.ring.size, (old, old_wrap), (new, new_wrap))

    def kick_at(self, slot: int, wrap: int) -> None:
        """Ask for a kick once the driver makes ``slot`` (in lap ``wrap``) available (DESC)."""
        self.ring.set_device_event(RING_EVENT_FLAGS_DESC, slot | wrap << EVENT_WRAP_BIT)

    def suppress_kicks(self, suppress: bool) -> None:
        self.ring.set_device_event(RING_EVENT_FLAGS_DISABLE if suppress else 0)


def available_flags(wrap: int, *, writable: bool = False, more: bool = False) -> int:
    """Flags of a packed descriptor made available in lap ``wrap``, for hand-built rings."""
    flags = packed_avail_flags(wrap)
    return flags | (PACKED_F.WRITE.mask if writable else 0) | (PACKED_F.NEXT.mask if more else 0)


# -- buffers ---------------------------------------------------------------------------------------


def pattern(n: int, seed: int = 0) -> bytes:
    """Recognisable bytes: no value repeats within 230 bytes, none is 0 or 0xEE (the usual fill)."""
    return bytes((seed + 7 * i) % 230 + 1 for i in range(n))


def alloc_bufs(
    memory: GuestMemory, sizes: Sequence[int], *, writable: bool = True, fill: int | None = None, tag: str = "test"
) -> list[Buf]:
    """One guest buffer per size, filled with ``fill`` when given (so bytes the device did not
    write show), device-writable unless ``writable=False``."""
    out = []
    for size in sizes:
        addr = memory.alloc(size, tag=tag)
        if fill is not None:
            memory.qtest.memset(addr, size, fill)
        out.append(Buf(addr, size, writable))
    return out


def free_bufs(memory: GuestMemory, bufs: Iterable[Buf]) -> None:
    for b in bufs:
        memory.free(b.addr)


@dataclass
class FakeGuest:
    """A fake bus, an allocator over it and a fake transport: what a queue is built on."""

    ram_bytes: int = 16 << 20
    legacy_layout: bool = False
    bus: FakeQtest = field(init=False)
    memory: GuestMemory = field(init=False)
    transport: FakeTransport = field(init=False)

    def __post_init__(self) -> None:
        self.bus = FakeQtest(self.ram_bytes)
        self.memory = GuestMemory(self.bus, self.ram_bytes)
        self.transport = FakeTransport(legacy_layout=self.legacy_layout)
