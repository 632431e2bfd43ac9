"""PCI register layouts, declared once, with the names the PCI Local Bus / PCIe specs use.

Offsets and widths in bytes. Only data lives here; ``bus.py`` and ``config.py`` read it.
"""

from __future__ import annotations

from ..registers import BitLayout, Bits, Field, Layout


#: Type 0 (endpoint) configuration header, PCI 3.0 §6.1.
class Type0HeaderLayout(Layout, struct="type0_header", size=0x40):
    vendor_id = Field(0x00, 2)
    device_id = Field(0x02, 2)
    command = Field(0x04, 2)
    status = Field(0x06, 2)
    revision_id = Field(0x08, 1)
    prog_if = Field(0x09, 1)
    subclass = Field(0x0A, 1)
    base_class = Field(0x0B, 1)
    cache_line_size = Field(0x0C, 1)
    latency_timer = Field(0x0D, 1)
    header_type = Field(0x0E, 1)
    bist = Field(0x0F, 1)
    bar0 = Field(0x10, 4)
    bar1 = Field(0x14, 4)
    bar2 = Field(0x18, 4)
    bar3 = Field(0x1C, 4)
    bar4 = Field(0x20, 4)
    bar5 = Field(0x24, 4)
    cardbus_cis = Field(0x28, 4)
    subsystem_vendor_id = Field(0x2C, 2)
    subsystem_id = Field(0x2E, 2)
    expansion_rom = Field(0x30, 4)
    capabilities_ptr = Field(0x34, 1)
    interrupt_line = Field(0x3C, 1)
    interrupt_pin = Field(0x3D, 1)
    min_gnt = Field(0x3E, 1)
    max_lat = Field(0x3F, 1)


TYPE0_HEADER = Type0HeaderLayout()


#: Type 1 (PCI-to-PCI bridge) header fields past the common first 16 bytes, PCI-PCI Bridge 1.2 §3.2.
class Type1HeaderLayout(Layout, struct="type1_header", size=0x40):
    vendor_id = Field(0x00, 2)
    device_id = Field(0x02, 2)
    command = Field(0x04, 2)
    status = Field(0x06, 2)
    header_type = Field(0x0E, 1)
    bar0 = Field(0x10, 4)
    bar1 = Field(0x14, 4)
    primary_bus = Field(0x18, 1)
    secondary_bus = Field(0x19, 1)
    subordinate_bus = Field(0x1A, 1)
    io_base = Field(0x1C, 1)
    io_limit = Field(0x1D, 1)
    secondary_status = Field(0x1E, 2)
    memory_base = Field(0x20, 2)
    memory_limit = Field(0x22, 2)
    prefetch_base = Field(0x24, 2)
    prefetch_limit = Field(0x26, 2)
    prefetch_base_upper = Field(0x28, 4)
    prefetch_limit_upper = Field(0x2C, 4)
    io_base_upper = Field(0x30, 2)
    io_limit_upper = Field(0x32, 2)
    capabilities_ptr = Field(0x34, 1)
    expansion_rom = Field(0x38, 4)
    interrupt_line = Field(0x3C, 1)
    interrupt_pin = Field(0x3D, 1)
    bridge_control = Field(0x3E, 2)


TYPE1_HEADER = Type1HeaderLayout()

BAR_COUNT = {0: 6, 1: 2}
HEADER_TYPE_MASK = 0x7F
HEADER_MULTIFUNCTION = 0x80


class CommandBits(BitLayout, register="command"):
    io_space = Bits(0)
    memory_space = Bits(1)
    bus_master = Bits(2)
    special_cycles = Bits(3)
    mwi_enable = Bits(4)
    vga_palette_snoop = Bits(5)
    parity_error_response = Bits(6)
    serr_enable = Bits(8)
    fast_back_to_back = Bits(9)
    interrupt_disable = Bits(10)


COMMAND = CommandBits()


class StatusBits(BitLayout, register="status"):
    interrupt_status = Bits(3)
    capabilities_list = Bits(4)
    mhz66_capable = Bits(5)
    fast_back_to_back_capable = Bits(7)
    master_data_parity_error = Bits(8)
    signaled_target_abort = Bits(11)
    received_target_abort = Bits(12)
    received_master_abort = Bits(13)
    signaled_system_error = Bits(14)
    detected_parity_error = Bits(15)


STATUS = StatusBits()


#: BAR low bits, PCI 3.0 §6.2.5.1.
class BarBits(BitLayout, register="bar"):
    io_space = Bits(0)
    memory_type = Bits(1, 2)  # 0: 32-bit, 2: 64-bit
    prefetchable = Bits(3)


BAR = BarBits()
BAR_IO_MASK = 0xFFFF_FFFC
BAR_MEM_MASK = 0xFFFF_FFF0
BAR_MEM_TYPE_64 = 2
ROM_ADDRESS_MASK = 0xFFFF_F800
ROM_ENABLE = 0x1


#: Common head of every capability in the standard list, PCI 3.0 §6.7.
class CapHeaderLayout(Layout, struct="cap_header"):
    cap_id = Field(0, 1)
    cap_next = Field(1, 1)


CAP_HEADER = CapHeaderLayout()


#: Head of an extended capability (config offset >= 0x100), PCIe 4.0 §7.6.3.
class ExtCapHeaderLayout(Layout, struct="ext_cap_header"):
    header = Field(0, 4)


EXT_CAP_HEADER = ExtCapHeaderLayout()


class ExtCapBits(BitLayout, register="ext_cap"):
    cap_id = Bits(0, 16)
    version = Bits(16, 4)
    next = Bits(20, 12)


EXT_CAP = ExtCapBits()
EXT_CAP_START = 0x100
CONFIG_SPACE_SIZE = 0x100
EXT_CONFIG_SPACE_SIZE = 0x1000

#: Capability IDs (PCI Code and ID Assignment spec §2).
CAP_ID_NAMES = {
    0x01: "Power Management",
    0x02: "AGP",
    0x03: "VPD",
    0x04: "Slot ID",
    0x05: "MSI",
    0x06: "CompactPCI Hot Swap",
    0x07: "PCI-X",
    0x08: "HyperTransport",
    0x09: "Vendor Specific",
    0x0A: "Debug port",
    0x0B: "CompactPCI CRC",
    0x0C: "PCI Hot-Plug",
    0x0D: "Bridge Subsystem Vendor ID",
    0x0E: "AGP 8x",
    0x0F: "Secure Device",
    0x10: "PCI Express",
    0x11: "MSI-X",
    0x12: "SATA",
    0x13: "Advanced Features",
    0x14: "Enhanced Allocation",
    0x15: "Flattening Portal Bridge",
}
CAP_ID_VENDOR = 0x09
CAP_ID_PCIE = 0x10
CAP_ID_MSIX = 0x11
CAP_ID_MSI = 0x05

EXT_CAP_ID_NAMES = {
    0x0001: "Advanced Error Reporting",
    0x0002: "Virtual Channel",
    0x0003: "Device Serial Number",
    0x0004: "Power Budgeting",
    0x000B: "Vendor Specific Extended",
    0x000D: "Access Control Services",
    0x000E: "Alternative Routing-ID Interpretation",
    0x000F: "Address Translation Services",
    0x0010: "SR-IOV",
    0x0013: "Page Request",
    0x0015: "Resizable BAR",
    0x0018: "Latency Tolerance Reporting",
    0x0019: "Secondary PCI Express",
    0x001B: "Process Address Space ID",
    0x001E: "L1 PM Substates",
    0x0023: "Designated Vendor-Specific",
}


#: MSI-X capability structure, PCI 3.0 §6.8.2.
class MsixCapLayout(Layout, struct="msix_cap"):
    cap_id = Field(0x00, 1)
    cap_next = Field(0x01, 1)
    message_control = Field(0x02, 2)
    table = Field(0x04, 4)
    pba = Field(0x08, 4)


MSIX_CAP = MsixCapLayout()


class MsixControlBits(BitLayout, register="msix_message_control"):
    table_size = Bits(0, 11)
    function_mask = Bits(14)
    enable = Bits(15)


MSIX_CONTROL = MsixControlBits()
MSIX_BIR = Bits(0, 3, name="bir")
MSIX_OFFSET_MASK = 0xFFFF_FFF8


#: One MSI-X table entry (16 bytes), PCI 3.0 §6.8.2.6-9.
class MsixEntryLayout(Layout, struct="msix_entry", size=16):
    message_address = Field(0x0, 4)
    message_upper_address = Field(0x4, 4)
    message_data = Field(0x8, 4)
    vector_control = Field(0xC, 4)


MSIX_ENTRY = MsixEntryLayout()
MSIX_VECTOR_MASKED = 0x1


#: MSI capability (32-bit and 64-bit forms share the head), PCI 3.0 §6.8.1.
class MsiControlBits(BitLayout, register="msi_message_control"):
    enable = Bits(0)
    multiple_message_capable = Bits(1, 3)
    address_64bit = Bits(7)
    per_vector_masking = Bits(8)


MSI_CONTROL = MsiControlBits()


#: PCI Express capability, its device and link registers (PCIe 4.0 §7.5.3.1-§7.5.3.8).
class PcieCapLayout(Layout, struct="pcie_cap"):
    cap_id = Field(0, 1)
    cap_next = Field(1, 1)
    pcie_capabilities = Field(2, 2)
    device_capabilities = Field(0x4, 4)
    device_control = Field(0x8, 2)
    device_status = Field(0xA, 2)
    link_capabilities = Field(0xC, 4)
    link_control = Field(0x10, 2)
    link_status = Field(0x12, 2)
    #: Slot registers (§7.5.3.9-§7.5.3.11): ports with Slot Implemented, hot-plug's registers.
    SLTCAP = Field(0x14, 4)
    SLTCTL = Field(0x18, 2)
    SLTSTA = Field(0x1A, 2)


PCIE_CAP = PcieCapLayout()


class PcieCapsBits(BitLayout, register="pcie_capabilities"):
    version = Bits(0, 4)
    port_type = Bits(4, 4)
    slot_implemented = Bits(8)
    interrupt_message_number = Bits(9, 5)


PCIE_CAPS = PcieCapsBits()


#: Device Capabilities (PCIe 4.0 §7.5.3.3).
class PcieDevCapBits(BitLayout, register="device_capabilities"):
    max_payload_size_supported = Bits(0, 3)
    role_based_error_reporting = Bits(15)
    function_level_reset_capability = Bits(28)


PCIE_DEVCAP = PcieDevCapBits()


#: Device Control (PCIe 4.0 §7.5.3.4).
class PcieDevCtlBits(BitLayout, register="device_control"):
    correctable_error_reporting_enable = Bits(0)
    non_fatal_error_reporting_enable = Bits(1)
    fatal_error_reporting_enable = Bits(2)
    unsupported_request_reporting_enable = Bits(3)
    initiate_function_level_reset = Bits(15)


PCIE_DEVCTL = PcieDevCtlBits()

#: Extended capability IDs the harness checks (PCI Code and ID Assignment spec §3).
EXT_CAP_ID_AER = 0x0001
EXT_CAP_ID_ATS = 0x000F


#: Address Translation Services extended capability (PCIe 4.0 §10.5.1).
class AtsCapLayout(Layout, struct="ats_ext_cap"):
    header = Field(0, 4)
    ats_capability = Field(4, 2)
    ats_control = Field(6, 2)


ATS_CAP = AtsCapLayout()


class AtsControlBits(BitLayout, register="ats_control"):
    smallest_translation_unit = Bits(0, 5)
    enable = Bits(15)


ATS_CONTROL = AtsControlBits()

#: Power Management capability (PCI Bus Power Management Interface 1.2 §3.2).
CAP_ID_PM = 0x01


class PmCapLayout(Layout, struct="pm_cap"):
    cap_id = Field(0, 1)
    cap_next = Field(1, 1)
    pmc = Field(2, 2)
    pmcsr = Field(4, 2)


PM_CAP = PmCapLayout()


class PmcBits(BitLayout, register="pmc"):
    version = Bits(0, 3)


PMC = PmcBits()


class PmcsrBits(BitLayout, register="pmcsr"):
    power_state = Bits(0, 2)
    no_soft_reset = Bits(3)


PMCSR = PmcsrBits()
PM_STATE_D0, PM_STATE_D3HOT = 0, 3
PCIE_PORT_TYPES = {
    0x0: "Endpoint",
    0x1: "Legacy Endpoint",
    0x4: "Root Port",
    0x5: "Upstream Port",
    0x6: "Downstream Port",
    0x7: "PCIe-to-PCI Bridge",
    0x8: "PCI-to-PCIe Bridge",
    0x9: "Root Complex Integrated Endpoint",
    0xA: "Root Complex Event Collector",
}

#: Base class names (PCI Code and ID Assignment spec §1), with the subclasses a harness meets.
CLASS_NAMES = {
    0x00: "Unclassified device",
    0x01: "Mass storage controller",
    0x02: "Network controller",
    0x03: "Display controller",
    0x04: "Multimedia controller",
    0x05: "Memory controller",
    0x06: "Bridge",
    0x07: "Communication controller",
    0x08: "Generic system peripheral",
    0x09: "Input device controller",
    0x0C: "Serial bus controller",
    0xFF: "Unassigned class",
}
SUBCLASS_NAMES = {
    (0x01, 0x00): "SCSI storage controller",
    (0x01, 0x01): "IDE interface",
    (0x01, 0x06): "SATA controller",
    (0x01, 0x80): "Mass storage controller",
    (0x02, 0x00): "Ethernet controller",
    (0x05, 0x00): "RAM memory",
    (0x06, 0x00): "Host bridge",
    (0x06, 0x01): "ISA bridge",
    (0x06, 0x04): "PCI bridge",
    (0x06, 0x80): "Bridge",
    (0x07, 0x80): "Communication controller",
    (0x00, 0xFF): "Unclassified device",
    (0x0C, 0x05): "SMBus",
    (0x00, 0x00): "Non-VGA unclassified device",
}

INTERRUPT_PINS = {0: "none", 1: "INTA#", 2: "INTB#", 3: "INTC#", 4: "INTD#"}


def class_name(base: int, sub: int) -> str:
    return SUBCLASS_NAMES.get((base, sub)) or CLASS_NAMES.get(base, f"class {base:02x}")


#: q35's MCH: PCIEXBAR locates the ECAM (MMCONFIG) window (Intel 3 Series datasheet §5.1.11;
#: QEMU hw/pci-host/q35.c). Firmware programs it; under qtest nobody does, so the harness must.
MCH_PCIEXBAR = Field(0x60, 8, name="pciexbar")


class PciexbarBits(BitLayout, register="pciexbar"):
    enable = Bits(0)
    length = Bits(1, 2)


PCIEXBAR = PciexbarBits()
PCIEXBAR_LENGTH_256M = 0
PCIEXBAR_DEFAULT_BASE = 0xB000_0000
ECAM_BUS_SHIFT, ECAM_DEVICE_SHIFT, ECAM_FUNCTION_SHIFT = 20, 15, 12


#: Link Capabilities / Link Status bits hot-plug uses (PCIe 4.0 §7.5.3.6, §7.5.3.8).
class PcieLnkCapBits(BitLayout, register="LNKCAP"):
    DLLLARC = Bits(20)


PCIE_LNKCAP = PcieLnkCapBits()


class PcieLnkStaBits(BitLayout, register="LNKSTA"):
    DLLLA = Bits(13)


PCIE_LNKSTA = PcieLnkStaBits()


#: Slot Capabilities (PCIe 4.0 §7.5.3.9).
class SltCapBits(BitLayout, register="SLTCAP"):
    ABP = Bits(0)
    PCP = Bits(1)
    MRLSP = Bits(2)
    AIP = Bits(3)
    PIP = Bits(4)
    HPS = Bits(5)
    HPC = Bits(6)
    EIP = Bits(17)
    NCCS = Bits(18)
    PSN = Bits(19, 13)


SLTCAP = SltCapBits()


#: Slot Control (PCIe 4.0 §7.5.3.10). AIC/PIC take the indicator values below; PCC 1 is power off.
class SltCtlBits(BitLayout, register="SLTCTL"):
    ABPE = Bits(0)
    PFDE = Bits(1)
    MRLSCE = Bits(2)
    PDCE = Bits(3)
    CCIE = Bits(4)
    HPIE = Bits(5)
    AIC = Bits(6, 2)
    PIC = Bits(8, 2)
    PCC = Bits(10)
    EIC = Bits(11)
    DLLSCE = Bits(12)


SLTCTL = SltCtlBits()
INDICATOR_ON = 0b01
INDICATOR_BLINK = 0b10
INDICATOR_OFF = 0b11
POWER_ON = 0
POWER_OFF = 1


#: Slot Status (PCIe 4.0 §7.5.3.11); the change bits are RW1C.
class SltStaBits(BitLayout, register="SLTSTA"):
    ABP = Bits(0)
    PFD = Bits(1)
    MRLSC = Bits(2)
    PDC = Bits(3)
    CC = Bits(4)
    MRLSS = Bits(5)
    PDS = Bits(6)
    EIS = Bits(7)
    DLLSC = Bits(8)


SLTSTA = SltStaBits()
#: The RW1C event bits of Slot Status.
SLTSTA_EVENTS = sum(b.mask for b in (SLTSTA.ABP, SLTSTA.PFD, SLTSTA.MRLSC, SLTSTA.PDC, SLTSTA.CC, SLTSTA.DLLSC))


#: QEMU's Red Hat vendor capability on bridges: resources firmware reserves for hot-plug
#: (QEMU docs/pcie.txt "Hot-plug", hw/pci/pci_bridge.c pci_bridge_qemu_reserve_cap_init).
class RedHatResReserveLayout(Layout, struct="redhat_res_reserve_cap"):
    cap_id = Field(0, 1)
    cap_next = Field(1, 1)
    len = Field(2, 1)
    type = Field(3, 1)
    bus_res = Field(4, 4)
    io = Field(8, 8)
    mem = Field(16, 4)
    mem_pref_32 = Field(20, 4)
    mem_pref_64 = Field(24, 8)


REDHAT_RES_RESERVE = RedHatResReserveLayout()
REDHAT_CAP_RESOURCE_RESERVE = 1
#: The vendor id of the bridges that carry it (Red Hat, Inc.).
VENDOR_REDHAT = 0x1B36


#: PIIX4 ACPI PCI hot-plug registers (QEMU hw/acpi/pcihp.c; 32-bit accesses only) and the
#: GPE0 block they raise bit 1 of (hw/acpi/piix4.c; ACPI 6.4 §4.8.4.1: status is write-1-to-clear).
class AcpiPciHpLayout(Layout, struct="acpi_pcihp", size=0x18):
    PCIU = Field(0x00, 4)
    PCID = Field(0x04, 4)
    B0EJ = Field(0x08, 4)
    PCRM = Field(0x0C, 4)
    BNUM = Field(0x10, 4)
    PCIDX = Field(0x14, 4)


ACPI_PCIHP = AcpiPciHpLayout()
ACPI_PCIHP_BASE_PIIX4 = 0xAE00


class Gpe0Layout(Layout, struct="piix4_gpe0", size=4):
    GPE0_STS = Field(0, 2)
    GPE0_EN = Field(2, 2)


GPE0 = Gpe0Layout()
GPE0_BASE_PIIX4 = 0xAFE0
#: GPE bit QEMU raises for PCI hot-plug (ACPI_PCI_HOTPLUG_STATUS; the DSDT's \_GPE._E01).
GPE_PCI_HOTPLUG = Bits(1, name="pci_hotplug")
