"""The guest's side of PCI hot(un)plug, as its firmware and OS drive it: config space and port
I/O only. QMP's side (``device_add``, ``device_del``, ``DEVICE_DELETED``) is the machine layer's.

- :class:`PcieSlot`: native PCI Express hot-plug of a root or downstream port (PCIe 4.0 §6.7),
  as Linux's pciehp does it. QEMU (hw/pci/pcie.c ``pcie_cap_slot_*``) reports a plug as
  Presence Detect Changed (with Presence Detect State and the link's Data Link Layer Link
  Active set) and powers the slot when the guest turns Power Controller Control on; for
  ``device_del`` it presses the Attention Button, and the guest answers by turning the power
  indicator and the slot off, which makes QEMU unplug the device.
- :class:`AcpiPciHotplug`: ACPI PCI hot-plug of PIIX4 (hw/acpi/pcihp.c): a General Purpose
  Event (GPE0 bit 1) and the up/down slot bitmaps, read and acknowledged as the DSDT's
  ``\\_GPE._E01`` does, and the eject register the slot's ``_EJ0`` method writes.

Neither layer above this knows a register: ``Machine.plug`` / ``Machine.unplug`` (vm.py) call
these between their QMP commands.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..qtest import QtestClient
from ..registers import RegisterBlock
from . import regs
from .bus import PciError, PciFunction
from .config import port_read, port_write
from .msix import Msix


class HotplugSlotError(PciError):
    """A slot or ACPI hot-plug register did not show what a hot-plug event must show."""


@dataclass(frozen=True)
class SlotEvent:
    """Slot Status as read when handling an event (before acknowledging it), decoded."""

    status: int
    link_active: bool

    @property
    def names(self) -> list[str]:
        return regs.SLTSTA.names_set(self.status)

    def has(self, bit: str) -> bool:
        return bool(regs.SLTSTA[bit].get(self.status))


class PcieSlot:
    """The hot-plug slot of a PCI Express root/downstream port (PCIe 4.0 §7.5.3.9-§7.5.3.11).

    ``msix``: the port's MSI-X, routed to RAM by the caller; then :meth:`enable_notifications`
    enables it and each event checks that the port's hot-plug interrupt arrived (§6.7.3.4)."""

    def __init__(self, port: PciFunction, msix: Msix | None = None) -> None:
        cap = port.find_capability(regs.CAP_ID_PCIE)
        if cap is None or not port.is_bridge:
            raise HotplugSlotError(f"{port.bdf} is no PCI Express port (no PCIe capability)")
        self.port = port
        self.msix = msix
        base = cap.offset
        self.regs = RegisterBlock(
            regs.PCIE_CAP,
            lambda off, width: port.read_config(base + off, width),
            lambda off, width, value: port.write_config(base + off, width, value),
        )
        if not regs.PCIE_CAPS.slot_implemented.get(self.regs.read(regs.PCIE_CAP.pcie_capabilities)):
            raise HotplugSlotError(f"{port.bdf}: the port implements no slot (PCIe Capabilities.Slot Implemented is 0)")

    # -- registers ------------------------------------------------------------------------

    @property
    def capabilities(self) -> dict[str, int]:
        return regs.SLTCAP.decode(self.regs.read(regs.PCIE_CAP.SLTCAP))

    @property
    def hotplug_capable(self) -> bool:
        return bool(self.capabilities["HPC"])

    def control(self) -> int:
        return self.regs.read(regs.PCIE_CAP.SLTCTL)

    def status(self) -> int:
        return self.regs.read(regs.PCIE_CAP.SLTSTA)

    def link_active(self) -> bool:
        return bool(regs.PCIE_LNKSTA.DLLLA.get(self.regs.read(regs.PCIE_CAP.link_status)))

    @property
    def present(self) -> bool:
        """Presence Detect State: a device is in the slot."""
        return bool(regs.SLTSTA.PDS.get(self.status()))

    @property
    def vector(self) -> int:
        """The MSI-X vector of the port's hot-plug interrupt (PCIe Capabilities' Interrupt
        Message Number, §7.5.3.2)."""
        return regs.PCIE_CAPS.interrupt_message_number.get(self.regs.read(regs.PCIE_CAP.pcie_capabilities))

    def command(self, control: int) -> None:
        """Write Slot Control (one write is one command, §6.7.3.2) and acknowledge its
        Command Completed, as pciehp's ``pcie_write_cmd`` waits for it where supported."""
        self.regs.write(regs.PCIE_CAP.SLTCTL, control)
        if not self.capabilities["NCCS"]:
            if not regs.SLTSTA.CC.get(self.status()):
                raise HotplugSlotError(f"{self.port.bdf}: Slot Control write {control:#06x} completed no command")
            self.acknowledge(regs.SLTSTA.CC.mask)
        if self.msix is not None:
            self.msix.fired(self.vector)  # the completion's own interrupt: not an event's

    def acknowledge(self, events: int) -> None:
        """Clear event bits of Slot Status (RW1C: ones clear, zeros keep, §7.5.3.11)."""
        self.regs.write(regs.PCIE_CAP.SLTSTA, events & regs.SLTSTA_EVENTS)

    # -- what pciehp does -----------------------------------------------------------------

    def enable_notifications(self) -> None:
        """As pciehp's probe: clear stale events, then enable Presence Detect Changed,
        Attention Button Pressed, Data Link Layer State Changed where the link reports it,
        Command Completed where supported, and the hot-plug interrupt (§7.5.3.10)."""
        if not self.hotplug_capable:
            raise HotplugSlotError(
                f"{self.port.bdf}: the slot is not hot-plug capable (SLTCAP.HPC 0); the port needs hotplug=on"
            )
        if self.msix is not None:
            self.msix.enable()
        self.acknowledge(regs.SLTSTA_EVENTS)
        caps = self.capabilities
        ctl = self.control()
        for bit, on in (
            (regs.SLTCTL.PDCE, True),
            (regs.SLTCTL.ABPE, bool(caps["ABP"])),
            (regs.SLTCTL.DLLSCE, bool(regs.PCIE_LNKCAP.DLLLARC.get(self.regs.read(regs.PCIE_CAP.link_capabilities)))),
            (regs.SLTCTL.CCIE, not caps["NCCS"]),
            (regs.SLTCTL.HPIE, True),
        ):
            ctl = bit.set(ctl, int(on))
        self.command(ctl)

    def _event(self, what: str, expected: str) -> SlotEvent:
        """Read (and check) the event, take the interrupt, acknowledge the status bits."""
        if self.msix is not None:
            self.msix.wait(self.vector, timeout=1.0)
        event = SlotEvent(self.status(), self.link_active())
        if not event.has(expected):
            raise HotplugSlotError(
                f"{self.port.bdf}: {what}: Slot Status {event.status:#06x} ({', '.join(event.names) or 'nothing'}) "
                f"has no {expected}"
            )
        self.acknowledge(event.status)
        return event

    def handle_plug(self) -> SlotEvent:
        """A device was added: Presence Detect Changed with Presence Detect State; the guest
        acknowledges, then powers the slot and its power indicator on (pciehp_enable_slot)."""
        event = self._event("after device_add", "PDC")
        if not event.has("PDS"):
            raise HotplugSlotError(f"{self.port.bdf}: presence changed but no device is present (PDS 0)")
        self.power(True)
        return event

    def handle_unplug_request(self) -> SlotEvent:
        """QEMU pressed the Attention Button for ``device_del``: as pciehp does, blink the power
        indicator (the 5 s in which a second press cancels), then turn the slot and its
        indicator off, upon which QEMU removes the device (Presence Detect Changed, PDS 0)."""
        event = self._event("after device_del", "ABP")
        ctl = self.control()
        self.command(regs.SLTCTL.PIC.set(ctl, regs.INDICATOR_BLINK))
        self.power(False)
        return event

    def handle_removal(self) -> SlotEvent:
        """The slot emptied (after power-off): Presence Detect Changed and PDS clear."""
        event = SlotEvent(self.status(), self.link_active())
        if not event.has("PDC") or event.has("PDS"):
            raise HotplugSlotError(
                f"{self.port.bdf}: after power-off Slot Status is {event.status:#06x} ({', '.join(event.names)}); "
                "a removal shows PDC with PDS 0"
            )
        self.acknowledge(event.status)
        return event

    def power(self, on: bool) -> None:
        """Power Controller Control and the power indicator in one command (§6.7.1.8)."""
        ctl = self.control()
        ctl = regs.SLTCTL.PCC.set(ctl, regs.POWER_ON if on else regs.POWER_OFF)
        ctl = regs.SLTCTL.PIC.set(ctl, regs.INDICATOR_ON if on else regs.INDICATOR_OFF)
        self.command(ctl)


class AcpiPciHotplug:
    """PIIX4's ACPI PCI hot-plug registers and GPE0 block, as the DSDT's methods use them:
    ``\\_GPE._E01`` (PCNT) selects each hot-plug bus (BNUM), reads PCIU/PCID and notifies;
    a slot's ``_EJ0`` writes its bit to B0EJ. 32-bit accesses (hw/acpi/pcihp.c)."""

    def __init__(
        self, qtest: QtestClient, base: int = regs.ACPI_PCIHP_BASE_PIIX4, gpe0: int = regs.GPE0_BASE_PIIX4
    ) -> None:
        self.qtest = qtest
        self.regs = RegisterBlock(
            regs.ACPI_PCIHP,
            lambda off, width: port_read(qtest, base + off, width),
            lambda off, width, value: port_write(qtest, base + off, width, value),
        )
        self.gpe = RegisterBlock(
            regs.GPE0,
            lambda off, width: port_read(qtest, gpe0 + off, width),
            lambda off, width, value: port_write(qtest, gpe0 + off, width, value),
        )

    def enable(self) -> None:
        """Enable the PCI hot-plug GPE (what the OS does for each ``_Exx`` method it finds)."""
        en = self.gpe.read(regs.GPE0.GPE0_EN)
        self.gpe.write(regs.GPE0.GPE0_EN, regs.GPE_PCI_HOTPLUG.set(en, 1))

    def gpe_pending(self) -> bool:
        return bool(regs.GPE_PCI_HOTPLUG.get(self.gpe.read(regs.GPE0.GPE0_STS)))

    def removable(self, bsel: int = 0) -> int:
        """PCRM: the slots of bus ``bsel`` whose devices can be hot-unplugged."""
        self.regs.write(regs.ACPI_PCIHP.BNUM, bsel)
        return self.regs.read(regs.ACPI_PCIHP.PCRM)

    def handle_event(self, bsel: int = 0) -> tuple[int, int]:
        """As ``\\_GPE._E01``: the GPE must be pending; select the bus, read the slots that
        came up (PCIU; reading clears it) and those asked to go down (PCID), then clear the
        GPE status (write 1, ACPI 6.4 §4.8.4.1). Returns (up, down) bitmaps."""
        if not self.gpe_pending():
            raise HotplugSlotError("no PCI hot-plug GPE pending (GPE0_STS bit 1 is 0)")
        self.regs.write(regs.ACPI_PCIHP.BNUM, bsel)
        up = self.regs.read(regs.ACPI_PCIHP.PCIU)
        down = self.regs.read(regs.ACPI_PCIHP.PCID)
        self.gpe.write(regs.GPE0.GPE0_STS, regs.GPE_PCI_HOTPLUG.mask)
        return up, down

    def eject(self, slot: int, bsel: int = 0) -> None:
        """A slot's ``_EJ0``: write its bit to B0EJ, upon which QEMU unplugs the device."""
        if not 0 <= slot < 32:
            raise ValueError(f"slot {slot} is not 0..31")
        self.regs.write(regs.ACPI_PCIHP.BNUM, bsel)
        self.regs.write(regs.ACPI_PCIHP.B0EJ, 1 << slot)

    def plugged(self, slot: int, bsel: int = 0) -> None:
        """Handle the event of a device_add into ``slot``: its bit must be up."""
        up, _ = self.handle_event(bsel)
        if not up >> slot & 1:
            raise HotplugSlotError(f"ACPI hot-plug event without slot {slot} in PCIU ({up:#010x})")

    def unplug_requested(self, slot: int, bsel: int = 0) -> None:
        """Handle the event of a device_del of the device in ``slot`` and eject it."""
        _, down = self.handle_event(bsel)
        if not down >> slot & 1:
            raise HotplugSlotError(f"ACPI hot-plug event without slot {slot} in PCID ({down:#010x})")
        self.eject(slot, bsel)
