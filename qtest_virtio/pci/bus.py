"""PCI enumeration, capabilities, BAR sizing and assignment, as firmware would do them.

No firmware runs under qtest (``-S`` or the qtest accelerator), so every BAR is unassigned and
every bridge unnumbered until the harness does it: bus numbers depth-first, BARs bump-allocated
from an I/O window and a 32-bit MMIO window (64-bit BARs optionally above 4 GiB), bridge
windows around their children, then the command register's decode enables.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from ..errors import QtestVirtioError
from ..qtest import Command, QtestClient
from ..registers import Field, RegisterBlock
from . import regs
from .config import (
    MMIO_READ,
    PORT_READ,
    Bdf,
    Cf8Access,
    ConfigAccess,
    ConfigOp,
    EcamAccess,
    mmio_read,
    mmio_write,
    port_read,
    port_write,
)

#: Address windows the harness assigns from (libqos uses the same I/O start on pc).
IO_WINDOW = (0xC000, 0x1_0000)
MMIO32_WINDOW = {"pc": (0xE000_0000, 0xFEC0_0000), "q35": (0xC000_0000, 0xFEC0_0000)}
#: Above-4G window: QEMU's pci-hole64 starts at 4 GiB plus RAM above 4 GiB (none for small -m).
MMIO64_BASE = 0x1_0000_0000
MAX_CAPABILITIES = 48


@dataclass
class Bar:
    """One base address register, as sized (and later assigned)."""

    index: int
    kind: str  # "io", "mem32" or "mem64"
    size: int
    prefetchable: bool = False
    address: int | None = None

    @property
    def is_io(self) -> bool:
        return self.kind == "io"

    def describe(self) -> str:
        where = f"at {self.address:#x}" if self.address is not None else "unassigned"
        if self.is_io:
            return f"I/O ports {where} [size={self.size:#x}]"
        bits = "64-bit" if self.kind == "mem64" else "32-bit"
        pf = "prefetchable" if self.prefetchable else "non-prefetchable"
        return f"Memory {where} ({bits}, {pf}) [size={_human(self.size)}]"


def _human(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


@dataclass(frozen=True)
class Capability:
    """A capability found in the standard (offset < 0x100) or extended list."""

    id: int
    offset: int
    extended: bool = False
    version: int = 0

    @property
    def name(self) -> str:
        if self.extended:
            return regs.EXT_CAP_ID_NAMES.get(self.id, f"Extended capability {self.id:#06x}")
        return regs.CAP_ID_NAMES.get(self.id, f"Capability {self.id:#04x}")


class PciError(QtestVirtioError):
    """Malformed config space (a capability loop, a BAR that cannot be placed, ...) or an access
    to a BAR that is not there."""


class PciFunction:
    """One function: config access by register name, capabilities, BARs and their I/O."""

    def __init__(self, bus: PciBus, bdf: Bdf) -> None:
        self.pci = bus
        self.bdf_addr = bdf
        self.qtest = bus.qtest
        self._config = bus.config
        hdr = regs.TYPE0_HEADER
        self.header_type, self.vendor_id, self.device_id, class_reg = self._config.run(
            [
                ConfigOp(bdf, hdr.header_type.offset, 1),
                ConfigOp(bdf, hdr.vendor_id.offset, 2),
                ConfigOp(bdf, hdr.device_id.offset, 2),
                ConfigOp(bdf, 0x08, 4),
            ]
        )
        self.is_bridge = (self.header_type & regs.HEADER_TYPE_MASK) == 1
        layout = regs.TYPE1_HEADER if self.is_bridge else regs.TYPE0_HEADER
        self.config = RegisterBlock(layout, self.read_config, self.write_config)
        self.revision_id = class_reg & 0xFF
        #: 24-bit class code: base class, subclass, programming interface.
        self.class_code = class_reg >> 8
        self.bars: list[Bar] = []
        self.rom_size = 0
        self.secondary_bus: int | None = None
        #: A hot-plug bridge's windows and what later plugged devices are placed from.
        self.reserved: Reservation | None = None
        #: The capability lists, walked once: they are read-only to software (PCI 3.0 §6.7).
        self._caps: list[Capability] | None = None

    def __repr__(self) -> str:
        return f"<PciFunction {self.bdf} {self.vendor_id:04x}:{self.device_id:04x}>"

    @property
    def bdf(self) -> str:
        return str(self.bdf_addr)

    @property
    def base_class(self) -> int:
        return self.class_code >> 16

    @property
    def subclass(self) -> int:
        return (self.class_code >> 8) & 0xFF

    @property
    def prog_if(self) -> int:
        return self.class_code & 0xFF

    @property
    def class_name(self) -> str:
        return regs.class_name(self.base_class, self.subclass)

    @property
    def subsystem(self) -> tuple[int, int] | None:
        if self.is_bridge:
            return None
        return self.config.read(regs.TYPE0_HEADER.subsystem_vendor_id), self.config.read(regs.TYPE0_HEADER.subsystem_id)

    # -- config space ---------------------------------------------------------------------

    def read_config(self, offset: int, width: int) -> int:
        return self._config.read(self.bdf_addr, offset, width)

    def write_config(self, offset: int, width: int, value: int) -> None:
        self._config.write(self.bdf_addr, offset, width, value)

    def read_config_many(self, spans: Sequence[tuple[int, int]]) -> list[int]:
        """Several ``(offset, width)`` registers, read in order in one exchange."""
        return self._config.run([ConfigOp(self.bdf_addr, offset, width) for offset, width in spans])

    def posting(self) -> AbstractContextManager[None]:
        """A block whose config and BAR writes are posted (``QtestClient.posting``)."""
        return self.qtest.posting()

    def enable(self, *, io: bool = True, memory: bool = True, bus_master: bool = True) -> None:
        """Set the command register's decode and bus-master bits (bus master lets MSI-X and
        DMA reach guest RAM)."""
        cmd = self.config.read(regs.TYPE0_HEADER.command)
        for bit, on in (
            (regs.COMMAND.io_space, io),
            (regs.COMMAND.memory_space, memory),
            (regs.COMMAND.bus_master, bus_master),
        ):
            cmd = bit.set(cmd, 1 if on else 0)
        self.config.write(regs.TYPE0_HEADER.command, cmd)

    @property
    def command_flags(self) -> list[str]:
        return regs.COMMAND.names_set(self.config.read(regs.TYPE0_HEADER.command))

    # -- capabilities ---------------------------------------------------------------------

    def capabilities(self) -> list[Capability]:
        """The standard capability list, then the extended one where config access reaches it
        (walked on first use; the lists are read-only)."""
        if self._caps is None:
            caps = list(self._standard_caps())
            if self._config.size > regs.CONFIG_SPACE_SIZE and any(c.id == regs.CAP_ID_PCIE for c in caps):
                caps += self.extended_capabilities()
            self._caps = caps
        return list(self._caps)

    def _standard_caps(self) -> Iterator[Capability]:
        if not regs.STATUS.capabilities_list.get(self.config.read(regs.TYPE0_HEADER.status)):
            return
        seen: set[int] = set()
        ptr = self.config.read(regs.TYPE0_HEADER.capabilities_ptr) & 0xFC
        while ptr:
            if ptr in seen or len(seen) >= MAX_CAPABILITIES or ptr < regs.TYPE0_HEADER.size:
                raise PciError(f"{self.bdf}: capability list loops or points into the header at {ptr:#x}")
            seen.add(ptr)
            cap_id, nxt = self._config.run(
                [
                    ConfigOp(self.bdf_addr, ptr + regs.CAP_HEADER.cap_id.offset, 1),
                    ConfigOp(self.bdf_addr, ptr + regs.CAP_HEADER.cap_next.offset, 1),
                ]
            )
            yield Capability(cap_id, ptr)
            ptr = nxt & 0xFC

    def extended_capabilities(self) -> list[Capability]:
        caps: list[Capability] = []
        ptr, seen = regs.EXT_CAP_START, set[int]()
        while ptr:
            header = self.read_config(ptr, 4)
            if header in (0, 0xFFFF_FFFF) or ptr in seen or len(seen) >= MAX_CAPABILITIES:
                break
            seen.add(ptr)
            fields = regs.EXT_CAP.decode(header)
            caps.append(Capability(fields["cap_id"], ptr, extended=True, version=fields["version"]))
            ptr = fields["next"] & 0xFFC
        return caps

    def find_capability(self, cap_id: int) -> Capability | None:
        return next((c for c in self.capabilities() if c.id == cap_id and not c.extended), None)

    def vendor_capabilities(self) -> list[Capability]:
        return [c for c in self.capabilities() if c.id == regs.CAP_ID_VENDOR and not c.extended]

    # -- BARs -----------------------------------------------------------------------------

    def size_bars(self) -> list[Bar]:
        """Size every BAR the way firmware does (write all ones, read the mask back, restore),
        with decoding off meanwhile so the device never answers at the probe address.

        Every BAR register, then the expansion ROM's, is probed in order, as one at a time
        would: the upper half of a 64-bit BAR is the next register. Two exchanges per function:
        the command register and each register's original value, then the probes and restores
        (a restore needs its original) with the command register's write-back."""
        bdf = self.bdf_addr
        command = regs.TYPE0_HEADER.command
        count = regs.BAR_COUNT[1 if self.is_bridge else 0]
        rom_reg = (regs.TYPE1_HEADER if self.is_bridge else regs.TYPE0_HEADER).expansion_rom.offset
        probed = [regs.TYPE0_HEADER.bar0.offset + 4 * i for i in range(count)] + [rom_reg]
        cmd, *originals = self._config.run(
            [ConfigOp(bdf, command.offset, command.width), *(ConfigOp(bdf, reg, 4) for reg in probed)]
        )
        masks = self._probe(cmd, dict(zip(probed, originals, strict=True)), rom_reg)
        bars: list[Bar] = []
        index = 0
        while index < count:
            reg = regs.TYPE0_HEADER.bar0.offset + 4 * index
            mask = masks[reg]
            if mask == 0:
                index += 1
                continue
            if regs.BAR.io_space.get(mask):
                io_mask = mask & regs.BAR_IO_MASK
                if io_mask >> 16 == 0:  # 16-bit I/O decoder: upper half reads as zero
                    io_mask |= 0xFFFF_0000
                bars.append(Bar(index, "io", (~io_mask & 0xFFFF_FFFF) + 1))
                index += 1
                continue
            prefetch = bool(regs.BAR.prefetchable.get(mask))
            if regs.BAR.memory_type.get(mask) == regs.BAR_MEM_TYPE_64:
                if index + 1 < count:
                    mask_hi = masks[reg + 4]
                else:  # the last BAR claims 64 bits: its upper half is past the BARs, probed alone
                    (orig_hi,) = self._config.run([ConfigOp(bdf, reg + 4, 4)])
                    mask_hi = self._probe(cmd, {reg + 4: orig_hi})[reg + 4]
                full = (mask_hi << 32) | (mask & regs.BAR_MEM_MASK)
                bars.append(Bar(index, "mem64", (~full & 0xFFFF_FFFF_FFFF_FFFF) + 1, prefetch))
                index += 2
            else:
                bars.append(Bar(index, "mem32", (~(mask & regs.BAR_MEM_MASK) & 0xFFFF_FFFF) + 1, prefetch))
                index += 1
        rom_mask = masks[rom_reg] & regs.ROM_ADDRESS_MASK
        self.rom_size = ((~rom_mask & 0xFFFF_FFFF) + 1) if rom_mask else 0
        self.bars = bars
        return bars

    def _probe(self, cmd: int, originals: dict[int, int], rom_reg: int | None = None) -> dict[int, int]:
        """Each register's mask, in one exchange: decoding off, then for each in order all ones
        written (the ROM's address mask to ``rom_reg``), read back and its original restored,
        then the command register ``cmd`` written back."""
        bdf = self.bdf_addr
        command = regs.TYPE0_HEADER.command
        decode_off = cmd & ~(regs.COMMAND.io_space.mask | regs.COMMAND.memory_space.mask)
        ops = [ConfigOp(bdf, command.offset, command.width, decode_off)]
        for reg, orig in originals.items():
            ones = regs.ROM_ADDRESS_MASK if reg == rom_reg else 0xFFFF_FFFF
            ops += [ConfigOp(bdf, reg, 4, ones), ConfigOp(bdf, reg, 4), ConfigOp(bdf, reg, 4, orig)]
        ops.append(ConfigOp(bdf, command.offset, command.width, cmd))
        return dict(zip(originals, self._config.run(ops), strict=True))

    def bar(self, index: int) -> Bar:
        for b in self.bars:
            if b.index == index:
                return b
        raise PciError(f"{self.bdf} has no BAR{index} (BARs: {[b.index for b in self.bars]})")

    def set_bar_address(self, bar: Bar, address: int) -> None:
        reg = regs.TYPE0_HEADER.bar0.offset + 4 * bar.index
        if bar.is_io:
            self.write_config(reg, 4, address & 0xFFFF_FFFF)
        else:
            self.write_config(reg, 4, address & 0xFFFF_FFFF)
            if bar.kind == "mem64":
                self.write_config(reg + 4, 4, address >> 32)
        bar.address = address

    def restore(self) -> None:
        """Put back what a guest may have scribbled over in the header: every assigned BAR's
        address, the expansion ROM off, I/O and memory decoding and bus mastering on (what a
        driver re-does after a function reset). Capabilities are left to their owners."""
        for bar in self.bars:
            if bar.address is not None:
                self.set_bar_address(bar, bar.address)
        if not self.is_bridge:
            self.config.write(regs.TYPE0_HEADER.expansion_rom, 0)
        self.enable()

    def _bar_address(self, index: int, offset: int, width: int) -> int:
        bar = self.bar(index)
        if bar.address is None:
            raise PciError(f"{self.bdf} BAR{index} is not assigned; call pci.assign_bars() first")
        if offset < 0 or offset + width > bar.size:
            raise ValueError(f"{self.bdf} BAR{index}: offset {offset:#x}+{width} is outside its {bar.size:#x} bytes")
        return bar.address + offset

    def bar_read(self, index: int, offset: int, width: int) -> int:
        """Read ``width`` bytes at ``offset`` in BAR ``index`` (port I/O or MMIO, little endian)."""
        addr = self._bar_address(index, offset, width)
        q = self.qtest
        if self.bar(index).is_io:
            if width == 8:
                return q.inl(addr) | q.inl(addr + 4) << 32
            return port_read(q, addr, width)
        return mmio_read(q, addr, width)

    def read_many(self, reads: Sequence[tuple[int | None, int, int]]) -> list[int]:
        """Several reads, ``(bar, offset, width)`` each (``bar`` None: config space), sent in
        order in one exchange: the commands one by one would send, without the waits between."""
        commands: list[Command] = []
        picks: list[tuple[int, ...]] = []  # per read: positions of its replies (two for 64-bit port I/O)
        for index, offset, width in reads:
            if index is None:
                cmds, at = self._config.plan([ConfigOp(self.bdf_addr, offset, width)])
                picks.append(tuple(len(commands) + i for i in at))
                commands += cmds
                continue
            addr = self._bar_address(index, offset, width)
            if self.bar(index).is_io and width == 8:
                picks.append((len(commands), len(commands) + 1))
                commands += [Command.build("inl", addr), Command.build("inl", addr + 4)]
                continue
            op = (PORT_READ if self.bar(index).is_io else MMIO_READ)[width]
            picks.append((len(commands),))
            commands.append(Command.build(op, addr))
        replies = self.qtest.run_many(commands)
        values = []
        for pick in picks:
            parts = [commands[i].reply_int(replies[i]) for i in pick]
            values.append(parts[0] | (parts[1] << 32 if len(parts) > 1 else 0))
        return values

    def bar_write(self, index: int, offset: int, width: int, value: int) -> None:
        addr = self._bar_address(index, offset, width)
        q = self.qtest
        if self.bar(index).is_io:
            if width == 8:
                q.outl(addr, value & 0xFFFF_FFFF)
                q.outl(addr + 4, value >> 32)
                return
            port_write(q, addr, width, value)
            return
        mmio_write(q, addr, width, value)


@dataclass
class Reservation:
    """The windows of a bridge with a hot-plug slot: sized at enumeration for devices plugged
    later (as SeaBIOS/OVMF reserve them) and the cursors those devices are placed from."""

    io: tuple[int, int]
    mmio: tuple[int, int]
    io_next: int = 0
    mmio_next: int = 0

    def __post_init__(self) -> None:
        self.rewind()

    def rewind(self) -> None:
        """Start placing from the bottom again (the slot is empty)."""
        self.io_next, self.mmio_next = self.io[0], self.mmio[0]


#: What a hot-plug bridge without QEMU's resource-reservation capability gets: 4 KiB of I/O
#: (the bridge granularity) and 2 MiB of memory (SeaBIOS's default for hot-plug ports).
DEFAULT_IO_RESERVE = 0x1000
DEFAULT_MEM_RESERVE = 0x20_0000


@dataclass
class _Windows:
    io: int
    io_end: int
    mmio: int
    mmio_end: int
    mmio64: int | None
    placed: list[tuple[PciFunction, Bar]] = field(default_factory=list)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class PciBus:
    """The PCI hierarchy of one machine: enumeration, resource assignment, lookups.

    ``access`` picks the config mechanism: "cf8" (pc and q35) or "ecam" (q35 only; reaches
    the extended config space). ``mmio64=True`` places 64-bit BARs above 4 GiB.
    """

    def __init__(
        self, qtest: QtestClient, machine_type: str = "q35", *, access: str = "auto", mmio64: bool = False
    ) -> None:
        self.qtest = qtest
        self.machine_type = "q35" if "q35" in machine_type else "pc"
        self.mmio64 = mmio64
        if access == "auto":
            access = "ecam" if self.machine_type == "q35" else "cf8"
        if access == "ecam":
            if self.machine_type != "q35":
                raise ValueError("ECAM needs the q35 machine (i440FX has no MMCONFIG)")
            self.config: ConfigAccess = EcamAccess.enable_q35(qtest)
        elif access == "cf8":
            self.config = Cf8Access(qtest)
        else:
            raise ValueError(f"config access {access!r} is not 'cf8', 'ecam' or 'auto'")
        self._functions: list[PciFunction] | None = None
        self._next_bus = 1
        self._assigned = False
        #: The root bus's windows after assignment: devices plugged there later come from them.
        self._root: _Windows | None = None

    # -- enumeration ----------------------------------------------------------------------

    def devices(self) -> list[PciFunction]:
        """Every function, depth-first from bus 0 (bridges get bus numbers on the way)."""
        if self._functions is None:
            self._next_bus = 1
            self._functions = []
            self._scan(0, self._functions)
        return list(self._functions)

    def _present(self, bdf: Bdf) -> bool:
        return self.config.read(bdf, regs.TYPE0_HEADER.vendor_id.offset, 2) not in (0xFFFF, 0x0000)

    def _present_among(self, bdfs: list[Bdf]) -> list[Bdf]:
        """The functions that answer, their vendor IDs read in one exchange."""
        ids = self.config.run([ConfigOp(b, regs.TYPE0_HEADER.vendor_id.offset, 2) for b in bdfs])
        return [b for b, vendor in zip(bdfs, ids, strict=True) if vendor not in (0xFFFF, 0x0000)]

    def _scan(self, bus: int, out: list[PciFunction]) -> None:
        for slot in self._present_among([Bdf(bus, dev, 0) for dev in range(32)]):
            first = PciFunction(self, slot)
            functions = [first]
            if first.header_type & regs.HEADER_MULTIFUNCTION:
                others = self._present_among([Bdf(bus, slot.device, fn) for fn in range(1, 8)])
                functions += [PciFunction(self, b) for b in others]
            for fn in functions:
                out.append(fn)
                if fn.is_bridge:
                    self._number_bridge(fn, out)

    def _number_bridge(self, bridge: PciFunction, out: list[PciFunction]) -> None:
        secondary = self._next_bus
        if secondary > 0xFF:
            raise PciError("ran out of bus numbers")
        self._next_bus += 1
        bridge.config.write(regs.TYPE1_HEADER.primary_bus, bridge.bdf_addr.bus)
        bridge.config.write(regs.TYPE1_HEADER.secondary_bus, secondary)
        bridge.config.write(regs.TYPE1_HEADER.subordinate_bus, 0xFF)
        self._scan(secondary, out)
        bridge.config.write(regs.TYPE1_HEADER.subordinate_bus, self._next_bus - 1)
        bridge.secondary_bus = secondary

    def find(
        self, *, vendor_id: int | None = None, device_id: int | None = None, bdf: str | None = None
    ) -> PciFunction:
        """The first function matching every given criterion."""
        for fn in self.devices():
            if vendor_id is not None and fn.vendor_id != vendor_id:
                continue
            if device_id is not None and fn.device_id != device_id:
                continue
            if bdf is not None and fn.bdf_addr != Bdf.parse(bdf):
                continue
            return fn
        crit = ", ".join(
            f"{k}={v:#06x}" if isinstance(v, int) else f"{k}={v}"
            for k, v in (("vendor_id", vendor_id), ("device_id", device_id), ("bdf", bdf))
            if v is not None
        )
        found = ", ".join(f"{f.bdf} {f.vendor_id:04x}:{f.device_id:04x}" for f in self.devices())
        raise PciError(f"no PCI function with {crit}; found {found}")

    def function(self, bdf: str) -> PciFunction:
        return self.find(bdf=bdf)

    # -- resources ------------------------------------------------------------------------

    def assign_bars(self) -> list[PciFunction]:
        """Size and place every BAR, program bridge windows, enable decode and bus mastering."""
        if self._assigned:
            return self.devices()
        lo, hi = MMIO32_WINDOW[self.machine_type]
        win = _Windows(IO_WINDOW[0], IO_WINDOW[1], lo, hi, MMIO64_BASE if self.mmio64 else None)
        with self.qtest.posting():  # the config writes wait for nothing; the reads carry them
            self._assign_bus(0, win)
        self._root = win
        self._assigned = True
        return self.devices()

    def _children(self, bus: int) -> list[PciFunction]:
        return [f for f in self.devices() if f.bdf_addr.bus == bus]

    def _assign_bus(self, bus: int, win: _Windows) -> None:
        for fn in self._children(bus):
            bars = fn.size_bars()
            # Largest first keeps natural alignment from wasting the window.
            for bar in sorted(bars, key=lambda b: -b.size):
                self._place(fn, bar, win)
            if fn.is_bridge and fn.secondary_bus is not None:
                self._assign_bridge(fn, win)
            fn.enable(io=any(b.is_io for b in fn.bars) or fn.is_bridge, memory=True, bus_master=True)

    def _place(self, fn: PciFunction, bar: Bar, win: _Windows) -> None:
        if bar.is_io:
            addr = _align(win.io, max(bar.size, 4))
            if addr + bar.size > win.io_end:
                raise PciError(f"{fn.bdf} BAR{bar.index}: I/O window exhausted ({bar.size:#x} bytes)")
            win.io = addr + bar.size
        elif bar.kind == "mem64" and win.mmio64 is not None and fn.bdf_addr.bus == 0:
            addr = _align(win.mmio64, max(bar.size, 16))
            win.mmio64 = addr + bar.size
        else:
            addr = _align(win.mmio, max(bar.size, 16))
            if addr + bar.size > win.mmio_end:
                raise PciError(f"{fn.bdf} BAR{bar.index}: MMIO window exhausted ({bar.size:#x} bytes)")
            win.mmio = addr + bar.size
        fn.set_bar_address(bar, addr)
        win.placed.append((fn, bar))

    def _assign_bridge(self, bridge: PciFunction, win: _Windows) -> None:
        """Children get 4 KiB-aligned I/O and 1 MiB-aligned memory windows (PCI-PCI Bridge §3.2.5)."""
        win.io = _align(win.io, 0x1000)
        win.mmio = _align(win.mmio, 0x10_0000)
        io_start, mem_start = win.io, win.mmio
        saved64, win.mmio64 = win.mmio64, None  # behind a bridge: everything in the 32-bit window
        assert bridge.secondary_bus is not None
        self._assign_bus(bridge.secondary_bus, win)
        win.mmio64 = saved64
        reserve = self._reserve(bridge)
        if reserve is not None:  # room for what is plugged later, past what is there now
            io_reserve, mem_reserve = reserve
            win.io = max(win.io, io_start + io_reserve)
            win.mmio = max(win.mmio, mem_start + mem_reserve)
        win.io = _align(win.io, 0x1000)
        win.mmio = _align(win.mmio, 0x10_0000)
        if reserve is not None:
            bridge.reserved = Reservation((io_start, win.io), (mem_start, win.mmio))
            if self._children(bridge.secondary_bus):
                bridge.reserved.io_next, bridge.reserved.mmio_next = win.io, win.mmio
        cfg = bridge.config
        if win.io > io_start:
            cfg.write(regs.TYPE1_HEADER.io_base, (io_start >> 8) & 0xF0)
            cfg.write(regs.TYPE1_HEADER.io_limit, ((win.io - 1) >> 8) & 0xF0)
            cfg.write(regs.TYPE1_HEADER.io_base_upper, 0)
            cfg.write(regs.TYPE1_HEADER.io_limit_upper, 0)
        else:  # base above limit closes the window
            cfg.write(regs.TYPE1_HEADER.io_base, 0xF0)
            cfg.write(regs.TYPE1_HEADER.io_limit, 0x00)
        if win.mmio > mem_start:
            cfg.write(regs.TYPE1_HEADER.memory_base, (mem_start >> 16) & 0xFFF0)
            cfg.write(regs.TYPE1_HEADER.memory_limit, ((win.mmio - 1) >> 16) & 0xFFF0)
        else:
            cfg.write(regs.TYPE1_HEADER.memory_base, 0xFFF0)
            cfg.write(regs.TYPE1_HEADER.memory_limit, 0x0000)
        cfg.write(regs.TYPE1_HEADER.prefetch_base, 0xFFF0)
        cfg.write(regs.TYPE1_HEADER.prefetch_limit, 0x0000)
        cfg.write(regs.TYPE1_HEADER.prefetch_base_upper, 0)
        cfg.write(regs.TYPE1_HEADER.prefetch_limit_upper, 0)

    # -- hot-plug -------------------------------------------------------------------------

    def _reserve(self, bridge: PciFunction) -> tuple[int, int] | None:
        """(I/O, memory) bytes to reserve behind a bridge whose slot can hot-plug: QEMU's Red
        Hat resource-reservation capability where the bridge has one (a field of all ones
        means "no hint"), else the defaults; None for a bridge without a hot-plug slot."""
        if not _hotplug_slot(bridge):
            return None
        io, mem = DEFAULT_IO_RESERVE, DEFAULT_MEM_RESERVE
        hints = regs.REDHAT_RES_RESERVE
        for cap in bridge.vendor_capabilities() if bridge.vendor_id == regs.VENDOR_REDHAT else []:

            def read(f: Field, base: int = cap.offset) -> int:
                at = base + f.offset  # config accesses stop at 4 bytes
                return sum(bridge.read_config(at + i, min(4, f.width)) << 8 * i for i in range(0, f.width, 4))

            if read(hints.type) != regs.REDHAT_CAP_RESOURCE_RESERVE:
                continue
            if (hint_io := read(hints.io)) != (1 << 64) - 1:
                io = hint_io
            if (hint_mem := read(hints.mem)) != (1 << 32) - 1:
                mem = hint_mem
        return io, mem

    def rescan(self, bus: int) -> list[PciFunction]:
        """Enumerate bus ``bus`` again after a hot-plug event: functions still there keep
        their objects (a driver holds them), gone ones are dropped, new ones are sized and
        placed inside their bridge's reserved windows (the root bus's on pc) and enabled.
        Returns the new functions. Hot-plugged bridges are not numbered (an error)."""
        functions = self.devices()
        assert self._functions is not None
        old = {fn.bdf_addr: fn for fn in functions if fn.bdf_addr.bus == bus}
        found: list[PciFunction] = []
        for dev in range(32):
            if not self._present(Bdf(bus, dev, 0)):
                continue
            first = old.get(Bdf(bus, dev, 0)) or PciFunction(self, Bdf(bus, dev, 0))
            found.append(first)
            if first.header_type & regs.HEADER_MULTIFUNCTION:
                found += [
                    old.get(Bdf(bus, dev, fn)) or PciFunction(self, Bdf(bus, dev, fn))
                    for fn in range(1, 8)
                    if self._present(Bdf(bus, dev, fn))
                ]
        new = [fn for fn in found if old.get(fn.bdf_addr) is not fn]
        keep = [fn for fn in self._functions if fn.bdf_addr.bus != bus]
        parent = next((f for f in keep if f.secondary_bus == bus), None)
        at = keep.index(parent) + 1 if parent is not None else len(keep)
        if parent is None and bus == 0:
            at = 0
        self._functions = keep[:at] + found + keep[at:]
        if parent is not None and parent.reserved is not None and not found:
            parent.reserved.rewind()
        if self._assigned:
            for fn in new:
                self._assign_plugged(fn, parent)
        return new

    def _assign_plugged(self, fn: PciFunction, parent: PciFunction | None) -> None:
        if fn.is_bridge:
            raise PciError(f"{fn.bdf}: a hot-plugged bridge is not supported (its buses were not reserved)")
        if parent is None:
            assert self._root is not None
            win = self._root
        elif parent.reserved is not None:
            r = parent.reserved
            win = _Windows(r.io_next, r.io[1], r.mmio_next, r.mmio[1], None)
        else:
            raise PciError(
                f"{fn.bdf} appeared behind {parent.bdf}, which has no hot-plug slot and so no reserved windows"
            )
        for bar in sorted(fn.size_bars(), key=lambda b: -b.size):
            self._place(fn, bar, win)
        if parent is not None and parent.reserved is not None:
            parent.reserved.io_next, parent.reserved.mmio_next = win.io, win.mmio
        fn.enable(io=any(b.is_io for b in fn.bars), memory=True, bus_master=True)

    def bridge_of(self, fn: PciFunction) -> PciFunction | None:
        """The bridge whose secondary bus ``fn`` is on (None on the root bus)."""
        return next((b for b in self.devices() if b.secondary_bus == fn.bdf_addr.bus and b.is_bridge), None)


def _hotplug_slot(bridge: PciFunction) -> bool:
    """Whether a bridge is a PCI Express port with a hot-plug capable slot (PCIe 4.0 §7.5.3.9)."""
    cap = bridge.find_capability(regs.CAP_ID_PCIE)
    if cap is None:
        return False
    caps = bridge.read_config(cap.offset + regs.PCIE_CAP.pcie_capabilities.offset, 2)
    if not regs.PCIE_CAPS.slot_implemented.get(caps):
        return False
    return bool(regs.SLTCAP.HPC.get(bridge.read_config(cap.offset + regs.PCIE_CAP.SLTCAP.offset, 4)))
