"""Receive-side scaling and hash reports (virtio 1.2 §5.1.6.4.3, §5.1.6.4.4, §5.1.6.5.6.4,
§5.1.6.5.7): the hash types, the report values, the two control-command structures, and the
Toeplitz hash computed the way the spec describes it, so a scenario can say on which receive
queue a frame must land and what hash the device must report. Pure data and functions.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from .packets import IpProto, parse_frame


class HashType(IntFlag):
    """VIRTIO_NET_HASH_TYPE_*, §5.1.6.4.3.1 (``hash_types`` and ``supported_hash_types``)."""

    IPv4 = 1 << 0
    TCPv4 = 1 << 1
    UDPv4 = 1 << 2
    IPv6 = 1 << 3
    TCPv6 = 1 << 4
    UDPv6 = 1 << 5
    IP_EX = 1 << 6
    TCP_EX = 1 << 7
    UDP_EX = 1 << 8


class HashReport(IntEnum):
    """VIRTIO_NET_HASH_REPORT_*, §5.1.6.4.4: HASH_TYPE_X = 1 << (HASH_REPORT_X - 1)."""

    NONE = 0
    IPv4 = 1
    TCPv4 = 2
    UDPv4 = 3
    IPv6 = 4
    TCPv6 = 5
    UDPv6 = 6
    IPv6_EX = 7
    TCPv6_EX = 8
    UDPv6_EX = 9


#: The key of Microsoft's RSS verification suite, which the Linux virtio-net driver also uses
#: by default (40 bytes: enough for the 36 bytes of an IPv6 TCP input plus the 32-bit window).
DEFAULT_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")


def toeplitz(key: bytes, data: bytes) -> int:
    """The Toeplitz hash of ``data`` under ``key``: for each input bit set, counted from the most
    significant bit of the first byte, XOR in the 32 key bits starting at that bit position."""
    if len(key) < len(data) + 4:
        raise ValueError(f"a {len(data)}-byte input needs a key of at least {len(data) + 4} bytes, not {len(key)}")
    k = int.from_bytes(key, "big")
    width = 8 * len(key)
    result = 0
    for i in range(8 * len(data)):
        if data[i // 8] >> (7 - i % 8) & 1:
            result ^= (k >> (width - 32 - i)) & 0xFFFFFFFF
    return result


def hash_input(frame: bytes, hash_types: int) -> tuple[HashReport, bytes]:
    """Which hash the device calculates for ``frame`` under the enabled ``hash_types`` and over
    which bytes (§5.1.6.4.3.2, §5.1.6.4.3.3): source address, destination address, then source
    and destination port for the TCP/UDP types. (NONE, b"") when it calculates none. IPv6
    frames with extension headers are not modelled here (the _EX types)."""
    parsed = parse_frame(frame)
    flow = parsed.flow
    if flow is None:
        return HashReport.NONE, b""
    if parsed.ipv6_ext:
        raise ValueError("IPv6 extension headers (the _EX hash types) are not modelled")
    addrs = ipaddress.ip_address(flow.src).packed + ipaddress.ip_address(flow.dst).packed
    ports = flow.sport.to_bytes(2, "big") + flow.dport.to_bytes(2, "big")
    if flow.version == 4:
        l4_types: dict[int, HashType] = {IpProto.TCP: HashType.TCPv4, IpProto.UDP: HashType.UDPv4}
        l4 = l4_types.get(flow.proto)
        l3 = HashType.IPv4
        reports = {HashType.TCPv4: HashReport.TCPv4, HashType.UDPv4: HashReport.UDPv4, l3: HashReport.IPv4}
    else:
        l4_types = {IpProto.TCP: HashType.TCPv6, IpProto.UDP: HashType.UDPv6}
        l4 = l4_types.get(flow.proto)
        l3 = HashType.IPv6
        reports = {HashType.TCPv6: HashReport.TCPv6, HashType.UDPv6: HashReport.UDPv6, l3: HashReport.IPv6}
    if l4 is not None and hash_types & l4:
        return reports[l4], addrs + ports
    if hash_types & l3:
        return reports[l3], addrs
    return HashReport.NONE, b""


def packet_hash(frame: bytes, hash_types: int, key: bytes) -> tuple[HashReport, int]:
    """(hash_report, hash_value) the device reports for ``frame`` (§5.1.6.4.4); (NONE, 0) when
    it calculates no hash."""
    report, data = hash_input(frame, hash_types)
    return (report, 0) if report is HashReport.NONE else (report, toeplitz(key, data))


@dataclass(frozen=True)
class RssConfig:
    """struct virtio_net_rss_config, §5.1.6.5.7.1: queue ids are receive queue numbers counted
    from 0 (``rss_rq_id``: bits 1..16 of the virtqueue index, so 1 is receiveq2)."""

    hash_types: int
    indirection_table: tuple[int, ...]
    key: bytes = DEFAULT_KEY
    unclassified_queue: int = 0
    max_tx_vq: int = 1
    #: Overrides ``len(indirection_table) - 1`` (to send a malformed mask on purpose).
    mask: int | None = None
    #: Overrides ``len(key)`` (to send a malformed key length on purpose).
    key_length: int | None = None

    @property
    def indirection_table_mask(self) -> int:
        return len(self.indirection_table) - 1 if self.mask is None else self.mask

    def encode(self) -> bytes:
        out = self.hash_types.to_bytes(4, "little")
        out += self.indirection_table_mask.to_bytes(2, "little") + self.unclassified_queue.to_bytes(2, "little")
        out += b"".join(q.to_bytes(2, "little") for q in self.indirection_table)
        out += self.max_tx_vq.to_bytes(2, "little")
        out += bytes([len(self.key) if self.key_length is None else self.key_length]) + self.key
        return out

    def queue_for(self, frame: bytes) -> int:
        """The receive queue RSS steers ``frame`` to (§5.1.6.5.7.2): the unclassified queue when
        no hash is calculated, else the indirection table entry at ``hash & mask``."""
        report, value = packet_hash(frame, self.hash_types, self.key)
        if report is HashReport.NONE:
            return self.unclassified_queue
        return self.indirection_table[value & self.indirection_table_mask]


@dataclass(frozen=True)
class HashConfig:
    """struct virtio_net_hash_config, §5.1.6.5.6.4 (hash reports without RSS steering)."""

    hash_types: int
    key: bytes = DEFAULT_KEY
    reserved: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))

    def encode(self) -> bytes:
        out = self.hash_types.to_bytes(4, "little") + b"".join(r.to_bytes(2, "little") for r in self.reserved)
        return out + bytes([len(self.key)]) + self.key
