"""virtio-pci transports: the register layouts (legacy I/O BAR, modern capabilities), the mode
that picks one, and the device initialization sequence of virtio 1.2 §3.1.1."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbcSet
from dataclasses import dataclass
from typing import TypeVar

from .. import modes
from ..pci import PciFunction
from . import layout
from .base import TransportError, VirtioTransport
from .legacy import LegacyTransport
from .modern import ModernTransport
from .pcimap import Access, DeviceKind, VirtioCap, VirtioPciMap, Window

__all__ = [
    "Access",
    "DeviceKind",
    "DeviceNeedsReset",
    "FeaturesRejected",
    "LegacyTransport",
    "ModernTransport",
    "Negotiated",
    "TransportError",
    "VirtioCap",
    "VirtioPciMap",
    "VirtioTransport",
    "Window",
    "check_device_status",
    "device_kind",
    "driver_ok",
    "feature_bit",
    "negotiate",
    "open_transport",
]

VERSION_1 = 1 << 32
_T = TypeVar("_T")
BAD_FEATURE = 1 << 30


class FeaturesRejected(TransportError):
    """FEATURES_OK did not stick: the device refused the accepted feature set (§3.1.1 step 6)."""


class DeviceNeedsReset(TransportError):
    """The device set DEVICE_NEEDS_RESET (§2.1.1): it hit an error it cannot recover from."""


def device_kind(fn: PciFunction) -> DeviceKind:
    """'legacy', 'transitional' or 'modern', from what the function actually exposes."""
    return VirtioPciMap.of(fn).kind


_KIND_FOR_MODE = {
    modes.LEGACY: DeviceKind.LEGACY,
    modes.TRANSITIONAL_LEGACY: DeviceKind.TRANSITIONAL,
    modes.TRANSITIONAL_MODERN: DeviceKind.TRANSITIONAL,
    modes.MODERN: DeviceKind.MODERN,
}


def open_transport(fn: PciFunction, mode: str, *, notify_via: str = "mmio") -> VirtioTransport:
    """The transport ``mode`` names; refuses (never guesses) when the device is of another kind."""
    mode = modes.check_mode(mode)
    kind = device_kind(fn)
    if kind != _KIND_FOR_MODE[mode]:
        raise TransportError(
            f"{fn.bdf} is a {kind} virtio device but mode '{mode}' drives a {_KIND_FOR_MODE[mode]} one "
            f"(build it with MachineSpec.add_virtio(..., mode='{mode}'))"
        )
    if modes.USES_LEGACY_LAYOUT[mode]:
        return LegacyTransport(fn, mode)
    return ModernTransport(fn, mode, notify_via=notify_via)


def feature_bit(name: str, device_bits: dict[int, str] | None = None) -> int:
    """Bit number of a feature name (reserved names like EVENT_IDX, or the device's own)."""
    for table in (layout.FEATURE_BITS, device_bits or {}):
        for bit, n in table.items():
            if n == name:
                return bit
    known = sorted(set(layout.FEATURE_BITS.values()) | set((device_bits or {}).values()))
    raise ValueError(f"unknown feature {name!r}; known: {', '.join(known)}")


@dataclass(frozen=True, eq=False)
class Negotiated(AbcSet[str]):
    """What feature negotiation ended with (§3.1.1 step 4): a ``collections.abc.Set`` of the
    accepted feature names (``"EVENT_IDX" in drv.negotiated``, ``set(drv.negotiated)``, ``==`` a
    set), plus the raw bits: ``offered``, ``accepted`` and what the driver ``refused``."""

    offered: int
    accepted: int
    refused: int
    names: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset(self.names))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def _from_iterable(cls, it: Iterable[_T]) -> frozenset[_T]:
        """Set operators (``&``, ``|``, ``-``) give plain frozensets of names: their result has
        no feature bits to carry."""
        return frozenset(it)

    def has(self, name_or_bit: str | int, device_bits: dict[int, str] | None = None) -> bool:
        bit = name_or_bit if isinstance(name_or_bit, int) else feature_bit(name_or_bit, device_bits)
        return bool(self.accepted >> bit & 1)

    __hash__ = AbcSet._hash

    def __repr__(self) -> str:
        return f"Negotiated({{{', '.join(map(repr, self))}}}, accepted={self.accepted:#x})"


def check_device_status(transport: VirtioTransport) -> int:
    """Read the status; raise if the device asks for a reset (§2.1.1) or the driver failed."""
    status = transport.get_status()
    if status & layout.STATUS.DEVICE_NEEDS_RESET.mask:
        raise DeviceNeedsReset(f"{transport}: device set DEVICE_NEEDS_RESET (status {status:#x})")
    if status & layout.STATUS.FAILED.mask:
        raise TransportError(f"{transport}: status has FAILED set ({status:#x})")
    return status


def negotiate(
    transport: VirtioTransport,
    *,
    driver_supports: int,
    refuse: int = 0,
    device_bits: dict[int, str] | None = None,
) -> Negotiated:
    """Steps 1-6 of §3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK and re-read.

    ``driver_supports`` is what this driver implements; ``refuse`` what it declines even when
    offered. The device never gets a bit it did not offer. Modern requires VERSION_1 (§6.1);
    the legacy layout must not offer it (its feature register has only 32 bits) and the
    legacy-only BAD_FEATURE bit is never accepted.
    """
    status = layout.STATUS
    transport.reset()
    transport.add_status(status.ACKNOWLEDGE.mask)
    transport.add_status(status.DRIVER.mask)
    offered = transport.device_features()
    if transport.uses_legacy_layout:
        if offered & VERSION_1:
            raise TransportError(f"{transport}: the legacy layout offered VERSION_1")
        accepted = offered & driver_supports & ~refuse & ~BAD_FEATURE & 0xFFFF_FFFF
    else:
        if not offered & VERSION_1:
            raise TransportError(f"{transport}: a modern device must offer VERSION_1 (§6.1); offered {offered:#x}")
        if refuse & VERSION_1:
            raise TransportError("VERSION_1 cannot be refused on the modern layout")
        accepted = (offered & driver_supports & ~refuse) | VERSION_1
    transport.set_driver_features(accepted)
    if not transport.uses_legacy_layout:
        transport.add_status(status.FEATURES_OK.mask)
        if not transport.get_status() & status.FEATURES_OK.mask:
            transport.add_status(status.FAILED.mask)
            raise FeaturesRejected(f"{transport}: device cleared FEATURES_OK for features {accepted:#x}")
    names = frozenset(layout.feature_names(accepted, device_bits))
    return Negotiated(offered, accepted, offered & refuse, names)


def driver_ok(transport: VirtioTransport) -> None:
    """Step 8 of §3.1.1: the driver is live."""
    transport.add_status(layout.STATUS.DRIVER_OK.mask)
    check_device_status(transport)
