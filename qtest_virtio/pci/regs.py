"""PCI register layouts, declared once, with the names the PCI Local Bus / PCIe specs use.

Offsets and widths in bytes. Only data lives here; ``bus.py`` and ``config.py`` read it.
"""

from __future__ import annotations

from ..registers import BitLayout, Bits, Field, Layout

#: Type 0 (endpoint) configuration header, PCI 3.0 §6.1.
TYPE0_HEADER = Layout(
    "type0_header",
    [
        Field("vendor_id", 0x00, 2),
        Field("device_id", 0x02, 2),
        Field("command", 0x04, 2),
        Field("status", 0x06, 2),
        Field("revision_id", 0x08, 1),
        Field("prog_if", 0x09, 1),
        Field("subclass", 0x0A, 1),
        Field("base_class", 0x0B, 1),
        Field("cache_line_size", 0x0C, 1),
        Field("latency_timer", 0x0D, 1),
        Field("header_type", 0x0E, 1),
        Field("bist", 0x0F, 1),
        Field("bar0", 0x10, 4),
        Field("bar1", 0x14, 4),
        Field("bar2", 0x18, 4),
        Field("bar3", 0x1C, 4),
        Field("bar4", 0x20, 4),
        Field("bar5", 0x24, 4),
        Field("cardbus_cis", 0x28, 4),
        Field("subsystem_vendor_id", 0x2C, 2),
        Field("subsystem_id", 0x2E, 2),
        Field("expansion_rom", 0x30, 4),
        Field("capabilities_ptr", 0x34, 1),
        Field("interrupt_line", 0x3C, 1),
        Field("interrupt_pin", 0x3D, 1),
        Field("min_gnt", 0x3E, 1),
        Field("max_lat", 0x3F, 1),
    ],
    size=0x40,
)

#: Type 1 (PCI-to-PCI bridge) header fields past the common first 16 bytes, PCI-PCI Bridge 1.2 §3.2.
TYPE1_HEADER = Layout(
    "type1_header",
    [
        Field("vendor_id", 0x00, 2),
        Field("device_id", 0x02, 2),
        Field("command", 0x04, 2),
        Field("status", 0x06, 2),
        Field("header_type", 0x0E, 1),
        Field("bar0", 0x10, 4),
        Field("bar1", 0x14, 4),
        Field("primary_bus", 0x18, 1),
        Field("secondary_bus", 0x19, 1),
        Field("subordinate_bus", 0x1A, 1),
        Field("io_base", 0x1C, 1),
        Field("io_limit", 0x1D, 1),
        Field("secondary_status", 0x1E, 2),
        Field("memory_base", 0x20, 2),
        Field("memory_limit", 0x22, 2),
        Field("prefetch_base", 0x24, 2),
        Field("prefetch_limit", 0x26, 2),
        Field("prefetch_base_upper", 0x28, 4),
        Field("prefetch_limit_upper", 0x2C, 4),
        Field("io_base_upper", 0x30, 2),
        Field("io_limit_upper", 0x32, 2),
        Field("capabilities_ptr", 0x34, 1),
        Field("expansion_rom", 0x38, 4),
        Field("interrupt_line", 0x3C, 1),
        Field("interrupt_pin", 0x3D, 1),
        Field("bridge_control", 0x3E, 2),
    ],
    size=0x40,
)

BAR_COUNT = {0: 6, 1: 2}
HEADER_TYPE_MASK = 0x7F
HEADER_MULTIFUNCTION = 0x80

COMMAND = BitLayout(
    "command",
    [
        Bits("io_space", 0),
        Bits("memory_space", 1),
        Bits("bus_master", 2),
        Bits("special_cycles", 3),
        Bits("mwi_enable", 4),
        Bits("vga_palette_snoop", 5),
        Bits("parity_error_response", 6),
        Bits("serr_enable", 8),
        Bits("fast_back_to_back", 9),
        Bits("interrupt_disable", 10),
    ],
)

STATUS = BitLayout(
    "status",
    [
        Bits("interrupt_status", 3),
        Bits("capabilities_list", 4),
        Bits("mhz66_capable", 5),
        Bits("fast_back_to_back_capable", 7),
        Bits("master_data_parity_error", 8),
        Bits("signaled_target_abort", 11),
        Bits("received_target_abort", 12),
        Bits("received_master_abort", 13),
        Bits("signaled_system_error", 14),
        Bits("detected_parity_error", 15),
    ],
)

#: BAR low bits, PCI 3.0 §6.2.5.1.
BAR = BitLayout(
    "bar",
    [
        Bits("io_space", 0),
        Bits("memory_type", 1, 2),  # 0: 32-bit, 2: 64-bit
        Bits("prefetchable", 3),
    ],
)
BAR_IO_MASK = 0xFFFF_FFFC
BAR_MEM_MASK = 0xFFFF_FFF0
BAR_MEM_TYPE_64 = 2
ROM_ADDRESS_MASK = 0xFFFF_F800
ROM_ENABLE = 0x1

#: Common head of every capability in the standard list, PCI 3.0 §6.7.
CAP_HEADER = Layout("cap_header", [Field("cap_id", 0, 1), Field("cap_next", 1, 1)])
#: Head of an extended capability (config offset >= 0x100), PCIe 4.0 §7.6.3.
EXT_CAP_HEADER = Layout("ext_cap_header", [Field("header", 0, 4)])
EXT_CAP = BitLayout("ext_cap", [Bits("cap_id", 0, 16), Bits("version", 16, 4), Bits("next", 20, 12)])
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
MSIX_CAP = Layout(
    "msix_cap",
    [
        Field("cap_id", 0x00, 1),
        Field("cap_next", 0x01, 1),
        Field("message_control", 0x02, 2),
        Field("table", 0x04, 4),
        Field("pba", 0x08, 4),
    ],
)
MSIX_CONTROL = BitLayout(
    "msix_message_control",
    [Bits("table_size", 0, 11), Bits("function_mask", 14), Bits("enable", 15)],
)
MSIX_BIR = Bits("bir", 0, 3)
MSIX_OFFSET_MASK = 0xFFFF_FFF8
#: One MSI-X table entry (16 bytes), PCI 3.0 §6.8.2.6-9.
MSIX_ENTRY = Layout(
    "msix_entry",
    [
        Field("message_address", 0x0, 4),
        Field("message_upper_address", 0x4, 4),
        Field("message_data", 0x8, 4),
        Field("vector_control", 0xC, 4),
    ],
    size=16,
)
MSIX_VECTOR_MASKED = 0x1

#: MSI capability (32-bit and 64-bit forms share the head), PCI 3.0 §6.8.1.
MSI_CONTROL = BitLayout(
    "msi_message_control",
    [
        Bits("enable", 0),
        Bits("multiple_message_capable", 1, 3),
        Bits("address_64bit", 7),
        Bits("per_vector_masking", 8),
    ],
)

#: PCI Express capability head (enough to name the port type), PCIe 4.0 §7.5.3.
PCIE_CAP = Layout("pcie_cap", [Field("cap_id", 0, 1), Field("cap_next", 1, 1), Field("pcie_capabilities", 2, 2)])
PCIE_CAPS = BitLayout("pcie_capabilities", [Bits("version", 0, 4), Bits("port_type", 4, 4)])
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
MCH_PCIEXBAR = Field("pciexbar", 0x60, 8)
PCIEXBAR = BitLayout("pciexbar", [Bits("enable", 0), Bits("length", 1, 2)])
PCIEXBAR_LENGTH_256M = 0
PCIEXBAR_DEFAULT_BASE = 0xB000_0000
ECAM_BUS_SHIFT, ECAM_DEVICE_SHIFT, ECAM_FUNCTION_SHIFT = 20, 15, 12
