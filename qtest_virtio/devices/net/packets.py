"""IPv4, IPv6, TCP and UDP headers as data, for frames a test injects and frames it gets back
(the receive offloads of virtio 1.2 §5.1.6.4 work on them: RSC coalesces TCP segments, RSS and
hash reports hash their addresses and ports, checksum offloads complete their checksums).

Each header is a dataclass whose fields are named as its RFC names them (IPv4: RFC 791, IPv6:
RFC 8200, TCP: RFC 9293, UDP: RFC 768), with ``encode()`` (network byte order) and ``decode()``.
A field left None when encoding (lengths, checksums) is computed; given, it is written as given,
so a test can build a malformed packet on purpose. On top of them: :class:`Flow` (one direction
of a TCP/UDP flow), :func:`ip_frame` (a frame of a flow, fully or partially checksummed) and
:func:`parse_frame`. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum, IntFlag

from .encoding import ETH_HLEN, ethernet_frame

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


class IpProto(IntEnum):
    """IP protocol numbers (IANA) the scenarios use."""

    TCP = 6
    UDP = 17


class TcpFlags(IntFlag):
    """The TCP control bits (RFC 9293 §3.1, RFC 3168 for ECE and CWR)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


#: IPv4 flags (RFC 791 §3.1): Don't Fragment, More Fragments.
IP_DF, IP_MF = 0x2, 0x1


def ones_complement_sum(data: bytes, start: int = 0) -> int:
    """The 16-bit ones' complement sum of ``data`` (padded to even length) added to ``start``,
    folded (RFC 1071 §1): what a partial checksum field holds for the pseudo-header."""
    if len(data) % 2:
        data += b"\0"
    total: int = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes, start: int = 0) -> int:
    """The 16-bit ones' complement of the ones' complement sum (RFC 1071), ``start`` being a
    sum already taken (a pseudo-header's)."""
    return ~ones_complement_sum(data, start) & 0xFFFF


def _addr(value: str | bytes, size: int) -> bytes:
    raw = ipaddress.ip_address(value).packed if isinstance(value, str) else bytes(value)
    if len(raw) != size:
        raise ValueError(f"an address of {size} bytes is needed, not {value!r}")
    return raw


@dataclass
class Ipv4:
    """An IPv4 header (RFC 791 §3.1). ``ihl`` and ``total_length`` follow from the options and
    the payload unless given; ``header_checksum`` is computed unless given."""

    src: str | bytes
    dst: str | bytes
    protocol: int = IpProto.TCP
    tos: int = 0
    identification: int = 0
    flags: int = IP_DF
    fragment_offset: int = 0
    ttl: int = 64
    options: bytes = b""
    ihl: int | None = None
    total_length: int | None = None
    header_checksum: int | None = None
    version: int = 4

    def encode(self, payload_length: int) -> bytes:
        if len(self.options) % 4:
            raise ValueError(f"IPv4 options are padded to 4 bytes; {len(self.options)} given")
        ihl = self.ihl if self.ihl is not None else 5 + len(self.options) // 4
        total = self.total_length if self.total_length is not None else 20 + len(self.options) + payload_length
        header = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s",
                self.version << 4 | ihl,
                self.tos,
                total,
                self.identification,
                self.flags << 13 | self.fragment_offset,
                self.ttl,
                self.protocol,
                0,
                _addr(self.src, 4),
                _addr(self.dst, 4),
            )
            + self.options
        )
        checksum = self.header_checksum if self.header_checksum is not None else internet_checksum(bytes(header))
        header[10:12] = checksum.to_bytes(2, "big")
        return bytes(header)

    @classmethod
    def decode(cls, data: bytes) -> Ipv4:
        ver_ihl, tos, total, ident, frag, ttl, proto, csum, src, dst = struct.unpack_from("!BBHHHBBH4s4s", data)
        ihl = ver_ihl & 0xF
        return cls(
            src=src,
            dst=dst,
            protocol=proto,
            tos=tos,
            identification=ident,
            flags=frag >> 13,
            fragment_offset=frag & 0x1FFF,
            ttl=ttl,
            options=bytes(data[20 : 4 * ihl]),
            ihl=ihl,
            total_length=total,
            header_checksum=csum,
            version=ver_ihl >> 4,
        )

    @property
    def header_length(self) -> int:
        return 4 * (self.ihl if self.ihl is not None else 5 + len(self.options) // 4)

    def pseudo_header(self, l4_length: int) -> bytes:
        """The TCP/UDP pseudo-header (RFC 9293 §3.1)."""
        return _addr(self.src, 4) + _addr(self.dst, 4) + struct.pack("!BBH", 0, self.protocol, l4_length)


@dataclass
class Ipv6:
    """An IPv6 header (RFC 8200 §3). ``payload_length`` follows from the payload unless given."""

    src: str | bytes
    dst: str | bytes
    next_header: int = IpProto.TCP
    traffic_class: int = 0
    flow_label: int = 0
    hop_limit: int = 64
    payload_length: int | None = None
    version: int = 6

    header_length = 40

    def encode(self, payload_length: int) -> bytes:
        length = self.payload_length if self.payload_length is not None else payload_length
        word = self.version << 28 | self.traffic_class << 20 | self.flow_label
        return struct.pack(
            "!IHBB16s16s", word, length, self.next_header, self.hop_limit, _addr(self.src, 16), _addr(self.dst, 16)
        )

    @classmethod
    def decode(cls, data: bytes) -> Ipv6:
        word, length, nxt, hops, src, dst = struct.unpack_from("!IHBB16s16s", data)
        return cls(
            src=src,
            dst=dst,
            next_header=nxt,
            traffic_class=word >> 20 & 0xFF,
            flow_label=word & 0xFFFFF,
            hop_limit=hops,
            payload_length=length,
            version=word >> 28,
        )

    def pseudo_header(self, l4_length: int) -> bytes:
        """The upper-layer pseudo-header (RFC 8200 §8.1)."""
        return _addr(self.src, 16) + _addr(self.dst, 16) + struct.pack("!I3xB", l4_length, self.next_header)


@dataclass
class Tcp:
    """A TCP header (RFC 9293 §3.1). ``data_offset`` follows from the options and ``checksum``
    is computed over the pseudo-header, header and payload, unless given."""

    source_port: int
    destination_port: int
    sequence_number: int = 0
    acknowledgment_number: int = 0
    flags: TcpFlags = TcpFlags.ACK
    window: int = 0xFFFF
    urgent_pointer: int = 0
    options: bytes = b""
    data_offset: int | None = None
    checksum: int | None = None

    def encode(self, payload: bytes, ip: Ipv4 | Ipv6) -> bytes:
        if len(self.options) % 4:
            raise ValueError(f"TCP options are padded to 4 bytes; {len(self.options)} given")
        offset = self.data_offset if self.data_offset is not None else 5 + len(self.options) // 4
        header = bytearray(
            struct.pack(
                "!HHIIHHHH",
                self.source_port,
                self.destination_port,
                self.sequence_number & 0xFFFFFFFF,
                self.acknowledgment_number & 0xFFFFFFFF,
                offset << 12 | int(self.flags),
                self.window,
                0,
                self.urgent_pointer,
            )
            + self.options
        )
        segment = bytes(header) + payload
        checksum = self.checksum
        if checksum is None:
            checksum = internet_checksum(ip.pseudo_header(len(segment)) + segment)
        header[16:18] = checksum.to_bytes(2, "big")
        return bytes(header) + payload

    @classmethod
    def decode(cls, data: bytes) -> Tcp:
        sport, dport, seq, ack, off_flags, window, csum, urg = struct.unpack_from("!HHIIHHHH", data)
        offset = off_flags >> 12
        return cls(
            source_port=sport,
            destination_port=dport,
            sequence_number=seq,
            acknowledgment_number=ack,
            flags=TcpFlags(off_flags & 0xFF),
            window=window,
            urgent_pointer=urg,
            options=bytes(data[20 : 4 * offset]),
            data_offset=offset,
            checksum=csum,
        )

    @property
    def header_length(self) -> int:
        return 4 * (self.data_offset if self.data_offset is not None else 5 + len(self.options) // 4)


#: TCP timestamps (RFC 7323 §3): NOP, NOP, kind 8, length 10, TSval, TSecr.
def timestamp_option(tsval: int, tsecr: int = 0) -> bytes:
    return struct.pack("!BBBBII", 1, 1, 8, 10, tsval, tsecr)


@dataclass
class TcpPacket:
    """An Ethernet frame carrying one TCP segment over IPv4 or IPv6."""

    dst_mac: bytes | str
    src_mac: bytes | str
    ip: Ipv4 | Ipv6
    tcp: Tcp
    payload: bytes = b""
    #: Bytes after the IP packet (Ethernet padding, or junk a test appends).
    trailer: bytes = field(default=b"", repr=False)

    @property
    def ethertype(self) -> int:
        return ETH_P_IP if isinstance(self.ip, Ipv4) else ETH_P_IPV6

    def encode(self) -> bytes:
        """The frame: lengths and checksums computed where the headers leave them None."""
        segment = self.tcp.encode(self.payload, self.ip)
        return ethernet_frame(self.dst_mac, self.src_mac, self.ethertype, self.ip.encode(len(segment)) + segment) + (
            self.trailer
        )

    def with_tcp(self, **changes: object) -> TcpPacket:
        """A copy with TCP header fields changed (and checksums recomputed unless given)."""
        return replace(self, tcp=replace(self.tcp, **changes))  # type: ignore[arg-type]

    @classmethod
    def decode(cls, frame: bytes) -> TcpPacket:
        """Parse a frame; the IP packet ends where its length field says, the rest is trailer."""
        ethertype = int.from_bytes(frame[12:14], "big")
        body = frame[ETH_HLEN:]
        ip: Ipv4 | Ipv6
        if ethertype == ETH_P_IP:
            ip = Ipv4.decode(body)
            end = ip.total_length or 0
        elif ethertype == ETH_P_IPV6:
            ip = Ipv6.decode(body)
            end = ip.header_length + (ip.payload_length or 0)
        else:
            raise ValueError(f"ethertype {ethertype:#06x} is neither IPv4 nor IPv6")
        tcp = Tcp.decode(body[ip.header_length :])
        start = ip.header_length + tcp.header_length
        return cls(frame[0:6], frame[6:12], ip, tcp, bytes(body[start:end]), bytes(body[end:]))


@dataclass
class Udp:
    """A UDP header (RFC 768). ``length`` follows from the payload and ``checksum`` is computed
    over the pseudo-header, header and payload (a computed 0 sent as 0xffff), unless given."""

    source_port: int
    destination_port: int
    length: int | None = None
    checksum: int | None = None

    header_length = 8

    def encode(self, payload: bytes, ip: Ipv4 | Ipv6) -> bytes:
        length = self.length if self.length is not None else 8 + len(payload)
        header = struct.pack("!HHHH", self.source_port, self.destination_port, length, 0)
        checksum = self.checksum
        if checksum is None:
            checksum = internet_checksum(header + payload, ones_complement_sum(ip.pseudo_header(8 + len(payload))))
            checksum = checksum or 0xFFFF
        return header[:6] + checksum.to_bytes(2, "big") + payload

    @classmethod
    def decode(cls, data: bytes) -> Udp:
        sport, dport, length, csum = struct.unpack_from("!HHHH", data)
        return cls(sport, dport, length, csum)


def udp_frame(
    dst_mac: bytes | str, src_mac: bytes | str, ip: Ipv4 | Ipv6, ports: tuple[int, int], data: bytes
) -> bytes:
    """An Ethernet frame with one UDP datagram (RFC 768), its checksum computed (IPv6 needs one)."""
    ip = replace(ip, protocol=IpProto.UDP) if isinstance(ip, Ipv4) else replace(ip, next_header=IpProto.UDP)
    datagram = Udp(*ports).encode(data, ip)
    ethertype = ETH_P_IP if isinstance(ip, Ipv4) else ETH_P_IPV6
    return ethernet_frame(dst_mac, src_mac, ethertype, ip.encode(len(datagram)) + datagram)


# -- flows: frames by addresses and ports (RSS, hash reports, checksum offloads) ---------------

#: Offset of the checksum inside the transport header (what csum_offset names, §5.1.6.2).
L4_CSUM_OFFSET = {IpProto.TCP: 16, IpProto.UDP: 6}


@dataclass(frozen=True)
class Flow:
    """One direction of a transport flow: addresses (v4 or v6, both the same family), ports,
    protocol (:class:`IpProto`; another number gives an IP packet without ports)."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: int = IpProto.UDP

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version

    @property
    def l3_len(self) -> int:
        return self.ip().header_length

    @property
    def l4_len(self) -> int:
        return Udp.header_length if self.proto == IpProto.UDP else 20

    @property
    def headers_len(self) -> int:
        """Ethernet + IP + transport header bytes (what hdr_len covers, §5.1.6.2)."""
        return ETH_HLEN + self.l3_len + self.l4_len

    def ip(self, **fields: object) -> Ipv4 | Ipv6:
        """The flow's IP header (other fields by keyword)."""
        if self.version == 4:
            return Ipv4(self.src, self.dst, protocol=self.proto, **fields)  # type: ignore[arg-type]
        return Ipv6(self.src, self.dst, next_header=self.proto, **fields)  # type: ignore[arg-type]

    def pseudo_header_sum(self, l4_length: int) -> int:
        """The ones' complement sum of the TCP/UDP pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1)."""
        return ones_complement_sum(self.ip().pseudo_header(l4_length))


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
    """An Ethernet frame carrying ``payload`` in one TCP (PSH|ACK at ``seq``) or UDP segment of
    ``flow``: checksummed, or (``partial``) with the checksum field holding the pseudo-header
    sum, as a driver leaves it with NEEDS_CSUM (§5.1.6.2). ``ident``: the IPv4 identification."""
    ip = flow.ip(identification=ident) if flow.version == 4 else flow.ip()
    l4: Tcp | Udp
    if flow.proto == IpProto.TCP:
        l4 = Tcp(flow.sport, flow.dport, seq, 0, TcpFlags.PSH | TcpFlags.ACK)
    elif flow.proto == IpProto.UDP:
        l4 = Udp(flow.sport, flow.dport)
    else:
        raise ValueError(f"a frame of a flow carries TCP or UDP, not protocol {flow.proto}")
    if partial:
        l4 = replace(l4, checksum=flow.pseudo_header_sum(l4.header_length + len(payload)))
    segment = l4.encode(payload, ip)
    ethertype = ETH_P_IP if flow.version == 4 else ETH_P_IPV6
    return ethernet_frame(dst_mac, src_mac, ethertype, ip.encode(len(segment)) + segment)


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
    frame with another protocol has a flow whose ports are 0; a non-IP frame has none. The IP
    packet ends where its length field says."""
    ethertype = int.from_bytes(frame[12:14], "big")
    body = frame[ETH_HLEN:]
    ip: Ipv4 | Ipv6
    if ethertype == ETH_P_IP:
        ip = Ipv4.decode(body)
        proto, end = ip.protocol, ip.total_length or 0
    elif ethertype == ETH_P_IPV6:
        ip = Ipv6.decode(body)
        proto, end = ip.next_header, ip.header_length + (ip.payload_length or 0)
    else:
        return ParsedFrame(None)
    src, dst = str(ipaddress.ip_address(ip.src)), str(ipaddress.ip_address(ip.dst))
    l4_offset = ETH_HLEN + ip.header_length
    l4_data = body[ip.header_length :]
    if proto == IpProto.TCP:
        tcp = Tcp.decode(l4_data)
        flow = Flow(src, dst, tcp.source_port, tcp.destination_port, IpProto.TCP)
        payload = body[ip.header_length + tcp.header_length : end]
        return ParsedFrame(flow, l4_offset, bytes(payload), tcp.sequence_number)
    if proto == IpProto.UDP:
        udp = Udp.decode(l4_data)
        flow = Flow(src, dst, udp.source_port, udp.destination_port, IpProto.UDP)
        return ParsedFrame(flow, l4_offset, bytes(body[ip.header_length + Udp.header_length : end]))
    ext = isinstance(ip, Ipv6)
    return ParsedFrame(Flow(src, dst, 0, 0, proto), l4_offset, bytes(body[ip.header_length : end]), ipv6_ext=ext)


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """What a NEEDS_CSUM receiver does (§5.1.6.2 point 2): the ones' complement checksum from
    ``csum_start`` to the end, stored at ``csum_start + csum_offset``."""
    at = csum_start + csum_offset
    if not csum_start < at + 2 <= len(frame):
        raise ValueError(f"csum_start {csum_start} + csum_offset {csum_offset} is outside a {len(frame)}-byte frame")
    value = internet_checksum(frame[csum_start:])
    return frame[:at] + value.to_bytes(2, "big") + frame[at + 2 :]
