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
and on Debian's builds (TCG, real time) 4 s outlast every step. The timer has its own scenarios.

RSC_EXT is feature bit 61: the legacy interface offers only bits 0-31, so coalescing exists only
on the modern layout (``transitional-modern``, ``modern``); the scenario without RSC runs on all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
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
QUIET = 0.1
MODERN = ["transitional-modern", "modern"]
RSC_FLAGS = {"guest_rsc_ext": "on", "rsc_interval": str(HOLD_NS)}
FAMILIES = ["ipv4", "ipv6"]
ACK = TcpFlags.ACK


def rsc_device(refuse: tuple[str, ...] = (), **flags: object) -> pytest.MarkDecorator:
    """The marker of a scenario about coalescing: the tap, the modern layout, RSC_FLAGS changed by ``flags``."""
    changed = {**RSC_FLAGS, **{k: str(v) for k, v in flags.items()}}
    return pytest.mark.virtio_device("virtio-net-pci", backend="tap", transports=MODERN, flags=changed, refuse=refuse)


pytestmark = rsc_device()

_ports = count(40000)


@dataclass
class Flow:
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


def _flows(net: VirtioNet, family: str) -> Iterator[Flow]:
    """Flows that differ in source port, each one new to the device."""
    while True:
        yield Flow(net.mac, family, next(_ports))


@pytest.fixture
def net(virtio_device: VirtioNet) -> VirtioNet:
    """The driver, reinitialised to negotiate RSC_EXT with GUEST_TSO4/6 (where not refused)."""
    virtio_device.set_rsc()
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
    """The TCP frame with its IPv4 header and TCP checksums recomputed: QEMU rewrites the length
    of a coalesced packet but not its checksums, which no receiver of an RSC packet relies on
    (§5.1.6.4: the driver MUST NOT rely on a checksum unless NEEDS_CSUM or DATA_VALID says so)."""
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


def _expect_run(net: VirtioNet, segments: list[TcpPacket], family: str, *, dup_acks: int = 0) -> RxPacket:
    """The next packet is the run of ``segments``, coalesced, with the RSC header fields."""
    pkt = net.receive_packet(timeout=2)
    assert _normalised(pkt.frame) == _normalised(_coalesced(segments)), (
        f"expected the {len(segments)} segments as one packet of {sum(len(s.payload) for s in segments)} "
        f"payload bytes, got {len(pkt.frame)} bytes"
    )
    h = pkt.header
    assert h.flags & NET_HDR_F.RSC_INFO.mask, f"a coalesced packet without VIRTIO_NET_HDR_F_RSC_INFO: {h}"
    assert h.gso_type == _gso_type(family), f"gso_type {h.gso_type}, expected {_gso_type(family)} for {family}"
    assert h.csum_start == len(segments), f"csum_start {h.csum_start}: {len(segments)} segments were coalesced"
    assert h.csum_offset == dup_acks, f"csum_offset {h.csum_offset}: {dup_acks} duplicated ACKs were received"
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
@pytest.mark.parametrize("family", FAMILIES)
def test_in_sequence_segments_arrive_as_one_packet(net: VirtioNet, qemu: Machine, family: str) -> None:
    """Three in-sequence segments of one flow become one TCP packet whose payload is theirs in
    order; with RSC_EXT the device MUST set VIRTIO_NET_HDR_F_RSC_INFO, the number of coalesced
    segments in csum_start and of duplicated ACKs (none) in csum_offset, gso_type TCPV4 or TCPV6
    (MUST). A SYN passes the held run at once; a FIN ends it: the run, then the FIN as sent."""
    flow = Flow(net.mac, family, next(_ports))
    run = [flow.data(100), flow.data(200), flow.data(300, flags=ACK | TcpFlags.PSH, window=0x6000)]
    _send(qemu, net, *run)
    _held(net, "three in-sequence segments")
    syn = flow.segment(flags=TcpFlags.SYN)
    _send(qemu, net, syn)
    _expect_as_sent(net, syn, "a SYN, which bypasses the held run")
    fin = flow.segment(flags=ACK | TcpFlags.FIN)
    _send(qemu, net, fin)
    _expect_run(net, run, family)
    _expect_as_sent(net, fin, "the FIN that ended the run")
    assert net.poll_packet() is None


@pytest.mark.conformance("net-rsc-gso-fields", spec="5.1.6.4.1")
def test_coalesced_packet_carries_needs_csum_and_mss(net: VirtioNet, qemu: Machine) -> None:
    """A coalesced packet has gso_type TCPV4, so the device MUST also set
    VIRTIO_NET_HDR_F_NEEDS_CSUM in flags and gso_size to the MSS: the segments' payload size
    (MUST)."""
    flow = Flow(net.mac, "ipv4", next(_ports))
    run = [flow.data(536) for _ in range(3)]
    _send(qemu, net, *run, flow.segment(flags=ACK | TcpFlags.FIN))
    pkt = _expect_run(net, run, "ipv4")
    assert pkt.header.flags & NET_HDR_F.NEEDS_CSUM.mask, f"gso_type TCPV4 without NEEDS_CSUM: {pkt.header}"
    assert pkt.header.gso_size == 536, f"gso_size {pkt.header.gso_size}, the MSS of the run is 536"


def test_largest_run_ends_before_the_ip_length_overflows(net: VirtioNet, qemu: Machine) -> None:
    """A run grows to at most 65535 bytes of IPv4 packet: 45 segments of 1448 bytes make 65200,
    a 46th would not fit, so it ends the run and is delivered as sent (virtio_net_rsc_coalesce_data,
    over_size). The 65 KiB packet takes 33 mergeable buffers (more are posted)."""
    net.restart(rx_buffers=64)
    flow = Flow(net.mac, "ipv4", next(_ports))
    run = [flow.data(1448) for _ in range(45)]
    extra = flow.data(1448)
    _send(qemu, net, *run)
    _held(net, "45 full-sized segments")
    _send(qemu, net, extra)
    pkt = _expect_run(net, run, "ipv4")
    ip = TcpPacket.decode(pkt.frame).ip
    assert isinstance(ip, Ipv4) and ip.total_length == 40 + 45 * 1448
    _expect_as_sent(net, extra, "the segment that did not fit")


# -- what ends a run (QEMU: virtio_net_rsc_tcp_ctrl_check, _coalesce_data, _handle_ack) -----------


def test_tcp_control_bits_end_a_run(net: VirtioNet, qemu: Machine) -> None:
    """FIN, RST and URG end the flow's run: the run is delivered, then the segment as
    sent. PSH does not: it is coalesced and the packet carries it. SYN bypasses: delivered at
    once, the run stays held until something ends it."""
    flows = _flows(net, "ipv4")
    for bit in (TcpFlags.FIN, TcpFlags.RST, TcpFlags.URG):
        flow = next(flows)
        run = [flow.data(64), flow.data(64, flags=ACK | TcpFlags.PSH)]
        ender = flow.data(64, flags=ACK | bit, urgent_pointer=1 if bit == TcpFlags.URG else 0)
        _send(qemu, net, *run)
        _held(net, f"the run before {bit.name}")
        _send(qemu, net, ender)
        pkt = _expect_run(net, run, "ipv4")
        assert TcpPacket.decode(pkt.frame).tcp.flags & TcpFlags.PSH, "PSH of the last segment is not kept"
        _expect_as_sent(net, ender, f"the {bit.name} segment")
    flow = next(flows)
    run = [flow.data(64), flow.data(64)]
    syn = flow.segment(flags=TcpFlags.SYN)
    _send(qemu, net, *run, syn)
    _expect_as_sent(net, syn, "a SYN during a run")
    _held(net, "the run a SYN passed")
    fin = flow.segment(flags=ACK | TcpFlags.FIN)
    _send(qemu, net, fin)
    _expect_run(net, run, "ipv4")
    _expect_as_sent(net, fin, "the FIN after the SYN")


@pytest.mark.conformance("net-rsc-ecn-not-coalesced", spec="5.1.6.4.1")
def test_cwr_segment_is_not_coalesced_without_guest_ecn(net: VirtioNet, qemu: Machine) -> None:
    """The device SHOULD NOT send the driver TCP packets requiring segmentation offload with the
    ECN bit (CWR) set unless GUEST_ECN is negotiated (it is not here): a segment with CWR never
    reaches the driver inside a coalesced packet (SHOULD; QEMU lists CWR and ECE among the bits
    that end a run, but masks the flags to the low six bits first)."""
    need_not(net, "GUEST_ECN")
    flow = Flow(net.mac, "ipv4", next(_ports))
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


def test_out_of_sequence_segments_end_a_run(net: VirtioNet, qemu: Machine) -> None:
    """A segment that does not start where the run ends ends it and is delivered as sent: one
    after a gap (out of order), one before the run's start (a retransmission outside the window),
    and a retransmission of the run's first segment (the same sequence and ack numbers: taken as
    a duplicate)."""
    flows = _flows(net, "ipv4")
    for what, offset in (("after a gap", 1000), ("before the run", -5000), ("at the run's start", None)):
        flow = next(flows)
        run = [flow.data(100), flow.data(100)]
        if offset is None:
            stray = replace(run[0])
        else:
            stray = flow.segment(bytes(50), sequence_number=flow.seq + offset)
        _send(qemu, net, *run)
        _held(net, f"the run before a segment {what}")
        _send(qemu, net, stray)
        _expect_run(net, run, "ipv4")
        _expect_as_sent(net, stray, f"the segment {what}")


def test_acks_after_a_held_ack(net: VirtioNet, qemu: Machine) -> None:
    """A pure ACK is held like data. What follows it at the same sequence number: data joins it
    (one packet of two segments); the same ACK again (a duplicate ACK) ends it, both delivered as
    sent; an ACK that acknowledges more, or far more than a window, ends it the same way; the same
    ACK with another window is folded into the held one, which then carries the new window and
    counts one segment."""
    flows = _flows(net, "ipv4")
    flow = next(flows)
    ack = flow.segment()
    data = flow.segment(bytes(range(200)))
    _send(qemu, net, ack, data)
    _held(net, "a pure ACK and data at its sequence number")
    _send(qemu, net, flow.segment(sequence_number=flow.seq + 200, flags=ACK | TcpFlags.FIN))
    _expect_run(net, [ack, data], "ipv4")
    net.receive_packet(timeout=2)  # the FIN
    for what, more in (("a duplicate ACK", 0), ("an ACK of 100 more bytes", 100), ("an ACK beyond the window", 70000)):
        flow = next(flows)
        first, second = flow.segment(), flow.segment(acknowledgment_number=flow.ack + more)
        _send(qemu, net, first)
        _held(net, f"a pure ACK before {what}")
        _send(qemu, net, second)
        _expect_as_sent(net, first, f"the held ACK before {what}")
        _expect_as_sent(net, second, what)
    flow = next(flows)
    first, update = flow.segment(), flow.segment(window=flow.window + 0x100)
    _send(qemu, net, first, update)
    _held(net, "a window update of a held ACK")
    fin = flow.segment(flags=ACK | TcpFlags.FIN, window=update.tcp.window)
    _send(qemu, net, fin)
    pkt = net.receive_packet(timeout=2)
    assert _normalised(pkt.frame) == _normalised(update.encode()), "the held ACK does not carry the new window"
    assert pkt.header.flags & NET_HDR_F.RSC_INFO.mask and pkt.header.csum_start == 1, pkt.header
    _expect_as_sent(net, fin, "the FIN after the window update")


def test_window_change_within_a_run_is_coalesced(net: VirtioNet, qemu: Machine) -> None:
    """In-sequence data with a new window or ack number stays in the run: the packet carries the
    last segment's window and ack number."""
    flow = Flow(net.mac, "ipv4", next(_ports))
    run = [flow.data(80), flow.data(80, window=0x1000), flow.data(80, window=0x2000, acknowledgment_number=9_000)]
    _send(qemu, net, *run)
    _held(net, "a run whose window changes")
    _send(qemu, net, flow.segment(flags=ACK | TcpFlags.FIN))
    got = TcpPacket.decode(_expect_run(net, run, "ipv4").frame).tcp
    assert (got.window, got.acknowledgment_number) == (0x2000, 9_000)


# -- what is never held (QEMU: virtio_net_rsc_sanity_check4/6, virtio_net_rsc_receive) ------------


def test_ip_and_tcp_options_are_not_coalesced(net: VirtioNet, qemu: Machine) -> None:
    """An IPv4 header with options, without Don't Fragment, or with an ECN codepoint is passed
    through at once and leaves the flow's run held. A TCP option (the
    timestamps, RFC 7323) ends the flow's run: the run, then the segment as sent."""
    for family, ip, what in (
        ("ipv4", {"options": bytes([1, 1, 1, 0])}, "IPv4 options"),
        ("ipv4", {"flags": 0}, "a fragmentable IPv4 packet"),
        ("ipv4", {"tos": 0x01}, "IPv4 ECT(1)"),
    ):
        flow = Flow(net.mac, family, next(_ports))
        run = [flow.data(90), flow.data(90)]
        odd = flow.data(90, ip=ip)
        _send(qemu, net, *run, odd)
        _expect_as_sent(net, odd, what)
        _held(net, f"the run beside {what}")
        fin = flow.segment(flags=ACK | TcpFlags.FIN)
        _send(qemu, net, fin)
        _expect_run(net, run, family)
        _expect_as_sent(net, fin, f"the FIN after {what}")
    for family in FAMILIES:
        flow = Flow(net.mac, family, next(_ports))
        run = [flow.data(90), flow.data(90)]
        stamped = flow.data(90, options=timestamp_option(12345))
        _send(qemu, net, *run)
        _held(net, "the run before a timestamp option")
        _send(qemu, net, stamped)
        _expect_run(net, run, family)
        _expect_as_sent(net, stamped, f"{family} with a TCP timestamp option")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_flows_coalesce_separately(net: VirtioNet, qemu: Machine, family: str) -> None:
    """Segments of two flows (other source address, other port), interleaved, make two runs:
    ending the later flow's run delivers that run only; the first stays held until its own flow
    ends it."""
    a = Flow(net.mac, family, next(_ports))
    b = Flow(net.mac, family, next(_ports), host=2)
    run_a, run_b = [], []
    for _ in range(3):
        run_a.append(a.data(70))
        run_b.append(b.data(110))
        _send(qemu, net, run_a[-1], run_b[-1])
    _held(net, "two interleaved runs")
    for flow, run, which in ((b, run_b, "second"), (a, run_a, "first")):
        fin = flow.segment(flags=ACK | TcpFlags.FIN)
        _send(qemu, net, fin)
        _expect_run(net, run, family)
        _expect_as_sent(net, fin, f"the {which} flow's FIN")
        if flow is b:
            _held(net, "the first flow's run")


def test_non_tcp_frames_pass_at_once(net: VirtioNet, qemu: Machine) -> None:
    """While a TCP run is held, a UDP datagram over IPv4 or IPv6 and a frame that is not IP at
    all are delivered at once, as sent."""
    flow = Flow(net.mac, "ipv4", next(_ports))
    run = [flow.data(120), flow.data(120)]
    _send(qemu, net, *run)
    for family in FAMILIES:
        udp = udp_frame(net.mac, PEER_MAC, Flow(net.mac, family, 0).ip(), (5353, 5353), bytes(range(32)))
        _send(qemu, net, udp)
        _expect_as_sent(net, udp, f"UDP over {family}")
    other = ethernet_frame(net.mac, PEER_MAC, 0x88B5, bytes(range(64)))
    _send(qemu, net, other)
    pkt = net.receive_packet(timeout=2)
    assert pkt.frame == other and not pkt.header.flags & NET_HDR_F.RSC_INFO.mask
    _held(net, "the TCP run beside other traffic")
    _send(qemu, net, flow.segment(flags=ACK | TcpFlags.FIN))
    _expect_run(net, run, "ipv4")


def test_malformed_segments_pass_uncoalesced(net: VirtioNet, qemu: Machine) -> None:
    """A segment whose IP length claims more than the frame holds, or less than IP and TCP headers
    need, an IPv4 frame whose header says version 6, and a frame too short for the headers are
    passed through at once, as sent; the flow's run stays held."""
    for family in FAMILIES:
        flow = Flow(net.mac, family, next(_ports))
        run = [flow.data(100), flow.data(100)]
        _send(qemu, net, *run)
        long_len = {"total_length": 20 + 20 + 500} if family == "ipv4" else {"payload_length": 20 + 500}
        cases: list[tuple[str, TcpPacket | bytes]] = [
            ("an IP length past the frame", flow.segment(bytes(100), ip=long_len))
        ]
        if family == "ipv4":
            cases.append(("an IP length shorter than the headers", flow.segment(bytes(100), ip={"total_length": 30})))
            cases.append(("IP version 6 under the IPv4 ethertype", flow.segment(bytes(100), ip={"version": 6})))
        cases.append(("a frame cut inside the TCP header", flow.segment(bytes(100)).encode()[: 14 + 20 + 10]))
        for what, bad in cases:
            _send(qemu, net, bad)
            _expect_as_sent(net, bad, f"{family}: {what}")
        _held(net, f"{family}: the run beside malformed segments")
        _send(qemu, net, flow.segment(flags=ACK | TcpFlags.FIN))
        _expect_run(net, run, family)
        net.receive_packet(timeout=2)


@pytest.mark.conformance("net-rsc-no-data-valid-unchecked", spec="5.1.6.4.1")
def test_bad_checksum_is_never_reported_valid(net: VirtioNet, qemu: Machine) -> None:
    """A segment with a wrong TCP checksum joins a run or not as the device likes, but the
    device MUST validate the checksum before it sets VIRTIO_NET_HDR_F_DATA_VALID: no packet that
    carries the bad segment's bytes says DATA_VALID (MUST; QEMU checks no checksum here)."""
    flow = Flow(net.mac, "ipv4", next(_ports))
    good = flow.data(100)
    bad = flow.data(100, checksum=0xBAD0)
    _send(qemu, net, good, bad, flow.segment(flags=ACK | TcpFlags.FIN))
    payload = b""
    while len(payload) < 200:
        pkt = net.receive_packet(timeout=2)
        assert not pkt.header.flags & NET_HDR_F.DATA_VALID.mask, f"DATA_VALID on an unchecked packet: {pkt.header}"
        payload += TcpPacket.decode(pkt.frame).payload
    assert payload == good.payload + bad.payload


# -- the drain timer (QEMU: virtio_net_rsc_purge, rsc_interval ns on the virtual clock) -----------

TIMER_NS = 5_000_000


@pytest.mark.virtual_clock
@rsc_device(rsc_interval=TIMER_NS)
def test_interval_timer_drains_held_runs(net: VirtioNet, qemu: Machine) -> None:
    """The first segment held arms a timer of rsc_interval ns of virtual time; when it fires,
    every run held for that protocol is delivered, coalesced, and nothing is held before."""
    a, b = Flow(net.mac, "ipv4", next(_ports)), Flow(net.mac, "ipv4", next(_ports), host=2)
    run_a = [a.data(60), a.data(60), a.data(60)]
    run_b = [b.data(90), b.data(90)]
    _send(qemu, net, *run_a, *run_b)
    _held(net, "two runs")
    qemu.qtest.clock_step(TIMER_NS - 1000)
    _held(net, f"two runs {TIMER_NS - 1000} ns after the first segment")
    qemu.qtest.clock_step(1000)
    _expect_run(net, run_a, "ipv4")
    _expect_run(net, run_b, "ipv4")
    assert net.poll_packet() is None
    again = [a.data(60), a.data(60)]
    _send(qemu, net, *again)
    _held(net, "a new run after the timer fired")
    qemu.qtest.clock_step(TIMER_NS)
    _expect_run(net, again, "ipv4")


REALTIME_NS = 300_000_000


@rsc_device(rsc_interval=REALTIME_NS)
def test_interval_timer_drains_a_run_in_real_time(net: VirtioNet, qemu: Machine) -> None:
    """Without the qtest accelerator the virtual clock follows real time while the machine runs:
    a run is delivered rsc_interval (300 ms) after its first segment, not before."""
    if qemu.binary.has_qtest_accel:
        pytest.skip("here the virtual clock moves only when stepped: test_interval_timer_drains_held_runs covers it")
    flow = Flow(net.mac, "ipv6", next(_ports))
    run = [flow.data(100), flow.data(100)]
    start = time.monotonic()
    _send(qemu, net, *run)
    _expect_run(net, run, "ipv6")
    waited = time.monotonic() - start
    assert waited >= REALTIME_NS / 1e9 * 0.95, f"the run was delivered after {waited * 1000:.0f} ms"


# -- without RSC -------------------------------------------------------------------------------------


@pytest.mark.conformance("net-rsc-info-not-negotiated", spec="5.1.6.4.1")
@pytest.mark.virtio_device("virtio-net-pci", backend="tap", flags={"guest_rsc_ext": "off"})
def test_without_rsc_ext_segments_arrive_one_by_one(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With RSC_EXT not negotiated (the device does not offer it; on the legacy interface it
    cannot) the device MUST NOT set VIRTIO_NET_HDR_F_RSC_INFO; QEMU coalesces nothing then, even
    with GUEST_TSO4/6: every segment arrives at once, as sent (MUST)."""
    net = virtio_device
    net.set_rsc()
    need_not(net, "RSC_EXT")
    for family in FAMILIES:
        flow = Flow(net.mac, family, next(_ports))
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
    v4 = Flow(net.mac, "ipv4", next(_ports))
    for seg in (v4.data(100), v4.data(100)):
        _send(qemu, net, seg)
        _expect_as_sent(net, seg, "IPv4 without GUEST_TSO4")
    v6 = Flow(net.mac, "ipv6", next(_ports))
    run = [v6.data(100), v6.data(100)]
    _send(qemu, net, *run)
    _held(net, "an IPv6 run with GUEST_TSO6")
    _send(qemu, net, v6.segment(flags=ACK | TcpFlags.FIN))
    _expect_run(net, run, "ipv6")
