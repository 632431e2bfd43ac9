"""INTx routing as firmware would program it, and the IOAPIC line a test can watch.

No firmware runs under qtest, so nobody programs the chipset's PIRQ router. On pc (PIIX3) a
device's INTx pin reaches no interrupt controller until its PIRQ route register holds an ISA IRQ;
SeaBIOS uses IRQ 10, 10, 11, 11 for PIRQA-D, and so do we. On q35 (ICH9) PIRQA-H also drive IOAPIC
inputs 16-23 directly; slots 0-24 are swizzled onto PIRQE-H (QEMU's DSDT _PRT says the same), so
the line is 16 + PIRQ whatever the route registers hold (we still program them, as firmware does).

qtest's ``irq_intercept_in ioapic`` then reports the line as ``IRQ raise/lower N``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..qtest import QtestClient
from ..registers import Field, Layout
from . import regs
from .bus import PciBus, PciError, PciFunction
from .config import Bdf


#: PIIX3 ISA bridge (00:01.0): PIRQRC[A-D] (82371SB datasheet §2.2.13).
class Piix3PirqrcLayout(Layout, struct="piix3_pirqrc"):
    pirqa_route = Field(0x60, 1)
    pirqb_route = Field(0x61, 1)
    pirqc_route = Field(0x62, 1)
    pirqd_route = Field(0x63, 1)


PIIX3_PIRQRC = Piix3PirqrcLayout()


#: ICH9 LPC bridge (00:1f.0): PIRQ[A-D]_ROUT at 0x60, PIRQ[E-H]_ROUT at 0x68 (ICH9 datasheet §13.1).
class Ich9PirqRoutLayout(Layout, struct="ich9_pirq_rout"):
    pirqa_rout = Field(0x60, 1)
    pirqb_rout = Field(0x61, 1)
    pirqc_rout = Field(0x62, 1)
    pirqd_rout = Field(0x63, 1)
    pirqe_rout = Field(0x68, 1)
    pirqf_rout = Field(0x69, 1)
    pirqg_rout = Field(0x6A, 1)
    pirqh_rout = Field(0x6B, 1)


ICH9_PIRQ_ROUT = Ich9PirqRoutLayout()
FIRMWARE_PIRQ_IRQS = (10, 10, 11, 11, 10, 10, 11, 11)
PIIX3_ISA = Bdf(0, 1, 0)
ICH9_LPC = Bdf(0, 0x1F, 0)
ICH9_FIRST_GSI = 16
IOAPIC = "ioapic"


@dataclass
class IntxLine:
    """The IOAPIC input a function's INTx pin drives, watched through qtest."""

    fn: PciFunction
    gsi: int
    pirq: int

    def intercept(self) -> None:
        """Ask qtest to report the IOAPIC's inputs (once per machine; repeating is fine)."""
        self.fn.qtest.irq_intercept_in(IOAPIC)

    @property
    def qtest(self) -> QtestClient:
        return self.fn.qtest

    def level(self) -> bool:
        return self.qtest.get_irq(self.gsi)

    def wait(self, level: bool = True, timeout: float = 5.0) -> None:
        self.qtest.wait_irq(self.gsi, level, timeout)


def route_intx(pci: PciBus, fn: PciFunction) -> IntxLine:
    """Program the PIRQ router for ``fn``'s pin as firmware would; return the IOAPIC line."""
    pin = fn.config.read(regs.TYPE0_HEADER.interrupt_pin)
    if pin == 0:
        raise PciError(f"{fn.bdf} uses no INTx pin")
    if fn.bdf_addr.bus != 0:
        raise PciError(f"{fn.bdf}: INTx routing behind a bridge (pin swizzling) is not implemented")
    intx, slot = pin - 1, fn.bdf_addr.device
    if pci.machine_type == "pc":
        pirq = (intx + slot - 1) & 3  # QEMU's pc_pci_slot_get_pirq
        isa = pci.function(str(PIIX3_ISA))
        irq = FIRMWARE_PIRQ_IRQS[pirq]
        isa.write_config(PIIX3_PIRQRC[f"pirq{'abcd'[pirq]}_route"].offset, 1, irq)
        return IntxLine(fn, irq, pirq)
    if slot >= 25:
        raise PciError(f"{fn.bdf}: slots 25-31 route through the D25IR-D31IR chipset registers (not implemented)")
    pirq = 4 + ((slot + intx) & 3)  # PIRQE-H, swizzled by slot
    lpc = pci.function(str(ICH9_LPC))
    lpc.write_config(ICH9_PIRQ_ROUT[f"pirq{'abcdefgh'[pirq]}_rout"].offset, 1, FIRMWARE_PIRQ_IRQS[pirq])
    return IntxLine(fn, ICH9_FIRST_GSI + pirq, pirq)
