"""virtio-net receive segment coalescing (VIRTIO_NET_F_RSC_EXT, virtio 1.2 §5.1.6.4) on a tap.

With RSC_EXT and GUEST_TSO4 (TSO6) negotiated, QEMU (``guest_rsc_ext=on``) holds in-sequence TCP
segments of one flow arriving from the link and hands the driver one large TCP packet per run:
gso_type TCPV4/TCPV6, VIRTIO_NET_HDR_F_RSC_INFO in flags, the number of coalesced segments in
csum_start and the number of duplicated ACKs in csum_offset (§5.1.6.4.1). What ends a run, and
what is never held, is QEMU's implementation (hw/net/virtio-net.c, ``virtio_net_rsc_*``): those are
regression scenarios.

The segments are injected on a tap interface whose other end QEMU reads (``backend="tap"``).
``rsc_interval`` (the drain timer, on the virtual clock) is set long, so that a run ends only when
a scenario ends it: with the qtest accelerator the virtual clock does not move unless stepped,
and on Debian's builds (TCG, real time) 4 s outlast every step. The timer has its own scenario.

RSC_EXT is feature bit 61: the legacy interface offers only bits 0-31, so coalescing exists only
on the modern layout (``transitional-modern``, ``modern``); the scenario without RSC runs on all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import count

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import TapBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import NET_HDR_F, GsoType, NetHdr, RxPacket, ethernet_frame
from qtest_virtio.devices.net.packets import Ipv4, Ipv6, Tcp, TcpFlags, TcpPacket, timestamp_option, udp_frame

from ._support import need, need_not

PEER_MAC = "02:00:00:00:00:01"
#: rsc_interval for the scenarios a timer must not end: 4 s (the property is a u32 of ns).
HOLD_NS = 4_000_000_000
#: How long the driver watches the receive queue before concluding the device holds a segment.
QUIET = 0.05
MODERN = ["transitional-modern", "modern"]
RSC_FLAGS = {"guest_rsc_ext": "on", "rsc_interval": str(HOLD_NS)}
FAMILIES = ["ipv4", "ipv6"]
ACK = TcpFlags.ACK


def rsc_device(refuse: tuple[str, ...] = (), **flags: object) -> pytest.MarkDecorator:
    """The marker of a scenario about coalescing: the tap, the modern layout, RSC_FLAGS changed by
    ``flags``, the driver accepting RSC_FEATURES (``rsc=True``). Of the refusal runs only
    MRG_RXBUF's changes what is checked (how a coalesced packet is laid out in the receive
    buffers)."""
    changed = {**RSC_FLAGS, **{k: str(v) for k, v in flags.items()}}
    return pytest.mark.virtio_device(
        "virtio-net-pci",
        backend="tap",
        transports=MODERN,
        flags=changed,
        refuse=refuse,
        rsc=True,
        refuse_each=["MRG_RXBUF"],
    )


pytestmark = rsc_device()

_ports = count(40000)


@dataclass
class Connection:
    """One TCP connection as its sender writes it: consecutive segments, in sequence."""

    mac: bytes
    family: str
    source_port: int
    destination_port: int = 80
    seq: int = 1_000_000
    ack: int = 7_000
    window: int = 0x7000
    host: int = 1

    def ip(self, **fields: object) -> Ipv4 | Ipv6:
        if self.family == "ipv4":
            return Ipv4(f"10.0.{self.host}.1", "10.0.0.2", **fields)  # type: ignore[arg-type]
        return Ipv6(f"fd00::{self.host}:1", "fd00::2", **fields)  # type: ignore[arg-type]

    def segment(self, payload: bytes = b"", *, ip: Mapping[str, object] | None = None, **tcp: object) -> TcpPacket:
        """A segment at the flow's current sequence number (not advancing it)."""
        fields: dict[str, object] = {
            "sequence_number": self.seq,
            "acknowledgment_number": self.ack,
            "flags": ACK,
            "window": self.window,
        }
        fields.update(tcp)
        header = Tcp(self.source_port, self.destination_port, **fields)  # type: ignore[arg-type]
        return TcpPacket(self.mac, PEER_MAC, self.ip(**(ip or {})), header, payload)

    def data(self, size: int, *, ip: Mapping[str, object] | None = None, **tcp: object) -> TcpPacket:
        """The next in-sequence data segment of ``size`` payload bytes; the flow moves past it."""
        payload = bytes((self.seq + i) & 0xFF for i in range(size))
        seg = self.segment(payload, ip=ip, **tcp)
        self.seq += size
        return seg


@pytest.fixture
def net(virtio_device: VirtioNet) -> VirtioNet:
    """The driver, negotiating RSC_EXT with GUEST_TSO4/6 (where not refused); skip without it."""
    need(virtio_device, "RSC_EXT")
    return virtio_device


def _send(qemu: Machine, net: VirtioNet, *segments: TcpPacket | bytes) -> None:
    host = qemu.backend(net.dev_id, TapBackend)
    for seg in segments:
        host.send(seg if isinstance(seg, bytes) else seg.encode())


def _held(net: VirtioNet, what: str) -> None:
    time.sleep(QUIET)
    got = net.poll_packet()
    assert got is None, f"{what}: the device delivered a packet at once ({len(got.frame)} bytes) instead of holding it"


def _normalised(frame: bytes) -> bytes:
    """The TCP frame with its IPv4 header and TCP checksums recomputed, for comparing contents:
    QEMU rewrites the IP length of a coalesced packet but leaves both checksums as the first
    segment had them. What the TCP checksum of such a packet should hold (the pseudo-header sum,
    with NEEDS_CSUM) is net-rsc-gso-fields's matter, not these scenarios'."""
    pkt = TcpPacket.decode(frame)
    if isinstance(pkt.ip, Ipv4):
        pkt.ip.header_checksum = None
    pkt.tcp.checksum = None
    return pkt.encode()


def _coalesced(segments: list[TcpPacket]) -> bytes:
    """What a run of in-sequence segments becomes (virtio_net_rsc_coalesce_data): the first
    segment's headers with the IP length of them all, the last one's TCP flags, ack number and
    window, and the payloads one after the other."""
    first, last = segments[0], segments[-1]
    ip = first.ip
    if isinstance(ip, Ipv6):
        ip = replace(ip, payload_length=None)
    tcp = replace(
        first.tcp,
        flags=last.tcp.flags,
        acknowledgment_number=last.tcp.acknowledgment_number,
        window=last.tcp.window,
        checksum=None,
    )
    return replace(first, ip=ip, tcp=tcp, payload=b"".join(s.payload for s in segments)).encode()


def _gso_type(family: str) -> int:
    return GsoType.TCPV4 if family == "ipv4" else GsoType.TCPV6


def _expect_run(net: VirtioNet, segments: list[TcpPacket], family: str) -> RxPacket:
    """The next packet is the run of ``segments``, coalesced, with the RSC header fields (no run
    here takes in a duplicated ACK: QEMU ends a run at one, test_acks_after_a_held_ack)."""
    pkt = net.receive_packet(timeout=2)
    assert _normalised(pkt.frame) == _normalised(_coalesced(segments)), (
        f"expected the {len(segments)} segments as one packet of {sum(len(s.payload) for s in segments)} "
        f"payload bytes, got {len(pkt.frame)} bytes"
    )
    h = pkt.header
    assert h.flags & NET_HDR_F.RSC_INFO.mask, f"a coalesced packet without VIRTIO_NET_HDR_F_RSC_INFO: {h}"
    assert h.gso_type == _gso_type(family), f"gso_type {h.gso_type}, expected {_gso_type(family)} for {family}"
    assert h.csum_start == len(segments), f"csum_start {h.csum_start}: {len(segments)} segments were coalesced"
    assert h.csum_offset == 0, f"csum_offset {h.csum_offset}: no duplicated ACK went into this packet"
    return pkt


def _expect_as_sent(net: VirtioNet, seg: TcpPacket | bytes, what: str) -> NetHdr:
    """The next packet is ``seg`` itself, byte for byte, not marked as coalesced."""
    frame = seg if isinstance(seg, bytes) else seg.encode()
    pkt = net.receive_packet(timeout=2)
    assert pkt.frame == frame, f"{what}: expected the {len(frame)}-byte segment as sent, got {len(pkt.frame)} bytes"
    assert not pkt.header.flags & NET_HDR_F.RSC_INFO.mask, f"{what}: RSC_INFO on a packet that was not coalesced"
    assert pkt.header.gso_type == GsoType.NONE, f"{what}: gso_type {pkt.header.gso_type} on a single segment"
    return pkt.header


# -- the coalesced packet (§5.1.6.4.1) ------------------------------------------------------------


@pytest.mark.conformance("net-rsc-info", spec="5.1.6.4.1")
def test_in_sequence_segments_arrive_as_one_packet(net: VirtioNet, qemu: Machine) -> None:
    """Three in-sequence segments of one flow become one TCP packet whose payload is theirs in
    order, with the last one's flags (PSH), ack number and window; with RSC_EXT the device MUST
    set VIRTIO_NET_HDR_F_RSC_INFO, the number of coalesced segments in csum_start and of
    duplicated ACKs (none) in csum_offset, and gso_type TCPV4 or TCPV6 (MUST). IPv4 and IPv6; a
    SYN passes the held run at once; a FIN ends it: the run, then the FIN as sent."""
    for family in FAMILIES:
        flow = Connection(net.mac, family, next(_ports))
        run = [
            flow.data(100),
            flow.data(200, window=0x1000),
            flow.data(300, flags=ACK | TcpFlags.PSH, window=0x6000, acknowledgment_number=flow.ack + 50),
        ]
        _send(qemu, net, *run)
        _held(net, f"three in-sequence {family} segments")
        syn = flow.segment(flags=TcpFlags.SYN)
        _send(qemu, net, syn)
        _expect_as_sent(net, syn, "a SYN, which bypasses the held run")
        fin = flow.segment(flags=ACK | TcpFlags.FIN)
        _send(qemu, net, fin)
        got = TcpPacket.decode(_expect_run(net, run, family).frame).tcp
        assert (got.flags, got.window, got.acknowledgment_number) == (ACK | TcpFlags.PSH, 0x6000, flow.ack + 50)
        _expect_as_sent(net, fin, "the FIN that ended the run")
    assert net.poll_packet() is None


@pytest.mark.conformance("net-rsc-gso-fields", spec="5.1.6.4.1")
def test_coalesced_packet_carries_needs_csum_and_mss(net: VirtioNet, qemu: Machine) -> None:
    """A coalesced packet has gso_type TCPV4, so the device MUST also set
    VIRTIO_NET_HDR_F_NEEDS_CSUM in flags and gso_size to the MSS: the segments' payload size
    (MUST)."""
    flow = Connection(net.mac, "ipv4", next(_ports))
    run = [flow.data(536) for _ in range(3)]
    _send(qemu, net, *run, flow.segment(flags=ACK | TcpFlags.FIN))
    pkt = _expect_run(net, run, "ipv4")
    assert pkt.header.flags & NET_HDR_F.NEEDS_CSUM.mask, f"gso_type TCPV4 without NEEDS_CSUM: {pkt.header}"
    assert pkt.header.gso_size == 536, f"gso_size {pkt.header.gso_size}, the MSS of the run is 536"


@pytest.mark.conformance("net-rsc-ecn-not-coalesced", spec="5.1.6.4.1")
def test_cwr_segment_is_not_coalesced_without_guest_ecn(net: VirtioNet, qemu: Machine) -> None:
    """The device SHOULD NOT send the driver TCP packets requiring segmentation offload with the
    ECN bit (CWR) set unless GUEST_ECN is negotiated (it is not here): a segment with CWR never
    reaches the driver inside a coalesced packet (SHOULD; QEMU lists CWR and ECE among the bits
    that end a run, but masks the flags to the low six bits first)."""
    need_not(net, "GUEST_ECN")
    flow = Connection(net.mac, "ipv4", next(_ports))
    sent = [flow.data(64), flow.data(64, flags=ACK | TcpFlags.CWR)]
    _send(qemu, net, *sent, flow.segment(flags=ACK | TcpFlags.FIN))
    payload = b""
    while len(payload) < 128:
        pkt = net.receive_packet(timeout=2)
        got = TcpPacket.decode(pkt.frame)
        if pkt.header.gso_type != GsoType.NONE:
            assert not got.tcp.flags & TcpFlags.CWR, f"a coalesced packet (gso_type {pkt.header.gso_type}) carries CWR"
        payload += got.payload
    assert payload == b"".join(s.payload for s in sent)


@pytest.mark.conformance("net-rsc-no-data-valid-unchecked", spec="5.1.6.4.1")
def test_bad_checksum_is_never_reported_valid(net: VirtioNet, qemu: Machine) -> None:
    """A segment with a wrong TCP checksum joins a run or not as the device likes, but the
    device MUST validate the checksum before it sets VIRTIO_NET_HDR_F_DATA_VALID: no packet that
    carries the bad segment's bytes says DATA_VALID (MUST; QEMU checks no checksum here)."""
    flow = Connection(net.mac, "ipv4", next(_ports))
    good = flow.data(100)
    bad = flow.data(100, checksum=0xBAD0)
    _send(qemu, net, good, bad, flow.segment(flags=ACK | TcpFlags.FIN))
    payload = b""
    while len(payload) < 200:
        pkt = net.receive_packet(timeout=2)
        assert not pkt.header.flags & NET_HDR_F.DATA_VALID.mask, f"DATA_VALID on an unchecked packet: {pkt.header}"
        payload += TcpPacket.decode(pkt.frame).payload
    assert payload == good.payload + bad.payload


# -- what ends a run (QEMU: virtio_net_rsc_tcp_ctrl_check, _coalesce_data, _handle_ack) -----------


def _run_then(
    qemu: Machine, net: VirtioNet, flow: Connection, run: list[TcpPacket], ender: TcpPacket, what: str
) -> None:
    """``run`` is held; ``ender`` ends it: the run is delivered, then ``ender`` as sent."""
    _send(qemu, net, *run)
    _held(net, f"the run before {what}")
    _send(qemu, net, ender)
    _expect_run(net, run, flow.family)
    _expect_as_sent(net, ender, what)


def test_what_ends_a_run(net: VirtioNet, qemu: Machine) -> None:
    """Each of these ends the flow's run, which is delivered first, and is then delivered as
    sent: FIN, RST, URG; a TCP option (the timestamps, RFC 7323; IPv4 and IPv6); a segment after
    a gap, one before the run's start (outside the window), a retransmission of the run's first
    segment (same sequence and ack numbers: taken as a duplicate); and a segment that would take
    the IPv4 packet past 65535 bytes (45 segments of 1448 bytes make 65200: the 46th does not fit;
    the 65 KiB packet takes 33 mergeable buffers, so more are posted)."""
    for bit in (TcpFlags.FIN, TcpFlags.RST, TcpFlags.URG):
        flow = Connection(net.mac, "ipv4", next(_ports))
        run = [flow.data(64), flow.data(64)]
        _run_then(
            qemu, net, flow, run, flow.data(64, flags=ACK | bit, urgent_pointer=bit == TcpFlags.URG), str(bit.name)
        )
    for family in FAMILIES:
        flow = Connection(net.mac, family, next(_ports))
        run = [flow.data(90), flow.data(90)]
        _run_then(qemu, net, flow, run, flow.data(90, options=timestamp_option(12345)), "a timestamp option")
    for what, offset in (("a segment after a gap", 1000), ("a segment before the run", -5000)):
        flow = Connection(net.mac, "ipv4", next(_ports))
        run = [flow.data(100), flow.data(100)]
        _run_then(qemu, net, flow, run, flow.segment(bytes(50), sequence_number=flow.seq + offset), what)
    flow = Connection(net.mac, "ipv4", next(_ports))
    run = [flow.data(100), flow.data(100)]
    _run_then(qemu, net, flow, run, replace(run[0]), "the run's first segment again")
    net.restart(rx_buffers=64)
    flow = Connection(net.mac, "ipv4", next(_ports))
    run = [flow.data(1448) for _ in range(45)]
    _run_then(qemu, net, flow, run, flow.data(1448), "a segment past 65535 bytes of IP packet")


def test_acks_after_a_held_ack(net: VirtioNet, qemu: Machine) -> None:
    """A pure ACK is held like data. What follows it at the same sequence number: data joins it
    (one packet of two segments); the same ACK again (a duplicate ACK) ends it, both delivered as
    sent; an ACK that acknowledges more, or far more than a window, ends it the same way; the same
    ACK with another window is folded into the held one, which then carries the new window and
    counts one segment."""
    flow = Connection(net.mac, "ipv4", next(_ports))
    ack = flow.segment()
    data = flow.segment(bytes(range(200)))
    _send(qemu, net, ack, data)
    _held(net, "a pure ACK and data at its sequence number")
    fin = flow.segment(sequence_number=flow.seq + 200, flags=ACK | TcpFlags.FIN)
    _send(qemu, net, fin)
    _expect_run(net, [ack, data], "ipv4")
    _expect_as_sent(net, fin, "the FIN after data joined an ACK")
    for what, more in (("a duplicate ACK", 0), ("an ACK of 100 more bytes", 100), ("an ACK beyond the window", 70000)):
        flow = Connection(net.mac, "ipv4", next(_ports))
        first, second = flow.segment(), flow.segment(acknowledgment_number=flow.ack + more)
        _send(qemu, net, first)
        _held(net, f"a pure ACK before {what}")
        _send(qemu, net, second)
        _expect_as_sent(net, first, f"the held ACK before {what}")
        _expect_as_sent(net, second, what)
    flow = Connection(net.mac, "ipv4", next(_ports))
    first, update = flow.segment(), flow.segment(window=flow.window + 0x100)
    _send(qemu, net, first, update)
    _held(net, "a window update of a held ACK")
    fin = flow.segment(flags=ACK | TcpFlags.FIN, window=update.tcp.window)
    _send(qemu, net, fin)
    pkt = net.receive_packet(timeout=2)
    assert _normalised(pkt.frame) == _normalised(update.encode()), "the held ACK does not carry the new window"
    assert pkt.header.flags & NET_HDR_F.RSC_INFO.mask and pkt.header.csum_start == 1, pkt.header
    _expect_as_sent(net, fin, "the FIN after the window update")


def test_two_flows_coalesce_separately(net: VirtioNet, qemu: Machine) -> None:
    """Segments of two flows (other source address, other port), interleaved, make two runs:
    ending the later flow's run delivers that run only; the first stays held until its own flow
    ends it. IPv4 and IPv6."""
    for family in FAMILIES:
        a = Connection(net.mac, family, next(_ports))
        b = Connection(net.mac, family, next(_ports), host=2)
        run_a, run_b = [], []
        for _ in range(3):
            run_a.append(a.data(70))
            run_b.append(b.data(110))
            _send(qemu, net, run_a[-1], run_b[-1])
        _held(net, f"two interleaved {family} runs")
        for flow, run, which in ((b, run_b, "second"), (a, run_a, "first")):
            fin = flow.segment(flags=ACK | TcpFlags.FIN)
            _send(qemu, net, fin)
            _expect_run(net, run, family)
            _expect_as_sent(net, fin, f"the {which} flow's FIN")
            if flow is b:
                _held(net, "the first flow's run")


# -- what is never held (QEMU: virtio_net_rsc_sanity_check4/6, virtio_net_rsc_receive) ------------


def test_what_passes_a_held_run(net: VirtioNet, qemu: Machine) -> None:
    """While a flow's run is held, these are delivered at once, as sent, and the run stays held
    until the flow's FIN: an IPv4 header with options, without Don't Fragment, or with an ECN
    codepoint; UDP over IPv4 and IPv6 and a frame that is not IP; an IP length past the end of the
    frame (IPv4, IPv6) or shorter than the headers, an IPv4 frame whose header says version 6, and
    a frame cut inside the TCP header."""
    for family in FAMILIES:
        flow = Connection(net.mac, family, next(_ports))
        run = [flow.data(100), flow.data(100)]
        _send(qemu, net, *run)
        strays: list[tuple[str, TcpPacket | bytes]] = [
            ("UDP", udp_frame(net.mac, PEER_MAC, flow.ip(), (5353, 5353), bytes(range(32)))),
            ("an IP length past the frame", flow.segment(bytes(100), ip=_ip_length(family, 20 + 20 + 500))),
            (
                "a frame cut inside the TCP header",
                flow.segment(bytes(100)).encode()[: 14 + flow.ip().header_length + 10],
            ),
        ]
        if family == "ipv4":
            strays += [
                ("IPv4 options", flow.segment(bytes(90), ip={"options": bytes([1, 1, 1, 0])})),
                ("a fragmentable IPv4 packet", flow.segment(bytes(90), ip={"flags": 0})),
                ("IPv4 ECT(1)", flow.segment(bytes(90), ip={"tos": 0x01})),
                ("an IP length shorter than the headers", flow.segment(bytes(100), ip={"total_length": 30})),
                ("IP version 6 under the IPv4 ethertype", flow.segment(bytes(100), ip={"version": 6})),
                ("a frame that is not IP", ethernet_frame(net.mac, PEER_MAC, 0x88B5, bytes(range(64)))),
            ]
        for what, stray in strays:
            _send(qemu, net, stray)
            _expect_as_sent(net, stray, f"{family}: {what}")
        _held(net, f"the {family} run beside the others")
        fin = flow.segment(flags=ACK | TcpFlags.FIN)
        _send(qemu, net, fin)
        _expect_run(net, run, family)
        _expect_as_sent(net, fin, f"the {family} FIN")


def _ip_length(family: str, ip_length: int) -> dict[str, object]:
    """The IP header field that gives the packet ``ip_length`` bytes (headers included)."""
    return {"total_length": ip_length} if family == "ipv4" else {"payload_length": ip_length - 40}


# -- the drain timer (QEMU: virtio_net_rsc_purge, rsc_interval ns on the virtual clock) -----------

TIMER_NS = 300_000_000


@rsc_device(rsc_interval=TIMER_NS)
def test_interval_timer_drains_held_runs(net: VirtioNet, qemu: Machine) -> None:
    """The first segment held arms a timer of rsc_interval ns on the virtual clock; when it
    fires, every run held for that protocol is delivered, coalesced, and nothing is delivered
    before. With the qtest accelerator the test steps the clock (one microsecond short, then the
    rest); on builds without it the virtual clock follows real time while the machine runs, and
    the runs must come rsc_interval (300 ms) after the first segment, not sooner."""
    stepped = qemu.binary.has_qtest_accel
    for family in FAMILIES if stepped else ["ipv4"]:
        a, b = Connection(net.mac, family, next(_ports)), Connection(net.mac, family, next(_ports), host=2)
        run_a = [a.data(60), a.data(60), a.data(60)]
        run_b = [b.data(90), b.data(90)]
        start = time.monotonic()
        _send(qemu, net, *run_a, *run_b)
        if stepped:
            _held(net, "two runs")
            qemu.qtest.clock_step(TIMER_NS - 1000)
            _held(net, f"two runs {TIMER_NS - 1000} ns after the first segment")
            qemu.qtest.clock_step(1000)
        _expect_run(net, run_a, family)
        _expect_run(net, run_b, family)
        waited = time.monotonic() - start
        assert stepped or waited >= TIMER_NS / 1e9 * 0.95, f"the runs were delivered after {waited * 1000:.0f} ms"
        assert net.poll_packet() is None


# -- without RSC -------------------------------------------------------------------------------------


@pytest.mark.conformance("net-rsc-info-not-negotiated", spec="5.1.6.4.1")
@pytest.mark.virtio_device("virtio-net-pci", backend="tap", flags={"guest_rsc_ext": "off"}, rsc=True, refuse_each=False)
def test_without_rsc_ext_segments_arrive_one_by_one(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With RSC_EXT not negotiated (the device does not offer it; on the legacy interface it
    cannot) the device MUST NOT set VIRTIO_NET_HDR_F_RSC_INFO; QEMU coalesces nothing then, even
    with GUEST_TSO4/6: every segment arrives at once, as sent (MUST)."""
    net = virtio_device
    need_not(net, "RSC_EXT")
    for family in FAMILIES:
        flow = Connection(net.mac, family, next(_ports))
        for seg in (flow.data(100), flow.data(100), flow.data(100)):
            _send(qemu, net, seg)
            _expect_as_sent(net, seg, f"{family} without RSC_EXT")


@rsc_device(refuse=("GUEST_TSO4",))
def test_rsc_follows_guest_tso_per_family(net: VirtioNet, qemu: Machine) -> None:
    """QEMU coalesces IPv4 only with GUEST_TSO4 and IPv6 only with GUEST_TSO6
    (virtio_net_set_features, rsc4_enabled / rsc6_enabled): with TSO4 refused, IPv4 segments
    arrive one by one while IPv6 segments are coalesced."""
    need(net, "GUEST_TSO6")
    need_not(net, "GUEST_TSO4")
    v4 = Connection(net.mac, "ipv4", next(_ports))
    for seg in (v4.data(100), v4.data(100)):
        _send(qemu, net, seg)
        _expect_as_sent(net, seg, "IPv4 without GUEST_TSO4")
    v6 = Connection(net.mac, "ipv6", next(_ports))
    run = [v6.data(100), v6.data(100)]
    _send(qemu, net, *run)
    _held(net, "an IPv6 run with GUEST_TSO6")
    _send(qemu, net, v6.segment(flags=ACK | TcpFlags.FIN))
    _expect_run(net, run, "ipv6")
