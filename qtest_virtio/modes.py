"""The four virtio-pci transport modes (names fixed by design.md) and the QEMU properties each needs.

This is vocabulary shared by the machine layer (which turns a mode into device properties) and the
transport layer (which picks the register layout from it); it holds no behaviour.
"""

from __future__ import annotations

from enum import StrEnum


class _Name(StrEnum):
    """A StrEnum that also reprs as its plain string, so messages read ``mode 'modern'``."""

    def __repr__(self) -> str:
        return repr(self.value)


class Mode(_Name):
    """A virtio-pci transport mode; prints (and compares equal to) its design.md name."""

    LEGACY = "legacy"
    TRANSITIONAL_LEGACY = "transitional-legacy"
    TRANSITIONAL_MODERN = "transitional-modern"
    MODERN = "modern"


class Ring(_Name):
    """A virtqueue format: split (virtio 1.2 §2.7) or packed (§2.8)."""

    SPLIT = "split"
    PACKED = "packed"


class Interrupts(_Name):
    """How a driver learns of used buffers: MSI-X (§4.1.5.1.2), INTx plus the ISR (§4.1.4.5), the
    ISR alone by polling, or ``auto`` (MSI-X where the function has it)."""

    AUTO = "auto"
    MSIX = "msix"
    INTX = "intx"
    ISR = "isr"


LEGACY = Mode.LEGACY
TRANSITIONAL_LEGACY = Mode.TRANSITIONAL_LEGACY
TRANSITIONAL_MODERN = Mode.TRANSITIONAL_MODERN
MODERN = Mode.MODERN

#: "All" transport modes, in the order design.md fixes.
ALL_MODES: tuple[Mode, ...] = (LEGACY, TRANSITIONAL_LEGACY, TRANSITIONAL_MODERN, MODERN)
#: Both ring formats, split first.
RINGS: tuple[Ring, ...] = (Ring.SPLIT, Ring.PACKED)

#: Device properties that make QEMU build the device a mode drives (virtio 1.2 §4.1.2).
MODE_PROPERTIES: dict[Mode, dict[str, str]] = {
    LEGACY: {"disable-legacy": "off", "disable-modern": "on"},
    TRANSITIONAL_LEGACY: {"disable-legacy": "off", "disable-modern": "off"},
    TRANSITIONAL_MODERN: {"disable-legacy": "off", "disable-modern": "off"},
    MODERN: {"disable-legacy": "on", "disable-modern": "off"},
}

#: Which register layout a mode drives the device through.
USES_LEGACY_LAYOUT: dict[Mode, bool] = {
    LEGACY: True,
    TRANSITIONAL_LEGACY: True,
    TRANSITIONAL_MODERN: False,
    MODERN: False,
}


#: The modes driven through the legacy I/O BAR and through the modern capabilities.
LEGACY_LAYOUT_MODES: tuple[Mode, ...] = tuple(m for m in ALL_MODES if USES_LEGACY_LAYOUT[m])
MODERN_LAYOUT_MODES: tuple[Mode, ...] = tuple(m for m in ALL_MODES if not USES_LEGACY_LAYOUT[m])


def check_mode(mode: str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"unknown transport mode {mode!r}; valid: {', '.join(ALL_MODES)}") from None
