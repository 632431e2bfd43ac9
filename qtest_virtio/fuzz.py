"""Hostile-driver fuzzing of virtio-pci devices: property-based (hypothesis), with shrinking to a
``.qtest`` reproducer (issue 7).

A hostile driver is a list of :class:`Action` values. Each renders, against a :class:`Target`
(the device's register windows, its first queue's ring addresses and the guest RAM bounds), to
raw qtest command lines. The runner starts a fresh machine per example, brings the real driver
to DRIVER_OK, sends the actions' commands with ``send_raw`` and checks that QEMU

- is alive and printed no assertion or sanitizer text (``machine.CRASH_MARKERS``),
- answers a qtest round trip within a bound (else: hung),
- after a device reset (``driver.initialize()``), serves a valid request (else: unrecovered).

Where the spec says what a device must do but QEMU does otherwise (an error reported without
DEVICE_NEEDS_RESET, §2.1.2), the runner records an :class:`Observation` and does not fail.

Rendered commands are always well-formed (QEMU's qtest server asserts on malformed lines, and
that would be a harness bug): :func:`validate_command` is the check, mirroring ``QtestClient``.

hypothesis is imported inside functions only, so ``import qtest_virtio`` stays light.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import math
import os
import random
import re
import shlex
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import modes
from .backends import NetBackend, SerialBackend
from .deviations import Deviation, TableError, format_version
from .deviations import table as deviation_table
from .errors import QemuCrashed, QemuStartError, QtestTimeout, QtestVirtioError, ScenarioError
from .machine import MachineSpec, is_crash_marker
from .pci.config import CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, Cf8Access
from .pci.regs import CONFIG_SPACE_SIZE, MSIX_ENTRY
from .reproducer import DEFAULT_SETTLE, FUZZ_CHECK, settle
from .transport import LegacyTransport, ModernTransport
from .transport.layout import COMMON_CFG, LEGACY_CFG, STATUS, VIRTIO_PCI_CFG_CAP
from .virtqueue import PackedVirtqueue, SplitVirtqueue
from .virtqueue.layout import (
    DESC_F,
    PACKED_DESC,
    PACKED_F,
    SPLIT_AVAIL,
    SPLIT_DESC,
    SPLIT_USED,
    USED_ELEM,
    packed_avail_flags,
)
from .vm import Machine

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from .reproducer import ReplayResult, Reproducer

U16, U32, U64 = 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
DEVICE_ID = "fuzz0"
#: A request's buffers: (length, device-writable, contents) each.
Request = tuple[tuple[int, bool, bytes], ...]
RINGS = ("split", "packed")
#: Outcomes of one example; every one but "ok" is a failure.
OUTCOMES = ("ok", "crashed", "hung", "unrecovered")

# -- qtest command validation ------------------------------------------------------------------

_WIDTH_OPS = {
    "writeb": (U64, 0xFF),
    "writew": (U64, 0xFFFF),
    "writel": (U64, U32),
    "writeq": (U64, U64),
    "outb": (U16, 0xFF),
    "outw": (U16, 0xFFFF),
    "outl": (U16, U32),
}
_READ_OPS = {"readb": U64, "readw": U64, "readl": U64, "readq": U64, "inb": U16, "inw": U16, "inl": U16}
_INT_RE = re.compile(r"^0x[0-9a-f]+$")


def _num(cmd: str, word: str, limit: int) -> int:
    if not _INT_RE.match(word):
        raise ValueError(f"{cmd!r}: {word!r} is not a lower-case hex number")
    value = int(word, 16)
    if value > limit:
        raise ValueError(f"{cmd!r}: {word} is above {limit:#x}")
    return value


def validate_command(cmd: str) -> None:
    """Raise ValueError unless ``cmd`` is a qtest line QEMU's server parses without asserting:
    one line, single spaces, a known op with the right number of in-range hex arguments (the
    rules ``QtestClient`` applies to its typed methods)."""
    if not cmd or "\n" in cmd or "\r" in cmd or "  " in cmd or cmd != cmd.strip(" "):
        raise ValueError(f"malformed qtest command {cmd!r}: one line, single spaces")
    words = cmd.split(" ")
    op, args = words[0], words[1:]
    if op in _WIDTH_OPS:
        where, limit = _WIDTH_OPS[op]
        if len(args) != 2:
            raise ValueError(f"{cmd!r}: {op} takes an address and a value")
        _num(cmd, args[0], where)
        _num(cmd, args[1], limit)
    elif op in _READ_OPS:
        if len(args) != 1:
            raise ValueError(f"{cmd!r}: {op} takes one address")
        _num(cmd, args[0], _READ_OPS[op])
    elif op == "b64write":
        if len(args) != 3:
            raise ValueError(f"{cmd!r}: b64write takes address, size and data")
        addr, size = _num(cmd, args[0], U64), _num(cmd, args[1], U64)
        data = base64.b64decode(args[2], validate=True)
        if size == 0 or len(data) != size or addr + size - 1 > U64:
            raise ValueError(f"{cmd!r}: size {size} does not match {len(data)} bytes of data, or wraps")
    elif op == "endianness":
        if args:
            raise ValueError(f"{cmd!r}: endianness takes no argument")
    else:
        raise ValueError(f"{cmd!r}: {op!r} is not an op the fuzzer renders")


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

    def read(self, offset: int, width: int) -> str:
        if self.io:
            op = {1: "inb", 2: "inw"}.get(width, "inl")  # no 8-byte port access on x86
        else:
            op = {1: "readb", 2: "readw", 4: "readl"}.get(width, "readq")
        return f"{op} {self._where(offset):#x}"

    def write(self, offset: int, width: int, value: int) -> str:
        if self.io:
            op, w = {1: ("outb", 1), 2: ("outw", 2)}.get(width, ("outl", 4))
        else:
            op, w = {1: ("writeb", 1), 2: ("writew", 2), 4: ("writel", 4)}.get(width, ("writeq", 8))
        return f"{op} {self._where(offset):#x} {value & ((1 << (8 * w)) - 1):#x}"


def _mem_write(addr: int, data: bytes) -> str:
    addr &= U64
    data = data[: U64 - addr + 1] or b"\0"
    if addr + len(data) - 1 > U64:
        addr = U64 - len(data) + 1
    return f"b64write {addr:#x} {len(data):#x} {base64.b64encode(data).decode('ascii')}"


def _writew(addr: int, value: int) -> str:
    return f"writew {addr & U64:#x} {value & U16:#x}"


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
        access = data.read(offset & 3, width) if value is None else data.write(offset & 3, width, value)
        return [address.write(0, 4, self.config_address | (offset & 0xFC)), access]


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


_DESC = struct.Struct("<QIHH")


def _pack_desc(packed: bool, addr: int, length: int, flags: int, link: int) -> bytes:
    """16 bytes of a descriptor: split (addr, len, flags, next) or packed (addr, len, id, flags);
    ``link`` is the next index or the buffer id."""
    return _DESC.pack(addr, length, link, flags) if packed else _DESC.pack(addr, length, flags, link)


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

    def may_write_status(self) -> bool:
        """Whether the action may rewrite device_status (a reset clears DEVICE_NEEDS_RESET, so
        the status read after it says nothing about an error the action caused before)."""
        return True


@dataclass(frozen=True)
class RegAccess(Action):
    """Read or write of any width at any offset of a window, unaligned and just past its end."""

    window: int
    offset: int
    width: int
    write: bool
    value: int

    def may_write_status(self) -> bool:
        return self.write

    def render(self, t: Target) -> list[str]:
        w = t.windows[self.window % len(t.windows)]
        off = self.offset % (w.length + 16)
        return [w.write(off, self.width, self.value) if self.write else w.read(off, self.width)]


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

    def may_write_status(self) -> bool:
        return False

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

    def may_write_status(self) -> bool:
        return False

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

    def may_write_status(self) -> bool:
        return False

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

    def may_write_status(self) -> bool:
        return False

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
class PciConfig(Action):
    """A config-space read or write of the function at any offset and width through CF8/CFC:
    command register, BARs, capabilities, MSI-X control; unaligned too (what a guest may do)."""

    offset: int
    width: int
    write: bool
    value: int

    def may_write_status(self) -> bool:
        return self.write  # a moved BAR makes the status read-back meaningless

    def render(self, t: Target) -> list[str]:
        return t.config(self.offset, self.width, self.value if self.write else None)


@dataclass(frozen=True)
class PciCfgWindow(Action):
    """The VIRTIO_PCI_CAP_PCI_CFG window (virtio 1.2 §4.1.4.9) with any bar, offset and length,
    then a pci_cfg_data access of any width: the device must bound the access itself."""

    bar: int
    offset: int
    length: int
    width: int
    write: bool
    value: int

    def may_write_status(self) -> bool:
        return self.write

    def render(self, t: Target) -> list[str]:
        if not t.pci_cfg_cap:
            return []
        cap = VIRTIO_PCI_CFG_CAP
        out = t.config(t.pci_cfg_cap + cap["bar"].offset, cap["bar"].width, self.bar)
        out += t.config(t.pci_cfg_cap + cap["offset"].offset, cap["offset"].width, self.offset)
        out += t.config(t.pci_cfg_cap + cap["length"].offset, cap["length"].width, self.length)
        data = t.pci_cfg_cap + cap.pci_cfg_data.offset
        return out + t.config(data, self.width, self.value if self.write else None)


@dataclass(frozen=True)
class MsixAccess(Action):
    """MSI-X table or PBA access at any entry (past the table too), offset and width; the
    message then goes wherever the entry now points, a guest's own business (PCI 3.0 §6.8.2)."""

    pba: bool
    offset: int
    width: int
    write: bool
    value: int

    def may_write_status(self) -> bool:
        return False

    def render(self, t: Target) -> list[str]:
        base = t.msix_pba_addr if self.pba else t.msix_table_addr
        if not base:
            return []
        span = 8 * (t.msix_table + 2) if self.pba else MSIX_ENTRY.size * (t.msix_table + 2)
        w = Window("msix-pba" if self.pba else "msix-table", False, base, span)
        off = self.offset % span
        return [w.write(off, self.width, self.value) if self.write else w.read(off, self.width)]


EVENT_FIELDS = ("used_event", "avail_event", "avail_flags", "used_flags")


@dataclass(frozen=True)
class EventWrite(Action):
    """used_event/avail_event (split) or the event suppression areas (packed) set to anything."""

    field: str
    value: int
    notify: bool

    def may_write_status(self) -> bool:
        return False

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

    def may_write_status(self) -> bool:
        return False

    def render(self, t: Target) -> list[str]:
        return t.notify(self.queue & U16)


@dataclass(frozen=True)
class Valid(Action):
    """A valid request through the real driver (its commands are recorded like any other)."""

    def may_write_status(self) -> bool:
        return False

    def render(self, t: Target) -> list[str]:
        return []


# -- strategies --------------------------------------------------------------------------------


def actions_strategy(max_actions: int = 8) -> SearchStrategy[list[Action]]:
    """Lists of hostile actions. Values are abstract (indices taken modulo the target's
    windows and queue size), so one strategy serves every device, mode and ring."""
    from hypothesis import strategies as st

    def boundary(bits: int) -> SearchStrategy[int]:
        top = (1 << bits) - 1
        return st.one_of(st.sampled_from([0, 1, 2, 3, top, top - 1, 1 << (bits - 1)]), st.integers(0, top))

    addr = st.builds(Addr, st.sampled_from(ADDR_KINDS), st.integers(0, 0xFFFF))
    desc_flags = st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0x80, 0x81, 0x8000, 0x8080, 0x8082]), st.integers(0, U16)
    )
    length = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 48, 512, U32, U32 - 15, 1 << 31]), st.integers(0, U32))
    desc = st.builds(
        Desc,
        slot=st.integers(0, 1024),
        addr=addr,
        length=length,
        flags=desc_flags,
        next=st.one_of(st.integers(0, 1024), boundary(16)),
    )
    queue = st.one_of(st.integers(0, 4), boundary(16))
    queue_size = st.one_of(st.sampled_from([0, 1, 3, 5, 255, 256, 257, 1024, 0x8000, 0xFFFF]), boundary(16))
    status = st.one_of(st.sampled_from([0, 1, 3, 0xB, 0xF, 0x40, 0x80, 0xFF, 4, 8]), st.integers(0, 0xFF))
    actions: SearchStrategy[Action] = st.one_of(
        st.builds(
            RegAccess,
            window=st.integers(0, 7),
            offset=st.integers(0, 0x1100),
            width=st.sampled_from([1, 2, 4, 8]),
            write=st.booleans(),
            value=boundary(64),
        ),
        st.builds(StatusWrites, st.lists(status, min_size=1, max_size=4).map(tuple)),
        st.builds(
            QueueConfig,
            queue=queue,
            size=queue_size,
            addrs=st.none() | st.tuples(addr, addr, addr),
            enable=st.booleans(),
        ),
        st.builds(MsixVector, queue=st.none() | queue, vector=boundary(16)),
        st.builds(Features, low=boundary(32), high=boundary(32), select=boundary(32), reset_first=st.booleans()),
        st.builds(ResetInFlight, queue_reset=st.booleans(), slot=st.integers(0, 1024)),
        st.builds(
            DescChain,
            descs=st.lists(desc, min_size=1, max_size=6).map(tuple),
            table=st.lists(desc, max_size=4).map(tuple),
            head=st.none() | boundary(16),
            jump=st.one_of(st.sampled_from([1, 2, 0, 256, 257, 0x8000, U16]), st.integers(0, U16)),
            notify=st.just(True) | st.booleans(),
        ),
        st.builds(EventWrite, st.sampled_from(EVENT_FIELDS), boundary(16), st.booleans()),
        st.builds(Notify, queue),
        st.just(Valid()),
        st.builds(IdReuse, st.integers(2, 3), st.integers(0, 1024)),
        st.builds(LongChain, st.booleans(), st.sampled_from([1, 2, 64]), st.sampled_from([0, 1, 16, 512])),
        st.builds(MisshapenRequest, st.sampled_from(REQUEST_SHAPES)),
        st.builds(
            PciConfig,
            offset=st.one_of(st.integers(0, 0x3F), st.integers(0, CONFIG_SPACE_SIZE - 1)),
            width=st.sampled_from([1, 2, 4]),
            write=st.booleans(),
            value=boundary(32),
        ),
        st.builds(
            PciCfgWindow,
            bar=st.one_of(st.integers(0, 6), boundary(8)),
            offset=boundary(32),
            length=st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8]), boundary(32)),
            width=st.sampled_from([1, 2, 4]),
            write=st.booleans(),
            value=boundary(32),
        ),
        st.builds(
            MsixAccess,
            pba=st.booleans(),
            offset=st.integers(0, 0x1000),
            width=st.sampled_from([1, 2, 4, 8]),
            write=st.booleans(),
            value=boundary(64),
        ),
    )
    return st.lists(actions, min_size=1, max_size=max_actions)


# -- devices -----------------------------------------------------------------------------------


def _rng_check(vm: Machine, driver: Any, timeout: float) -> None:
    data = driver.read(16, timeout=timeout)
    if len(data) != 16:
        raise QtestVirtioError(f"virtio-rng returned {len(data)} bytes for 16")


def _blk_check(vm: Machine, driver: Any, timeout: float) -> None:
    data = driver.read(0, 1, timeout=timeout)
    if len(data) != 512:
        raise QtestVirtioError(f"virtio-blk read returned {len(data)} bytes for one sector")


_CHECK_FRAME = bytes.fromhex("020000000001020000000002") + b"\x88\xb5" + b"qtest-virtio fuzz check".ljust(46, b".")


def _net_check(vm: Machine, driver: Any, timeout: float) -> None:
    """A frame transmitted reaches the socket backend (earlier frames of the abuse skipped)."""
    host = vm.backend(DEVICE_ID)
    assert isinstance(host, NetBackend)
    while host.pending():  # the abuse's frames: a peer that never reads stalls the transmit path
        host.receive(timeout=timeout)
    driver.send(_CHECK_FRAME, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.receive(timeout=max(deadline - time.monotonic(), 0.01)) == _CHECK_FRAME:
            return
    raise QtestVirtioError("virtio-net: the transmitted check frame never reached the backend")


def _console_check(vm: Machine, driver: Any, timeout: float) -> None:
    """Bytes written to port 0 reach the chardev behind it."""
    backend = vm.backend(DEVICE_ID)
    assert isinstance(backend, SerialBackend)
    end = backend["console"]
    # The abuse's bytes first: a chardev whose peer never reads stays full (1-byte writes fill
    # a socket's buffer after a few hundred), and what the port is given then is not delivered.
    end.read_available(timeout=0.05)
    driver.write(b"qtest-virtio fuzz check\n", 0, timeout=timeout)
    seen = b""
    deadline = time.monotonic() + timeout
    while b"fuzz check" not in seen:
        if time.monotonic() > deadline:
            raise QtestVirtioError(f"virtio-console: port 0 bytes never reached the chardev (got {seen[-64:]!r})")
        seen += end.read_available(timeout=0.05)


def _scsi_check(vm: Machine, driver: Any, timeout: float) -> None:
    from .devices.scsi import InquiryData, cdb_inquiry

    result = driver.checked(cdb_inquiry(96), data_in_len=96, timeout=timeout)
    inquiry = InquiryData.parse(result.data)
    if not inquiry.vendor:
        raise QtestVirtioError(f"virtio-scsi INQUIRY came back empty: {inquiry!r}")


def _balloon_check(vm: Machine, driver: Any, timeout: float) -> None:
    driver.inflate(1, timeout=timeout)
    driver.deflate(1, timeout=timeout)


_NET_TX: Request = ((12 + len(_CHECK_FRAME), False, bytes(12) + _CHECK_FRAME),)
#: VIRTIO_NET_CTRL_RX / VIRTIO_NET_CTRL_RX_PROMISC on, then the ack byte (virtio 1.2 §5.1.6.5).
_NET_CTRL: Request = ((2, False, b"\x00\x00"), (1, False, b"\x01"), (1, True, b""))
#: VIRTIO_CONSOLE_PORT_READY for port 0 (virtio 1.2 §5.3.6.2).
_CONSOLE_CONTROL: Request = ((8, False, struct.pack("<IHH", 0, 3, 1)),)
#: TEST UNIT READY to target 0 LUN 0: virtio_scsi_req_cmd (cdb_size 32), then its response.
_SCSI_CMD: Request = ((51, False, bytes([1, 0, 0x40, 0]) + bytes(47)), (108, True, b""))
#: VIRTIO_SCSI_T_TMF / LOGICAL_UNIT_RESET, then the response byte (virtio 1.2 §5.6.6.2).
_SCSI_TMF: Request = ((24, False, struct.pack("<II", 0, 5) + bytes([1, 0, 0x40, 0]) + bytes(12)), (1, True, b""))


@dataclass(frozen=True)
class DeviceProfile:
    """A device the fuzzer knows: how to check it serves a valid request, and the queues it
    aims at, each with a valid request's buffers (length, device-writable, contents) that
    ResetInFlight, IdReuse and MisshapenRequest build on."""

    name: str
    check: Callable[[Machine, Any, float], None]
    queues: dict[int, Request]
    props: tuple[tuple[str, str], ...] = ()

    @property
    def default_queue(self) -> int:
        return next(iter(self.queues))


#: Devices, data-driven: add a profile to fuzz another device. The first queue is the default.
DEVICES: dict[str, DeviceProfile] = {
    "virtio-rng-pci": DeviceProfile("virtio-rng-pci", _rng_check, {0: ((64, True, b""),)}),
    "virtio-blk-pci": DeviceProfile(
        "virtio-blk-pci",
        _blk_check,
        {0: ((16, False, struct.pack("<IIQ", 0, 0, 0)), (512, True, b""), (1, True, b""))},
    ),
    "virtio-net-pci": DeviceProfile("virtio-net-pci", _net_check, {1: _NET_TX, 2: _NET_CTRL}),
    "virtio-serial-pci": DeviceProfile(
        "virtio-serial-pci", _console_check, {1: ((8, False, b"fuzzdata"),), 3: _CONSOLE_CONTROL}
    ),
    "virtio-scsi-pci": DeviceProfile("virtio-scsi-pci", _scsi_check, {2: _SCSI_CMD, 0: _SCSI_TMF}),
    "virtio-balloon-pci": DeviceProfile(
        "virtio-balloon-pci", _balloon_check, {0: ((4, False, bytes(4)),), 2: ((10, False, bytes(10)),)}
    ),
}


# -- the runner --------------------------------------------------------------------------------


#: Seconds an example's QEMU runs after the last hostile action before the check (replay's
#: default is 1 s). Shorter on purpose: each example pays it, and a second per example would
#: halve the examples a budget buys. Deferred work that kills QEMU later still shows: the
#: recovery that follows (device reset, initialization, a valid request) keeps QEMU running,
#: and a find is verified by replaying its reproducer with replay's full settle period.
FUZZ_SETTLE = 0.1


@dataclass(frozen=True)
class FuzzConfig:
    device: str
    mode: str
    ring: str = "split"
    qemu: str | None = None
    #: The queue the actions aim at; None: the profile's first.
    queue: int | None = None
    #: Seconds without a qtest reply that count as a hang.
    hang_timeout: float = 3.0
    #: Timeout of the driver's valid requests interleaved with the abuse (failures are observations).
    valid_timeout: float = 0.3

    @property
    def queue_index(self) -> int:
        return DEVICES[self.device].default_queue if self.queue is None else self.queue

    @property
    def name(self) -> str:
        """``device-mode-ring``, with ``-qN`` when the queue is not the profile's first."""
        default = DEVICES[self.device].default_queue
        return f"{self.device}-{self.mode}-{self.ring}" + ("" if self.queue_index == default else f"-q{self.queue}")


@dataclass(frozen=True)
class Observation:
    """Something QEMU did that the spec does not allow or that is worth knowing, not a failure."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class ExampleResult:
    config: FuzzConfig
    actions: list[Action]
    outcome: str = "ok"
    detail: str = ""
    commands: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    stderr_tail: str = ""
    returncode: int | None = None
    #: Index in ``commands`` of the first command of the recovery (reset and valid request).
    recovery_from: int | None = None

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"

    def summary(self) -> str:
        return f"{self.config.name}: {self.outcome}: {self.detail}"


class HarnessBug(Exception):
    """QEMU answered FAIL/ERR to a command the fuzzer rendered: the rendering is wrong."""


Hook = Callable[[Machine, Action], None]


def replay_args(command_line: str) -> list[str]:
    """A machine's command line (``Machine.command_line()``) as ``# qemu-args:`` for replay:
    without the binary, the accelerator, -S, the halt firmware and -qtest, which replay adds."""
    words = shlex.split(command_line)[1:]
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-accel", "-bios", "-qtest", "-qtest-log"):
            i += 2
            continue
        if w != "-S":
            out.append(w)
        i += 1
    return out


def make_target(vm: Machine, driver: Any, device: DeviceProfile, queue: int) -> Target:
    """The target of the driver's device: windows from its transport, the queue's rings, the
    function's config address, pci_cfg capability and MSI-X table, and a zeroed scratch area
    from the guest allocator."""
    tr = driver.transport
    fn = driver.fn
    windows: list[Window] = []

    def bar_window(name: str, index: int, offset: int, length: int) -> None:
        bar = fn.bar(index)
        if bar.address is not None:
            windows.append(Window(name, bar.is_io, bar.address + offset, max(length, 1)))

    mult = 4
    if isinstance(tr, ModernTransport):
        for name, cap in (("common", tr.common_cap), ("notify", tr.notify_cap), ("isr", tr.isr_cap)):
            bar_window(name, cap.bar, cap.offset, cap.length)
        if tr.device_cap is not None:
            bar_window("device", tr.device_cap.bar, tr.device_cap.offset, tr.device_cap.length)
        mult = tr.notify_cap.notify_off_multiplier
    legacy_bar = next((b for b in fn.bars if b.index == 0 and b.is_io), None)
    if legacy_bar is not None:
        bar_window("legacy", 0, 0, legacy_bar.size)
    if queue >= len(driver.queues):
        raise QtestVirtioError(f"{device.name}: queue {queue} is not set up (the driver has {len(driver.queues)})")
    vq = driver.queues[queue]
    if isinstance(vq, PackedVirtqueue):
        desc, avail, used = vq.ring, vq.driver_event, vq.device_event
    else:
        assert isinstance(vq, SplitVirtqueue)
        desc, avail, used = vq.desc, vq.avail, vq.used
    msix = driver.msix
    scratch_size = 0x10000
    scratch = vm.memory.alloc(scratch_size, 4096, tag="fuzz scratch", zero=True)
    return Target(
        device=device.name,
        mode=driver.mode,
        legacy=isinstance(tr, LegacyTransport),
        windows=tuple(windows),
        num_queues=len(driver.queues),
        msix_table=driver.msix.table_size if driver.msix is not None else 0,
        packed=isinstance(vq, PackedVirtqueue),
        queue_size=vq.size,
        desc=desc,
        avail=avail,
        used=used,
        ram_start=vm.memory.start,
        ram_end=vm.memory.end,
        scratch=scratch,
        scratch_size=scratch_size,
        notify_multiplier=mult,
        queue=queue,
        avail_idx=vq.next_avail if isinstance(vq, PackedVirtqueue) else 0,
        wrap=vq.avail_wrap if isinstance(vq, PackedVirtqueue) else 1,
        request=device.queues[queue],
        config_address=Cf8Access.address(fn.bdf_addr, 0),
        pci_cfg_cap=tr.pci_cfg_cap.cap_offset if isinstance(tr, ModernTransport) and tr.pci_cfg_cap else 0,
        msix_table_addr=_bar_addr(fn, msix.table_bar, msix.table_offset) if msix else 0,
        msix_pba_addr=_bar_addr(fn, msix.pba_bar, msix.pba_offset) if msix else 0,
    )


def _bar_addr(fn: Any, index: int, offset: int) -> int:
    address = fn.bar(index).address
    return 0 if address is None else int(address) + offset


def _normal(exc: BaseException | str) -> str:
    """A message with numbers and the transport's name taken out, so observations group."""
    text = str(exc).split("\n")[0]
    text = re.sub(r"^<[^>]*>: ", "", text)
    text = re.sub(r"0x[0-9a-f]+|\b\d+\b", "N", text)
    return text[:100]


def _observe_errors(vm: Machine, driver: Any, target: Target, action: Action, seen: int, out: list[Observation]) -> int:
    """Errors QEMU printed since line ``seen`` (virtio_error and friends), each with whether
    the device then shows DEVICE_NEEDS_RESET (§2.1.2: it should, in the modern layout)."""
    lines = vm.stderr_text().splitlines()
    new = [line for line in lines[seen:] if line.strip() and not is_crash_marker(line)]
    if new:
        needs_reset = bool(driver.transport.get_status() & STATUS.DEVICE_NEEDS_RESET.mask)
        for line in new:
            what = _normal(line.split(": ", 1)[-1] if line.startswith("qemu-system") else line)
            if target.legacy:
                kind = "error reported (legacy layout, no DEVICE_NEEDS_RESET there)"
            elif action.may_write_status():
                kind = "error reported (status rewritten by the same action: not checked)"
            elif needs_reset:
                kind = "error reported, DEVICE_NEEDS_RESET set"
            else:
                kind = "error reported WITHOUT DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2)"
            out.append(Observation(kind, what))
    return len(lines)


def _machine(config: FuzzConfig) -> Machine:
    """The machine an example runs on (and a checked replay rebuilds): the device alone."""
    device = DEVICES[config.device]
    spec = MachineSpec(qemu=config.qemu, command_timeout=config.hang_timeout)
    spec.add_virtio(
        device.name,
        dict(device.props),
        mode=config.mode,
        id=DEVICE_ID,
        packed="on" if config.ring == "packed" else "off",
    )
    return Machine(spec)


def run_example(config: FuzzConfig, actions: Sequence[Action], *, hook: Hook | None = None) -> ExampleResult:
    """One example on a fresh machine: initialize, abuse, check, reset, check a valid request."""
    device = DEVICES[config.device]
    result = ExampleResult(config, list(actions))
    vm = _machine(config)
    vm.start()  # QemuStartError: the caller's problem (cannot run here)
    sink = vm.qtest.record()
    recovery_at: int | None = None
    result.args = replay_args(vm.command_line())
    phase = "initialization"
    step = 0
    seen = 0
    try:
        driver = vm.virtio(DEVICE_ID)
        target = make_target(vm, driver, device, config.queue_index)
        phase = "abuse"
        for i, action in enumerate(actions, 1):
            step = i
            if hook is not None:
                hook(vm, action)
            if isinstance(action, Valid):
                try:
                    device.check(vm, driver, config.valid_timeout)
                except (QemuCrashed, QtestTimeout):
                    raise
                except QtestVirtioError as exc:
                    result.observations.append(Observation("valid request during abuse failed", _normal(exc)))
                seen = _observe_errors(vm, driver, target, action, seen, result.observations)
                continue
            if target.packed:
                vq = driver.queues[target.queue]
                target = replace(target, avail_idx=vq.next_avail, wrap=vq.avail_wrap)
            else:
                target = replace(target, avail_idx=vm.qtest.readw(target.avail + SPLIT_AVAIL.idx.offset))
            for cmd in action.render(target):
                reply = vm.qtest.send_raw(cmd)
                if not reply.startswith("OK"):
                    raise HarnessBug(f"{cmd!r} -> {reply!r} (action {action!r})")
            seen = _observe_errors(vm, driver, target, action, seen, result.observations)
        phase = "check"
        step = 0
        settle(vm, FUZZ_SETTLE)  # deferred work may kill QEMU after the last action
        phase = "recovery"
        recovery_at = sum(len(b) for b in sink)
        driver.fn.restore()  # BARs, decoding, bus master: what config-space abuse may have moved
        driver.initialize()
        try:
            device.check(vm, driver, 5.0)
        except (QemuCrashed, QtestTimeout):
            raise
        except QtestVirtioError as exc:
            result.outcome = "unrecovered"
            result.detail = f"after a device reset a valid request failed: {str(exc)[:200]}"
    except QemuCrashed as exc:
        result.outcome, result.detail = "crashed", exc.summary
    except QtestTimeout as exc:
        result.outcome = "hung"
        where = f"action {step}" if step else phase
        result.detail = f"no qtest reply within {config.hang_timeout:g} s during {where}: {exc}"
    except QtestVirtioError as exc:
        if phase != "abuse":
            raise
        # The driver's own read-back (e.g. of ring state) refused what it saw: not QEMU's crash.
        result.observations.append(Observation("driver error during abuse", _normal(exc)))
    finally:
        vm.shutdown(check=False)
        sent = b"".join(sink)
        result.commands = sent.decode("latin-1").splitlines()
        if recovery_at is not None:
            result.recovery_from = sent[:recovery_at].count(b"\n")
        result.stderr_tail = vm.stderr_tail(30)
        result.returncode = vm.returncode
    marker = vm.crash_marker()
    if vm.crash is not None and result.outcome in ("ok", "unrecovered"):
        result.outcome = "crashed"
        result.detail = marker or vm.crash.summary
    elif result.outcome == "crashed" and marker is not None:
        result.detail = marker  # the assertion text says more than "socket closed"
    return result


# -- hypothesis driving and reproducers --------------------------------------------------------


@dataclass
class FuzzReport:
    config: FuzzConfig
    seed: int
    examples: int = 0
    seconds: float = 0.0
    failure: ExampleResult | None = None
    observations: Counter[str] = field(default_factory=Counter)
    #: Shrinking ended at the run's deadline: ``failure`` is the smallest found by then.
    shrink_cut: bool = False
    #: QEMU runs after the first failure (hypothesis's replays and shrinking, then ours): what
    #: shrinking cost; 0 for a known failure, which is not shrunk again.
    shrink_runs: int = 0


class _Failed(Exception):
    pass


class FuzzInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`fuzz_target`; ``report`` holds what was found by then
    (``failure``: the smallest failing example so far, unshrunk or half shrunk)."""

    def __init__(self, report: FuzzReport) -> None:
        super().__init__("interrupted")
        self.report = report


_ASSERTION_RE = re.compile(r"([A-Za-z_]\w*): Assertion `(.*)' failed")


def signature(result: ExampleResult) -> str:
    """What makes two failures the same bug, for a campaign's de-duplication: a crash by its
    assertion (on any device: the assertions are in QEMU's shared virtio code) or by device and
    message, a hang by device and ring, the rest by outcome and message."""
    c = result.config
    if result.outcome == "hung":
        return f"{c.device} {c.ring}: hung"
    if result.outcome == "crashed":
        assertion = _ASSERTION_RE.search(result.detail)
        if assertion:  # file and line numbers change with the build; function and condition do not
            return f"crashed: {assertion.group(1)}: Assertion `{assertion.group(2)}' failed"
        return f"{c.device}: crashed: {_normal(result.detail)}"
    return f"{c.device} {c.ring}: {result.outcome}: {_normal(result.detail)}"


def _size(actions: Sequence[Action]) -> tuple[int, int]:
    return len(actions), len(repr(actions))


def fuzz_target(
    config: FuzzConfig,
    *,
    max_examples: int = 20,
    seed: int = 0,
    shrink_seconds: float = 120.0,
    max_actions: int = 8,
    hook: Hook | None = None,
    known: Container[str] = (),
    deadline: float | None = None,
) -> FuzzReport:
    """Run hypothesis on one (device, mode, ring); on failure, shrink and keep the smallest.

    A failure whose :func:`signature` is in ``known`` (found earlier in the campaign) is not
    shrunk. Shrinking stops costing QEMU starts after ``shrink_seconds``, or at ``deadline``
    (``time.monotonic()``; the run's whole budget): from then on only the smallest failing case
    found so far runs for real, so hypothesis ends with it. No new example starts QEMU after
    ``deadline``. An interrupt raises :class:`FuzzInterrupted` with what was found by then.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    report = FuzzReport(config, seed)
    failures: list[ExampleResult] = []
    first_failure: list[float] = []
    started = time.monotonic()

    @hypothesis_seed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # hypothesis ignores it in a seeded run; the kept record is the .qtest files
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        print_blob=False,
    )
    @given(actions_strategy(max_actions))
    def prop(actions: list[Action]) -> None:
        if failures and signature(failures[0]) in known:
            return  # a known bug: hypothesis's own replays and shrinking would only cost QEMU starts
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if not failures and out_of_time:
            return  # the budget is spent: the remaining examples cost nothing
        if failures and (out_of_time or time.monotonic() - first_failure[0] > shrink_seconds):
            report.shrink_cut = report.shrink_cut or out_of_time
            best = min(failures, key=lambda r: _size(r.actions))
            if actions != best.actions:
                return
        report.shrink_runs += bool(failures)
        result = run_example(config, actions, hook=hook)
        report.examples += 1
        report.observations.update(str(o) for o in result.observations)
        if result.failed:
            if not first_failure:
                first_failure.append(time.monotonic())
            failures.append(result)
            raise _Failed(result.summary())

    try:
        try:
            prop()
        except Exception:
            if not failures:
                raise
            # hypothesis replays the smallest case last; take the smallest in any case.
            best = min(reversed(failures), key=lambda r: _size(r.actions))
            report.failure = best
            end = time.monotonic() + (0.0 if signature(best) in known else shrink_seconds)
            report.failure = _delete_actions(best, hook, end if deadline is None else min(end, deadline), keep=report)
            if deadline is not None and time.monotonic() >= deadline and len(report.failure.actions) > 1:
                report.shrink_cut = True
    except KeyboardInterrupt:
        if failures and report.failure is None:
            report.failure = min(reversed(failures), key=lambda r: _size(r.actions))
        report.seconds = time.monotonic() - started
        raise FuzzInterrupted(report) from None
    report.seconds = time.monotonic() - started
    return report


def _delete_actions(
    best: ExampleResult, hook: Hook | None, deadline: float, *, keep: FuzzReport | None = None
) -> ExampleResult:
    """Drop actions one at a time while the failure stays the same kind: hypothesis's shrinker
    often keeps harmless actions in front of the one that matters. Each smaller failure is
    kept in ``keep.failure`` as soon as it is found, so an interrupt keeps the smallest."""
    changed = True
    while changed and len(best.actions) > 1 and time.monotonic() < deadline:
        changed = False
        for i in range(len(best.actions)):
            if time.monotonic() >= deadline:
                break
            candidate = best.actions[:i] + best.actions[i + 1 :]
            if keep is not None:
                keep.shrink_runs += 1
            result = run_example(best.config, candidate, hook=hook)
            if result.outcome == best.outcome:
                best, changed = result, True
                if keep is not None:
                    keep.failure = best
                break
    return best


def reproducer_text(result: ExampleResult, *, seed: int | None = None) -> str:
    """The plain ``.qtest`` form: ``# qemu-args:`` then every command QEMU received."""
    c = result.config
    commands = result.commands
    check: list[str] = []
    if result.outcome == "unrecovered" and result.recovery_from is not None:
        # QEMU lived: the failure is in the recovery, which replay re-runs from this header.
        commands = commands[: result.recovery_from]
        check = [f"# {FUZZ_CHECK} device={c.device} mode={c.mode} ring={c.ring} queue={c.queue_index}"]
    lines = [
        f"# qtest-virtio fuzz: {c.device} mode={c.mode} ring={c.ring}" + (f" seed={seed}" if seed is not None else ""),
        f"# outcome: {result.outcome}: {result.detail.splitlines()[0] if result.detail else ''}",
        f"{SIGNATURE_HEADER} {signature(result)}",
        "# hostile actions (after the driver's initialization to DRIVER_OK):",
        *(f"#   {a!r}" for a in result.actions),
        *check,
        f"# qemu-args: {shlex.join(result.args)}",
        *commands,
    ]
    return "\n".join(lines) + "\n"


SIGNATURE_HEADER = "# fuzz-signature:"


def known_signatures(
    directory: str, version: tuple[int, int, int], deviations: Mapping[str, Deviation] | None = None
) -> dict[str, str]:
    """Signatures of the known bugs in a reproducer directory -> path: the ``# fuzz-signature:``
    of each ``.qtest`` whose file stem is an entry of the deviation table that is live on
    ``version`` (verified there, or unverified in between; not fixed). A campaign or a smoke
    test passes them as ``known`` so a known bug is not reported anew."""
    table = deviations if deviations is not None else deviation_table()
    out: dict[str, str] = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".qtest"):
            continue
        entry = table.get(name[: -len(".qtest")])
        if entry is None or not entry.status(version).live:
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            comments = [line.strip().lstrip("# ") for line in f if line.startswith("#")]
        sig = _comment_value(comments, SIGNATURE_HEADER)
        if sig:
            out[sig] = path
    return out


def _comment_value(comments: Sequence[str], header: str) -> str | None:
    """The value of the first ``# name: value`` header among a reproducer's comments (their
    text without the ``#``, as ``Reproducer.comments`` holds them)."""
    prefix = header.lstrip("# ")
    return next((c[len(prefix) :].strip() for c in comments if c.startswith(prefix)), None)


def write_reproducer(result: ExampleResult, out_dir: str, *, seed: int | None = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    c = result.config
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = os.path.join(out_dir, f"{c.name}-{result.outcome}-{stamp}")
    path, n = f"{stem}.qtest", 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}.qtest"
    with open(path, "w", encoding="utf-8") as f:
        f.write(reproducer_text(result, seed=seed))
    return path


def replay_checked(
    rep: Reproducer,
    *,
    qemu: str | None,
    timeout: float,
    settle_s: float = DEFAULT_SETTLE,
    trace: bool = False,
    echo: object = None,
) -> ReplayResult:
    """Replay a reproducer whose ``# fuzz-check:`` header asks for the recovery check: the
    machine the header names, the commands, then a fresh driver (device reset, initialization)
    and the device's valid request. survived, crashed, hung or unrecovered."""
    from .binary import QemuBinary
    from .reproducer import ReplayResult, run_commands

    line = next(c for c in rep.comments if c.startswith(FUZZ_CHECK))
    fields = dict(word.partition("=")[::2] for word in line[len(FUZZ_CHECK) :].split())
    try:
        config = FuzzConfig(
            fields["device"],
            modes.check_mode(fields["mode"]),
            fields["ring"],
            QemuBinary.get(qemu).path,
            queue=int(fields["queue"]),
            hang_timeout=timeout,
        )
        device = DEVICES[config.device]
    except (KeyError, ValueError) as exc:
        raise ScenarioError(f"malformed '# {FUZZ_CHECK}' line ({exc}): {line}", path=rep.path) from None
    vm = _machine(config)
    try:
        vm.start()
    except QemuStartError as exc:
        return ReplayResult("cannot-run", str(exc).splitlines()[0], command_line=exc.command_line)
    result = ReplayResult("survived", command_line=vm.command_line())
    where = "the commands"
    try:
        vm.resume()  # as in the example: the driver's first step resumed the machine (QMP cont)
        run_commands(vm, rep, result, trace=trace, echo=echo)
        where = "the settle period"
        settle(vm, settle_s)
        where = "the recovery"
        try:
            driver = vm.virtio(DEVICE_ID)  # enumeration re-assigns the BARs; initialization resets
            device.check(vm, driver, 5.0)
            result.detail = f"{result.commands_run} commands, then a device reset and a valid request: served"
        except (QemuCrashed, QtestTimeout):
            raise
        except QtestVirtioError as exc:
            result.outcome = "unrecovered"
            result.detail = f"after a device reset a valid request failed: {str(exc)[:200]}"
    except QemuCrashed as exc:
        result.outcome, result.detail = "crashed", exc.summary
    except QtestTimeout as exc:
        result.outcome, result.detail = "hung", f"no reply within {timeout:g} s during {where}: {exc}"
    finally:
        vm.shutdown(check=False)
    result.returncode = vm.returncode
    result.stderr_tail = vm.stderr_tail(30)
    if vm.crash is not None and result.outcome != "hung":
        result.outcome, result.signal = "crashed", vm.crash.signal
        result.detail = vm.crash_marker() or vm.crash.summary
    return result


def verify_reproducer(path: str, *, qemu: str | None, timeout: float) -> ReplayResult:
    """Replay the written file as ``qtest-virtio replay`` would."""
    from .reproducer import load, replay

    return replay(load(path), qemu=qemu, timeout=timeout)


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", action="append", default=[], metavar="NAME", help=f"device to fuzz (default: {', '.join(DEVICES)})"
    )
    parser.add_argument(
        "--transport", action="append", default=[], metavar="MODE", help="transport mode (default: all four)"
    )
    parser.add_argument("--ring", action="append", default=[], choices=RINGS, help="ring layout (default: both)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="time budget of the whole run, shrinking included (default 60; a shrink still running then keeps "
        "the smallest reproducer found so far)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, metavar="N", help="stop after N rounds (e.g. 1), or at --seconds if sooner"
    )
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    parser.add_argument(
        "--out", default="fuzz-out", metavar="DIR", help="where reproducers go (earlier ones there are replayed first)"
    )
    parser.add_argument("--qemu", default=None, help="QEMU binary (default: $QEMU or qemu-system-x86_64)")
    parser.add_argument("--hang-timeout", type=float, default=3.0, help="seconds without a qtest reply = hang")
    parser.add_argument("--examples", type=int, default=25, help="examples per target per round")
    parser.add_argument(
        "--shrink-seconds", type=float, default=120.0, help="time spent shrinking a new find (default 120)"
    )
    parser.add_argument(
        "--known",
        metavar="DIR",
        default=None,
        help="reproducers of known bugs (e.g. scenarios/reproducers): a find is known when its reproducer's "
        "deviation-table entry is live on this QEMU's version",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="after a find, write its reproducer and go on until the budget is spent (finds de-duplicated)",
    )


def _bad_numbers(args: argparse.Namespace) -> str | None:
    """The first numeric option out of range, as a one-line reason (argparse takes -1, nan, inf)."""
    one_round = "a positive number of seconds (for exactly one round: --rounds 1)"
    checks: tuple[tuple[str, float | None, bool, str], ...] = (
        ("--seconds", args.seconds, args.seconds > 0, one_round),
        ("--shrink-seconds", args.shrink_seconds, args.shrink_seconds >= 0, "0 or more seconds"),
        ("--hang-timeout", args.hang_timeout, args.hang_timeout > 0, "a positive number of seconds"),
        ("--examples", args.examples, args.examples >= 1, "1 or more"),
        ("--rounds", args.rounds, args.rounds is None or args.rounds >= 1, "1 or more"),
    )
    for option, value, ok, wanted in checks:
        if not ok or (value is not None and not math.isfinite(value)):
            return f"{option} {value:g}: must be {wanted}"
    return None


def run_fuzz(args: argparse.Namespace) -> int:
    """``qtest-virtio fuzz``: 0 nothing found, 1 a failure found and written, 125 cannot run,
    128 a usage error or an interrupt (what was found by then is written and listed)."""
    from .binary import QemuBinary, QemuNotFound

    bad = _bad_numbers(args)
    if bad:
        print(f"qtest-virtio fuzz: {bad}", file=sys.stderr)
        return 128

    try:
        import hypothesis  # noqa: F401
    except ImportError:
        print(
            "qtest-virtio fuzz: needs hypothesis: pip install 'qtest-virtio[fuzz]' (or pip install hypothesis)",
            file=sys.stderr,
        )
        return 125
    devices = args.device or list(DEVICES)
    for d in devices:
        if d not in DEVICES:
            print(f"qtest-virtio fuzz: no fuzz profile for {d!r}; known: {', '.join(DEVICES)}", file=sys.stderr)
            return 128
    try:
        transports = [modes.check_mode(m) for m in (args.transport or modes.ALL_MODES)]
    except ValueError as exc:
        print(f"qtest-virtio fuzz: {exc}", file=sys.stderr)
        return 128
    rings = args.ring or list(RINGS)
    try:
        binary = QemuBinary.get(args.qemu)
        qemu = binary.path
    except QemuNotFound as exc:
        print(f"qtest-virtio fuzz: {exc}", file=sys.stderr)
        return 125
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    earlier = sorted(glob.glob(os.path.join(args.out, "*.qtest")))
    print(
        f"seed {seed}; finds kept in {os.path.abspath(args.out)} ({len(earlier)} from earlier runs, replayed first)",
        flush=True,
    )
    # The legacy layout has no packed rings: those targets would repeat the split ones.
    targets = [
        FuzzConfig(d, m, r, qemu, queue=q, hang_timeout=args.hang_timeout)
        for d in devices
        for q in DEVICES[d].queues
        for m in transports
        for r in rings
        if not (r == "packed" and modes.USES_LEGACY_LAYOUT[m])
    ]
    deadline = time.monotonic() + args.seconds
    observations: Counter[str] = Counter()
    try:
        known = known_signatures(args.known, binary.version) if args.known else {}
    except TableError as exc:
        print(f"qtest-virtio fuzz: {exc}", file=sys.stderr)
        return 128
    if args.known and not known:
        print(
            f"qtest-virtio fuzz: --known {args.known}: no reproducer there is a deviation-table entry live on "
            f"QEMU {format_version(binary.version)} with '{SIGNATURE_HEADER}'"
        )
    found: dict[str, str] = dict(known)
    total = 0
    rounds = 0
    still: list[str] = []
    try:
        still = _replay_earlier(earlier, found, qemu, args.hang_timeout)
        while True:
            for config in targets:
                if time.monotonic() >= deadline:
                    break
                try:
                    report = fuzz_target(
                        config,
                        max_examples=args.examples,
                        seed=seed + rounds,
                        known=found,
                        shrink_seconds=args.shrink_seconds,
                        deadline=deadline,
                    )
                except QemuStartError as exc:
                    print(f"{config.name}: cannot run here: {str(exc).splitlines()[0]}", file=sys.stderr)
                    return 125
                except FuzzInterrupted as exc:
                    total += exc.report.examples
                    observations.update(exc.report.observations)
                    _keep_interrupted(exc.report, args, found, seed + rounds)
                    raise
                total += report.examples
                observations.update(report.observations)
                print(
                    f"{config.name}: {report.examples} examples in {report.seconds:.1f} s "
                    f"(round {rounds}, seed {seed + rounds})",
                    flush=True,
                )
                if report.failure is not None:
                    sig = signature(report.failure)
                    if sig in found:
                        print(f"  {'known' if sig in known else 'again'}: {sig} (as {found[sig]})", flush=True)
                        continue
                    _report_failure(report, args, qemu, seed + rounds, found)
                    if not args.keep_going:
                        return 1
            rounds += 1
            if time.monotonic() >= deadline or (args.rounds is not None and rounds >= args.rounds):
                break
    except KeyboardInterrupt:
        new = {sig: path for sig, path in found.items() if sig not in known and path not in earlier}
        print(f"interrupted: {total} examples, seed {seed}; kept {len(new)} new find(s) in {os.path.abspath(args.out)}")
        for sig, path in new.items():
            print(f"  {sig}: {path}")
        sys.stdout.flush()
        print("qtest-virtio fuzz: interrupted, exit 128 (aborts a git bisect run)", file=sys.stderr)
        return 128
    new = {sig: path for sig, path in found.items() if sig not in known and path not in earlier}
    verdict = f"{len(new)} distinct new find(s)" if new else "nothing new found"
    if still:
        verdict += f", {len(still)} earlier find(s) still failing"
    print(f"{verdict}: {total} examples in {rounds} round(s), seed {seed}")
    for sig, path in new.items():
        print(f"  {sig}: {path}")
    for text, n in observations.most_common():
        print(f"  observed {n}x: {text}")
    return 1 if new or still else 0


def _keep_interrupted(report: FuzzReport, args: argparse.Namespace, found: dict[str, str], seed: int) -> None:
    """Write the failure an interrupted target had found (the smallest by then), unreplayed."""
    failure = report.failure
    if failure is None or signature(failure) in found:
        return
    path = write_reproducer(failure, args.out, seed=seed)
    found[signature(failure)] = path
    print(f"FOUND {failure.summary()}")
    print(f"  interrupted while shrinking: kept the smallest so far, {len(failure.actions)} action(s): {path}")


def _replay_earlier(paths: list[str], found: dict[str, str], qemu: str, timeout: float) -> list[str]:
    """Replay the finds an earlier run left in the output directory (what hypothesis's example
    database would do, which a seeded run does not use): the ones that still fail are not new
    when found again. Returns those paths."""
    from .reproducer import load

    still: list[str] = []
    for path in paths:
        try:
            rep = load(path)
            verdict = verify_reproducer(path, qemu=qemu, timeout=timeout)
        except QtestVirtioError as exc:
            print(f"  earlier find {os.path.basename(path)}: cannot replay: {str(exc).splitlines()[0]}")
            continue
        print(f"  earlier find {os.path.basename(path)}: {verdict.outcome}", flush=True)
        if verdict.exit_code == 1:  # crashed, hung or unrecovered
            still.append(path)
            sig = _comment_value(rep.comments, SIGNATURE_HEADER)
            if sig:
                found.setdefault(sig, path)
    return still


def _report_failure(report: FuzzReport, args: argparse.Namespace, qemu: str, seed: int, found: dict[str, str]) -> str:
    """Write the find, record it in ``found`` (before the replay, which an interrupt may cut
    short), say what it is and replay the file as ``replay`` would."""
    failure = report.failure
    assert failure is not None
    path = write_reproducer(failure, args.out, seed=seed)
    found[signature(failure)] = path
    print(f"FOUND {failure.summary()}")
    cut = " (the budget ran out while shrinking: the smallest so far)" if report.shrink_cut else ""
    print(f"  shrunk to {len(failure.actions)} action(s), {len(failure.commands)} qtest commands{cut}: {path}")
    with contextlib.suppress(QtestVirtioError):
        verdict = verify_reproducer(path, qemu=qemu, timeout=args.hang_timeout)
        print(f"  replay: {verdict.outcome}: {verdict.detail}")
    sys.stdout.flush()
    return path
