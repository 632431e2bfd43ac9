"""The legacy virtio-pci layout: everything in I/O BAR 0 (virtio 1.2 §4.1.4.10).

Rules that differ from modern: 32 feature bits only; the queue size is fixed by the device;
the rings are one contiguous area at a page frame number (4096-byte pages) with the used ring
on the next 4096-byte boundary after the available ring; the device config starts at 0x14,
or at 0x18 once MSI-X is enabled (two vector registers are inserted before it).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..pci import PciFunction
from .base import TransportError, VirtioTransport
from .layout import LEGACY_CFG, LEGACY_QUEUE_ALIGN_SHIFT
from .pcimap import VirtioPciMap

#: No legacy device has more queues than this; counting stops at the first size 0.
MAX_LEGACY_QUEUES = 1024


class LegacyTransport(VirtioTransport):
    """The legacy layout over the ``legacy`` window of the function's :class:`VirtioPciMap`."""

    uses_legacy_layout = True

    def __init__(self, fn: PciFunction, mode: str) -> None:
        self.fn = fn
        self.mode = mode
        self.map = VirtioPciMap.of(fn)
        if self.map.legacy is None:
            raise TransportError(
                f"{fn.bdf} has no legacy I/O BAR0: the device is modern-only (disable-legacy=on), "
                f"mode '{mode}' needs a legacy or transitional device"
            )
        self.regs = self.map.block(self.map.legacy)

    @property
    def msix_enabled(self) -> bool:
        return self.map.msix_enabled()

    @property
    def device_config_offset(self) -> int:
        """Where the device-specific config starts in BAR0: it moves with MSI-X (§4.1.4.10)."""
        return self.map.legacy_device().offset

    def get_status(self) -> int:
        return self.regs.read(LEGACY_CFG.device_status)

    def set_status(self, status: int) -> None:
        self.regs.write(LEGACY_CFG.device_status, status)

    def device_features(self) -> int:
        return self.regs.read(LEGACY_CFG.device_features)

    def driver_features(self) -> int:
        return self.regs.read(LEGACY_CFG.driver_features)

    def set_driver_features(self, features: int) -> None:
        if features >> 32:
            raise TransportError(f"{self}: the legacy layout has 32 feature bits; asked for {features:#x}")
        self.regs.write(LEGACY_CFG.driver_features, features)

    def _select(self, queue: int) -> None:
        self.regs.write(LEGACY_CFG.queue_select, queue)

    def num_queues(self) -> int:
        n = 0
        while n < MAX_LEGACY_QUEUES and self.queue_max_size(n):
            n += 1
        return n

    def queue_max_size(self, queue: int) -> int:
        self._select(queue)
        return self.regs.read(LEGACY_CFG.queue_size)

    def setup_queue(self, queue: int, size: int, desc: int, driver: int, device: int) -> None:
        fixed = self.queue_max_size(queue)
        if size != fixed:
            raise TransportError(f"{self}: legacy queue {queue} has the fixed size {fixed}, not {size}")
        if desc & ((1 << LEGACY_QUEUE_ALIGN_SHIFT) - 1):
            raise TransportError(f"{self}: legacy rings must start on a 4096-byte page, not {desc:#x}")
        expected_driver, expected_device = legacy_ring_offsets(size)
        if driver != desc + expected_driver or device != desc + expected_device:
            raise TransportError(
                f"{self}: legacy rings are contiguous: avail at desc+{expected_driver:#x}, "
                f"used at desc+{expected_device:#x}"
            )
        self.regs.write(LEGACY_CFG.queue_address, desc >> LEGACY_QUEUE_ALIGN_SHIFT)

    def enable_queue(self, queue: int) -> None:
        """Legacy has no enable register: writing the PFN made the queue live."""

    def queue_enabled(self, queue: int) -> bool:
        self._select(queue)
        return self.regs.read(LEGACY_CFG.queue_address) != 0

    def notify(self, queue: int) -> None:
        self.regs.write(LEGACY_CFG.queue_notify, queue)

    def read_isr(self) -> int:
        return self.regs.read(LEGACY_CFG.isr_status)

    def set_config_vector(self, vector: int) -> int:
        if not self.msix_enabled:
            raise TransportError(f"{self}: the legacy MSI-X vector registers exist only while MSI-X is enabled")
        self.regs.write(LEGACY_CFG.config_msix_vector, vector)
        return self.regs.read(LEGACY_CFG.config_msix_vector)

    def set_queue_vector(self, queue: int, vector: int) -> int:
        if not self.msix_enabled:
            raise TransportError(f"{self}: the legacy MSI-X vector registers exist only while MSI-X is enabled")
        self._select(queue)
        self.regs.write(LEGACY_CFG.queue_msix_vector, vector)
        return self.regs.read(LEGACY_CFG.queue_msix_vector)

    def config_read(self, offset: int, width: int) -> int:
        return self.map.read(self.map.legacy_device(), offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.map.write(self.map.legacy_device(), offset, width, value)

    def config_read_many(self, spans: Sequence[tuple[int, int]]) -> tuple[int, list[int], int]:
        window = self.map.legacy_device()
        return 0, self.map.read_many([(window, offset, width) for offset, width in spans]), 0


def legacy_ring_offsets(size: int) -> tuple[int, int]:
    """Offsets of the avail and used rings from the descriptor table in the legacy layout
    (§2.7 "Legacy Interfaces: A Note on Virtqueue Layout": used ring on a 4096 boundary)."""
    avail = 16 * size
    used = (avail + 6 + 2 * size + 4095) & ~4095
    return avail, used


def legacy_ring_bytes(size: int) -> int:
    """Bytes of the whole contiguous legacy ring area."""
    _, used = legacy_ring_offsets(size)
    return used + ((6 + 8 * size + 4095) & ~4095)
