"""IPv4 / IPv6 frames with TCP or UDP inside, built and parsed for the tap scenarios (RSS, hash
reports, checksum and segmentation offloads need real L3/L4 headers: the kernel and QEMU look at
them). Pure functions, no I/O. Checksums as RFC 791 / 793 / 768 / 8200 define them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .encoding import ethernet_frame

ETH_P_IPV4, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17
IPV4_HLEN, IPV6_HLEN, TCP_HLEN, UDP_HLEN = 20, 40, 20, 8
#: Offset of the checksum inside the L4 header (what csum_offset names, virtio 1.2 §5.1.6.2).
L4_CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


def ones_complement_sum(data: bytes, start: int = 0) -> int:
    """The 16-bit ones' complement sum of ``data`` (padded to even length), folded."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes, start: int = 0) -> int:
    """The Internet checksum (RFC 1071): the complement of the ones' complement sum."""
    return ~ones_complement_sum(data, start) & 0xFFFF


@dataclass(frozen=True)
class Flow:
    """One direction of a transport flow: addresses (v4 or v6, both the same family), ports,
    protocol (IPPROTO_TCP or IPPROTO_UDP)."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: int = IPPROTO_UDP

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version

    @property
    def l3_len(self) -> int:
        return IPV4_HLEN if self.version == 4 else IPV6_HLEN

    @property
    def l4_len(self) -> int:
        return TCP_HLEN if self.proto == IPPROTO_TCP else UDP_HLEN

    @property
    def headers_len(self) -> int:
        """Ethernet + IP + transport header bytes (what hdr_len covers, §5.1.6.2)."""
        return 14 + self.l3_len + self.l4_len

    def pseudo_header_sum(self, l4_length: int) -> int:
        """The ones' complement sum of the TCP/UDP pseudo header (RFC 793 / RFC 8200 §8.1)."""
        addrs = ipaddress.ip_address(self.src).packed + ipaddress.ip_address(self.dst).packed
        if self.version == 4:
            pseudo = addrs + bytes([0, self.proto]) + l4_length.to_bytes(2, "big")
        else:
            pseudo = addrs + l4_length.to_bytes(4, "big") + bytes([0, 0, 0, self.proto])
        return ones_complement_sum(pseudo)


def _ip_header(flow: Flow, payload_len: int, ident: int) -> bytes:
    src, dst = ipaddress.ip_address(flow.src).packed, ipaddress.ip_address(flow.dst).packed
    if flow.version == 4:
        total = IPV4_HLEN + payload_len
        hdr = bytearray(
            bytes([0x45, 0])
            + total.to_bytes(2, "big")
            + ident.to_bytes(2, "big")
            + b"\x40\x00"  # DF, no fragment offset
            + bytes([64, flow.proto, 0, 0])
            + src
            + dst
        )
        hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
        return bytes(hdr)
    return b"\x60\0\0\0" + payload_len.to_bytes(2, "big") + bytes([flow.proto, 64]) + src + dst


def l4_segment(flow: Flow, payload: bytes, *, seq: int = 1, partial: bool = False) -> bytes:
    """The TCP or UDP header plus payload: checksummed, or (``partial``) with the checksum field
    holding the pseudo-header sum, as a driver leaves it with NEEDS_CSUM (§5.1.6.2)."""
    length = flow.l4_len + len(payload)
    if flow.proto == IPPROTO_TCP:
        hdr = bytearray(
            flow.sport.to_bytes(2, "big")
            + flow.dport.to_bytes(2, "big")
            + seq.to_bytes(4, "big")
            + (0).to_bytes(4, "big")
            + bytes([(TCP_HLEN // 4) << 4, 0x18])  # PSH, ACK
            + (65535).to_bytes(2, "big")
            + b"\0\0\0\0"
        )
    else:
        ports = flow.sport.to_bytes(2, "big") + flow.dport.to_bytes(2, "big")
        hdr = bytearray(ports + length.to_bytes(2, "big") + b"\0\0")
    at = L4_CSUM_OFFSET[flow.proto]
    pseudo = flow.pseudo_header_sum(length)
    if partial:
        value = pseudo
    else:
        value = checksum(bytes(hdr) + payload, pseudo)
        if flow.proto == IPPROTO_UDP and value == 0:
            value = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    hdr[at : at + 2] = value.to_bytes(2, "big")
    return bytes(hdr) + payload


def ip_frame(
    flow: Flow,
    payload: bytes,
    *,
    dst_mac: bytes | str,
    src_mac: bytes | str,
    seq: int = 1,
    partial: bool = False,
    ident: int = 1,
) -> bytes:
    """An Ethernet frame carrying ``payload`` in one TCP or UDP segment of ``flow``."""
    l4 = l4_segment(flow, payload, seq=seq, partial=partial)
    ethertype = ETH_P_IPV4 if flow.version == 4 else ETH_P_IPV6
    return ethernet_frame(dst_mac, src_mac, ethertype, _ip_header(flow, len(l4), ident) + l4)


@dataclass(frozen=True)
class ParsedFrame:
    """What :func:`parse_frame` found: the flow (None for a frame that is not IP), the offset of
    the transport header, and the transport payload."""

    flow: Flow | None
    l4_offset: int = 0
    payload: bytes = b""
    #: TCP sequence number (0 for UDP).
    seq: int = 0
    #: IPv6 with an extension header before the transport header.
    ipv6_ext: bool = False

    def l4_checksum_ok(self, frame: bytes) -> bool:
        """True when the TCP/UDP checksum of ``frame`` verifies (RFC 1071: the sum is 0xffff)."""
        if self.flow is None:
            raise ValueError("not an IP frame")
        segment = frame[self.l4_offset :]
        return ones_complement_sum(segment, self.flow.pseudo_header_sum(len(segment))) == 0xFFFF


def parse_frame(frame: bytes) -> ParsedFrame:
    """The flow of an Ethernet II frame with IPv4 or IPv6 and TCP or UDP (no VLAN tag). An IP
    frame with another protocol has a flow whose ports are 0; a non-IP frame has none."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_IPV4:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        src, dst = str(ipaddress.IPv4Address(frame[26:30])), str(ipaddress.IPv4Address(frame[30:34]))
        l4 = 14 + ihl
        total = int.from_bytes(frame[16:18], "big")
        end = 14 + total
        ext = False
    elif ethertype == ETH_P_IPV6:
        proto = frame[20]
        src, dst = str(ipaddress.IPv6Address(frame[22:38])), str(ipaddress.IPv6Address(frame[38:54]))
        l4 = 14 + IPV6_HLEN
        end = l4 + int.from_bytes(frame[18:20], "big")
        ext = proto not in (IPPROTO_TCP, IPPROTO_UDP)
    else:
        return ParsedFrame(None)
    if proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return ParsedFrame(Flow(src, dst, 0, 0, proto), l4, frame[l4:end], ipv6_ext=ext)
    sport, dport = int.from_bytes(frame[l4 : l4 + 2], "big"), int.from_bytes(frame[l4 + 2 : l4 + 4], "big")
    flow = Flow(src, dst, sport, dport, proto)
    seq = int.from_bytes(frame[l4 + 4 : l4 + 8], "big") if proto == IPPROTO_TCP else 0
    hlen = (frame[l4 + 12] >> 4) * 4 if proto == IPPROTO_TCP else UDP_HLEN
    return ParsedFrame(flow, l4, frame[l4 + hlen : end], seq)


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """What a NEEDS_CSUM receiver does (§5.1.6.2 point 2): the ones' complement checksum from
    ``csum_start`` to the end, stored at ``csum_start + csum_offset``."""
    at = csum_start + csum_offset
    if not csum_start < at + 2 <= len(frame):
        raise ValueError(f"csum_start {csum_start} + csum_offset {csum_offset} is outside a {len(frame)}-byte frame")
    value = checksum(frame[csum_start:])
    return frame[:at] + value.to_bytes(2, "big") + frame[at + 2 :]
