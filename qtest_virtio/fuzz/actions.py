"""The hostile driver's steps (:class:`Action`) and their wire form: each renders, against a
:class:`Target` (the device's register windows, its queue's ring addresses and the guest RAM
bounds), to raw qtest command lines.

Rendered commands are always well-formed (QEMU's qtest server asserts on malformed lines, and
that would be a harness bug): :func:`validate_command` is the check, the grammar's strict
``Command.parse`` (the lines the client itself writes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..devices.registry import FuzzRequest
from ..errors import MalformedCommand
from ..pci.config import CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT
from ..pci.regs import CONFIG_SPACE_SIZE, MSIX_ENTRY
from ..qtest import Command, Space, access
from ..transport.layout import COMMON_CFG, LEGACY_CFG, STATUS, VIRTIO_PCI_CFG_CAP
from ..virtqueue.layout import (
    DESC_F,
    PACKED_DESC,
    PACKED_F,
    SPLIT_AVAIL,
    SPLIT_DESC,
    SPLIT_USED,
    USED_ELEM,
    packed_avail_flags,
)

U16, U32, U64 = 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
#: A request's buffers: (length, device-writable, contents) each.
Request = FuzzRequest

# -- qtest command validation ------------------------------------------------------------------

#: The commands actions render; anything else in a rendering is a harness bug.
FUZZ_OPS = frozenset(
    {"writeb", "writew", "writel", "writeq", "outb", "outw", "outl"}
    | {"readb", "readw", "readl", "readq", "inb", "inw", "inl", "b64write", "endianness"}
)


def validate_command(cmd: str) -> None:
    """Raise :class:`MalformedCommand` (a ValueError) unless ``cmd`` is a line the client itself
    would write (the grammar's strict parse) and one of the ops actions render."""
    command = Command.parse(cmd)
    if command.name not in FUZZ_OPS:
        raise MalformedCommand(command.name, f"{cmd!r}: {command.name!r} is not an op the fuzzer renders")


# -- the target: where the device's registers and rings are ------------------------------------


@dataclass(frozen=True)
class Window:
    """A register window of the device: a modern capability's range or the legacy I/O BAR."""

    name: str
    io: bool
    base: int
    length: int

    def _where(self, offset: int) -> int:
        return (self.base + offset) & (U16 if self.io else U64)

    @property
    def space(self) -> Space:
        return Space.IO if self.io else Space.MEM

    def read(self, offset: int, width: int) -> str:
        """The access of ``width`` bytes (the widest there is beyond it: ports stop at 4)."""
        return access(self.space, width, write=False).build(self._where(offset)).encode()

    def write(self, offset: int, width: int, value: int) -> str:
        spec = access(self.space, width, write=True)
        return spec.build(self._where(offset), value & spec.arg("value").hi).encode()

    def rw(self, offset: int, width: int, value: int | None) -> str:
        """The read (``value`` None) or the write of ``value``."""
        return self.read(offset, width) if value is None else self.write(offset, width, value)


def _mem_write(addr: int, data: bytes) -> str:
    addr &= U64
    data = data[: U64 - addr + 1] or b"\0"
    if addr + len(data) - 1 > U64:
        addr = U64 - len(data) + 1
    return Command.build("b64write", addr, len(data), data).encode()


def _writew(addr: int, value: int) -> str:
    return Command.build("writew", addr & U64, value & U16).encode()


@dataclass(frozen=True)
class Target:
    """What an action renders against: the device's windows and its queue 0, RAM bounds, a
    zeroed scratch area for buffers and indirect tables, and the driver's avail index."""

    device: str
    mode: str
    legacy: bool
    windows: tuple[Window, ...]
    num_queues: int
    msix_table: int
    packed: bool
    queue_size: int
    #: split: descriptor table, avail ring, used ring; packed: ring, driver and device event areas.
    desc: int
    avail: int
    used: int
    ram_start: int
    ram_end: int
    scratch: int
    scratch_size: int
    notify_multiplier: int = 4
    #: The queue the actions aim at (its rings are desc/avail/used above).
    queue: int = 0
    #: Split: the avail index in guest memory; packed: the driver's next ring slot.
    avail_idx: int = 0
    #: Packed: the driver's wrap counter for ``avail_idx`` (AVAIL = wrap, USED = not wrap).
    wrap: int = 1
    #: A valid request for the queue: (length, writable, contents) per buffer.
    request: Request = ((64, True, b""),)
    #: The function's CF8/CFC address for offset 0 (bus/device/function, enable bit).
    config_address: int = 0
    #: Config-space offset of the VIRTIO_PCI_CAP_PCI_CFG capability, 0 without one.
    pci_cfg_cap: int = 0
    #: Guest-physical addresses of the MSI-X table and PBA, 0 without MSI-X.
    msix_table_addr: int = 0
    msix_pba_addr: int = 0

    def window(self, name: str) -> Window | None:
        return next((w for w in self.windows if w.name == name), None)

    @property
    def regs(self) -> tuple[Window, Any]:
        """The window and layout the mode drives: legacy BAR or modern common cfg."""
        w = self.window("legacy" if self.legacy else "common")
        assert w is not None, f"{self.mode}: no {'legacy' if self.legacy else 'common'} window"
        return w, LEGACY_CFG if self.legacy else COMMON_CFG

    def reg_write(self, name: str, value: int) -> str:
        w, layout = self.regs
        f = getattr(layout, name)
        return w.write(f.offset, f.width, value)

    def reg_read(self, name: str) -> str:
        w, layout = self.regs
        f = getattr(layout, name)
        return w.read(f.offset, f.width)

    def notify(self, queue: int) -> list[str]:
        if self.legacy:
            return [self.reg_write("queue_notify", queue)]
        w = self.window("notify")
        assert w is not None
        return [w.write((queue * self.notify_multiplier) % max(w.length, 1), 2, queue)]

    def table_addr(self) -> int:
        return self.scratch + self.scratch_size // 2

    def config(self, offset: int, width: int, value: int | None) -> list[str]:
        """A config-space access to the function through CF8/CFC, any width and alignment."""
        offset %= CONFIG_SPACE_SIZE
        address = Window("config-address", True, CONFIG_ADDRESS_PORT, 4)
        data = Window("config-data", True, CONFIG_DATA_PORT, 4)
        return [address.write(0, 4, self.config_address | (offset & 0xFC)), data.rw(offset & 3, width, value)]


# -- actions -----------------------------------------------------------------------------------

ADDR_KINDS = ("scratch", "ring", "table", "outside", "top", "low")


@dataclass(frozen=True)
class Addr:
    """A guest address by intent: in the scratch area, overlapping the ring, the indirect table,
    past the end of RAM, near 2**64 (so addr+len wraps) or in low memory."""

    kind: str
    offset: int

    def resolve(self, t: Target) -> int:
        if self.kind == "scratch":
            return t.scratch + self.offset % (t.scratch_size // 2)
        if self.kind == "ring":
            return t.desc + self.offset % (PACKED_DESC.size * t.queue_size)
        if self.kind == "table":
            return t.table_addr()
        if self.kind == "outside":
            return (t.ram_end + self.offset) & U64
        if self.kind == "top":
            return U64 - (self.offset & 0xFFFF)
        return self.offset & 0xFFFFF


def _pack_desc(packed: bool, addr: int, length: int, flags: int, link: int) -> bytes:
    """16 bytes of a descriptor: split (addr, len, flags, next) or packed (addr, len, id, flags);
    ``link`` is the next index or the buffer id."""
    return (
        PACKED_DESC.struct.pack(addr, length, link, flags)
        if packed
        else SPLIT_DESC.struct.pack(addr, length, flags, link)
    )


@dataclass(frozen=True)
class Desc:
    """One raw descriptor: split (addr, len, flags, next) or packed (addr, len, id, flags)."""

    slot: int
    addr: Addr
    length: int
    flags: int
    next: int

    def pack_split(self, t: Target) -> bytes:
        return _pack_desc(False, self.addr.resolve(t), self.length & U32, self.flags & U16, self.next & U16)

    def pack_packed(self, t: Target) -> bytes:
        return _pack_desc(True, self.addr.resolve(t), self.length & U32, self.flags & U16, self.next & U16)


class Action:
    """A hostile driver step. ``render`` returns the qtest lines; ``Valid`` is run by the driver."""

    def render(self, t: Target) -> list[str]:
        raise NotImplementedError

    #: False for an action that never rewrites device_status (memory, MSI-X, notifications).
    writes_status: ClassVar[bool] = True

    def may_write_status(self) -> bool:
        """Whether the action may rewrite device_status (a reset clears DEVICE_NEEDS_RESET, so
        the status read after it says nothing about an error the action caused before)."""
        return self.writes_status


class _Access(Action):
    """A register access of the fuzzed ``width``: a write of ``value`` or a read."""

    width: int
    write: bool
    value: int

    @property
    def written(self) -> int | None:
        """The value written, None for a read (what :meth:`Window.rw` and ``Target.config`` take)."""
        return self.value if self.write else None

    def may_write_status(self) -> bool:
        # a write only (PciConfig: a moved BAR makes the status read-back meaningless too)
        return self.write and self.writes_status


@dataclass(frozen=True)
class RegAccess(_Access):
    """Read or write of any width at any offset of a window, unaligned and just past its end."""

    window: int
    offset: int
    width: int
    write: bool
    value: int

    def render(self, t: Target) -> list[str]:
        w = t.windows[self.window % len(t.windows)]
        off = self.offset % (w.length + 16)
        return [w.rw(off, self.width, self.written)]


@dataclass(frozen=True)
class StatusWrites(Action):
    """Device status values in any order (reading back after each)."""

    values: tuple[int, ...]

    def render(self, t: Target) -> list[str]:
        out: list[str] = []
        for v in self.values:
            out += [t.reg_write("device_status", v), t.reg_read("device_status")]
        return out


@dataclass(frozen=True)
class QueueConfig(Action):
    """Select any queue (beyond num_queues too), write a size (0, not a power of two), maybe
    addresses, then maybe enable it (with addresses unset)."""

    queue: int
    size: int
    addrs: tuple[Addr, Addr, Addr] | None
    enable: bool

    def render(self, t: Target) -> list[str]:
        q = self.queue & U16
        out = [t.reg_write("queue_select", q)]
        if t.legacy:
            pfn = (self.addrs[0].resolve(t) >> 12) & U32 if self.addrs else 0
            out += [t.reg_read("queue_size"), t.reg_write("queue_address", pfn), t.reg_read("queue_address")]
            return out
        out.append(t.reg_write("queue_size", self.size))
        if self.addrs is not None:
            for name, a in zip(("queue_desc", "queue_driver", "queue_device"), self.addrs, strict=True):
                out.append(t.reg_write(name, a.resolve(t)))
        if self.enable:
            out.append(t.reg_write("queue_enable", 1))
        out += [t.reg_read("queue_enable"), t.reg_read("queue_size")]
        return out


@dataclass(frozen=True)
class MsixVector(Action):
    """Config or queue MSI-X vector numbers, beyond the table too (read back)."""

    queue: int | None
    vector: int

    def render(self, t: Target) -> list[str]:
        out = []
        if self.queue is not None:
            out.append(t.reg_write("queue_select", self.queue & U16))
            name = "queue_msix_vector"
        else:
            name = "config_msix_vector"
        return [*out, t.reg_write(name, self.vector), t.reg_read(name)]


@dataclass(frozen=True)
class Features(Action):
    """Driver feature words the device never offered (any select value), then FEATURES_OK."""

    low: int
    high: int
    select: int
    reset_first: bool

    def render(self, t: Target) -> list[str]:
        st = STATUS
        out: list[str] = []
        if self.reset_first:
            out += [t.reg_write("device_status", 0), t.reg_write("device_status", st.ACKNOWLEDGE.mask)]
            out.append(t.reg_write("device_status", st.ACKNOWLEDGE.mask | st.DRIVER.mask))
        if t.legacy:
            return [*out, t.reg_write("driver_features", self.low), t.reg_read("driver_features")]
        for sel, word in ((0, self.low), (1, self.high), (self.select, self.high ^ self.low)):
            out += [t.reg_write("driver_feature_select", sel), t.reg_write("driver_feature", word)]
        ok = st.ACKNOWLEDGE.mask | st.DRIVER.mask | st.FEATURES_OK.mask
        out += [t.reg_write("device_status", ok), t.reg_read("device_status")]
        out += [t.reg_write("device_feature_select", self.select), t.reg_read("device_feature")]
        return out


def _request_chain(
    t: Target, base_slot: int, request: Request | None = None, buffer_id: int | None = None
) -> tuple[list[str], int, list[int]]:
    """A request (the queue's valid one unless given) written into the scratch area and
    descriptor slots: (commands, head slot, slots). On a packed ring it is flagged available
    for the driver's current lap and carries ``buffer_id`` (default: the head slot)."""
    request = t.request if request is None else request
    cmds: list[str] = []
    addr = t.scratch
    slots = [(base_slot + i) % t.queue_size for i in range(len(request))]
    for i, (length, writable, data) in enumerate(request):
        if data:
            cmds.append(_mem_write(addr, data))
        last = i + 1 == len(request)
        if t.packed:
            wrap = t.wrap ^ (1 if base_slot + i >= t.queue_size else 0)
            flags = (0 if last else PACKED_F.NEXT.mask) | (PACKED_F.WRITE.mask if writable else 0)
            flags |= packed_avail_flags(wrap)
            desc = _pack_desc(True, addr, length, flags, slots[0] if buffer_id is None else buffer_id)
        else:
            flags = (0 if last else DESC_F.NEXT.mask) | (DESC_F.WRITE.mask if writable else 0)
            desc = _pack_desc(False, addr, length, flags, 0 if last else slots[i + 1])
        cmds.append(_mem_write(t.desc + SPLIT_DESC.size * slots[i], desc))
        addr += (length + 15) & ~15
    return cmds, slots[0], slots


def _publish(t: Target, head: int, jump: int) -> list[str]:
    """Split ring: the head in the avail ring, avail.idx moved by ``jump``."""
    if t.packed:
        return []
    new = (t.avail_idx + jump) & U16
    slot = t.avail + SPLIT_AVAIL.size + 2 * ((new - 1) % t.queue_size)
    return [_writew(slot, head), _writew(t.avail + SPLIT_AVAIL.idx.offset, new)]


@dataclass(frozen=True)
class ResetInFlight(Action):
    """Publish a valid request, notify, then reset the device (status 0) or the queue."""

    queue_reset: bool
    slot: int

    def render(self, t: Target) -> list[str]:
        cmds, head, _ = _request_chain(t, self.slot)
        cmds += _publish(t, head, 1) + t.notify(t.queue)
        if self.queue_reset and not t.legacy:
            cmds += [t.reg_write("queue_select", t.queue), t.reg_write("queue_reset", 1), t.reg_read("queue_reset")]
        else:
            cmds += [t.reg_write("device_status", 0), t.reg_read("device_status")]
        return cmds


@dataclass(frozen=True)
class DescChain(Action):
    """Raw descriptors (loops through next, next out of range, len 0 or near 2**32, addresses
    outside RAM or on the ring, INDIRECT with NEXT, nested or odd-sized indirect tables),
    published with an avail index jump and notified. On a packed ring the same descriptors
    go into ring slots with whatever AVAIL/USED bits (flipped wrap counters) they carry."""

    descs: tuple[Desc, ...]
    table: tuple[Desc, ...]
    head: int | None
    jump: int
    notify: bool

    writes_status = False

    def render(self, t: Target) -> list[str]:
        out: list[str] = []
        if self.table:
            table = b"".join(d.pack_packed(t) if t.packed else d.pack_split(t) for d in self.table)
            out.append(_mem_write(t.table_addr(), table))
        for d in self.descs:
            slot = d.slot % t.queue_size
            out.append(_mem_write(t.desc + SPLIT_DESC.size * slot, d.pack_packed(t) if t.packed else d.pack_split(t)))
        head = self.head if self.head is not None else (self.descs[0].slot % t.queue_size if self.descs else 0)
        out += _publish(t, head, self.jump)
        if self.notify:
            out += t.notify(t.queue)
        return out


@dataclass(frozen=True)
class LongChain(Action):
    """A chain longer than the queue without a loop: an indirect table of queue size + ``extra``
    linked descriptors (§2.7.5.3.1: a driver must not create one; QEMU takes an indirect one) or,
    direct, every slot of the ring chained in turn and the last pointing back at the head."""

    indirect: bool
    extra: int
    length: int

    writes_status = False

    def render(self, t: Target) -> list[str]:
        size = SPLIT_DESC.size  # a packed descriptor has the same 16 bytes
        if self.indirect:  # the table goes in the table half of the scratch area
            count = min(t.queue_size + self.extra, (t.scratch_size // 2) // size)
        else:
            count = t.queue_size
        avail = packed_avail_flags(t.wrap) if t.packed else 0
        flags_of = PACKED_F if t.packed else DESC_F
        descs = []
        for i in range(count):
            addr = t.scratch + (i * 16) % (t.scratch_size // 2)
            flags = flags_of.NEXT.mask if i + 1 < count or not self.indirect else 0
            link = 0 if t.packed else (i + 1) % count  # packed: the buffer id
            descs.append(_pack_desc(t.packed, addr, self.length & U32, flags | avail, link))
        # Split: the chain starts at slot 0; packed: where the device looks next.
        head = t.avail_idx % t.queue_size if t.packed else 0
        if self.indirect:
            table = _pack_desc(t.packed, t.table_addr(), count * size, flags_of.INDIRECT.mask | avail, 0)
            out = [_mem_write(t.table_addr(), b"".join(descs)), _mem_write(t.desc + size * head, table)]
        else:
            ring = b"".join(descs)
            out = [_mem_write(t.desc + size * head, ring[: size * (count - head)])]
            if head:
                out.append(_mem_write(t.desc, ring[size * (count - head) :]))
        return out + _publish(t, head, 1) + t.notify(t.queue)


@dataclass(frozen=True)
class IdReuse(Action):
    """The valid request made available ``copies`` times at once with one buffer id (packed)
    or one head (split): the device sees an id that is still in flight."""

    copies: int
    buffer_id: int

    writes_status = False

    def render(self, t: Target) -> list[str]:
        out: list[str] = []
        step = len(t.request)
        for c in range(self.copies):
            base = (t.avail_idx + c * step) if t.packed else 0
            cmds, head, _ = _request_chain(t, base, buffer_id=self.buffer_id % max(t.queue_size, 1))
            out += cmds if (t.packed or c == 0) else []
            out += _publish(replace(t, avail_idx=(t.avail_idx + c) & U16), head, 1)
        return out + t.notify(t.queue)


REQUEST_SHAPES = ("writable_first", "all_readable", "all_writable", "empty_buffers", "one_buffer")


@dataclass(frozen=True)
class MisshapenRequest(Action):
    """The queue's valid request with its buffers out of shape: device-writable buffers before
    the readable ones (virtio 1.2 §2.7.4.2: a driver MUST NOT), all one direction, zero-length
    buffers, or everything squeezed into one buffer; made available where the device looks next."""

    shape: str

    writes_status = False

    def render(self, t: Target) -> list[str]:
        req = list(t.request)
        if self.shape == "writable_first":
            req = [b for b in req if b[1]] + [b for b in req if not b[1]]
        elif self.shape == "all_readable":
            req = [(n, False, d) for n, _, d in req]
        elif self.shape == "all_writable":
            req = [(n, True, b"") for n, _, _ in req]
        elif self.shape == "empty_buffers":
            req = [(0, w, b"") for _, w, _ in req]
        else:
            req = [(sum(n for n, _, _ in req), False, b"".join(d.ljust(n, b"\0") for n, _, d in req))]
        base = t.avail_idx if t.packed else 0
        cmds, head, _ = _request_chain(t, base, tuple(req))
        return cmds + _publish(t, head, 1) + t.notify(t.queue)


@dataclass(frozen=True)
class PciConfig(_Access):
    """A config-space read or write of the function at any offset and width through CF8/CFC:
    command register, BARs, capabilities, MSI-X control; unaligned too (what a guest may do)."""

    offset: int
    width: int
    write: bool
    value: int

    def render(self, t: Target) -> list[str]:
        return t.config(self.offset, self.width, self.written)


@dataclass(frozen=True)
class PciCfgWindow(_Access):
    """The VIRTIO_PCI_CAP_PCI_CFG window (virtio 1.2 §4.1.4.9) with any bar, offset and length,
    then a pci_cfg_data access of any width: the device must bound the access itself."""

    bar: int
    offset: int
    length: int
    width: int
    write: bool
    value: int

    def render(self, t: Target) -> list[str]:
        if not t.pci_cfg_cap:
            return []
        cap = VIRTIO_PCI_CFG_CAP
        out = t.config(t.pci_cfg_cap + cap.bar.offset, cap.bar.width, self.bar)
        out += t.config(t.pci_cfg_cap + cap.offset.offset, cap.offset.width, self.offset)
        out += t.config(t.pci_cfg_cap + cap.length.offset, cap.length.width, self.length)
        data = t.pci_cfg_cap + cap.pci_cfg_data.offset
        return out + t.config(data, self.width, self.written)


@dataclass(frozen=True)
class MsixAccess(_Access):
    """MSI-X table or PBA access at any entry (past the table too), offset and width; the
    message then goes wherever the entry now points, a guest's own business (PCI 3.0 §6.8.2)."""

    pba: bool
    offset: int
    width: int
    write: bool
    value: int

    writes_status = False

    def render(self, t: Target) -> list[str]:
        base = t.msix_pba_addr if self.pba else t.msix_table_addr
        if not base:
            return []
        span = 8 * (t.msix_table + 2) if self.pba else MSIX_ENTRY.size * (t.msix_table + 2)
        w = Window("msix-pba" if self.pba else "msix-table", False, base, span)
        off = self.offset % span
        return [w.rw(off, self.width, self.written)]


EVENT_FIELDS = ("used_event", "avail_event", "avail_flags", "used_flags")


@dataclass(frozen=True)
class EventWrite(Action):
    """used_event/avail_event (split) or the event suppression areas (packed) set to anything."""

    field: str
    value: int
    notify: bool

    writes_status = False

    def render(self, t: Target) -> list[str]:
        n = t.queue_size
        if t.packed:
            addr = {"used_event": t.avail, "avail_flags": t.avail + 2, "avail_event": t.used}.get(
                self.field, t.used + 2
            )
        else:
            addr = {
                "used_event": t.avail + SPLIT_AVAIL.size + 2 * n,
                "avail_event": t.used + SPLIT_USED.size + USED_ELEM.size * n,
                "avail_flags": t.avail,
            }.get(self.field, t.used)
        return [_writew(addr, self.value)] + (t.notify(t.queue) if self.notify else [])


@dataclass(frozen=True)
class Notify(Action):
    """A notification for any queue number."""

    queue: int

    writes_status = False

    def render(self, t: Target) -> list[str]:
        return t.notify(self.queue & U16)


@dataclass(frozen=True)
class Valid(Action):
    """A valid request through the real driver (its commands are recorded like any other)."""

    writes_status = False

    def render(self, t: Target) -> list[str]:
        return []


#: A reproducer line (plain form) that replay honours between the commands, not a comment:
#: ``# qtest-virtio: migrate`` (:mod:`qtest_virtio.reproducer`, "Directives").
DIRECTIVE = "# qtest-virtio:"


@dataclass(frozen=True)
class Migrate(Action):
    """Live migration mid-sequence (issue 15): the machine moves to a fresh QEMU of the same
    binary and command line, so the source saves the hostile driver's device state
    (``virtio_save``) and the destination loads it (``virtio_load``); the actions after it go
    to the destination. Run by the engine; a reproducer holds it as :attr:`directive`."""

    writes_status = False
    #: The line a reproducer holds where the migration happened.
    directive: ClassVar[str] = f"{DIRECTIVE} migrate"

    def render(self, t: Target) -> list[str]:
        return []


@dataclass(frozen=True)
class Unplug(Action):
    """Hot-unplug mid-sequence (issue 15): QMP ``device_del`` of the device as the hostile
    driver left it (requests in flight, broken rings), the guest's part (the q35 slot powered
    off, the ACPI slot ejected on pc) and ``DEVICE_DELETED``: QEMU must free it
    (``virtio_device_unrealize``, ``virtio_pci_device_unplugged``). The actions after it poke
    where the device was; the recovery plugs it again. Run by the engine (``FuzzConfig.unplug``);
    a reproducer holds the QMP steps as directives (:data:`DEVICE_DEL`, :data:`DELETED`,
    :data:`DEVICE_ADD`) between the guest's qtest commands."""

    writes_status = False

    def render(self, t: Target) -> list[str]:
        return []


#: Directives the hot-unplug and the re-plug leave in a reproducer (followed by the device id,
#: or by the ``-device`` option for ``device_add``).
DEVICE_DEL = f"{DIRECTIVE} device_del"
DELETED = f"{DIRECTIVE} deleted"
DEVICE_ADD = f"{DIRECTIVE} device_add"
