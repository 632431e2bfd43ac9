"""The virtio-pci map of one PCI function: every register window a driver meets, decoded once.

virtio 1.2 §4.1.4 places the modern registers through vendor capabilities (common, notify, ISR,
device, and the PCI configuration access window of §4.1.4.9); a legacy or transitional device
also has the legacy header in I/O BAR 0 (§4.1.4.10); MSI-X adds its vector table and PBA
(PCI 3.0 §6.8.2). :class:`VirtioPciMap` names them all, each as a :class:`Window` (BAR, offset,
length, register layout, how it is reached), with the notify multiplier and the device kind.
It is the only decoder of the virtio capabilities: the transports and ``probe`` read it.

The map is built once per function and BAR sizing (``VirtioPciMap.of(fn)``): capabilities are
read-only to the driver, so a window is BAR index + offset, and its address is looked up from
the BAR at access time (``address``), where ``PciFunction.restore`` puts it back after abuse.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from ..pci import MsixCapability, PciFunction
from ..pci import regs as pci_regs
from ..registers import L, Layout, RegisterBlock
from . import layout as vlayout
from .base import TransportError

#: The legacy header lives in I/O BAR 0 of a legacy or transitional device (§4.1.4.10).
LEGACY_BAR = 0

_LayoutT = TypeVar("_LayoutT", bound=Layout | None, covariant=True)


class DeviceKind(StrEnum):
    """What a virtio-pci function exposes (§4.1.2): the legacy BAR only, both layouts, or the
    modern capabilities only. Prints as the names ``device_kind`` always returned."""

    LEGACY = "legacy"
    TRANSITIONAL = "transitional"
    MODERN = "modern"


class Access(StrEnum):
    """How a window is reached: memory or I/O space through a BAR, or PCI config space."""

    MEM = "mem"
    IO = "io"
    CONFIG = "config"


@dataclass(frozen=True)
class VirtioCap:
    """One virtio vendor capability as the device presents it (struct virtio_pci_cap, §4.1.4).

    For the PCI configuration access capability (cfg_type 5), ``bar``/``offset``/``length`` are
    the driver's own last writes (§4.1.4.9), not a window; its window is the capability itself."""

    cap_offset: int
    cfg_type: int
    bar: int
    offset: int
    length: int
    notify_off_multiplier: int = 0
    id: int = 0
    cap_len: int = 0
    #: Every field read, by the spec's name (cap_vndr .. length, and the multiplier of a notify cap).
    fields: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return vlayout.CFG_TYPE_NAMES.get(self.cfg_type, f"cfg_type {self.cfg_type}")


@dataclass(frozen=True)
class Window(Generic[_LayoutT]):
    """A register window of the function: ``length`` bytes at ``offset`` in BAR ``bar`` (or in
    config space when ``access`` is CONFIG and ``bar`` is None), laid out as ``layout`` (None
    where the layout is the device type's own, or a bit array like the PBA)."""

    name: str
    access: Access
    bar: int | None
    offset: int
    length: int
    layout: _LayoutT
    #: The virtio capability that declared the window (None for the legacy BAR and MSI-X).
    cap: VirtioCap | None = None

    def __str__(self) -> str:
        where = "config space" if self.bar is None else f"BAR{self.bar} ({self.access})"
        return f"{self.name}: {where} +{self.offset:#x} length {self.length:#x}"


def decode_virtio_caps(fn: PciFunction) -> tuple[VirtioCap, ...]:
    """Every virtio vendor capability of ``fn``, in list order (§4.1.4)."""
    caps = []
    cap_layout = vlayout.VIRTIO_PCI_NOTIFY_CAP
    for cap in fn.vendor_capabilities():
        # Dword reads of the fixed part; the multiplier only for notify caps: the dword after
        # a PCI cfg cap is pci_cfg_data, and reading it would access a BAR (§4.1.4.9).
        words = fn.read_config_many([(cap.offset + at, 4) for at in range(0, vlayout.VIRTIO_PCI_CAP.size, 4)])
        data = b"".join(w.to_bytes(4, "little") for w in words)
        if cap_layout.cfg_type.get(data) == vlayout.CFG_TYPE_NOTIFY:
            data += fn.read_config(cap.offset + cap_layout.notify_off_multiplier.offset, 4).to_bytes(4, "little")
        fields = cap_layout.unpack(data)
        caps.append(
            VirtioCap(
                cap_offset=cap.offset,
                cfg_type=fields["cfg_type"],
                bar=fields["bar"],
                offset=fields["offset"],
                length=fields["length"],
                notify_off_multiplier=fields.get("notify_off_multiplier", 0),
                id=fields["id"],
                cap_len=fields["cap_len"],
                fields=fields,
            )
        )
    return tuple(caps)


_MAPS: weakref.WeakKeyDictionary[PciFunction, VirtioPciMap] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class VirtioPciMap:
    """The windows of one virtio-pci function (virtio 1.2 §4.1.4), found once.

    ``common``, ``notify`` (the first notify structure in a memory BAR), ``notify_io`` (one in
    an I/O BAR, ``modern-pio-notify=on``), ``isr``, ``device`` and ``pci_cfg`` come from the
    capabilities, the first usable one of each type (§4.1.4: "the driver SHOULD use the first
    one"); ``legacy`` is I/O BAR 0 of a legacy or transitional device (§4.1.4.10);
    ``msix_table`` and ``msix_pba`` come from the MSI-X capability. A window the function does
    not have is None."""

    #: The function, held weakly so the per-function cache never keeps a dead machine alive.
    _fn: weakref.ReferenceType[PciFunction] = field(repr=False)
    kind: DeviceKind
    caps: tuple[VirtioCap, ...]
    #: A window for every capability in a sized BAR (all but the PCI cfg one), in list order,
    #: named as the spec names its type ("common_cfg", "notify_cfg", "shared_memory_cfg", ...).
    cap_windows: tuple[Window[None], ...]
    msix: MsixCapability | None
    common: Window[vlayout.CommonCfgLayout] | None
    notify: Window[None] | None
    notify_io: Window[None] | None
    isr: Window[None] | None
    device: Window[None] | None
    pci_cfg: Window[vlayout.VirtioPciCfgCapLayout] | None
    legacy: Window[vlayout.LegacyCfgLayout] | None
    msix_table: Window[pci_regs.MsixEntryLayout] | None
    msix_pba: Window[None] | None
    _bars: object = field(repr=False)

    @classmethod
    def of(cls, fn: PciFunction) -> VirtioPciMap:
        """The map of ``fn``, decoded on first use and again only after its BARs are re-sized
        (the windows need each BAR's kind and size)."""
        found = _MAPS.get(fn)
        if found is None or found._bars is not fn.bars:
            found = _MAPS[fn] = cls._decode(fn)
        return found

    @classmethod
    def _decode(cls, fn: PciFunction) -> VirtioPciMap:
        bars = {b.index: b for b in fn.bars}
        caps = decode_virtio_caps(fn)

        # One window per capability in a sized BAR, named as the spec names its type.
        def access(index: int) -> Access:
            return Access.IO if bars[index].is_io else Access.MEM

        cap_windows = tuple(
            Window(cap.name, access(cap.bar), cap.bar, cap.offset, cap.length, None, cap)
            for cap in caps
            if cap.cfg_type != vlayout.CFG_TYPE_PCI and cap.bar in bars
        )

        def first(name: str, cfg_type: int, want: Access | None = None) -> Window[None] | None:
            for w in cap_windows:
                if w.cap is not None and w.cap.cfg_type == cfg_type and want in (None, w.access):
                    return Window(name, w.access, w.bar, w.offset, w.length, None, w.cap)
            return None

        common_w = first("common", vlayout.CFG_TYPE_COMMON)
        common = None
        if common_w is not None:
            w = common_w
            common = Window(w.name, w.access, w.bar, w.offset, w.length, vlayout.COMMON_CFG, w.cap)
        pci_cfg_cap = next((c for c in caps if c.cfg_type == vlayout.CFG_TYPE_PCI), None)
        pci_cfg = None
        if pci_cfg_cap is not None:
            length = pci_cfg_cap.cap_len or vlayout.VIRTIO_PCI_CFG_CAP.size
            pci_cfg = Window(
                "pci_cfg", Access.CONFIG, None, pci_cfg_cap.cap_offset, length, vlayout.VIRTIO_PCI_CFG_CAP, pci_cfg_cap
            )
        legacy_bar = bars.get(LEGACY_BAR)
        has_legacy = legacy_bar is not None and legacy_bar.is_io and fn.device_id not in vlayout.MODERN_ID_RANGE
        legacy = None
        if has_legacy and legacy_bar is not None:
            legacy = Window("legacy", Access.IO, LEGACY_BAR, 0, legacy_bar.size, vlayout.LEGACY_CFG)
        has_modern = any(c.cfg_type == vlayout.CFG_TYPE_COMMON for c in caps)
        if fn.device_id in vlayout.MODERN_ID_RANGE or not has_legacy:
            kind = DeviceKind.MODERN
        else:
            kind = DeviceKind.TRANSITIONAL if has_modern else DeviceKind.LEGACY
        msix = MsixCapability.find(fn)
        msix_table = msix_pba = None
        if msix is not None and msix.table_bar in bars and msix.pba_bar in bars:
            msix_table = Window(
                "msix_table",
                access(msix.table_bar),
                msix.table_bar,
                msix.table_offset,
                msix.table_bytes,
                pci_regs.MSIX_ENTRY,
            )
            msix_pba = Window("msix_pba", access(msix.pba_bar), msix.pba_bar, msix.pba_offset, msix.pba_bytes, None)
        return cls(
            _fn=weakref.ref(fn),
            kind=kind,
            caps=caps,
            cap_windows=cap_windows,
            msix=msix,
            common=common,
            notify=first("notify", vlayout.CFG_TYPE_NOTIFY, Access.MEM),
            notify_io=first("notify", vlayout.CFG_TYPE_NOTIFY, Access.IO),
            isr=first("isr", vlayout.CFG_TYPE_ISR),
            device=first("device", vlayout.CFG_TYPE_DEVICE),
            pci_cfg=pci_cfg,
            legacy=legacy,
            msix_table=msix_table,
            msix_pba=msix_pba,
            _bars=fn.bars,
        )

    # -- what the function is -------------------------------------------------------------

    @property
    def fn(self) -> PciFunction:
        fn = self._fn()
        if fn is None:
            raise TransportError("the PCI function of this virtio-pci map is gone (its machine was closed)")
        return fn

    @property
    def has_legacy_bar(self) -> bool:
        """Whether the legacy header is there: I/O BAR 0 on a non-modern device ID (§4.1.4.10)."""
        return self.legacy is not None

    @property
    def has_modern(self) -> bool:
        """Whether the function has the modern common configuration capability (§4.1.4.3)."""
        return any(c.cfg_type == vlayout.CFG_TYPE_COMMON for c in self.caps)

    @property
    def notify_off_multiplier(self) -> int:
        """The multiplier of the (memory) notify structure, §4.1.4.4; 0 when there is none."""
        window = self.notify or self.notify_io
        return window.cap.notify_off_multiplier if window is not None and window.cap is not None else 0

    def windows(self) -> dict[str, Window[Layout | None]]:
        """Every window the function has, by name (for reports, the shell and the fuzzer)."""
        found: dict[str, Window[Layout | None]] = {}
        for w in (
            self.common,
            self.notify,
            self.isr,
            self.device,
            self.pci_cfg,
            self.legacy,
            self.msix_table,
            self.msix_pba,
        ):
            if w is not None:
                found[w.name] = w
        if self.notify_io is not None:
            found["notify_io"] = self.notify_io
        return found

    def cap_at(self, cap_offset: int) -> VirtioCap | None:
        """The virtio capability at ``cap_offset`` in config space, if there is one."""
        return next((c for c in self.caps if c.cap_offset == cap_offset), None)

    # -- the legacy device config, which moves with MSI-X ---------------------------------

    def msix_enabled(self) -> bool:
        """Whether MSI-X is enabled now (read live: the driver turns it on and off)."""
        return self.msix is not None and self.msix.enabled(self.fn)

    def legacy_device(self, msix_enabled: bool | None = None) -> Window[None]:
        """The legacy device-specific config: in BAR 0 after the header, at 0x14, or at 0x18
        while MSI-X is enabled (§4.1.4.10); ``msix_enabled`` None reads the state now."""
        legacy = self.require("legacy")
        on = self.msix_enabled() if msix_enabled is None else msix_enabled
        start = vlayout.LEGACY_DEVICE_CFG_OFFSET_MSIX if on else vlayout.LEGACY_DEVICE_CFG_OFFSET
        return Window("legacy_device", Access.IO, LEGACY_BAR, start, legacy.length - start, None)

    # -- access -----------------------------------------------------------------------------

    def require(self, name: str) -> Window[Layout | None]:
        """The window ``name``, or a TransportError naming what the function lacks."""
        window = self.windows().get(name)
        if window is None:
            raise TransportError(f"{self.fn.bdf} ({self.kind} virtio device) has no {name} window")
        return window

    def address(self, window: Window[Layout | None]) -> int | None:
        """The window's start in memory or I/O space now (config offset for CONFIG), or None
        while its BAR is unassigned."""
        if window.bar is None:
            return window.offset
        base = self.fn.bar(window.bar).address
        return None if base is None else base + window.offset

    def read(self, window: Window[Layout | None], offset: int, width: int) -> int:
        """Read ``width`` bytes at ``offset`` inside ``window``."""
        if window.bar is None:
            return self.fn.read_config(window.offset + offset, width)
        return self.fn.bar_read(window.bar, window.offset + offset, width)

    def read_many(self, reads: Sequence[tuple[Window[Layout | None], int, int]]) -> list[int]:
        """Several ``(window, offset, width)`` reads in order, in one exchange."""
        return self.fn.read_many([(w.bar, w.offset + off, width) for w, off, width in reads])

    def write(self, window: Window[Layout | None], offset: int, width: int, value: int) -> None:
        if window.bar is None:
            self.fn.write_config(window.offset + offset, width, value)
        else:
            self.fn.bar_write(window.bar, window.offset + offset, width, value)

    def block(self, window: Window[L]) -> RegisterBlock[L]:
        """The window's registers by name, through its own access path."""
        return RegisterBlock(
            window.layout,
            lambda off, w: self.read(window, off, w),
            lambda off, w, v: self.write(window, off, w, v),
        )
