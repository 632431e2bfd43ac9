"""The four virtio-pci transport modes (names fixed by design.md) and the QEMU properties each needs.

This is vocabulary shared by the machine layer (which turns a mode into device properties) and the
transport layer (which picks the register layout from it); it holds no behaviour.
"""

from __future__ import annotations

LEGACY = "legacy"
TRANSITIONAL_LEGACY = "transitional-legacy"
TRANSITIONAL_MODERN = "transitional-modern"
MODERN = "modern"

#: "All" transport modes, in the order design.md fixes.
ALL_MODES: tuple[str, ...] = (LEGACY, TRANSITIONAL_LEGACY, TRANSITIONAL_MODERN, MODERN)

#: Device properties that make QEMU build the device a mode drives (virtio 1.2 §4.1.2).
MODE_PROPERTIES: dict[str, dict[str, str]] = {
    LEGACY: {"disable-legacy": "off", "disable-modern": "on"},
    TRANSITIONAL_LEGACY: {"disable-legacy": "off", "disable-modern": "off"},
    TRANSITIONAL_MODERN: {"disable-legacy": "off", "disable-modern": "off"},
    MODERN: {"disable-legacy": "on", "disable-modern": "off"},
}

#: Which register layout a mode drives the device through.
USES_LEGACY_LAYOUT: dict[str, bool] = {
    LEGACY: True,
    TRANSITIONAL_LEGACY: True,
    TRANSITIONAL_MODERN: False,
    MODERN: False,
}


def check_mode(mode: str) -> str:
    if mode not in MODE_PROPERTIES:
        raise ValueError(f"unknown transport mode {mode!r}; valid: {', '.join(ALL_MODES)}")
    return mode
