"""Names for the addresses raw commands touch: which BAR, and which register inside a virtio
window, an I/O port or memory address falls on; on ECAM, which function's config register.

The windows are the library's :class:`~qtest_virtio.transport.VirtioPciMap` of each function
(virtio 1.2 §4.1.4); the shell only labels them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ...pci import Bdf, ConfigAccess, EcamAccess
from ...pci import regs as pci_regs
from ...registers import Layout
from ...transport import Access, VirtioPciMap, layout
from .registers import Target

#: The ECAM window of 256 buses, 1 MiB each (PCIe 3.0 §7.2.2).
ECAM_WINDOW = 256 << pci_regs.ECAM_BUS_SHIFT


@dataclass(frozen=True)
class Region:
    """An address range the shell can name: a BAR, or a register window inside one."""

    space: Access
    start: int
    size: int
    label: str
    layout: Layout | None = None

    def name(self, addr: int) -> str:
        off = addr - self.start
        f = self.layout.at(off) if self.layout is not None else None
        if f is not None:
            return f"{self.label}.{f.name}"
        return f"{self.label}+{off:#x}"


def build_regions(targets: Iterable[Target]) -> list[Region]:
    """Every assigned BAR, and inside virtio BARs the register windows by name."""
    regions: list[Region] = []
    for t in targets:
        fn = t.fn
        for b in fn.bars:
            if b.address is not None:
                space = Access.IO if b.is_io else Access.MEM
                regions.append(Region(space, b.address, b.size, f"{fn.bdf} BAR{b.index}"))
        if t.device_type is None:
            continue
        vmap = VirtioPciMap.of(fn)
        if vmap.legacy is not None and (start := vmap.address(vmap.legacy)) is not None:
            label = f"{fn.bdf} legacy"
            regions.append(Region(Access.IO, start, layout.LEGACY_DEVICE_CFG_OFFSET, label, vmap.legacy.layout))
        for w in vmap.cap_windows:
            start = vmap.address(w)
            if start is None or w.cap is None or not w.length:
                continue
            block: Layout | None = None
            if w.cap.cfg_type == layout.CFG_TYPE_COMMON:
                block = layout.COMMON_CFG
            elif w.cap.cfg_type == layout.CFG_TYPE_DEVICE:
                block = t.device_layout
            regions.append(Region(w.access, start, w.length, f"{fn.bdf} {w.name}", block))
    return regions


def name_address(regions: Iterable[Region], config: ConfigAccess, space: str, addr: int) -> str:
    """The register (or BAR) an I/O port or memory address falls on ("" if none is known):
    the smallest region holding it, so a window's register wins over its BAR."""
    if space == Access.MEM and isinstance(config, EcamAccess) and config.base <= addr < config.base + ECAM_WINDOW:
        off = addr - config.base
        bdf = Bdf(
            off >> pci_regs.ECAM_BUS_SHIFT & 0xFF,
            off >> pci_regs.ECAM_DEVICE_SHIFT & 0x1F,
            off >> pci_regs.ECAM_FUNCTION_SHIFT & 0x7,
        )
        reg = pci_regs.TYPE0_HEADER.at(off & 0xFFF)
        return f"{bdf} config {reg.name if reg else hex(off & 0xFFF)}"
    best: Region | None = None
    for r in regions:
        if r.space == space and r.start <= addr < r.start + r.size and (best is None or r.size < best.size):
            best = r
    return best.name(addr) if best else ""
