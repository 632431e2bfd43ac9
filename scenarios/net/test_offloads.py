"""virtio-net conformance, checksum and segmentation offloads (virtio 1.2 §5.1.6.2, §5.1.6.4,
§5.1.6.5.8) on a tap backend: the peer has a virtio-net header, so QEMU offers CSUM, GUEST_CSUM,
GUEST_TSO4/6, HOST_TSO4/6 and CTRL_GUEST_OFFLOADS there (a socket peer has none of them).

The host side injects frames with a virtio-net header through a packet socket on the tap; the
kernel passes a partial checksum or a GSO packet through to QEMU only while the offload QEMU
set on the tap (TUNSETOFFLOAD, from the guest's offloads) allows it, and otherwise completes
the checksum or segments the packet itself. Frames go through one tap queue, so the segments
of one packet cannot be reordered; the test still reassembles them by TCP sequence number.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import VNET_HDR, TapBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import CTRL_COMMANDS, NET_HDR_F, Ack, GsoType, NetHdr, RxPacket
from qtest_virtio.devices.net.packets import (
    L4_CSUM_OFFSET,
    Flow,
    IpProto,
    complete_checksum,
    ip_frame,
    parse_frame,
)

from ._support import need, need_not

PEER = "02:00:00:00:00:01"
NEEDS_CSUM = NET_HDR_F.NEEDS_CSUM.mask
INBOUND = Flow("10.0.0.1", "10.0.0.2", 1234, 80, IpProto.TCP)
OUTBOUND = Flow("10.0.0.2", "10.0.0.1", 80, 1234, IpProto.TCP)
CSUM_START = 14 + INBOUND.l3_len
CSUM_OFFSET = L4_CSUM_OFFSET[IpProto.TCP]
MSS = 1000
#: What the driver accepts when offered: the receive and transmit offloads and their control.
OFFLOADS = frozenset({"CSUM", "HOST_TSO4", "GUEST_CSUM", "GUEST_TSO4", "CTRL_GUEST_OFFLOADS"})
GUEST_OFFLOADS_SET = CTRL_COMMANDS["GUEST_OFFLOADS_SET"]


def offload_device(accept: Iterable[str] = OFFLOADS) -> pytest.MarkDecorator:
    """The marker of an offload scenario: the tap, the driver accepting ``accept`` when offered.
    Of the refusal runs only MRG_RXBUF's changes what is checked (how a whole GSO packet is laid
    out in the receive buffers); the other refusals touch nothing these scenarios use, or refuse
    CTRL_VQ, which only skips."""
    return pytest.mark.virtio_device(
        "virtio-net-pci", backend="tap", accept=tuple(sorted(accept)), refuse_each=["MRG_RXBUF"]
    )


pytestmark = offload_device()


def _payload(size: int) -> bytes:
    return bytes((7 * i + 3) & 0xFF for i in range(size))


def _partial(net: VirtioNet, size: int = 100) -> bytes:
    """A TCP frame whose checksum field holds only the pseudo-header sum (NEEDS_CSUM style)."""
    return ip_frame(INBOUND, _payload(size), dst_mac=net.mac, src_mac=PEER, partial=True)


def _complete(net: VirtioNet, size: int = 100) -> bytes:
    return ip_frame(INBOUND, _payload(size), dst_mac=net.mac, src_mac=PEER)


def _inject(qemu: Machine, net: VirtioNet, frame: bytes, *, gso_size: int = 0) -> None:
    """Send ``frame`` into the tap with a NEEDS_CSUM header (and TCPv4 GSO with ``gso_size``)."""
    gso = GsoType.TCPV4 if gso_size else GsoType.NONE
    header = VNET_HDR.pack(NEEDS_CSUM, gso, INBOUND.headers_len if gso_size else 0, gso_size, CSUM_START, CSUM_OFFSET)
    qemu.backend(net.dev_id, TapBackend).send(frame, header)


def _assert_valid_partial(packet: RxPacket, sent: bytes) -> None:
    """NEEDS_CSUM as §5.1.6.4.1 defines it: the frame as sent (checksum field = pseudo-header
    sum), and csum_start / csum_offset such that completing the checksum gives a valid one."""
    hdr = packet.header
    assert hdr.flags & NEEDS_CSUM, f"flags {hdr.flag_names}: NEEDS_CSUM expected"
    assert packet.frame == sent
    done = complete_checksum(packet.frame, hdr.csum_start, hdr.csum_offset)
    assert parse_frame(done).l4_checksum_ok(done), (hdr.csum_start, hdr.csum_offset)


def _segments(net: VirtioNet, count: int) -> list[RxPacket]:
    packets = [net.receive_packet(timeout=2) for _ in range(count)]
    assert not net.drain(), f"more than {count} frames for one segmented packet"
    return sorted(packets, key=lambda p: parse_frame(p.frame).seq)


def _offloading(net: VirtioNet) -> VirtioNet:
    """The driver (accepting OFFLOADS, the marker's): skip where one is missing, or the control
    queue their command needs (§5.1.3.1 lists no requirement for CTRL_GUEST_OFFLOADS)."""
    need(net, *OFFLOADS, "CTRL_VQ")
    return net


@pytest.mark.conformance("net-guest-offloads-on-by-negotiation", spec="5.1.6.5.8.1")
def test_negotiated_guest_offloads_are_on(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Upon feature negotiation the corresponding offloads are enabled: with GUEST_CSUM a
    partially checksummed packet arrives with NEEDS_CSUM, its checksum field the pseudo-header
    sum and csum_start / csum_offset completing it (MUST, §5.1.6.4.1); with GUEST_TSO4 a TCPv4
    GSO packet arrives whole, gso_type TCPV4 with NEEDS_CSUM and gso_size the MSS (MUST), hdr_len
    not less than the headers (SHOULD)."""
    net = _offloading(virtio_device)
    frame = _partial(net)
    _inject(qemu, net, frame)
    packet = net.receive_packet(timeout=2)
    _assert_valid_partial(packet, frame)
    assert packet.header.gso_type == GsoType.NONE
    big = _partial(net, 3 * MSS)
    _inject(qemu, net, big, gso_size=MSS)
    packet = net.receive_packet(timeout=2)
    assert (packet.header.gso_type, packet.header.gso_size) == (GsoType.TCPV4, MSS)
    assert packet.header.hdr_len >= INBOUND.headers_len
    _assert_valid_partial(packet, big)


@pytest.mark.conformance("net-guest-offloads-set", spec="5.1.6.5.8.1")
def test_guest_offloads_set_turns_offloads_off_and_on(virtio_device: VirtioNet, qemu: Machine) -> None:
    """VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET applies the new offloads: bits cleared disable them.
    Without TSO4 a GSO packet reaches the driver as MSS-sized segments with gso_type NONE (still
    NEEDS_CSUM with GUEST_CSUM on); with no offload at all, flags are zero and the checksum is
    complete; setting them again restores whole GSO packets."""
    net = _offloading(virtio_device)
    big = _partial(net, 3 * MSS)
    net.set_guest_offloads({"GUEST_CSUM"})
    _inject(qemu, net, big, gso_size=MSS)
    segments = _segments(net, 3)
    assert [p.header.gso_type for p in segments] == [GsoType.NONE] * 3
    assert b"".join(parse_frame(p.frame).payload for p in segments) == _payload(3 * MSS)
    for p in segments:
        assert p.header.flags & NEEDS_CSUM and len(parse_frame(p.frame).payload) <= MSS
        done = complete_checksum(p.frame, p.header.csum_start, p.header.csum_offset)
        assert parse_frame(done).l4_checksum_ok(done)
    net.set_guest_offloads(())
    _inject(qemu, net, _partial(net))
    packet = net.receive_packet(timeout=2)
    assert packet.header.flags == 0 and packet.frame == _complete(net)
    net.set_guest_offloads({"GUEST_CSUM", "GUEST_TSO4"})
    _inject(qemu, net, big, gso_size=MSS)
    packet = net.receive_packet(timeout=2)
    assert (packet.header.gso_type, packet.header.gso_size) == (GsoType.TCPV4, MSS)
    _assert_valid_partial(packet, big)


@pytest.mark.conformance("net-guest-offloads-refused", spec="5.1.6.5.8.2")
def test_guest_offloads_set_outside_the_negotiated_is_refused(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A driver MUST NOT enable an offload whose feature was not negotiated; QEMU answers such
    a GUEST_OFFLOADS_SET, one with a short mask and an unknown command of the class with
    VIRTIO_NET_ERR, and keeps the offloads it had (regression)."""
    net = _offloading(virtio_device)
    need_not(net, "GUEST_UFO")
    ufo = 1 << 10  # VIRTIO_NET_F_GUEST_UFO, not accepted by the driver
    for data, code in ((ufo.to_bytes(8, "little"), GUEST_OFFLOADS_SET.code), (b"\x03", GUEST_OFFLOADS_SET.code)):
        assert net.ctrl_raw(GUEST_OFFLOADS_SET.class_code, code, data) == Ack.ERR
    assert net.ctrl_raw(GUEST_OFFLOADS_SET.class_code, 1, bytes(8)) == Ack.ERR
    frame = _partial(net)
    _inject(qemu, net, frame)
    _assert_valid_partial(net.receive_packet(timeout=2), frame)


@pytest.mark.conformance("net-guest-offloads-need-ctrl", spec="5.1.6.5.8")
@offload_device({"GUEST_CSUM"})
def test_guest_offloads_set_needs_its_feature(virtio_device: VirtioNet, qemu: Machine) -> None:
    """GUEST_OFFLOADS_SET exists only with CTRL_GUEST_OFFLOADS negotiated; QEMU answers it with
    VIRTIO_NET_ERR otherwise, and the negotiated offloads stay on (regression)."""
    net = virtio_device
    need(net, "GUEST_CSUM", "CTRL_VQ")
    need_not(net, "CTRL_GUEST_OFFLOADS")
    assert net.ctrl_raw(GUEST_OFFLOADS_SET.class_code, GUEST_OFFLOADS_SET.code, bytes(8)) == Ack.ERR
    frame = _partial(net)
    _inject(qemu, net, frame)
    _assert_valid_partial(net.receive_packet(timeout=2), frame)


@pytest.mark.conformance("net-rx-no-guest-offloads", spec="5.1.6.4.1")
@offload_device(())
def test_without_guest_offloads_packets_arrive_complete(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Without GUEST_CSUM the device MUST set flags to zero and SHOULD supply a fully
    checksummed packet; without GUEST_TSO4 it MUST NOT set gso_type TCPV4: a partial packet
    arrives checksummed, a GSO packet as complete MSS-sized segments (MUST / SHOULD)."""
    net = virtio_device
    need_not(net, "GUEST_CSUM", "GUEST_TSO4")
    _inject(qemu, net, _partial(net))
    packet = net.receive_packet(timeout=2)
    assert (packet.header.flags, packet.header.gso_type) == (0, GsoType.NONE)
    assert packet.frame == _complete(net)
    _inject(qemu, net, _partial(net, 3 * MSS), gso_size=MSS)
    segments = _segments(net, 3)
    assert b"".join(parse_frame(p.frame).payload for p in segments) == _payload(3 * MSS)
    for p in segments:
        assert (p.header.flags, p.header.gso_type) == (0, GsoType.NONE)
        assert parse_frame(p.frame).l4_checksum_ok(p.frame)


@pytest.mark.conformance("net-tx-offload-header-forwarded", spec="5.1.6.2")
def test_transmit_offload_header_reaches_the_peer(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With CSUM and HOST_TSO4 the driver may leave the checksum to the device (NEEDS_CSUM,
    csum_start / csum_offset) and hand it a packet larger than 1514 bytes to segment (gso_type
    TCPV4, gso_size): QEMU passes the frame and that header unchanged to a peer with a vnet
    header, which does the work (regression)."""
    net = _offloading(virtio_device)
    host = qemu.backend(net.dev_id, TapBackend)
    for size, header in (
        (200, NetHdr(flags=NEEDS_CSUM, csum_start=CSUM_START, csum_offset=CSUM_OFFSET)),
        (
            4 * MSS,
            NetHdr(
                flags=NEEDS_CSUM,
                gso_type=GsoType.TCPV4,
                hdr_len=OUTBOUND.headers_len,
                gso_size=MSS,
                csum_start=CSUM_START,
                csum_offset=CSUM_OFFSET,
            ),
        ),
    ):
        frame = ip_frame(OUTBOUND, _payload(size), dst_mac=PEER, src_mac=net.mac, partial=True)
        net.send(frame, header=header)
        raw, got = host.receive_with_header(timeout=2)
        assert got == frame
        fields = (header.flags, header.gso_type, header.hdr_len, header.gso_size, header.csum_start, header.csum_offset)
        assert VNET_HDR.unpack(raw) == fields


@pytest.mark.conformance("net-rx-dhcp-checksum-completed", spec="5.1.6.4.1")
def test_partial_dhcp_reply_arrives_checksummed(virtio_device: VirtioNet, qemu: Machine) -> None:
    """QEMU completes the checksum of a partially checksummed IPv4 UDP packet from the bootps
    port (67) below 1500 bytes and clears NEEDS_CSUM, for DHCP clients that read raw sockets
    and never look at the header (work_around_broken_dhclient); other UDP packets keep
    NEEDS_CSUM (regression; both are valid headers under GUEST_CSUM, §5.1.6.4.1)."""
    net = _offloading(virtio_device)
    host = qemu.backend(net.dev_id, TapBackend)
    udp_csum = L4_CSUM_OFFSET[IpProto.UDP]
    for sport, completed in ((67, True), (1067, False)):
        flow = Flow("10.0.0.1", "10.0.0.2", sport, 68, IpProto.UDP)
        partial = ip_frame(flow, _payload(300), dst_mac=net.mac, src_mac=PEER, partial=True)
        host.send(partial, VNET_HDR.pack(NEEDS_CSUM, GsoType.NONE, 0, 0, CSUM_START, udp_csum))
        packet = net.receive_packet(timeout=2)
        if completed:
            assert packet.header.flags == 0
            assert packet.frame == ip_frame(flow, _payload(300), dst_mac=net.mac, src_mac=PEER)
        else:
            _assert_valid_partial(packet, partial)
