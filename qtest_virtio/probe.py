"""What a driver sees without a guest: every PCI function, its BARs as assigned, its capabilities
decoded by name, and for virtio devices the virtio capabilities and offered features.

Used by ``qtest-virtio probe``; returns plain data (``probe()``) and formats it like ``lspci -vv``
for a device model (``format_report()``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .devices import registry
from .pci import MsixCapability, PciBus, PciFunction
from .pci import regs as pci_regs
from .transport import DeviceKind, VirtioCap, VirtioPciMap, layout

VENDOR_NAMES = {0x8086: "Intel Corporation", 0x1AF4: "Red Hat, Inc.", 0x1B36: "Red Hat, Inc.", 0x1234: "QEMU"}


@dataclass
class CapabilityInfo:
    offset: int
    id: int
    name: str
    extended: bool = False
    detail: str = ""
    fields: dict[str, int] = field(default_factory=dict)


@dataclass
class FunctionInfo:
    bdf: str
    vendor_id: int
    device_id: int
    class_code: int
    class_name: str
    revision: int
    subsystem: tuple[int, int] | None
    command: list[str]
    interrupt_pin: str
    bars: list[dict[str, Any]]
    rom_size: int
    capabilities: list[CapabilityInfo]
    virtio: dict[str, Any] | None = None


def _virtio_cap_detail(cap: VirtioCap) -> tuple[str, dict[str, int]]:
    detail = f"virtio {cap.name}: BAR={cap.bar} offset={cap.offset:#06x} length={cap.length:#x}"
    if cap.cfg_type == layout.CFG_TYPE_NOTIFY:
        detail += f" multiplier={cap.notify_off_multiplier}"
    return detail, dict(cap.fields)


def _msix_detail(fn: PciFunction, offset: int) -> tuple[str, dict[str, int]]:
    msix = MsixCapability.at(fn, offset)
    control = msix.control(fn)
    fields = {
        "table_size": msix.table_size,
        "enable": control["enable"],
        "function_mask": control["function_mask"],
        "table_bar": msix.table_bar,
        "table_offset": msix.table_offset,
        "pba_bar": msix.pba_bar,
        "pba_offset": msix.pba_offset,
    }
    detail = (
        f"Enable{'+' if fields['enable'] else '-'} Count={fields['table_size']} "
        f"Masked{'+' if fields['function_mask'] else '-'} "
        f"Vector table: BAR={fields['table_bar']} offset={fields['table_offset']:#06x} "
        f"PBA: BAR={fields['pba_bar']} offset={fields['pba_offset']:#06x}"
    )
    return detail, fields


def _pcie_detail(fn: PciFunction, offset: int) -> str:
    caps = pci_regs.PCIE_CAPS.decode(fn.read_config(offset + pci_regs.PCIE_CAP.pcie_capabilities.offset, 2))
    return (
        f"v{caps['version']} {pci_regs.PCIE_PORT_TYPES.get(caps['port_type'], 'port type ' + str(caps['port_type']))}"
    )


def _offered_features(vmap: VirtioPciMap, vtype: int) -> dict[str, list[str]]:
    """Device features as each register layout presents them (reading them changes nothing
    but the feature-select register)."""
    offered: dict[str, list[str]] = {}
    device_bits = registry.feature_bits().get(vtype)
    if vmap.legacy is not None and vmap.address(vmap.legacy) is not None:
        bits = vmap.block(vmap.legacy).read(layout.LEGACY_CFG.device_features)
        offered["legacy"] = layout.feature_names(bits, device_bits)
    if vmap.common is not None:
        common = vmap.block(vmap.common)
        bits = 0
        for word in (0, 1):
            common.write(layout.COMMON_CFG.device_feature_select, word)
            bits |= common.read(layout.COMMON_CFG.device_feature) << (32 * word)
        offered["modern"] = layout.feature_names(bits, device_bits)
    return offered


#: probe's words for the device kinds (its report and JSON have always said these).
_KIND_WORDS = {
    DeviceKind.LEGACY: "legacy-only",
    DeviceKind.TRANSITIONAL: "transitional",
    DeviceKind.MODERN: "modern-only",
}


def describe_function(fn: PciFunction) -> FunctionInfo:
    caps: list[CapabilityInfo] = []
    is_virtio = fn.vendor_id == layout.VIRTIO_PCI_VENDOR_ID
    vmap = VirtioPciMap.of(fn) if is_virtio else None
    for cap in fn.capabilities():
        ci = CapabilityInfo(cap.offset, cap.id, cap.name, cap.extended)
        if cap.extended:
            ci.detail = f"version {cap.version}"
        elif cap.id == pci_regs.CAP_ID_VENDOR and vmap is not None and (vcap := vmap.cap_at(cap.offset)):
            ci.detail, ci.fields = _virtio_cap_detail(vcap)
        elif cap.id == pci_regs.CAP_ID_MSIX:
            ci.detail, ci.fields = _msix_detail(fn, cap.offset)
        elif cap.id == pci_regs.CAP_ID_PCIE:
            ci.detail = _pcie_detail(fn, cap.offset)
        caps.append(ci)
    pin = fn.config.read(pci_regs.TYPE0_HEADER.interrupt_pin)
    info = FunctionInfo(
        bdf=fn.bdf,
        vendor_id=fn.vendor_id,
        device_id=fn.device_id,
        class_code=fn.class_code,
        class_name=fn.class_name,
        revision=fn.revision_id,
        subsystem=fn.subsystem,
        command=fn.command_flags,
        interrupt_pin=pci_regs.INTERRUPT_PINS.get(pin, str(pin)),
        bars=[
            {
                "index": b.index,
                "kind": b.kind,
                "address": b.address,
                "size": b.size,
                "prefetchable": b.prefetchable,
                "text": b.describe(),
            }
            for b in fn.bars
        ],
        rom_size=fn.rom_size,
        capabilities=caps,
    )
    if vmap is not None:
        vtype = layout.virtio_device_type(fn.device_id, fn.subsystem[1] if fn.subsystem else None)
        if vtype is not None:
            info.virtio = {
                "device_type": vtype,
                "device_name": layout.DEVICE_TYPES.get(vtype, f"type {vtype}"),
                "kind": _KIND_WORDS[vmap.kind],
                "offered_features": _offered_features(vmap, vtype),
            }
    return info


def probe(pci: PciBus) -> list[FunctionInfo]:
    """Enumerate, assign resources as firmware would, and describe every function."""
    pci.assign_bars()
    return [describe_function(fn) for fn in pci.devices()]


def _vendor(vid: int) -> str:
    return VENDOR_NAMES.get(vid, f"vendor {vid:04x}")


def format_report(functions: list[FunctionInfo], header: str = "") -> str:
    out = [header] if header else []
    for f in functions:
        base, sub = f.class_code >> 16, (f.class_code >> 8) & 0xFF
        out.append(
            f"{f.bdf} {f.class_name} [{base:02x}{sub:02x}]: {_vendor(f.vendor_id)} "
            f"[{f.vendor_id:04x}:{f.device_id:04x}] (rev {f.revision:02x})"
        )
        if f.subsystem:
            out.append(f"\tSubsystem: [{f.subsystem[0]:04x}:{f.subsystem[1]:04x}]")
        flags = {"io_space": "I/O", "memory_space": "Mem", "bus_master": "BusMaster"}
        out.append("\tControl: " + " ".join(f"{v}{'+' if k in f.command else '-'}" for k, v in flags.items()))
        if f.interrupt_pin != "none":
            out.append(f"\tInterrupt: pin {f.interrupt_pin}")
        for b in f.bars:
            out.append(f"\tRegion {b['index']}: {b['text']}")
        if f.rom_size:
            out.append(f"\tExpansion ROM: [size={f.rom_size // 1024}K] (not enabled)")
        if f.capabilities:
            out.append("\tCapabilities:")
            for c in f.capabilities:
                where = f"{c.offset:03x}" if c.extended else f"{c.offset:02x}"
                out.append(f"\t  [{where}] {c.name}{': ' + c.detail if c.detail else ''}")
        if f.virtio:
            v = f.virtio
            out.append(f"\tVirtio: {v['device_name']} device (type {v['device_type']}), {v['kind']}")
            for mode, names in v["offered_features"].items():
                out.append(f"\t  offered features ({mode} layout): {' '.join(names) or '(none)'}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def to_json(functions: list[FunctionInfo]) -> list[dict[str, Any]]:
    return [asdict(f) for f in functions]
