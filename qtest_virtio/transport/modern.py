"""The modern virtio-pci layout: vendor capabilities pointing into BARs (virtio 1.2 §4.1.4).

Common cfg (features through select registers, per-queue registers behind queue_select), notify
(address = cap offset + queue_notify_off * notify_off_multiplier, §4.1.4.4), ISR, device cfg,
and the PCI configuration access capability, which reaches any BAR through config space alone
(§4.1.4.9).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pci import PciFunction
from ..registers import Field, L, RegisterBlock
from .base import TransportError, VirtioTransport
from .layout import (
    CFG_TYPE_COMMON,
    CFG_TYPE_DEVICE,
    CFG_TYPE_ISR,
    CFG_TYPE_NOTIFY,
    CFG_TYPE_PCI,
    COMMON_CFG,
    VIRTIO_PCI_CFG_CAP,
    VIRTIO_PCI_NOTIFY_CAP,
    VirtioPciCfgCapLayout,
)


@dataclass(frozen=True)
class VirtioCap:
    """One decoded virtio_pci_cap (§4.1.4)."""

    cap_offset: int
    cfg_type: int
    bar: int
    offset: int
    length: int
    notify_off_multiplier: int = 0


def cap_block(fn: PciFunction, base: int, cap_layout: L) -> RegisterBlock[L]:
    """A capability's registers in config space, by name."""
    return RegisterBlock(
        cap_layout,
        lambda off, w: fn.read_config(base + off, w),
        lambda off, w, v: fn.write_config(base + off, w, v),
    )


def read_virtio_caps(fn: PciFunction) -> list[VirtioCap]:
    """Every virtio vendor capability of ``fn``, in list order."""
    caps = []
    for cap in fn.vendor_capabilities():
        block = cap_block(fn, cap.offset, VIRTIO_PCI_NOTIFY_CAP)
        cfg_type = block.read(VIRTIO_PCI_NOTIFY_CAP.cfg_type)
        mult = block.read(VIRTIO_PCI_NOTIFY_CAP.notify_off_multiplier) if cfg_type == CFG_TYPE_NOTIFY else 0
        caps.append(
            VirtioCap(
                cap.offset,
                cfg_type,
                block.read(VIRTIO_PCI_NOTIFY_CAP.bar),
                block.read(VIRTIO_PCI_NOTIFY_CAP.offset),
                block.read(VIRTIO_PCI_NOTIFY_CAP.length),
                mult,
            )
        )
    return caps


class ModernTransport(VirtioTransport):
    uses_legacy_layout = False

    def __init__(self, fn: PciFunction, mode: str, *, notify_via: str = "mmio") -> None:
        self.fn = fn
        self.mode = mode
        self.caps = read_virtio_caps(fn)

        def first(cfg_type: int, want_io: bool | None = None) -> VirtioCap | None:
            for c in self.caps:
                if c.cfg_type != cfg_type:
                    continue
                if c.cfg_type == CFG_TYPE_PCI:
                    return c
                bar = next((b for b in fn.bars if b.index == c.bar), None)
                if bar is None:
                    continue
                if want_io is None or bar.is_io == want_io:
                    return c
            return None

        common, isr, device = first(CFG_TYPE_COMMON), first(CFG_TYPE_ISR), first(CFG_TYPE_DEVICE)
        if common is None or isr is None:
            raise TransportError(
                f"{fn.bdf} has no virtio common/ISR capability: the device is legacy-only "
                f"(disable-modern=on), mode {mode!r} needs a modern or transitional device"
            )
        if notify_via not in ("mmio", "pio"):
            raise ValueError(f"notify_via must be 'mmio' or 'pio', not {notify_via!r}")
        notify = first(CFG_TYPE_NOTIFY, want_io=notify_via == "pio")
        if notify is None:
            hint = " (the device needs modern-pio-notify=on)" if notify_via == "pio" else ""
            raise TransportError(f"{fn.bdf} has no {notify_via} notify capability{hint}")
        self.common_cap, self.notify_cap, self.isr_cap, self.device_cap = common, notify, isr, device
        self.pci_cfg_cap = first(CFG_TYPE_PCI)
        self.common = RegisterBlock(
            COMMON_CFG,
            lambda off, w: fn.bar_read(common.bar, common.offset + off, w),
            lambda off, w, v: fn.bar_write(common.bar, common.offset + off, w, v),
        )
        self._notify_offsets: dict[int, int] = {}

    def after_reset(self) -> None:
        self._notify_offsets.clear()

    # -- status and features --------------------------------------------------------------

    def get_status(self) -> int:
        return self.common.read(COMMON_CFG.device_status)

    def set_status(self, status: int) -> None:
        self.common.write(COMMON_CFG.device_status, status)

    def _read64(self, select: Field, value: Field) -> int:
        bits = 0
        for word in (0, 1):
            self.common.write(select, word)
            bits |= self.common.read(value) << (32 * word)
        return bits

    def device_features(self) -> int:
        return self._read64(COMMON_CFG.device_feature_select, COMMON_CFG.device_feature)

    def driver_features(self) -> int:
        return self._read64(COMMON_CFG.driver_feature_select, COMMON_CFG.driver_feature)

    def set_driver_features(self, features: int) -> None:
        for word in (0, 1):
            self.common.write(COMMON_CFG.driver_feature_select, word)
            self.common.write(COMMON_CFG.driver_feature, (features >> (32 * word)) & 0xFFFF_FFFF)

    # -- queues ---------------------------------------------------------------------------

    def select_queue(self, queue: int) -> None:
        self.common.write(COMMON_CFG.queue_select, queue)

    def num_queues(self) -> int:
        return self.common.read(COMMON_CFG.num_queues)

    def queue_max_size(self, queue: int) -> int:
        """The maximum size; the driver may write a smaller power of two (§4.1.4.3.2)."""
        self.select_queue(queue)
        return self.common.read(COMMON_CFG.queue_size)

    def setup_queue(self, queue: int, size: int, desc: int, driver: int, device: int) -> None:
        self.select_queue(queue)
        self.common.write(COMMON_CFG.queue_size, size)
        self.common.write(COMMON_CFG.queue_desc, desc)
        self.common.write(COMMON_CFG.queue_driver, driver)
        self.common.write(COMMON_CFG.queue_device, device)
        self._notify_offsets[queue] = self.common.read(COMMON_CFG.queue_notify_off)

    def enable_queue(self, queue: int) -> None:
        self.select_queue(queue)
        self.common.write(COMMON_CFG.queue_enable, 1)

    def queue_enabled(self, queue: int) -> bool:
        self.select_queue(queue)
        return self.common.read(COMMON_CFG.queue_enable) == 1

    def notify_address(self, queue: int) -> tuple[int, int]:
        """(BAR, offset) the driver writes to notify ``queue`` (§4.1.4.4)."""
        if queue not in self._notify_offsets:
            self.select_queue(queue)
            self._notify_offsets[queue] = self.common.read(COMMON_CFG.queue_notify_off)
        off = self.notify_cap.offset + self._notify_offsets[queue] * self.notify_cap.notify_off_multiplier
        return self.notify_cap.bar, off

    def notify(self, queue: int) -> None:
        bar, off = self.notify_address(queue)
        self.fn.bar_write(bar, off, 2, queue)

    def reset_queue(self, queue: int) -> None:
        """Write queue_reset=1, wait for it to read 0 (§4.1.4.3.2, RING_RESET)."""
        self.select_queue(queue)
        self.common.write(COMMON_CFG.queue_reset, 1)
        for _ in range(1000):
            if self.common.read(COMMON_CFG.queue_reset) == 0:
                self._notify_offsets.pop(queue, None)
                return
        raise TransportError(f"{self}: queue {queue} reset never completed")

    # -- interrupts -----------------------------------------------------------------------

    def read_isr(self) -> int:
        return self.fn.bar_read(self.isr_cap.bar, self.isr_cap.offset, 1)

    def set_config_vector(self, vector: int) -> int:
        self.common.write(COMMON_CFG.config_msix_vector, vector)
        return self.common.read(COMMON_CFG.config_msix_vector)

    def set_queue_vector(self, queue: int, vector: int) -> int:
        self.select_queue(queue)
        self.common.write(COMMON_CFG.queue_msix_vector, vector)
        return self.common.read(COMMON_CFG.queue_msix_vector)

    # -- device config --------------------------------------------------------------------

    def _device_cap(self) -> VirtioCap:
        if self.device_cap is None:
            raise TransportError(f"{self}: the device has no device-specific configuration")
        return self.device_cap

    def config_read(self, offset: int, width: int) -> int:
        cap = self._device_cap()
        if offset + width > cap.length:
            raise TransportError(f"{self}: device config {offset:#x}+{width} is past its {cap.length:#x} bytes")
        if width == 8:  # 64-bit fields are read as two 32-bit halves (§4.1.3.1)
            return self.config_read(offset, 4) | self.config_read(offset + 4, 4) << 32
        return self.fn.bar_read(cap.bar, cap.offset + offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        cap = self._device_cap()
        if offset + width > cap.length:
            raise TransportError(f"{self}: device config {offset:#x}+{width} is past its {cap.length:#x} bytes")
        self.fn.bar_write(cap.bar, cap.offset + offset, width, value)

    def config_generation(self) -> int:
        return self.common.read(COMMON_CFG.config_generation)

    # -- PCI configuration access capability ----------------------------------------------

    def _pci_cfg(self) -> RegisterBlock[VirtioPciCfgCapLayout]:
        if self.pci_cfg_cap is None:
            raise TransportError(f"{self}: no VIRTIO_PCI_CAP_PCI_CFG capability")
        return cap_block(self.fn, self.pci_cfg_cap.cap_offset, VIRTIO_PCI_CFG_CAP)

    def pci_cfg_read(self, bar: int, offset: int, width: int) -> int:
        """Read a BAR through config space only: set bar/offset/length, read pci_cfg_data
        (§4.1.4.9.1)."""
        cap = self._pci_cfg()
        cap.write(VIRTIO_PCI_CFG_CAP.bar, bar)
        cap.write(VIRTIO_PCI_CFG_CAP.offset, offset)
        cap.write(VIRTIO_PCI_CFG_CAP.length, width)
        data_offset = VIRTIO_PCI_CFG_CAP.pci_cfg_data.offset
        return self.fn.read_config(self.pci_cfg_cap.cap_offset + data_offset, width)  # type: ignore[union-attr]

    def pci_cfg_write(self, bar: int, offset: int, width: int, value: int) -> None:
        cap = self._pci_cfg()
        cap.write(VIRTIO_PCI_CFG_CAP.bar, bar)
        cap.write(VIRTIO_PCI_CFG_CAP.offset, offset)
        cap.write(VIRTIO_PCI_CFG_CAP.length, width)
        data_offset = VIRTIO_PCI_CFG_CAP.pci_cfg_data.offset
        self.fn.write_config(self.pci_cfg_cap.cap_offset + data_offset, width, value)  # type: ignore[union-attr]
