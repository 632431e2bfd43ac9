"""The modern virtio-pci layout: vendor capabilities pointing into BARs (virtio 1.2 §4.1.4).

Common cfg (features through select registers, per-queue registers behind queue_select), notify
(address = cap offset + queue_notify_off * notify_off_multiplier, §4.1.4.4), ISR, device cfg,
and the PCI configuration access capability, which reaches any BAR through config space alone
(§4.1.4.9).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..pci import PciFunction
from ..registers import Field
from .base import TransportError, VirtioTransport
from .layout import COMMON_CFG, VIRTIO_PCI_CFG_CAP, VirtioPciCfgCapLayout
from .pcimap import VirtioPciMap, Window


class ModernTransport(VirtioTransport):
    """The modern layout over the windows of the function's :class:`VirtioPciMap`."""

    uses_legacy_layout = False

    def __init__(self, fn: PciFunction, mode: str, *, notify_via: str = "mmio") -> None:
        self.fn = fn
        self.mode = mode
        self.map = vmap = VirtioPciMap.of(fn)
        if vmap.common is None or vmap.isr is None:
            raise TransportError(
                f"{fn.bdf} has no virtio common/ISR capability: the device is legacy-only "
                f"(disable-modern=on), mode '{mode}' needs a modern or transitional device"
            )
        if notify_via not in ("mmio", "pio"):
            raise ValueError(f"notify_via must be 'mmio' or 'pio', not {notify_via!r}")
        notify = vmap.notify_io if notify_via == "pio" else vmap.notify
        if notify is None or notify.cap is None:
            hint = " (the device needs modern-pio-notify=on)" if notify_via == "pio" else ""
            raise TransportError(f"{fn.bdf} has no {notify_via} notify capability{hint}")
        #: The notify structure this transport kicks through (memory, or I/O for notify_via="pio").
        self.notify_window: Window[None] = notify
        self._notify_multiplier = notify.cap.notify_off_multiplier
        self.isr_window: Window[None] = vmap.isr
        self.common = vmap.block(vmap.common)
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

    @property
    def notify_off_multiplier(self) -> int:
        """The multiplier of the notify structure this transport kicks through (§4.1.4.4)."""
        return self._notify_multiplier

    def notify_address(self, queue: int) -> tuple[int, int]:
        """(BAR, offset) the driver writes to notify ``queue`` (§4.1.4.4)."""
        if queue not in self._notify_offsets:
            self.select_queue(queue)
            self._notify_offsets[queue] = self.common.read(COMMON_CFG.queue_notify_off)
        window = self.notify_window
        assert window.bar is not None  # a notify structure is in a BAR (§4.1.4.4)
        return window.bar, window.offset + self._notify_offsets[queue] * self._notify_multiplier

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
        return self.map.read(self.isr_window, 0, 1)

    def set_config_vector(self, vector: int) -> int:
        self.common.write(COMMON_CFG.config_msix_vector, vector)
        return self.common.read(COMMON_CFG.config_msix_vector)

    def set_queue_vector(self, queue: int, vector: int) -> int:
        self.select_queue(queue)
        self.common.write(COMMON_CFG.queue_msix_vector, vector)
        return self.common.read(COMMON_CFG.queue_msix_vector)

    # -- device config --------------------------------------------------------------------

    def _device_window(self, offset: int, width: int) -> Window[None]:
        window = self.map.device
        if window is None:
            raise TransportError(f"{self}: the device has no device-specific configuration")
        if offset + width > window.length:
            raise TransportError(f"{self}: device config {offset:#x}+{width} is past its {window.length:#x} bytes")
        return window

    def config_read(self, offset: int, width: int) -> int:
        window = self._device_window(offset, width)
        if width == 8:  # 64-bit fields are read as two 32-bit halves (§4.1.3.1)
            return self.config_read(offset, 4) | self.config_read(offset + 4, 4) << 32
        return self.map.read(window, offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.map.write(self._device_window(offset, width), offset, width, value)

    def config_generation(self) -> int:
        return self.common.read(COMMON_CFG.config_generation)

    def config_read_many(self, spans: Sequence[tuple[int, int]]) -> tuple[int, list[int], int]:
        common = self.map.require("common")
        gen = (common, COMMON_CFG.config_generation.offset, COMMON_CFG.config_generation.width)
        reads = [gen]
        for offset, width in spans:
            window = self._device_window(offset, width)
            halves = [(offset, 4), (offset + 4, 4)] if width == 8 else [(offset, width)]
            reads += [(window, off, w) for off, w in halves]
        got = self.map.read_many([*reads, gen])
        values, at = [], 1
        for _, width in spans:
            if width == 8:
                values.append(got[at] | got[at + 1] << 32)
                at += 2
            else:
                values.append(got[at])
                at += 1
        return got[0], values, got[-1]

    # -- PCI configuration access capability ----------------------------------------------

    def _pci_cfg_select(self, bar: int, offset: int, width: int) -> Window[VirtioPciCfgCapLayout]:
        """Point the PCI cfg window at ``bar``/``offset`` for a ``width``-byte access (§4.1.4.9.1)."""
        window = self.map.pci_cfg
        if window is None:
            raise TransportError(f"{self}: no VIRTIO_PCI_CAP_PCI_CFG capability")
        cap = self.map.block(window)
        cap.write(VIRTIO_PCI_CFG_CAP.bar, bar)
        cap.write(VIRTIO_PCI_CFG_CAP.offset, offset)
        cap.write(VIRTIO_PCI_CFG_CAP.length, width)
        return window

    def pci_cfg_read(self, bar: int, offset: int, width: int) -> int:
        """Read a BAR through config space only: set bar/offset/length, read pci_cfg_data
        (§4.1.4.9.1)."""
        window = self._pci_cfg_select(bar, offset, width)
        return self.map.read(window, VIRTIO_PCI_CFG_CAP.pci_cfg_data.offset, width)

    def pci_cfg_write(self, bar: int, offset: int, width: int, value: int) -> None:
        window = self._pci_cfg_select(bar, offset, width)
        self.map.write(window, VIRTIO_PCI_CFG_CAP.pci_cfg_data.offset, width, value)
