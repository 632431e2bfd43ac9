"""The Toeplitz hash and the RSS / hash config layouts the RSS and hash-report scenarios
rely on (pure logic): checked against Microsoft's published RSS verification vectors,
independently of QEMU, so a scenario that agrees with QEMU cannot agree on a shared mistake."""

from __future__ import annotations

import pytest

from qtest_virtio.devices.net.packets import (
    Flow,
    IpProto,
    ip_frame,
)
from qtest_virtio.devices.net.rss import (
    DEFAULT_KEY,
    HashConfig,
    HashReport,
    HashType,
    RssConfig,
    packet_hash,
    toeplitz,
)

DST, SRC = "02:00:00:00:00:02", "02:00:00:00:00:01"


def _frame(flow: Flow, payload: bytes, *, partial: bool = False) -> bytes:
    return ip_frame(flow, payload, dst_mac=DST, src_mac=SRC, partial=partial)


#: (source, source port, destination, destination port, IPv4/IPv6 only hash, with TCP ports):
#: "Verifying the RSS Hash Calculation", Microsoft's NDIS documentation.
VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
]


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "ip_hash", "tcp_hash"), VECTORS)
def test_toeplitz_matches_the_verification_suite(
    src: str, sport: int, dst: str, dport: int, ip_hash: int, tcp_hash: int
) -> None:
    frame = _frame(Flow(src, dst, sport, dport, IpProto.TCP), b"payload")
    v4 = ":" not in src
    ip_type, tcp_type = (HashType.IPv4, HashType.TCPv4) if v4 else (HashType.IPv6, HashType.TCPv6)
    ip_report, tcp_report = (HashReport.IPv4, HashReport.TCPv4) if v4 else (HashReport.IPv6, HashReport.TCPv6)
    assert packet_hash(frame, ip_type, DEFAULT_KEY) == (ip_report, ip_hash)
    assert packet_hash(frame, tcp_type | ip_type, DEFAULT_KEY) == (tcp_report, tcp_hash)
    # a UDP type does not apply to TCP: the address hash, or none at all
    udp_type = HashType.UDPv4 if v4 else HashType.UDPv6
    assert packet_hash(frame, udp_type | ip_type, DEFAULT_KEY) == (ip_report, ip_hash)
    assert packet_hash(frame, udp_type, DEFAULT_KEY) == (HashReport.NONE, 0)


def test_non_ip_frames_and_short_keys() -> None:
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert packet_hash(arp, 0x1FF, DEFAULT_KEY) == (HashReport.NONE, 0)
    with pytest.raises(ValueError, match="key of at least 16 bytes"):
        toeplitz(bytes(15), bytes(12))


def test_rss_config_layout_and_queue_choice() -> None:
    config = RssConfig(HashType.UDPv4, (0, 1, 2, 3), bytes(range(40)), unclassified_queue=2, max_tx_vq=4)
    raw = config.encode()
    assert raw[:8] == bytes.fromhex("0400000003000200")
    assert raw[8:16] == bytes.fromhex("0000010002000300")
    assert raw[16:19] == bytes.fromhex("040028") and raw[19:] == bytes(range(40))
    udp = _frame(Flow("10.0.0.1", "10.0.0.2", 5, 6, IpProto.UDP), b"x")
    tcp = _frame(Flow("10.0.0.1", "10.0.0.2", 5, 6, IpProto.TCP), b"x")
    assert config.queue_for(udp) == packet_hash(udp, HashType.UDPv4, bytes(range(40)))[1] & 3
    assert config.queue_for(tcp) == 2, "no hash type applies: the unclassified queue"
    assert HashConfig(HashType.IPv4, b"\x01\x02").encode() == bytes.fromhex("010000000000000000000000020102")
