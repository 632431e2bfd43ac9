"""The virtio-net driver (virtio 1.2 §5.1): frames through the transmit and receive queues,
the control queue, and the config structure.

Queues (§5.1.2): receiveq1 (0), transmitq1 (1), ..., controlq (2N, N = max_virtqueue_pairs
with MQ or RSS, else 1). The first pair is driven unless ``queue_pairs=`` asks for more.
Receive buffers are kept posted: each used buffer is made available again once its frame has
been read (§5.1.6.3). Layouts, control commands and feature dependencies are in
:mod:`.encoding`; RSS and hash reports in :mod:`.rss`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from ...memory import GuestMemory
from ...pci import PciFunction
from ...transport import TransportError, feature_bit
from ...transport.layout import ISR, feature_names
from ...virtqueue import Buf, Request, UsedElem, Virtqueue, VirtqueueTimeout
from ..base import VirtioDriver, field_exists
from . import encoding
from .encoding import (
    ACK_UNWRITTEN,
    CTRL_COMMANDS,
    ETH_HLEN,
    ETH_MAX_FRAME,
    GSO_MAX_PACKET,
    GUEST_GSO_FEATURES,
    GUEST_OFFLOADS,
    NET_CONFIG,
    NET_CONFIG_MAC,
    NET_STATUS,
    RX_MODES,
    Ack,
    NetConfig,
    NetCtrlError,
    NetDeviceError,
    NetError,
    NetHdr,
    RxPacket,
    header_size,
    mac_bytes,
    unmet_dependencies,
)
from .rss import HashConfig, RssConfig

# -- receive segment coalescing (RSC) ---------------------------------------------------------

#: What a driver that takes coalesced TCP segments accepts with ``rsc=True``: RSC_EXT
#: (§5.1.6.4), GUEST_TSO4/6 (coalesced packets are large TCP packets, §5.1.6.4) with the
#: GUEST_CSUM they require, and HOST_TSO4/6 with CSUM, which RSC_EXT requires (§5.1.3.1). The
#: driver never sets gso_type or NEEDS_CSUM on what it sends, which those features allow, not ask.
RSC_FEATURES = frozenset({"RSC_EXT", "GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "CSUM", "HOST_TSO4", "HOST_TSO6"})

# -- the driver -----------------------------------------------------------------------------

RX_QUEUE, TX_QUEUE = 0, 1
#: Receive buffers posted at DRIVER_OK unless told otherwise.
DEFAULT_RX_BUFFERS = 32


class VirtioNet(VirtioDriver):
    """virtio-net driver, §5.1: ``send(frame)``, ``receive(timeout)``, control commands, config.

    Extra keywords (``vm.virtio("net0", rx_buffers=..., ...)``): ``rx_buffers`` posted at
    DRIVER_OK (0: none; post later with :meth:`post_rx_buffers`), ``rx_buffer_size`` bytes per
    buffer including the header (default: a full frame, or 2048 with MRG_RXBUF),
    ``rx_poison`` a byte every receive buffer is filled with before it is posted, so a field
    the device did not write is visible; ``queue_pairs`` the pairs set up when MQ or RSS is
    negotiated (default 1; enable them with :meth:`set_queue_pairs`), ``accept`` features of
    ``OPTIONAL_FEATURES`` the driver also negotiates when offered (offloads, RSS, hash reports,
    RSC_EXT), ``rsc=True`` the shorthand for accepting :data:`RSC_FEATURES`.
    """

    DEVICE_TYPE = encoding.DEVICE_ID
    CONFIG_LAYOUT = NET_CONFIG
    FEATURE_BITS = encoding.FEATURE_BITS
    FEATURES = frozenset(
        {
            "MAC",
            "MTU",
            "MRG_RXBUF",
            "STATUS",
            "CTRL_VQ",
            "CTRL_RX",
            "CTRL_RX_EXTRA",
            "CTRL_VLAN",
            "CTRL_MAC_ADDR",
            "GUEST_ANNOUNCE",
            "MQ",
        }
    )
    QUEUES = 0  # created in setup_device(): the control queue's index depends on the config
    #: Features implemented here but negotiated only when asked (``accept=``), so the default
    #: driver stays the plain one the other scenarios rely on.
    OPTIONAL_FEATURES = frozenset(
        {
            "CSUM",
            "GUEST_CSUM",
            "CTRL_GUEST_OFFLOADS",
            "GUEST_TSO4",
            "GUEST_TSO6",
            "GUEST_ECN",
            "GUEST_UFO",
            "HOST_TSO4",
            "HOST_TSO6",
            "HOST_ECN",
            "HOST_UFO",
            "RSS",
            "HASH_REPORT",
            "RSC_EXT",
        }
    )

    def __init__(
        self,
        fn: PciFunction,
        mode: str,
        memory: GuestMemory,
        *,
        rx_buffers: int = DEFAULT_RX_BUFFERS,
        rx_buffer_size: int | None = None,
        rx_poison: int | None = None,
        queue_pairs: int = 1,
        accept: Iterable[str] = (),
        rsc: bool = False,
        **kwargs: Any,
    ) -> None:
        self._set_mq_options(queue_pairs, frozenset(accept) | (RSC_FEATURES if rsc else frozenset()))
        self.rx_buffers_wanted = rx_buffers
        self.rx_buffer_size_wanted = rx_buffer_size
        self.rx_poison = rx_poison
        self._check_rx_options()
        self.rxq: Virtqueue | None = None
        self.txq: Virtqueue | None = None
        #: receiveq1..N and transmitq1..N as set up (the first pair is rxq / txq).
        self.rxqs: list[Virtqueue] = []
        self.txqs: list[Virtqueue] = []
        #: max_virtqueue_pairs read at setup (1 without MQ and RSS).
        self.max_pairs = 1
        self.ctrlq: Virtqueue | None = None
        self.ctrl_index: int | None = None
        #: config mtu, read once when MTU is negotiated (the device MUST NOT change it, §5.1.4.1).
        self.mtu: int | None = None
        self.rx_buffer_size = 0
        self._rx_regions: list[int] = []
        self._rx_posted: dict[int, int] = {}
        #: Queues reset with :meth:`reset_queue` and not yet re-enabled.
        self._reset_queues: set[int] = set()
        super().__init__(fn, mode, memory, **kwargs)

    # -- initialization (§5.1.5) ----------------------------------------------------------

    def refused_bits(self) -> int:
        """The user's refusals, plus offered features whose requirements (§5.1.3.1) will not
        be negotiated: a driver MUST NOT accept those (§2.2.1)."""
        refused = super().refused_bits()
        candidates = self.transport.device_features() & self.supported_bits() & ~refused
        for name in unmet_dependencies(feature_names(candidates, self.device_bits)):
            refused |= 1 << feature_bit(name, self.device_bits)
        return refused

    def setup_device(self) -> None:
        """receiveq1, transmitq1 (up to ``queue_pairs`` pairs with MQ or RSS) and, with CTRL_VQ,
        the control queue at 2N (§5.1.2, §5.1.5 step 1)."""
        pairs = 1
        if self.has("MQ") or self.has("RSS"):
            pairs = self.read_config(["max_virtqueue_pairs"])["max_virtqueue_pairs"]
            if not 1 <= pairs <= 0x8000:
                raise NetDeviceError(f"{self._who()}: max_virtqueue_pairs is {pairs}, not 1..0x8000 (§5.1.4.1)")
            if self.queue_pairs_wanted > pairs:
                wanted = self.queue_pairs_wanted
                raise NetError(f"{self._who()}: queue_pairs={wanted}, but max_virtqueue_pairs is {pairs}")
        self.max_pairs = pairs
        self.mtu = None
        if self.has("MTU"):
            self.mtu = self.read_config(["mtu"])["mtu"]
        driven = self.queue_pairs_wanted if pairs > 1 else 1
        for n in range(driven):
            self.rxqs.append(self._queue(2 * n, f"receiveq{n + 1}"))
            self.txqs.append(self._queue(2 * n + 1, f"transmitq{n + 1}"))
        self.rxq, self.txq = self.rxqs[0], self.txqs[0]
        if self.has("CTRL_VQ"):
            self.ctrl_index = 2 * pairs
            self.ctrlq = self._queue(self.ctrl_index, "controlq")

    def _queue(self, index: int, role: str) -> Virtqueue:
        vq = self.create_queue(index)
        vq.name = f"{type(self).__name__} {role} (queue {index})"
        self.queues.append(vq)
        return vq

    def initialize(self) -> None:
        """§3.1.1 through DRIVER_OK, then fill the receive queue (§5.1.5 step 3): buffers are
        made available only once the device is live, so no notification precedes DRIVER_OK."""
        super().initialize()
        self.rx_buffer_size = self.rx_buffer_size_wanted or self.default_rx_buffer_size()
        if self.has("MRG_RXBUF") and self.rx_buffer_size < self.header_size:
            raise ValueError(f"with MRG_RXBUF each receive buffer holds at least the {self.header_size}-byte header")
        if self.rx_buffers_wanted:
            for pair in range(len(self.rxqs)):
                self.post_rx_buffers(self.rx_buffers_wanted, pair=pair)

    def restart(self, **rx: int | None) -> None:
        """Reset and initialize again (§3.1.1), with receive-buffer options changed by keyword
        (``rx_buffers``, ``rx_buffer_size``, ``rx_poison``; None restores the default)."""
        attrs = {"rx_buffers": "rx_buffers_wanted", "rx_buffer_size": "rx_buffer_size_wanted", "rx_poison": "rx_poison"}
        for key, value in rx.items():
            if key not in attrs:
                raise TypeError(f"restart() takes {', '.join(attrs)}, not {key!r}")
            setattr(self, attrs[key], DEFAULT_RX_BUFFERS if key == "rx_buffers" and value is None else value)
        self._check_rx_options()
        self.initialize()

    @property
    def rsc(self) -> bool:
        """Whether RSC_EXT is among the accepted features (``rsc=True`` or :meth:`set_rsc`)."""
        return "RSC_EXT" in self.accepted

    def set_rsc(self, on: bool = True) -> None:
        """:meth:`configure` with :data:`RSC_FEATURES` added to ``accept`` (or, ``on=False``,
        taken out of it): a reset and a new initialization (§3.1.1), other options kept."""
        self.configure(accept=(self.accepted | RSC_FEATURES) if on else (self.accepted - RSC_FEATURES))

    def _check_rx_options(self) -> None:
        if self.rx_buffers_wanted < 0:
            raise ValueError(f"rx_buffers must be >= 0, not {self.rx_buffers_wanted}")
        if self.rx_poison is not None and not 0 <= self.rx_poison <= 0xFF:
            raise ValueError(f"rx_poison must be a byte, not {self.rx_poison}")

    def release_queues(self) -> None:
        """Free the rings and the receive buffers (after a reset the device forgets them)."""
        super().release_queues()
        self.rxq = self.txq = self.ctrlq = None
        self.rxqs, self.txqs = [], []
        self.ctrl_index = None
        for addr in self._rx_regions:
            self.memory.free(addr)
        self._rx_regions = []
        self._rx_posted = {}
        self._reset_queues = set()

    # -- facts from the negotiation -------------------------------------------------------

    @property
    def header_size(self) -> int:
        return header_size(self.negotiated)

    @property
    def separate_header(self) -> bool:
        """Legacy without ANY_LAYOUT: the header gets a descriptor of its own (§5.1.6.6)."""
        return not (self.has("VERSION_1") or self.has("ANY_LAYOUT"))

    @property
    def max_frame(self) -> int:
        """The largest frame the driver expects: mtu + 14 with MTU (at least 1514), else 1514."""
        return ETH_MAX_FRAME if self.mtu is None else max(self.mtu + ETH_HLEN, ETH_MAX_FRAME)

    def default_rx_buffer_size(self) -> int:
        """A whole frame plus header without MRG_RXBUF (§5.1.6.3.1: at least 1526 bytes), or the
        largest GSO packet plus header where GUEST_TSO4/6 (UFO, USO) let the device send one
        (coalesced packets included); a 2 KiB buffer with MRG_RXBUF."""
        if self.has("MRG_RXBUF"):
            return 2048
        if any(self.has(f) for f in GUEST_GSO_FEATURES):
            return self.header_size + GSO_MAX_PACKET
        return self.header_size + self.max_frame

    def _who(self) -> str:
        return f"{type(self).__name__} {self.dev_id or self.fn.bdf} ({self.mode})"

    def _where(self, vq: Virtqueue, elem: UsedElem) -> str:
        return f"{self._who()}: {vq.name}: descriptor {elem.id}"

    # -- config (§5.1.4) ------------------------------------------------------------------

    def config_features(self) -> frozenset[str]:
        """A net config field exists when the device *offers* one of its features (§5.1.4
        says "exists only if VIRTIO_NET_F_MAC is set", which the device does by offering it)."""
        return frozenset(feature_names(self.negotiated.offered, self.device_bits))

    def config(self) -> NetConfig:
        """The config structure by name, one consistent snapshot (§2.5.1, §5.1.4)."""
        return NetConfig.from_fields(self.read_config())

    @property
    def mac(self) -> bytes:
        """The device's MAC address from config (§5.1.4; valid with MAC offered)."""
        return bytes(self.read_config([f.name for f in NET_CONFIG_MAC]).values())

    def _has_status(self) -> bool:
        return field_exists(NET_CONFIG.status, self.config_features())

    @property
    def status(self) -> int:
        if not self._has_status():
            raise NetError(f"{self._who()}: config has no status field (STATUS not offered)")
        return self.read_config(["status"])["status"]

    @property
    def link_up(self) -> bool:
        """LINK_UP from status; without STATUS the driver assumes the link is up (§5.1.4.2)."""
        if not self._has_status():
            return True
        return bool(NET_STATUS.LINK_UP.get(self.status))

    def wait_config_interrupt(self, timeout: float = 5.0) -> None:
        """Wait for a configuration change notification (§4.1.5.3): MSI-X vector 0, or the
        INTx line / ISR polling with the ISR's config bit (§4.1.4.5)."""
        if self.msix is not None:
            self.msix.wait(0, timeout)
            return
        deadline = time.monotonic() + timeout
        while True:
            if self.intx is not None:
                self.intx.wait(True, max(deadline - time.monotonic(), 0.001))
            isr = self.transport.read_isr()
            if isr & ISR.config_change.mask:
                return
            if time.monotonic() > deadline:
                raise TransportError(f"{self._who()}: no configuration change interrupt within {timeout:g} s")
            if self.intx is None:
                time.sleep(0.0005)

    # -- transmit (§5.1.6.2) --------------------------------------------------------------

    def _tx_chain(self, frame: bytes, header: NetHdr | None) -> list[bytes]:
        if self.mtu is not None and len(frame) > self.mtu + ETH_HLEN:
            raise NetError(f"{self._who()}: a {len(frame)}-byte frame exceeds mtu {self.mtu} + {ETH_HLEN} (§5.1.4.2)")
        hdr = (header or NetHdr()).encode(self.header_size)
        return [hdr, frame] if self.separate_header else [hdr + frame]

    def send(self, frame: bytes, *, header: NetHdr | None = None, timeout: float = 5.0, pair: int = 0) -> None:
        """Transmit one frame (header with num_buffers 0, §5.1.6.2.1) on transmitq ``pair + 1``
        and wait until the device has used it."""
        self.send_many([frame], header=header, timeout=timeout, pair=pair)

    def transmit(self, frame: bytes, *, header: NetHdr | None = None, pair: int = 0, kick: bool = True) -> Request:
        """Make one frame available and notify, without waiting for the device (a tx=timer
        device holds it until its timer fires); ``txq.complete(request)`` waits. With
        ``kick=False`` the chain is queued unpublished until the queue's next kick."""
        return self._tx(pair).submit(self._tx_chain(frame, header), [], kick=kick)

    def send_many(
        self, frames: Sequence[bytes], *, header: NetHdr | None = None, timeout: float = 5.0, pair: int = 0
    ) -> None:
        """Transmit several frames with one notification; wait until all are used."""
        vq = self._tx(pair)
        chains = [self._tx_chain(f, header) for f in frames]
        allocations: list[int] = []
        tokens = []
        for chain in chains:
            bufs = []
            for part in chain:
                addr = self.memory.alloc(max(len(part), 1), 16, tag=f"{vq.name} frame")
                allocations.append(addr)
                self.memory.write(addr, part)
                bufs.append(Buf(addr, len(part)))
            tokens.append(vq.add(bufs))
        vq.kick()
        for token in tokens:
            vq.wait_for(token, timeout)  # on a timeout the frames stay allocated: still in flight
        for addr in allocations:
            self.memory.free(addr)

    # -- receive (§5.1.6.3, §5.1.6.4) -----------------------------------------------------

    def post_rx_buffers(self, count: int, size: int | None = None, *, pair: int = 0) -> None:
        """Make ``count`` more receive buffers of ``size`` bytes available on receiveq
        ``pair + 1``, and notify."""
        vq = self._rx(pair)
        size = size or self.rx_buffer_size
        if count <= 0:
            return
        region = self.memory.alloc(count * size, 64, tag=f"{vq.name} buffers")
        self._rx_regions.append(region)
        if self.rx_poison is not None:
            self.memory.write(region, bytes([self.rx_poison]) * (count * size))
        for i in range(count):
            vq.add(self._rx_chain(region + i * size, size))
        self._rx_posted[pair] = self._rx_posted.get(pair, 0) + count
        vq.kick()

    def _rx_chain(self, addr: int, size: int) -> list[Buf]:
        """One receive buffer: header and data in separate descriptors on the legacy layout
        without ANY_LAYOUT (§5.1.6.6); a mergeable buffer stays whole (any of them can be a
        continuation without a header, as Linux's legacy driver does it)."""
        hdr = self.header_size
        if self.separate_header and not self.has("MRG_RXBUF") and size > hdr:
            return [Buf(addr, hdr, writable=True), Buf(addr + hdr, size - hdr, writable=True)]
        return [Buf(addr, size, writable=True)]

    def _repost(self, vq: Virtqueue, elems: Sequence[UsedElem]) -> None:
        for elem in elems:
            if self.rx_poison is not None:
                for b in elem.bufs:
                    self.memory.write(b.addr, bytes([self.rx_poison]) * b.length)
            vq.add(elem.bufs)
        vq.kick()

    @staticmethod
    def _buf_size(elem: UsedElem) -> int:
        return sum(b.length for b in elem.bufs)

    def _read_used(self, elem: UsedElem) -> bytes:
        """The first ``used length`` bytes of a used buffer, across its descriptors."""
        out = bytearray()
        left = elem.length
        for b in elem.bufs:
            if left <= 0:
                break
            n = min(left, b.length)
            out += self.memory.read(b.addr, n)
            left -= n
        return bytes(out)

    def poll_packet(self, *, pair: int = 0) -> RxPacket | None:
        """A received packet if one is used already (on receiveq ``pair + 1``), else None."""
        vq = self._rx(pair)
        first = vq.poll_used()
        return None if first is None else self._assemble(vq, first, 5.0, pair)

    def receive_packet(self, timeout: float = 5.0, *, pair: int = 0) -> RxPacket:
        """The next received packet with its header and buffer accounting; its buffers are
        posted again. Raises VirtqueueTimeout when nothing arrives."""
        vq = self._rx(pair)
        return self._assemble(vq, vq.wait_used(timeout), timeout, pair)

    def receive(self, timeout: float = 5.0, *, pair: int = 0) -> bytes:
        """The next received frame, header stripped."""
        return self.receive_packet(timeout, pair=pair).frame

    def _assemble(self, vq: Virtqueue, first: UsedElem, timeout: float, pair: int = 0) -> RxPacket:
        hdr_size = self.header_size
        elems = [first]
        try:
            if first.length < hdr_size:
                raise NetDeviceError(
                    f"{self._where(vq, first)}: used length {first.length} is shorter than the "
                    f"{hdr_size}-byte virtio_net_hdr (§5.1.6.4)"
                )
            data = self._read_used(first)
            header = NetHdr.decode(data[:hdr_size])
            count = 1
            if self.has("MRG_RXBUF"):
                count = header.num_buffers or 0
                posted = self._rx_posted.get(pair, 0)
                if not 1 <= count <= posted:
                    raise NetDeviceError(
                        f"{self._where(vq, first)}: num_buffers is {header.num_buffers}, not 1..{posted} "
                        f"(the buffers posted) (§5.1.6.4.1)"
                    )
            deadline = time.monotonic() + timeout
            while len(elems) < count:
                try:
                    elem = vq.wait_used(max(deadline - time.monotonic(), 0.0))
                except VirtqueueTimeout as e:
                    raise NetDeviceError(
                        f"{self._where(vq, first)}: num_buffers is {count} but only {len(elems)} buffers were "
                        f"used (§5.1.6.4.1: all buffers of a packet are used together)"
                    ) from e
                elems.append(elem)
                data += self._read_used(elem)
        finally:
            self._repost(vq, elems)
        return RxPacket(
            header,
            data[hdr_size:],
            [e.length for e in elems],
            [self._buf_size(e) for e in elems],
            [e.id for e in elems],
        )

    def drain(self, *, pair: int = 0) -> list[RxPacket]:
        """Every packet already received (to clear the queue between steps)."""
        out = []
        while (p := self.poll_packet(pair=pair)) is not None:
            out.append(p)
        return out

    # -- control queue (§5.1.6.5) ---------------------------------------------------------

    def ctrl_raw(self, class_code: int, code: int, data: bytes | Sequence[bytes] = b"", *, timeout: float = 5.0) -> int:
        """Send one control command and return its ack byte (VIRTIO_NET_OK or _ERR). The class
        and command go in one descriptor, each part of ``data`` in the next ones, the ack in a
        last device-writable one: the framing legacy devices need without ANY_LAYOUT (§5.1.6.6)."""
        vq = self._need(self.ctrlq, "controlq (CTRL_VQ not negotiated)")
        chunks = [data] if isinstance(data, bytes) else list(data)
        parts = [bytes([class_code, code])] + [c for c in chunks if c]
        allocations = []
        bufs = []
        for part in parts:
            addr = self.memory.alloc(len(part), 16, tag=f"{vq.name} command")
            allocations.append(addr)
            self.memory.write(addr, part)
            bufs.append(Buf(addr, len(part)))
        ack_addr = self.memory.alloc(1, 16, tag=f"{vq.name} ack")
        allocations.append(ack_addr)
        self.memory.write(ack_addr, bytes([ACK_UNWRITTEN]))
        bufs.append(Buf(ack_addr, 1, writable=True))
        token = vq.add(bufs)
        vq.kick()
        elem = vq.wait_for(token, timeout)  # on a timeout the buffers stay allocated: still in flight
        ack = self.memory.read(ack_addr, 1)[0]
        for addr in allocations:
            self.memory.free(addr)
        what = f"command class {class_code} command {code}"
        if elem.length < 1 and not self.transport.uses_legacy_layout:
            raise NetDeviceError(f"{self._where(vq, elem)}: {what}: used length 0, the ack byte was not written")
        if ack == ACK_UNWRITTEN:
            raise NetDeviceError(
                f"{self._where(vq, elem)}: {what}: the ack byte still holds the {ACK_UNWRITTEN:#04x} the driver put "
                f"there: the device used the command without acking it"
            )
        if ack not in (Ack.OK, Ack.ERR):
            raise NetDeviceError(
                f"{self._where(vq, elem)}: {what}: ack byte {ack:#04x} is neither VIRTIO_NET_OK nor VIRTIO_NET_ERR"
            )
        return ack

    def ctrl(
        self, command: str, data: bytes | Sequence[bytes] = b"", *, force: bool = False, timeout: float = 5.0
    ) -> None:
        """Send a named command (``"RX_PROMISC"``, ``"MAC_ADDR_SET"``, ...); raise NetCtrlError
        on VIRTIO_NET_ERR. The feature that allows the command must be negotiated unless
        ``force`` (a driver MUST NOT send it otherwise)."""
        cmd = CTRL_COMMANDS[command]
        if not force and not self.has(cmd.feature):
            raise NetError(f"{self._who()}: VIRTIO_NET_CTRL_{command} needs {cmd.feature}, which was not negotiated")
        ack = self.ctrl_raw(cmd.class_code, cmd.code, data, timeout=timeout)
        if ack != Ack.OK:
            raise NetCtrlError(f"{self._who()}: VIRTIO_NET_CTRL_{command} answered VIRTIO_NET_ERR", command, ack)

    def set_rx_mode(self, **modes: bool) -> None:
        """VIRTIO_NET_CTRL_RX commands (§5.1.6.5.1): ``set_rx_mode(promisc=False, allmulti=True)``."""
        for name, on in modes.items():
            if name not in RX_MODES:
                raise ValueError(f"unknown rx mode {name!r}; known: {', '.join(RX_MODES)}")
            self.ctrl(f"RX_{name.upper()}", bytes([1 if on else 0]))

    def set_mac(self, mac: bytes | str) -> None:
        """Set the default MAC: VIRTIO_NET_CTRL_MAC_ADDR_SET (§5.1.6.5.2), or on the legacy
        interface without CTRL_MAC_ADDR by writing config ``mac`` first to last byte (§5.1.6.5.2.2)."""
        raw = mac_bytes(mac)
        if self.has("CTRL_MAC_ADDR"):
            self.ctrl("MAC_ADDR_SET", raw)
        elif self.transport.uses_legacy_layout:
            for f, b in zip(NET_CONFIG_MAC, raw, strict=True):
                self.write_config(f, b)
        else:
            raise NetError(f"{self._who()}: cannot set the MAC: CTRL_MAC_ADDR not negotiated on the modern interface")

    def set_mac_table(self, unicast: Sequence[bytes | str] = (), multicast: Sequence[bytes | str] = ()) -> None:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET (§5.1.6.5.2): two tables of le32 entries + MACs, one
        descriptor each (§5.1.6.6)."""
        tables = [len(t).to_bytes(4, "little") + b"".join(mac_bytes(m) for m in t) for t in (unicast, multicast)]
        self.ctrl("MAC_TABLE_SET", tables)

    def vlan_add(self, vid: int) -> None:
        """VIRTIO_NET_CTRL_VLAN_ADD (§5.1.6.5.3)."""
        self.ctrl("VLAN_ADD", vid.to_bytes(2, "little"))

    def vlan_del(self, vid: int) -> None:
        """VIRTIO_NET_CTRL_VLAN_DEL (§5.1.6.5.3)."""
        self.ctrl("VLAN_DEL", vid.to_bytes(2, "little"))

    def announce_ack(self) -> None:
        """VIRTIO_NET_CTRL_ANNOUNCE_ACK (§5.1.6.5.4): the device clears status ANNOUNCE."""
        self.ctrl("ANNOUNCE_ACK")

    def set_queue_pairs(self, pairs: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (§5.1.6.5.6). Only the pairs set up are accepted (the
        driver MUST configure queues before enabling them, §5.1.6.5.6.1)."""
        if not 1 <= pairs <= max(len(self.rxqs), 1):
            raise ValueError(
                f"{max(len(self.rxqs), 1)} queue pair(s) set up (queue_pairs=); VQ_PAIRS_SET {pairs} would enable "
                f"queues the driver did not configure"
            )
        self.ctrl("MQ_VQ_PAIRS_SET", pairs.to_bytes(2, "little"))

    # -- multiqueue, RSS, hash reports and guest offloads (issue 14) ------------------------

    def _set_mq_options(self, queue_pairs: int, accept: Iterable[str]) -> None:
        if not 1 <= queue_pairs <= 0x8000:
            raise ValueError(f"queue_pairs must be 1..0x8000, not {queue_pairs}")
        unknown = sorted(set(accept) - self.OPTIONAL_FEATURES)
        if unknown:
            raise ValueError(
                f"accept: {', '.join(unknown)} is not an optional feature of this driver; "
                f"known: {', '.join(sorted(self.OPTIONAL_FEATURES))}"
            )
        self.queue_pairs_wanted = queue_pairs
        self.accepted = frozenset(accept)

    def supported_bits(self) -> int:
        """The default feature set plus those asked for with ``accept``."""
        bits = super().supported_bits()
        for name in self.accepted:
            bits |= 1 << feature_bit(name, self.device_bits)
        return bits

    def configure(self, *, queue_pairs: int | None = None, accept: Iterable[str] | None = None) -> None:
        """Reset and initialize again (§3.1.1) with other ``queue_pairs`` or ``accept`` (None
        keeps the current value)."""
        self._set_mq_options(
            self.queue_pairs_wanted if queue_pairs is None else queue_pairs,
            self.accepted if accept is None else accept,
        )
        self.initialize()

    def set_rss(self, config: RssConfig) -> None:
        """VIRTIO_NET_CTRL_MQ_RSS_CONFIG (§5.1.6.5.7.1); raise NetCtrlError on VIRTIO_NET_ERR."""
        self.ctrl("MQ_RSS_CONFIG", config.encode())

    def set_hash_config(self, config: HashConfig) -> None:
        """VIRTIO_NET_CTRL_MQ_HASH_CONFIG (§5.1.6.5.6.4); raise NetCtrlError on VIRTIO_NET_ERR."""
        self.ctrl("MQ_HASH_CONFIG", config.encode())

    def set_guest_offloads(self, offloads: Iterable[str], *, force: bool = False) -> None:
        """VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET (§5.1.6.5.8.1): the le64 mask of the named offload
        features (GUEST_CSUM, GUEST_TSO4, ...), the others off."""
        mask = 0
        for name in offloads:
            if name not in GUEST_OFFLOADS:
                raise ValueError(f"{name} is not a guest offload; those are {', '.join(GUEST_OFFLOADS)}")
            mask |= 1 << feature_bit(name, self.device_bits)
        self.ctrl("GUEST_OFFLOADS_SET", mask.to_bytes(8, "little"), force=force)

    def receive_any(self, timeout: float = 5.0) -> tuple[int, RxPacket]:
        """(pair, packet): the next packet on any receive queue set up, the lowest pair first
        when several hold one. Raises VirtqueueTimeout when nothing arrives."""
        deadline = time.monotonic() + timeout
        while True:
            for pair in range(len(self.rxqs)):
                packet = self.poll_packet(pair=pair)
                if packet is not None:
                    return pair, packet
            if time.monotonic() > deadline:
                raise VirtqueueTimeout(f"{self._who()}: nothing received on {len(self.rxqs)} queue(s) in {timeout:g} s")
            time.sleep(0.0005)

    def _rx(self, pair: int) -> Virtqueue:
        if not 0 <= pair < len(self.rxqs):
            raise NetError(f"{self._who()}: no receiveq{pair + 1} set up ({len(self.rxqs)} pair(s))")
        return self.rxqs[pair]

    def _tx(self, pair: int) -> Virtqueue:
        if not 0 <= pair < len(self.txqs):
            raise NetError(f"{self._who()}: no transmitq{pair + 1} set up ({len(self.txqs)} pair(s))")
        return self.txqs[pair]

    # -- helpers --------------------------------------------------------------------------

    def _need(self, vq: Virtqueue | None, what: str) -> Virtqueue:
        if vq is None:
            raise NetError(f"{self._who()}: no {what} set up")
        return vq

    # -- queue reset (RING_RESET, §2.6.1) -------------------------------------------------

    def _slot(self, index: int) -> tuple[str, int, str]:
        """Where queue ``index`` lives in this driver: ("rx" | "tx", pair, spec name) for
        receiveqN / transmitqN, ("ctrl", 0, "controlq") for the control queue (§5.1.2)."""
        if self.ctrl_index is not None and index == self.ctrl_index:
            return "ctrl", 0, "controlq"
        pair, tx = divmod(index, 2)
        if 0 <= pair < (len(self.txqs) if tx else len(self.rxqs)):
            return ("tx", pair, f"transmitq{pair + 1}") if tx else ("rx", pair, f"receiveq{pair + 1}")
        raise ValueError(f"{self._who()}: queue {index} is not one this driver set up")

    def reset_queue(self, index: int) -> None:
        """Reset one queue of the live device alone (RING_RESET, §2.6.1.1: the register is on the
        modern layout only). The driver keeps the old ring and, for a receive queue, its buffers
        as they were, so a test can look at them, until :meth:`reenable_queue`."""
        if not self.has("RING_RESET"):
            raise NetError(f"{self._who()}: queue reset needs RING_RESET, which was not negotiated")
        _, _, role = self._slot(index)
        if index in self._reset_queues:
            raise NetError(f"{self._who()}: {role} is reset already")
        self.transport.reset_queue(index)
        self._reset_queues.add(index)

    def reenable_queue(self, index: int) -> None:
        """Set a reset queue up again in fresh ring memory and enable it (§2.6.1.2); a receive
        queue gets ``rx_buffers`` fresh buffers (the old ones stay allocated until teardown)."""
        kind, pair, role = self._slot(index)
        if index not in self._reset_queues:
            raise NetError(f"{self._who()}: {role} was not reset")
        self._reset_queues.discard(index)
        old = {"rx": self.rxqs, "tx": self.txqs}[kind][pair] if kind != "ctrl" else self._need(self.ctrlq, role)
        old.release()
        vq = self.create_queue(index)
        vq.name = old.name
        self.queues[self.queues.index(old)] = vq
        if kind == "ctrl":
            self.ctrlq = vq
        elif kind == "tx":
            self.txqs[pair] = vq
            self.txq = self.txqs[0]
        else:
            self.rxqs[pair] = vq
            self.rxq = self.rxqs[0]
            self._rx_posted[pair] = 0
            if self.rx_buffers_wanted:
                self.post_rx_buffers(self.rx_buffers_wanted, pair=pair)

    def rx_buffers_posted(self) -> list[Buf]:
        """The receive buffers the device holds now (made available, not yet used)."""
        vq = self._need(self.rxq, "receiveq1")
        return [b for chain in vq.in_flight.values() for b in chain.bufs]
