"""The IPv4/IPv6/TCP/UDP builder and parser the RSC, RSS and offload scenarios use
(qtest_virtio.devices.net.packets): pure logic, checked against published vectors and frames
Linux accepted."""

from __future__ import annotations

import struct

import pytest

from qtest_virtio.devices.net.packets import (
    ETH_P_IP,
    ETH_P_IPV6,
    Flow,
    IpProto,
    Ipv4,
    Ipv6,
    Tcp,
    TcpFlags,
    TcpPacket,
    complete_checksum,
    internet_checksum,
    ip_frame,
    parse_frame,
    timestamp_option,
    udp_frame,
)

#: SYNs from 10.9.0.1 / fd09::1 port 5555 to port 9, seq 100: Linux 6.18 answered each with a RST
#: when injected on a tap holding 10.9.0.2 / fd09::2, and dropped them with the TCP checksum changed.
LINUX_ACCEPTED_SYN4 = bytes.fromhex(
    "02000000000202000000000108004500002800004000400626bc0a0900010a09000215b3000900000064000000005002ffff85ae0000"
)
LINUX_ACCEPTED_SYN6 = bytes.fromhex(
    "02000000000202000000000186dd6000000000140640fd090000000000000000000000000001fd090000000000000000000000000002"
    "15b3000900000064000000005002ffff9fac0000"
)
MACS = ("02:00:00:00:00:02", "02:00:00:00:00:01")


def test_internet_checksum_rfc1071_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2; the checksum is its complement.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2
    assert internet_checksum(b"\x01") == 0xFEFF  # an odd byte is padded with zero


def test_ipv4_header_checksum_known_vector() -> None:
    # The usual worked example: 4500 0073 0000 4000 4011 [b861] c0a8 0001 c0a8 00c7.
    header = Ipv4("192.168.0.1", "192.168.0.199", protocol=IpProto.UDP, total_length=0x73).encode(0)
    assert header.hex() == "45000073000040004011b861c0a80001c0a800c7"
    assert internet_checksum(header) == 0


@pytest.mark.parametrize(
    ("ip", "frame"),
    [(Ipv4("10.9.0.1", "10.9.0.2"), LINUX_ACCEPTED_SYN4), (Ipv6("fd09::1", "fd09::2"), LINUX_ACCEPTED_SYN6)],
)
def test_tcp_segments_match_frames_linux_accepted(ip: Ipv4 | Ipv6, frame: bytes) -> None:
    built = TcpPacket(*MACS, ip, Tcp(5555, 9, 100, 0, TcpFlags.SYN)).encode()
    assert built == frame
    decoded = TcpPacket.decode(frame)
    assert decoded.tcp.flags == TcpFlags.SYN and decoded.tcp.checksum == int.from_bytes(frame[-4:-2], "big")
    assert decoded.encode() == frame, "decode then encode gives the frame back, checksums kept"


def test_lengths_options_and_payload_round_trip() -> None:
    pkt = TcpPacket(
        *MACS,
        Ipv4("10.0.0.1", "10.0.0.2", options=bytes([1, 1, 1, 0]), tos=2),
        Tcp(1, 2, 0xFFFFFFF0, 7, TcpFlags.ACK | TcpFlags.PSH, options=timestamp_option(5, 6)),
        b"payload",
    )
    frame = pkt.encode()
    got = TcpPacket.decode(frame + b"\0" * 5)  # Ethernet padding is not payload
    assert isinstance(got.ip, Ipv4)
    assert (got.ip.ihl, got.ip.total_length, got.ip.tos) == (6, 24 + 32 + 7, 2)
    assert (got.tcp.data_offset, got.tcp.options) == (8, bytes.fromhex("0101080a0000000500000006"))
    assert (got.payload, got.trailer) == (b"payload", b"\0" * 5)
    assert internet_checksum(frame[14 : 14 + 24]) == 0
    segment = frame[14 + 24 :]
    assert internet_checksum(got.ip.pseudo_header(len(segment)) + segment) == 0


def test_given_fields_are_written_as_given() -> None:
    pkt = TcpPacket(*MACS, Ipv6("fd00::1", "fd00::2", payload_length=999), Tcp(1, 2, checksum=0xBAD0), b"x")
    frame = pkt.encode()
    assert struct.unpack_from("!H", frame, 14 + 4)[0] == 999
    assert frame[14 + 40 + 16 : 14 + 40 + 18] == b"\xba\xd0"
    assert int.from_bytes(frame[12:14], "big") == ETH_P_IPV6


def test_udp_frame_checksum() -> None:
    for ip, ethertype in ((Ipv4("10.0.0.1", "10.0.0.2"), ETH_P_IP), (Ipv6("fd00::1", "fd00::2"), ETH_P_IPV6)):
        frame = udp_frame(*MACS, ip, (53, 5353), b"abc")
        assert int.from_bytes(frame[12:14], "big") == ethertype
        hlen = 20 if isinstance(ip, Ipv4) else 40
        datagram = frame[14 + hlen :]
        assert struct.unpack_from("!HHH", datagram) == (53, 5353, 11)
        udp_ip = (
            Ipv4("10.0.0.1", "10.0.0.2", protocol=IpProto.UDP)
            if isinstance(ip, Ipv4)
            else Ipv6("fd00::1", "fd00::2", next_header=IpProto.UDP)
        )
        assert internet_checksum(udp_ip.pseudo_header(len(datagram)) + datagram) == 0


def test_misaligned_options_are_refused() -> None:
    with pytest.raises(ValueError, match="padded to 4 bytes"):
        Tcp(1, 2, options=b"\x01").encode(b"", Ipv4("10.0.0.1", "10.0.0.2"))
    with pytest.raises(ValueError, match="of 4 bytes is needed"):
        Ipv4("fd00::1", "10.0.0.2").encode(0)


@pytest.mark.parametrize("proto", [IpProto.TCP, IpProto.UDP])
@pytest.mark.parametrize(("src", "dst"), [("10.1.2.3", "10.4.5.6"), ("fd00::1", "fd00::2")])
def test_frames_parse_back_and_partial_checksums_complete(proto: int, src: str, dst: str) -> None:
    flow = Flow(src, dst, 1234, 80, proto)
    full = ip_frame(flow, bytes(range(77)), dst_mac=MACS[0], src_mac=MACS[1])
    parsed = parse_frame(full)
    assert (parsed.flow, parsed.payload, parsed.l4_offset) == (flow, bytes(range(77)), 14 + flow.l3_len)
    assert parsed.l4_checksum_ok(full)
    partial = ip_frame(flow, bytes(range(77)), dst_mac=MACS[0], src_mac=MACS[1], partial=True)
    assert not parse_frame(partial).l4_checksum_ok(partial)
    offset = 16 if proto == IpProto.TCP else 6
    assert complete_checksum(partial, 14 + flow.l3_len, offset) == full
