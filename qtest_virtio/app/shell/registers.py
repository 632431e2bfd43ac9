"""The register blocks the shell names, and how their values read.

A selected function (:class:`Target`) has up to four blocks: ``common_cfg`` (modern, virtio 1.2
§4.1.4.3), ``legacy`` (I/O BAR 0, §4.1.4.10), ``device_cfg`` (the device type's config layout,
from the device registry, §5) and ``pci`` (the config header). The layouts are the library's;
this module only picks them, says which registers cannot be read now, and names the bits of
the registers whose bits have names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...devices import registry
from ...modes import Mode
from ...pci import PciFunction
from ...pci import regs as pci_regs
from ...registers import BitLayout, Layout, RegisterBlock
from ...transport import DeviceKind, LegacyTransport, ModernTransport, TransportError, VirtioPciMap, layout
from .text import ShellError, parse_int

BLOCKS = ("common_cfg", "legacy", "device_cfg", "pci")
#: Registers whose read has a side effect: left out of dumps and never read back after a write.
SIDE_EFFECT_READS = {("legacy", "isr_status")}
#: Legacy registers that exist only while MSI-X is enabled (virtio 1.2 §4.1.4.10).
LEGACY_MSIX_REGS = frozenset({"config_msix_vector", "queue_msix_vector"})

#: Registers whose bits have names, by (block, register).
NAMED_BITS: dict[tuple[str, str], BitLayout] = {
    ("pci", "command"): pci_regs.COMMAND,
    ("pci", "status"): pci_regs.STATUS,
    ("common_cfg", "device_status"): layout.STATUS,
    ("legacy", "device_status"): layout.STATUS,
    ("legacy", "isr_status"): layout.ISR,
}


def virtio_device_type(fn: PciFunction) -> int | None:
    """The virtio device ID of a function, None when it is no virtio-pci device (§4.1.2)."""
    if fn.vendor_id != layout.VIRTIO_PCI_VENDOR_ID:
        return None
    subsystem = fn.subsystem
    return layout.virtio_device_type(fn.device_id, subsystem[1] if subsystem else None)


@dataclass
class Target:
    """A PCI function with whatever virtio register layouts it has."""

    fn: PciFunction
    modern: ModernTransport | None = None
    legacy: LegacyTransport | None = None
    device_type: int | None = None
    kind: DeviceKind | None = None
    device_bits: dict[int, str] = field(default_factory=dict)
    device_layout: Layout | None = None

    @classmethod
    def of(cls, fn: PciFunction) -> Target:
        t = cls(fn, device_type=virtio_device_type(fn))
        if t.device_type is None:
            return t
        vmap = VirtioPciMap.of(fn)
        t.kind = vmap.kind
        modern_mode = Mode.MODERN if t.kind is DeviceKind.MODERN else Mode.TRANSITIONAL_MODERN
        legacy_mode = Mode.LEGACY if t.kind is DeviceKind.LEGACY else Mode.TRANSITIONAL_LEGACY
        with contextlib.suppress(TransportError):
            t.modern = ModernTransport(fn, modern_mode)
        if vmap.has_legacy_bar:
            with contextlib.suppress(TransportError):
                t.legacy = LegacyTransport(fn, legacy_mode)
        info = registry.by_id(t.device_type)
        if info is not None:
            t.device_bits = dict(info.feature_bits)
            t.device_layout = info.config
        return t

    @property
    def name(self) -> str:
        """The device type's name (``block``), or its number when the spec table lacks it."""
        return layout.DEVICE_TYPES.get(self.device_type or -1, f"type {self.device_type}")

    @property
    def transport(self) -> ModernTransport | LegacyTransport:
        """The layout ``status``/``device_cfg`` go through: modern where there is one."""
        found = self.modern or self.legacy
        if found is None:
            raise ShellError(f"{self.fn.bdf} is not a virtio device (or its BARs are not assigned)")
        return found

    def describe(self) -> str:
        if self.device_type is None:
            return f"{self.fn.bdf}: not a virtio device; cfg and pci.NAME work"
        blocks = [b for b, ok in (("common_cfg", self.modern), ("legacy", self.legacy)) if ok]
        if self.device_layout is not None:
            blocks.append("device_cfg")
        return f"{self.fn.bdf}: virtio {self.name} ({self.kind}); registers: {', '.join([*blocks, 'pci'])}"

    def block(self, name: str) -> RegisterBlock[Layout]:
        """The register block ``name`` (one of :data:`BLOCKS`), or why the function has none."""
        if name == "pci":
            return self.fn.config
        if name == "common_cfg":
            if self.modern is None:
                raise ShellError(f"{self.fn.bdf} has no modern common_cfg ({self.kind or 'not virtio'})")
            return self.modern.common
        if name == "legacy":
            if self.legacy is None:
                raise ShellError(f"{self.fn.bdf} has no legacy I/O BAR0 ({self.kind or 'not virtio'})")
            return self.legacy.regs
        transport = self.transport
        if self.device_layout is None:
            kind = layout.DEVICE_TYPES.get(self.device_type or -1, "this device")
            raise ShellError(f"no device_cfg layout known for {kind}")
        return RegisterBlock(self.device_layout, transport.config_read, transport.config_write)

    def absent(self, block_name: str, reg_name: str) -> str:
        """Why a register of the layout is not there now ("" when it is)."""
        if block_name == "legacy" and reg_name in LEGACY_MSIX_REGS and self.legacy and not self.legacy.msix_enabled:
            return "exists only while MSI-X is enabled; until then the device config starts here"
        return ""

    @contextlib.contextmanager
    def features_select_kept(self) -> Iterator[None]:
        """Reading 64-bit features moves the modern select registers (§4.1.4.3): put them back."""
        if self.modern is None:
            yield
            return
        common = self.modern.common
        saved = {
            r: common.read(r)
            for r in (layout.COMMON_CFG.device_feature_select, layout.COMMON_CFG.driver_feature_select)
        }
        try:
            yield
        finally:
            for reg, value in saved.items():
                common.write(reg, value)


def bits_suffix(block: str, reg_name: str, value: int) -> str:
    """``: io_space memory_space`` for the registers whose bits have names."""
    bits = NAMED_BITS.get((block, reg_name))
    if bits is None:
        return ""
    return ": " + (" ".join(bits.names_set(value)) or "(none)")


def status_value(text: str) -> int:
    """``0x0b``, or bit names joined by ``|``, ``,`` or spaces (``ACKNOWLEDGE|DRIVER``), §2.1."""
    if re.fullmatch(r"\d\w*", text):
        return parse_int(text, "status")
    value = 0
    for name in filter(None, re.split(r"[|,\s]+", text)):
        try:
            value |= getattr(layout.STATUS, name.upper()).mask
        except AttributeError:
            names = ", ".join(b.name for b in layout.STATUS)
            raise ShellError(f"unknown status bit {name!r}; bits: {names}") from None
    return value
