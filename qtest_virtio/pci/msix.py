"""MSI-X: the capability, its table and PBA, and message mailboxes in guest RAM.

Under qtest there is no CPU to take an interrupt. Instead each vector's message address points
at a word of guest RAM (with bus mastering on, the device's MSI-X write is an ordinary DMA
write there), and the driver polls that word — the message data says which vector fired.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import QtestVirtioError
from ..memory import GuestMemory
from ..registers import Bits, RegisterBlock
from . import regs
from .bus import PciError, PciFunction

#: Data word of vector N's message: never zero, so a zero mailbox means "nothing arrived".
MESSAGE_DATA_BASE = 0x4D53_0000


class MsixTimeout(QtestVirtioError):
    """No MSI-X message arrived for a vector within the timeout."""


@dataclass(frozen=True)
class MsixCapability:
    """The MSI-X capability as decoded once (PCI 3.0 §6.8.2): where it sits in config space,
    the table size, and the BAR/offset of the vector table and of the Pending Bit Array.

    These are read-only to software; only Message Control's enable and mask bits change, so
    they are read live (:meth:`control`). This is the one decoder of the capability: ``Msix``,
    the virtio-pci map and ``probe`` all read it."""

    offset: int
    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @classmethod
    def find(cls, fn: PciFunction) -> MsixCapability | None:
        """The function's MSI-X capability, or None when it has none."""
        cap = fn.find_capability(regs.CAP_ID_MSIX)
        return None if cap is None else cls.at(fn, cap.offset)

    @classmethod
    def at(cls, fn: PciFunction, offset: int) -> MsixCapability:
        """Decode the MSI-X capability found at ``offset`` in ``fn``'s config space."""
        cap = regs.MSIX_CAP
        control, table, pba = fn.read_config_many(
            [(offset + f.offset, f.width) for f in (cap.message_control, cap.table, cap.pba)]
        )
        return cls(
            offset=offset,
            table_size=regs.MSIX_CONTROL.table_size.get(control) + 1,
            table_bar=regs.MSIX_BIR.get(table),
            table_offset=table & regs.MSIX_OFFSET_MASK,
            pba_bar=regs.MSIX_BIR.get(pba),
            pba_offset=pba & regs.MSIX_OFFSET_MASK,
        )

    @property
    def table_bytes(self) -> int:
        """Length of the vector table: one 16-byte entry per vector."""
        return self.table_size * regs.MSIX_ENTRY.size

    @property
    def pba_bytes(self) -> int:
        """Length of the PBA: one bit per vector, in whole QWORDs (PCI 3.0 §6.8.2.7)."""
        return (self.table_size + 63) // 64 * 8

    def registers(self, fn: PciFunction) -> RegisterBlock[regs.MsixCapLayout]:
        """The capability's registers in ``fn``'s config space, by name."""
        return _cap_registers(fn, self.offset)

    def control(self, fn: PciFunction) -> dict[str, int]:
        """Message Control decoded now (table_size, function_mask, enable)."""
        return regs.MSIX_CONTROL.decode(self.registers(fn).read(regs.MSIX_CAP.message_control))

    def enabled(self, fn: PciFunction) -> bool:
        return bool(self.control(fn)["enable"])


def _cap_registers(fn: PciFunction, offset: int) -> RegisterBlock[regs.MsixCapLayout]:
    return RegisterBlock(
        regs.MSIX_CAP,
        lambda off, w: fn.read_config(offset + off, w),
        lambda off, w, v: fn.write_config(offset + off, w, v),
    )


class Msix:
    """The MSI-X capability of one function (PCI 3.0 §6.8.2): control, table, PBA, mailboxes."""

    def __init__(self, fn: PciFunction) -> None:
        capability = MsixCapability.find(fn)
        if capability is None:
            raise PciError(f"{fn.bdf} has no MSI-X capability")
        self.fn = fn
        self.capability = capability
        self.offset = capability.offset
        self.cap = capability.registers(fn)
        self.table_size = capability.table_size
        self.table_bar = capability.table_bar
        self.table_offset = capability.table_offset
        self.pba_bar = capability.pba_bar
        self.pba_offset = capability.pba_offset
        self.mailboxes: dict[int, int] = {}

    # -- control --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.capability.enabled(self.fn)

    @property
    def function_masked(self) -> bool:
        return bool(regs.MSIX_CONTROL.function_mask.get(self.cap.read(regs.MSIX_CAP.message_control)))

    def _set_control(self, bits: Bits, on: bool) -> None:
        control = self.cap.read(regs.MSIX_CAP.message_control)
        self.cap.write(regs.MSIX_CAP.message_control, bits.set(control, 1 if on else 0))

    def enable(self, on: bool = True) -> None:
        self._set_control(regs.MSIX_CONTROL.enable, on)

    def mask_function(self, on: bool = True) -> None:
        self._set_control(regs.MSIX_CONTROL.function_mask, on)

    # -- table and PBA --------------------------------------------------------------------

    def _entry(self, vector: int) -> RegisterBlock[regs.MsixEntryLayout]:
        if not 0 <= vector < self.table_size:
            raise ValueError(f"{self.fn.bdf}: MSI-X vector {vector} is outside the table of {self.table_size}")
        base = self.table_offset + vector * regs.MSIX_ENTRY.size
        return RegisterBlock(
            regs.MSIX_ENTRY,
            lambda off, w: self.fn.bar_read(self.table_bar, base + off, w),
            lambda off, w, v: self.fn.bar_write(self.table_bar, base + off, w, v),
        )

    def set_vector(self, vector: int, address: int, data: int, *, masked: bool = False) -> None:
        entry = self._entry(vector)
        entry.write(regs.MSIX_ENTRY.message_address, address & 0xFFFF_FFFF)
        entry.write(regs.MSIX_ENTRY.message_upper_address, address >> 32)
        entry.write(regs.MSIX_ENTRY.message_data, data)
        entry.write(regs.MSIX_ENTRY.vector_control, regs.MSIX_VECTOR_MASKED if masked else 0)

    def read_vector(self, vector: int) -> dict[str, int]:
        return dict(self._entry(vector).dump())

    def mask_vector(self, vector: int, masked: bool = True) -> None:
        self._entry(vector).write(regs.MSIX_ENTRY.vector_control, regs.MSIX_VECTOR_MASKED if masked else 0)

    def pending(self, vector: int) -> bool:
        """The vector's Pending Bit Array bit: set while a message waits behind a mask."""
        if not 0 <= vector < self.table_size:
            raise ValueError(f"MSI-X vector {vector} is outside the table of {self.table_size}")
        word = self.fn.bar_read(self.pba_bar, self.pba_offset + (vector // 64) * 8, 8)
        return bool(word >> (vector % 64) & 1)

    # -- mailboxes in guest RAM -----------------------------------------------------------

    def route_to_ram(self, memory: GuestMemory, vectors: int | None = None) -> None:
        """Point vectors 0..n-1 at fresh zeroed words of guest RAM and enable MSI-X."""
        count = self.table_size if vectors is None else vectors
        region = memory.alloc(4 * count, align=64, tag=f"msix mailboxes {self.fn.bdf}", zero=True)
        self.mailboxes.update({v: region + 4 * v for v in range(count)})
        self._program_mailboxes(range(count))
        self.enable()

    def reprogram(self) -> None:
        """Write every mailbox vector's entry again, unmask the function and enable MSI-X: the
        table is guest-writable, so a driver re-programs it at initialization."""
        self._program_mailboxes(self.mailboxes)
        self.mask_function(False)
        self.enable()

    def _program_mailboxes(self, vectors: Iterable[int]) -> None:
        """Point each vector's table entry at its mailbox, with its own message data."""
        for vector in vectors:
            self.set_vector(vector, self.mailboxes[vector], MESSAGE_DATA_BASE + vector)

    def _mailbox(self, vector: int) -> int:
        try:
            return self.mailboxes[vector]
        except KeyError:
            raise ValueError(f"MSI-X vector {vector} has no mailbox; call route_to_ram() first") from None

    def fired(self, vector: int, *, clear: bool = True) -> bool:
        """Whether vector's message has landed since the last clear."""
        addr = self._mailbox(vector)
        value = self.fn.qtest.readl(addr)
        if value == 0:
            return False
        if value != MESSAGE_DATA_BASE + vector:
            raise PciError(f"{self.fn.bdf}: MSI-X mailbox of vector {vector} holds {value:#x}, not its message data")
        if clear:
            self.fn.qtest.writel(addr, 0)
        return True

    def wait(self, vector: int, timeout: float = 5.0) -> None:
        """Poll vector's mailbox until its message lands (then clear it), or raise MsixTimeout."""
        deadline = time.monotonic() + timeout
        while not self.fired(vector):
            if time.monotonic() > deadline:
                raise MsixTimeout(f"{self.fn.bdf}: no MSI-X message on vector {vector} within {timeout:g} s")
            time.sleep(0.0005)
