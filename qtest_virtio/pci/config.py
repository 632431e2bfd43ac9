"""Configuration-space access: legacy CF8/CFC ports, and ECAM (MMCONFIG) on q35.

Both implement :class:`ConfigAccess`; the bus layer does not care which it uses, and the
tests read the same registers both ways to prove they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..qtest import Command, QtestClient
from . import regs

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_ENABLE = 0x8000_0000


@dataclass(frozen=True, order=True)
class Bdf:
    """Bus/device/function address of a PCI function; prints as ``00:04.0``."""

    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        if not (0 <= self.bus <= 0xFF and 0 <= self.device <= 0x1F and 0 <= self.function <= 7):
            raise ValueError(f"invalid PCI address {self.bus}:{self.device}.{self.function}")

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function:x}"

    @classmethod
    def parse(cls, text: str) -> Bdf:
        """'00:04.0' (or '0000:00:04.0')."""
        try:
            parts = text.split(":")
            if len(parts) == 3:
                parts = parts[1:]
            bus, rest = parts
            dev, fn = rest.split(".")
            return cls(int(bus, 16), int(dev, 16), int(fn, 16))
        except ValueError:
            raise ValueError(f"{text!r} is not a PCI address like 00:04.0") from None


def port_read(qtest: QtestClient, port: int, width: int) -> int:
    """An I/O port read of 1, 2 or 4 bytes (x86 ports stop at 4: callers split wider ones)."""
    return {1: qtest.inb, 2: qtest.inw, 4: qtest.inl}[width](port)


def port_write(qtest: QtestClient, port: int, width: int, value: int) -> None:
    {1: qtest.outb, 2: qtest.outw, 4: qtest.outl}[width](port, value)


def mmio_read(qtest: QtestClient, addr: int, width: int) -> int:
    """A little-endian memory read of 1, 2, 4 or 8 bytes."""
    return {1: qtest.readb, 2: qtest.readw, 4: qtest.readl, 8: qtest.readq}[width](addr)


def mmio_write(qtest: QtestClient, addr: int, width: int, value: int) -> None:
    {1: qtest.writeb, 2: qtest.writew, 4: qtest.writel, 8: qtest.writeq}[width](addr, value)


#: The qtest command of a read or write of each width, memory and port I/O.
MMIO_READ = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}
_WRITE = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}
PORT_READ = {1: "inb", 2: "inw", 4: "inl"}
_OUT = {1: "outb", 2: "outw", 4: "outl"}


@dataclass(frozen=True)
class ConfigOp:
    """One config access of an :meth:`ConfigAccess.run` batch: a read when ``value`` is None."""

    bdf: Bdf
    offset: int
    width: int
    value: int | None = None


def _run(qtest: QtestClient, commands: list[Command], reads: list[int]) -> list[int]:
    """Send ``commands`` in one exchange; decode the replies at positions ``reads``."""
    replies = qtest.run_many(commands)
    return [commands[i].reply_int(replies[i]) for i in reads]


def _plan(
    ops: Sequence[ConfigOp],
    size: int,
    read: Callable[[ConfigOp], list[Command]],
    write: Callable[[ConfigOp, int], list[Command]],
) -> tuple[list[Command], list[int]]:
    """The commands of ``ops`` (each read's last command is the one whose reply is the value)
    and the positions of those replies."""
    commands: list[Command] = []
    reads: list[int] = []
    for op in ops:
        _check_access(op.offset, op.width, size)
        if op.value is None:
            commands += read(op)
            reads.append(len(commands) - 1)
        else:
            commands += write(op, op.value)
    return commands, reads


def _check_access(offset: int, width: int, limit: int) -> None:
    if width not in (1, 2, 4):
        raise ValueError(f"config access width {width} is not 1, 2 or 4")
    if offset < 0 or offset + width > limit:
        raise ValueError(f"config offset {offset:#x}+{width} is outside 0..{limit:#x}")
    if offset % width:
        raise ValueError(f"config offset {offset:#x} is not aligned to its width {width}")


class ConfigAccess(Protocol):
    """Reads and writes a function's configuration space."""

    #: Bytes of config space reachable (256 for CF8/CFC, 4096 for ECAM).
    size: int
    name: str

    def read(self, bdf: Bdf, offset: int, width: int) -> int: ...

    def write(self, bdf: Bdf, offset: int, width: int, value: int) -> None: ...

    def run(self, ops: Sequence[ConfigOp]) -> list[int]:
        """The accesses in order, in one exchange (the same commands as one by one); returns
        the values read."""
        ...

    def plan(self, ops: Sequence[ConfigOp]) -> tuple[list[Command], list[int]]:
        """The commands of ``ops`` and the positions of the reads among them."""
        ...


class Cf8Access:
    """Configuration mechanism #1 (PCI 3.0 §3.2.2.3.2): address to 0xCF8, data at 0xCFC+(reg&3)."""

    size = regs.CONFIG_SPACE_SIZE
    name = "CF8/CFC"

    def __init__(self, qtest: QtestClient) -> None:
        self.qtest = qtest

    @staticmethod
    def address(bdf: Bdf, offset: int) -> int:
        return CONFIG_ENABLE | bdf.bus << 16 | bdf.device << 11 | bdf.function << 8 | (offset & 0xFC)

    def read(self, bdf: Bdf, offset: int, width: int) -> int:
        _check_access(offset, width, self.size)
        self.qtest.outl(CONFIG_ADDRESS_PORT, self.address(bdf, offset))
        return port_read(self.qtest, CONFIG_DATA_PORT + (offset & 3), width)

    def write(self, bdf: Bdf, offset: int, width: int, value: int) -> None:
        _check_access(offset, width, self.size)
        self.qtest.outl(CONFIG_ADDRESS_PORT, self.address(bdf, offset))
        port_write(self.qtest, CONFIG_DATA_PORT + (offset & 3), width, value)

    def run(self, ops: Sequence[ConfigOp]) -> list[int]:
        return _run(self.qtest, *self.plan(ops))

    def plan(self, ops: Sequence[ConfigOp]) -> tuple[list[Command], list[int]]:
        def select(op: ConfigOp) -> Command:
            return Command.build("outl", CONFIG_ADDRESS_PORT, self.address(op.bdf, op.offset))

        def data(op: ConfigOp) -> int:
            return CONFIG_DATA_PORT + (op.offset & 3)

        return _plan(
            ops,
            self.size,
            lambda op: [select(op), Command.build(PORT_READ[op.width], data(op))],
            lambda op, value: [select(op), Command.build(_OUT[op.width], data(op), value)],
        )


class EcamAccess:
    """PCIe enhanced configuration access: config space as MMIO, 4 KiB per function.

    On q35 the window exists only once the MCH's PCIEXBAR is programmed, which firmware does
    and qtest never runs firmware, so :meth:`enable_q35` writes it through CF8/CFC first.
    """

    size = regs.EXT_CONFIG_SPACE_SIZE
    name = "ECAM"

    def __init__(self, qtest: QtestClient, base: int) -> None:
        self.qtest = qtest
        self.base = base

    @classmethod
    def enable_q35(cls, qtest: QtestClient, base: int = regs.PCIEXBAR_DEFAULT_BASE) -> EcamAccess:
        if base & 0xFFF_FFFF:
            raise ValueError(f"ECAM base {base:#x} must be 256 MiB aligned")
        value = regs.PCIEXBAR.enable.set(base, 1)
        value = regs.PCIEXBAR.length.set(value, regs.PCIEXBAR_LENGTH_256M)
        cf8 = Cf8Access(qtest)
        host = Bdf(0, 0, 0)
        cf8.write(host, regs.MCH_PCIEXBAR.offset + 4, 4, value >> 32)
        cf8.write(host, regs.MCH_PCIEXBAR.offset, 4, value & 0xFFFF_FFFF)
        return cls(qtest, base)

    def address(self, bdf: Bdf, offset: int) -> int:
        return (
            self.base
            | bdf.bus << regs.ECAM_BUS_SHIFT
            | bdf.device << regs.ECAM_DEVICE_SHIFT
            | bdf.function << regs.ECAM_FUNCTION_SHIFT
            | offset
        )

    def read(self, bdf: Bdf, offset: int, width: int) -> int:
        _check_access(offset, width, self.size)
        return mmio_read(self.qtest, self.address(bdf, offset), width)

    def write(self, bdf: Bdf, offset: int, width: int, value: int) -> None:
        _check_access(offset, width, self.size)
        mmio_write(self.qtest, self.address(bdf, offset), width, value)

    def run(self, ops: Sequence[ConfigOp]) -> list[int]:
        return _run(self.qtest, *self.plan(ops))

    def plan(self, ops: Sequence[ConfigOp]) -> tuple[list[Command], list[int]]:
        return _plan(
            ops,
            self.size,
            lambda op: [Command.build(MMIO_READ[op.width], self.address(op.bdf, op.offset))],
            lambda op, value: [Command.build(_WRITE[op.width], self.address(op.bdf, op.offset), value)],
        )
