"""The driver core every device driver shares: initialization to DRIVER_OK, queues, interrupts.

A driver names its device type, the features it implements and how many queues it uses; this
class runs virtio 1.2 §3.1.1 over the transport the mode names, lays the queues out in the ring
format the negotiated features call for, and routes interrupts (MSI-X mailboxes in guest RAM, or
INTx with the ISR register).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Mapping, Set
from typing import ClassVar

from ..errors import QtestVirtioError
from ..memory import GuestMemory
from ..modes import Interrupts, Mode, check_mode
from ..pci import Msix, PciFunction
from ..pci import regs as pci_regs
from ..pci.intx import IntxLine, route_intx
from ..registers import Field, Layout
from ..transport import (
    Negotiated,
    TransportError,
    VirtioPciMap,
    VirtioTransport,
    check_device_status,
    driver_ok,
    feature_bit,
    negotiate,
    open_transport,
)
from ..transport.layout import ISR, VIRTIO_MSI_NO_VECTOR
from ..virtqueue import Request, Virtqueue, make_virtqueue

#: Reserved features every driver here implements (the ring machinery is shared).
CORE_FEATURES = {"VERSION_1", "EVENT_IDX", "INDIRECT_DESC", "RING_PACKED", "RING_RESET", "ANY_LAYOUT", "IN_ORDER"}
#: Default queue size asked of modern devices (they may offer more; legacy sizes are fixed).
DEFAULT_QUEUE_SIZE = 256
#: How often a config snapshot is retried while the generation moves before giving up.
CONFIG_RETRIES = 100


class DriverError(QtestVirtioError):
    """A driver was used against its life cycle (before :meth:`VirtioDriver.initialize`)."""


# -- device-specific configuration (virtio 1.2 §2.5) ------------------------------------------


def field_exists(f: Field, features: Set[str]) -> bool:
    """A config field exists when it needs no feature, or when one of the features its
    ``requires`` names is in ``features`` (§2.5; ``"MQ|RSS"`` is "MQ or RSS", as §5.1.4
    words it)."""
    return f.requires is None or any(name in features for name in f.requires.split("|"))


def existing_fields(layout: Layout, features: Set[str]) -> list[Field]:
    """The fields of ``layout`` that exist with ``features``, in offset order."""
    return [f for f in layout if field_exists(f, features)]


def read_config(transport: VirtioTransport, layout: Layout, fields: Iterable[Field]) -> dict[str, int]:
    """One consistent snapshot of config fields by name, each read at its own width: re-read
    while config_generation moves (§2.5.1, §4.1.4.3.1; legacy has none). 64-bit fields are two
    32-bit reads, low half first (§4.1.3.1), which the legacy I/O BAR needs anyway."""
    wanted = list(fields)
    for _ in range(CONFIG_RETRIES):
        before, got, after = transport.config_read_many([(f.offset, f.width) for f in wanted])
        if after == before:
            return {f.name: value for f, value in zip(wanted, got, strict=True)}
    raise TransportError(f"{transport}: config generation never settled while reading {layout.name}")


class Pending:
    """What a driver's record of a request made available and not yet completed holds: the
    queue and the chain :meth:`Virtqueue.submit` built, whose token names the request."""

    queue: int
    chain: Request

    @property
    def token(self) -> int:
        return self.chain.token


class VirtioDriver:
    """Base of the device drivers. Subclasses set DEVICE_TYPE, CONFIG_LAYOUT, FEATURE_BITS
    (from their device's encoding module), FEATURES and QUEUES.

    The life cycle is explicit: construction only records the arguments (no I/O);
    :meth:`initialize` opens the transport and runs §3.1.1 to DRIVER_OK, and may be called
    again to reinitialise. ``Machine.virtio()`` does both."""

    #: Virtio device ID (virtio 1.2 §5).
    DEVICE_TYPE: ClassVar[int] = 0
    #: The device-specific configuration layout (§2.5), None where the device has none.
    CONFIG_LAYOUT: ClassVar[Layout | None] = None
    #: Device-specific feature bits by number, named as the spec names them without prefix.
    FEATURE_BITS: ClassVar[Mapping[int, str]] = {}
    #: Device-specific feature names this driver implements.
    FEATURES: frozenset[str] = frozenset()
    #: Queues this driver sets up at initialization.
    QUEUES = 1
    #: What ``interrupts="auto"`` means on a function without MSI-X.
    AUTO_WITHOUT_MSIX: ClassVar[Interrupts] = Interrupts.ISR

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The keyword options this driver's constructor takes, its own and every base's (a
        subclass passes the rest on with ``**kwargs``): what a test may hand it, as the plugin's
        marker does. ``refuse`` is not among them: refusals have their own option."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            names.update(
                p.name for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
            )
        return frozenset(names - {"refuse"})

    def __init__(
        self,
        fn: PciFunction,
        mode: str,
        memory: GuestMemory,
        *,
        refuse: Iterable[str] = (),
        interrupts: str = Interrupts.AUTO,
        queue_size: int | None = None,
        notify_via: str = "mmio",
    ) -> None:
        self.fn = fn
        self.memory = memory
        self.requested_mode: Mode = check_mode(mode)
        self.device_bits: dict[int, str] = dict(self.FEATURE_BITS)
        self.refused_names = set(refuse)
        for name in self.refused_names:
            feature_bit(name, self.device_bits)  # a typo is an error, not a silent no-op
        try:
            self.interrupts = Interrupts(interrupts)
        except ValueError:
            raise ValueError(
                f"interrupts must be 'auto', 'msix', 'intx' (IOAPIC line) or 'isr' (ISR polling), not {interrupts!r}"
            ) from None
        self.queue_size = queue_size
        self.notify_via = notify_via
        self._transport: VirtioTransport | None = None
        self.queues: list[Virtqueue] = []
        self.msix: Msix | None = None
        self.intx: IntxLine | None = None
        #: MSI-X vector of each queue as the device accepted it (VIRTIO_MSI_NO_VECTOR: none).
        self.queue_vectors: dict[int, int] = {}
        self.negotiated = Negotiated(0, 0, 0)
        #: Set by Machine.virtio(): the device's id, and the host end of its backend (if any).
        self.dev_id = ""
        self.backend: object | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.fn.bdf} {self.mode}>"

    @property
    def transport(self) -> VirtioTransport:
        """The register layout the mode drives the device through (opened by initialize())."""
        if self._transport is None:
            raise DriverError(f"{type(self).__name__} {self.fn.bdf}: not initialised yet; call initialize() first")
        return self._transport

    @property
    def initialized(self) -> bool:
        return self._transport is not None

    @property
    def mode(self) -> str:
        return self.requested_mode

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

    def _open(self) -> None:
        """Find the mode's registers and decide ``auto`` interrupts (the first I/O)."""
        if self._transport is not None:
            return
        if self.interrupts is Interrupts.AUTO:  # MSI-X where the device has it (virtio-balloon-pci has not)
            has_msix = VirtioPciMap.of(self.fn).msix is not None
            self.interrupts = Interrupts.MSIX if has_msix else self.AUTO_WITHOUT_MSIX
        self._transport = open_transport(self.fn, self.requested_mode.value, notify_via=self.notify_via)

    def initialize(self) -> None:
        """Reset, negotiate, route interrupts, set the queues up, DRIVER_OK; the writes posted,
        so only what is read waits (§3.1.1)."""
        with self.fn.posting():
            self._initialize()

    def _initialize(self) -> None:
        self._open()
        self.release_queues()
        self.negotiated = negotiate(
            self.transport,
            driver_supports=self.supported_bits(),
            refuse=self.refused_bits(),
            device_bits=self.device_bits,
        )
        if self.interrupts is Interrupts.MSIX:
            self._setup_msix()
        else:
            self._setup_intx()
        self.setup_device()
        for q in range(self.QUEUES):
            self.queues.append(self.create_queue(q))
        driver_ok(self.transport)

    # -- device-specific configuration (§2.5) ---------------------------------------------

    def config_features(self) -> Set[str]:
        """The features that decide which config fields exist: the negotiated ones (§2.5)."""
        return self.negotiated

    def read_config(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """Config fields by name as one consistent snapshot (:func:`read_config`); by default
        every field that exists with :meth:`config_features`. Named fields are read whether
        they exist or not (a test may read what a driver should not rely on)."""
        layout = self.CONFIG_LAYOUT
        if layout is None:
            raise DriverError(f"{type(self).__name__}: the device has no device-specific configuration")
        fields = existing_fields(layout, self.config_features()) if names is None else [layout[n] for n in names]
        return read_config(self.transport, layout, fields)

    def write_config(self, f: Field, value: int) -> None:
        """Write one config field at its width (the driver-writable ones, §2.5)."""
        layout = self.CONFIG_LAYOUT
        if layout is None or f not in layout:
            raise DriverError(f"{type(self).__name__}: {f.name} is not a field of its config")
        self.transport.config_write(f.offset, f.width, value)

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
        if VirtioPciMap.of(self.fn).msix is None:
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
        if VirtioPciMap.of(self.fn).msix is not None:
            Msix(self.fn).enable(False)
        cmd = self.fn.config.read(pci_regs.TYPE0_HEADER.command)
        self.fn.config.write(pci_regs.TYPE0_HEADER.command, pci_regs.COMMAND.interrupt_disable.set(cmd, 0))
        if self.interrupts is Interrupts.INTX and self.intx is None:
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
        """Reset the device and free everything the driver allocated in guest RAM (nothing to
        do before initialize())."""
        if self._transport is None:
            return
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
