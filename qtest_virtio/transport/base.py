"""The transport interface every virtio-pci register layout implements, and the errors it raises.

A transport hides *where* a register lives (legacy I/O BAR or modern capability windows); the
initialization sequence and the virtqueues are written once against this interface.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..errors import QtestVirtioError
from ..pci import PciFunction
from . import layout


class TransportError(QtestVirtioError):
    """The device broke a rule of the transport, or the driver asked for something impossible."""


class VirtioTransport(ABC):
    """Register access of one virtio-pci function, in one transport mode.

    ``uses_legacy_layout`` tells the virtqueue layer whether the rings must be laid out
    contiguously at a 4096-byte aligned page frame (legacy, virtio 1.2 §4.1.4.10 and §2.7)
    or may live anywhere (modern, §4.1.4.3).
    """

    mode: str
    fn: PciFunction
    uses_legacy_layout: bool

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.fn.bdf} {self.mode}>"

    # -- status ---------------------------------------------------------------------------

    @abstractmethod
    def get_status(self) -> int: ...

    @abstractmethod
    def set_status(self, status: int) -> None: ...

    def add_status(self, bits: int) -> int:
        """OR ``bits`` into the device status (§3.1.1 builds it up one bit at a time)."""
        status = self.get_status() | bits
        self.set_status(status)
        return status

    def reset(self, timeout: float = 1.0) -> None:
        """Write 0 and wait until the device reads back 0 (§2.1.2, §4.1.4.3.2)."""
        self.set_status(0)
        deadline = time.monotonic() + timeout
        while (status := self.get_status()) != 0:
            if time.monotonic() > deadline:
                raise TransportError(f"{self}: device status stays {status:#x} after reset")
        self.after_reset()

    def after_reset(self) -> None:  # noqa: B027 - optional hook
        """Forget per-device state cached by the transport."""

    def status_names(self) -> list[str]:
        return layout.STATUS.names_set(self.get_status())

    # -- features -------------------------------------------------------------------------

    @abstractmethod
    def device_features(self) -> int: ...

    @abstractmethod
    def driver_features(self) -> int: ...

    @abstractmethod
    def set_driver_features(self, features: int) -> None: ...

    # -- queues ---------------------------------------------------------------------------

    @abstractmethod
    def num_queues(self) -> int:
        """Queues the device exposes (legacy has no register: counted by non-zero sizes)."""

    @abstractmethod
    def queue_max_size(self, queue: int) -> int:
        """The device's size for ``queue``; 0 if the queue does not exist."""

    @abstractmethod
    def setup_queue(self, queue: int, size: int, desc: int, driver: int, device: int) -> None:
        """Tell the device where the rings of ``queue`` live and how big the queue is."""

    @abstractmethod
    def enable_queue(self, queue: int) -> None: ...

    @abstractmethod
    def queue_enabled(self, queue: int) -> bool: ...

    @abstractmethod
    def notify(self, queue: int) -> None:
        """Kick: tell the device there are new available buffers in ``queue``."""

    def reset_queue(self, queue: int) -> None:
        """Reset one queue (RING_RESET, §2.6.1); only the modern layout has the register."""
        raise TransportError(f"{self}: queue reset needs the modern layout")

    # -- interrupts -----------------------------------------------------------------------

    @abstractmethod
    def read_isr(self) -> int:
        """Read (and so clear) the ISR status byte (§4.1.4.5)."""

    @abstractmethod
    def set_config_vector(self, vector: int) -> int:
        """Set the MSI-X vector for config changes; returns what the device read back
        (VIRTIO_MSI_NO_VECTOR when it refused, §4.1.5.1.2)."""

    @abstractmethod
    def set_queue_vector(self, queue: int, vector: int) -> int: ...

    # -- device-specific configuration ----------------------------------------------------

    @abstractmethod
    def config_read(self, offset: int, width: int) -> int: ...

    @abstractmethod
    def config_write(self, offset: int, width: int, value: int) -> None: ...

    def config_generation(self) -> int:
        """Changes whenever the device config changes (§2.5.1); legacy has none: 0."""
        return 0

    def config_read_many(self, spans: Sequence[tuple[int, int]]) -> tuple[int, list[int], int]:
        """``(offset, width)`` device config fields read at their widths (64-bit ones as two
        32-bit halves, low first, §4.1.3.1), between two config_generation reads: returns
        (generation before, values, generation after). Transports send it all in one exchange."""
        before = self.config_generation()
        values = [
            self.config_read(offset, 4) | self.config_read(offset + 4, 4) << 32
            if width == 8
            else self.config_read(offset, width)
            for offset, width in spans
        ]
        return before, values, self.config_generation()

    def read_config_bytes(self, offset: int, size: int) -> bytes:
        """A consistent snapshot of ``size`` config bytes: re-read while the generation moves
        (§2.5.1, driver requirement)."""
        for _ in range(100):
            before = self.config_generation()
            data = b"".join(self.config_read(offset + i, 1).to_bytes(1, "little") for i in range(size))
            if self.config_generation() == before:
                return data
        raise TransportError(f"{self}: config generation never settled")
