"""The driver core every device driver shares: initialization to DRIVER_OK, queues, interrupts.

A driver names its device type, the features it implements and how many queues it uses; this
class runs virtio 1.2 §3.1.1 over the transport the mode names, lays the queues out in the ring
format the negotiated features call for, and routes interrupts (MSI-X mailboxes in guest RAM, or
INTx with the ISR register).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ..memory import GuestMemory
from ..pci import Msix, PciFunction
from ..pci import regs as pci_regs
from ..pci.intx import IntxLine, route_intx
from ..transport import (
    Negotiated,
    TransportError,
    VirtioTransport,
    check_device_status,
    driver_ok,
    feature_bit,
    negotiate,
    open_transport,
)
from ..transport.layout import ISR, VIRTIO_MSI_NO_VECTOR
from ..virtqueue import Virtqueue, make_virtqueue
from .features import DEVICE_FEATURE_BITS

#: Reserved features every driver here implements (the ring machinery is shared).
CORE_FEATURES = {"VERSION_1", "EVENT_IDX", "INDIRECT_DESC", "RING_PACKED", "RING_RESET", "ANY_LAYOUT", "IN_ORDER"}
#: Default queue size asked of modern devices (they may offer more; legacy sizes are fixed).
DEFAULT_QUEUE_SIZE = 256


class VirtioDriver:
    """Base of the device drivers. Subclasses set DEVICE_TYPE, FEATURES and QUEUES."""

    DEVICE_TYPE = 0
    #: Device-specific feature names this driver implements.
    FEATURES: frozenset[str] = frozenset()
    #: Queues this driver sets up at initialization.
    QUEUES = 1

    def __init__(
        self,
        fn: PciFunction,
        mode: str,
        memory: GuestMemory,
        *,
        refuse: Iterable[str] = (),
        interrupts: str = "auto",
        queue_size: int | None = None,
        notify_via: str = "mmio",
    ) -> None:
        self.fn = fn
        self.memory = memory
        self.device_bits = DEVICE_FEATURE_BITS.get(self.DEVICE_TYPE, {})
        self.refused_names = set(refuse)
        for name in self.refused_names:
            feature_bit(name, self.device_bits)  # a typo is an error, not a silent no-op
        if interrupts not in ("auto", "msix", "intx", "isr"):
            raise ValueError(
                f"interrupts must be 'auto', 'msix', 'intx' (IOAPIC line) or 'isr' (ISR polling), not {interrupts!r}"
            )
        if interrupts == "auto":  # MSI-X where the device has it (virtio-balloon-pci has not)
            interrupts = "msix" if fn.find_capability(pci_regs.CAP_ID_MSIX) is not None else "isr"
        self.interrupts = interrupts
        self.queue_size = queue_size
        self.transport: VirtioTransport = open_transport(fn, mode, notify_via=notify_via)
        self.queues: list[Virtqueue] = []
        self.msix: Msix | None = None
        self.intx: IntxLine | None = None
        #: MSI-X vector of each queue as the device accepted it (VIRTIO_MSI_NO_VECTOR: none).
        self.queue_vectors: dict[int, int] = {}
        self.negotiated = Negotiated(0, 0, 0)
        #: Set by Machine.virtio(): the device's id, and the host end of its backend (if any).
        self.dev_id = ""
        self.backend: object | None = None
        self.initialize()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.fn.bdf} {self.transport.mode}>"

    @property
    def mode(self) -> str:
        return self.transport.mode

    # -- initialization (§3.1.1) ----------------------------------------------------------

    def supported_bits(self) -> int:
        bits = 0
        for name in CORE_FEATURES | set(self.FEATURES):
            bits |= 1 << feature_bit(name, self.device_bits)
        return bits

    def refused_bits(self) -> int:
        bits = 0
        for name in self.refused_names:
            bits |= 1 << feature_bit(name, self.device_bits)
        return bits

    def initialize(self) -> None:
        """Reset, negotiate, route interrupts, set the queues up, DRIVER_OK."""
        self.release_queues()
        self.negotiated = negotiate(
            self.transport,
            driver_supports=self.supported_bits(),
            refuse=self.refused_bits(),
            device_bits=self.device_bits,
        )
        if self.interrupts == "msix":
            self._setup_msix()
        else:
            self._setup_intx()
        self.setup_device()
        for q in range(self.QUEUES):
            self.queues.append(self.create_queue(q))
        driver_ok(self.transport)

    def setup_device(self) -> None:
        """Device-specific steps between FEATURES_OK and queue setup (§3.1.1 step 7)."""

    def create_queue(self, index: int) -> Virtqueue:
        max_size = self.transport.queue_max_size(index)
        if max_size == 0:
            raise TransportError(f"{self.transport}: queue {index} does not exist (size 0)")
        if self.transport.uses_legacy_layout:
            size = max_size
        else:
            size = min(self.queue_size or DEFAULT_QUEUE_SIZE, max_size)
        vq = make_virtqueue(
            self.transport,
            self.memory,
            index,
            size,
            packed=self.has("RING_PACKED"),
            event_idx=self.has("EVENT_IDX"),
            indirect=self.has("INDIRECT_DESC"),
            in_order=self.has("IN_ORDER"),
            name=f"{type(self).__name__} queue {index}",
        )
        if self.msix is not None:
            vector = 1 + index if 1 + index < self.msix.table_size else VIRTIO_MSI_NO_VECTOR
            got = self.transport.set_queue_vector(index, vector)
            if got != vector:
                raise TransportError(f"{self.transport}: queue {index} refused MSI-X vector {vector} (read {got:#x})")
            self.queue_vectors[index] = vector
        return vq

    def _setup_msix(self) -> None:
        """Vector 0 for config changes, 1.. for the queues (§4.1.5.1.2); messages to RAM."""
        if self.fn.find_capability(pci_regs.CAP_ID_MSIX) is None:
            raise TransportError(f"{self.fn.bdf} has no MSI-X capability (vectors=0?); use interrupts='intx'")
        if self.msix is None:
            self.msix = Msix(self.fn)
            self.msix.route_to_ram(self.memory)
        else:
            self.msix.reprogram()
        got = self.transport.set_config_vector(0)
        if got != 0:
            raise TransportError(f"{self.transport}: config vector 0 refused (read {got:#x})")

    def _setup_intx(self) -> None:
        """INTx: MSI-X off, interrupt-disable clear; 'intx' also routes the pin to an IOAPIC
        line and watches it, 'isr' relies on polling the ISR register alone."""
        if self.fn.find_capability(pci_regs.CAP_ID_MSIX) is not None:
            Msix(self.fn).enable(False)
        cmd = self.fn.config.read(pci_regs.TYPE0_HEADER.command)
        self.fn.config.write(pci_regs.TYPE0_HEADER.command, pci_regs.COMMAND.interrupt_disable.set(cmd, 0))
        if self.interrupts == "intx" and self.intx is None:
            self.intx = route_intx(self.fn.pci, self.fn)
            self.intx.intercept()

    def has(self, feature: str) -> bool:
        return feature in self.negotiated

    def check_status(self) -> int:
        return check_device_status(self.transport)

    # -- reset ----------------------------------------------------------------------------

    def release_queues(self) -> None:
        for vq in self.queues:
            vq.release()
        self.queues = []
        self.queue_vectors.clear()

    def reset(self) -> None:
        """Device reset: the device forgets the queues, the driver frees their memory."""
        self.transport.reset()
        self.release_queues()

    def close(self) -> None:
        """Reset the device and free everything the driver allocated in guest RAM."""
        self.reset()
        if self.msix is not None:
            self.msix.enable(False)
            if self.msix.mailboxes:
                self.memory.free(self.msix.mailboxes[0])
            self.msix.mailboxes.clear()
            self.msix = None

    # -- interrupts -----------------------------------------------------------------------

    def queue_vector(self, index: int) -> int:
        """The MSI-X vector queue ``index`` signals on; raises if it has none."""
        vector = self.queue_vectors.get(index, VIRTIO_MSI_NO_VECTOR)
        if vector == VIRTIO_MSI_NO_VECTOR:
            table = self.msix.table_size if self.msix else 0
            raise TransportError(f"{self.transport}: queue {index} has no MSI-X vector (the table has {table})")
        return vector

    def wait_queue_interrupt(self, index: int, timeout: float = 5.0) -> None:
        """Wait for a queue interrupt: the queue's MSI-X message; or with INTx the IOAPIC line,
        then the ISR read that says "queue" and deasserts it (§4.1.4.5); or ISR polling."""
        if self.msix is not None:
            self.msix.wait(self.queue_vector(index), timeout)
            return
        if self.intx is not None:
            self.intx.wait(True, timeout)
            isr = self.transport.read_isr()
            if not isr & ISR.queue_interrupt.mask:
                raise TransportError(f"{self.transport}: INTx line {self.intx.gsi} rose but ISR is {isr:#x}")
            self.intx.wait(False, timeout)
            return
        deadline = time.monotonic() + timeout
        while not self.transport.read_isr() & ISR.queue_interrupt.mask:
            if time.monotonic() > deadline:
                raise TransportError(f"{self.transport}: ISR queue bit not set within {timeout:g} s")
