"""virtio-net (network device, virtio 1.2 §5.1): the encoding of the config, the per-packet
header, the control commands and the feature dependencies, declared once as data under the
names the spec gives them. Pure data and functions (no I/O): unit-testable without QEMU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from ...errors import QtestVirtioError
from ...registers import BitLayout, Bits, Field, Layout

#: Virtio device ID of the network device (virtio 1.2 §5).
DEVICE_ID = 1
#: Feature bits (§5.1.3), named without the VIRTIO_NET_F_ prefix.
FEATURE_BITS: dict[int, str] = {
    0: "CSUM",
    1: "GUEST_CSUM",
    2: "CTRL_GUEST_OFFLOADS",
    3: "MTU",
    5: "MAC",
    6: "GSO",  # legacy only
    7: "GUEST_TSO4",
    8: "GUEST_TSO6",
    9: "GUEST_ECN",
    10: "GUEST_UFO",
    11: "HOST_TSO4",
    12: "HOST_TSO6",
    13: "HOST_ECN",
    14: "HOST_UFO",
    15: "MRG_RXBUF",
    16: "STATUS",
    17: "CTRL_VQ",
    18: "CTRL_RX",
    19: "CTRL_VLAN",
    20: "CTRL_RX_EXTRA",
    21: "GUEST_ANNOUNCE",
    22: "MQ",
    23: "CTRL_MAC_ADDR",
    50: "DEVICE_STATS",
    51: "HASH_TUNNEL",
    52: "VQ_NOTF_COAL",
    53: "NOTF_COAL",
    54: "GUEST_USO4",
    55: "GUEST_USO6",
    56: "HOST_USO",
    57: "HASH_REPORT",
    59: "GUEST_HDRLEN",
    60: "RSS",
    61: "RSC_EXT",
    62: "STANDBY",
    63: "SPEED_DUPLEX",
}

# -- data: config structure (§5.1.4) -------------------------------------------------------


#: struct virtio_net_config, §5.1.4: ``u8 mac[6]`` (one byte register each), the rest little-endian
#: words (guest-endian on the legacy layout, §5.1.4.3; x86 is little-endian either way). A field
#: exists only if one of the features its ``requires`` names is offered ("MQ|RSS": MQ or RSS).
class NetConfigLayout(Layout, struct="virtio_net_config", size=24):
    mac_0 = Field(0, 1, name="mac[0]", requires="MAC")
    mac_1 = Field(1, 1, name="mac[1]", requires="MAC")
    mac_2 = Field(2, 1, name="mac[2]", requires="MAC")
    mac_3 = Field(3, 1, name="mac[3]", requires="MAC")
    mac_4 = Field(4, 1, name="mac[4]", requires="MAC")
    mac_5 = Field(5, 1, name="mac[5]", requires="MAC")
    status = Field(6, 2, requires="STATUS")
    max_virtqueue_pairs = Field(8, 2, requires="MQ|RSS")
    mtu = Field(10, 2, requires="MTU")
    speed = Field(12, 4, requires="SPEED_DUPLEX")
    duplex = Field(16, 1, requires="SPEED_DUPLEX")
    rss_max_key_size = Field(17, 1, requires="RSS|HASH_REPORT")
    rss_max_indirection_table_length = Field(18, 2, requires="RSS")
    supported_hash_types = Field(20, 4, requires="RSS|HASH_REPORT")


NET_CONFIG = NetConfigLayout()
#: The six byte registers of ``mac``, in order.
NET_CONFIG_MAC: tuple[Field, ...] = tuple(NET_CONFIG[f"mac[{i}]"] for i in range(6))


#: status bits, §5.1.4.
class NetStatusBits(BitLayout, register="status"):
    LINK_UP = Bits(0)
    ANNOUNCE = Bits(1)


NET_STATUS = NetStatusBits()

# -- data: the per-packet header (§5.1.6) ---------------------------------------------------


#: struct virtio_net_hdr, §5.1.6 (hash fields only with HASH_REPORT).
class NetHdrLayout(Layout, struct="virtio_net_hdr"):
    flags = Field(0, 1)
    gso_type = Field(1, 1)
    hdr_len = Field(2, 2)
    gso_size = Field(4, 2)
    csum_start = Field(6, 2)
    csum_offset = Field(8, 2)
    num_buffers = Field(10, 2)
    hash_value = Field(12, 4)
    hash_report = Field(16, 2)
    padding_reserved = Field(18, 2)


NET_HDR = NetHdrLayout()
#: Which optional header fields are present, by negotiated feature: ``num_buffers`` always
#: with VERSION_1, and on the legacy interface only with MRG_RXBUF (§5.1.6.1).
NET_HDR_PRESENT_IF: dict[str, tuple[str, ...]] = {
    "num_buffers": ("VERSION_1", "MRG_RXBUF"),
    "hash_value": ("HASH_REPORT",),
    "hash_report": ("HASH_REPORT",),
    "padding_reserved": ("HASH_REPORT",),
}


#: flags, §5.1.6.
class NetHdrFBits(BitLayout, register="flags"):
    NEEDS_CSUM = Bits(0)
    DATA_VALID = Bits(1)
    RSC_INFO = Bits(2)


NET_HDR_F = NetHdrFBits()


class GsoType(IntEnum):
    """gso_type values, §5.1.6 (ECN is a flag ORed into the others)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80


def header_size(features: Iterable[str]) -> int:
    """Bytes of struct virtio_net_hdr for these negotiated features (§5.1.6, §5.1.6.1):
    10 on the legacy interface without MRG_RXBUF, 12 otherwise, 20 with HASH_REPORT."""
    names = set(features)
    size = 0
    for f in NET_HDR:
        needs = NET_HDR_PRESENT_IF.get(f.name)
        if needs is None or names.intersection(needs):
            size = max(size, f.end)
    return size


@dataclass
class NetHdr:
    """One struct virtio_net_hdr; absent optional fields decode as None."""

    flags: int = 0
    gso_type: int = GsoType.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int | None = 0
    hash_value: int | None = None
    hash_report: int | None = None
    padding_reserved: int | None = None

    def encode(self, size: int) -> bytes:
        """The first ``size`` bytes of the header (a size from :func:`header_size`)."""
        out = bytearray(size)
        for f in NET_HDR:
            if f.end > size:
                continue
            value = getattr(self, f.name) or 0
            if value >> (8 * f.width):
                raise ValueError(f"virtio_net_hdr.{f.name}={value:#x} does not fit in {f.width} bytes")
            out[f.offset : f.end] = value.to_bytes(f.width, "little")
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> NetHdr:
        """Decode as many fields as ``data`` holds (10, 12 or 20 bytes)."""
        if len(data) < NET_HDR.csum_offset.end:
            raise ValueError(f"a virtio_net_hdr has at least {NET_HDR.csum_offset.end} bytes, not {len(data)}")
        values: dict[str, int | None] = {}
        for f in NET_HDR:
            values[f.name] = int.from_bytes(data[f.offset : f.end], "little") if f.end <= len(data) else None
        return cls(**values)  # type: ignore[arg-type]

    @property
    def flag_names(self) -> list[str]:
        return NET_HDR_F.names_set(self.flags)


# -- data: control queue (§5.1.6.5) ---------------------------------------------------------


class Ack(IntEnum):
    """The control command ack byte, §5.1.6.5."""

    OK = 0
    ERR = 1


@dataclass(frozen=True)
class CtrlCommand:
    """A control command: its class and command codes and the feature that allows it."""

    klass: str
    name: str
    class_code: int
    code: int
    feature: str


_CTRL_CLASSES = {"RX": 0, "MAC": 1, "VLAN": 2, "ANNOUNCE": 3, "MQ": 4, "GUEST_OFFLOADS": 5}
#: (class, command, code, feature needed), §5.1.6.5.1-§5.1.6.5.6.
CTRL_COMMANDS: dict[str, CtrlCommand] = {
    f"{k}_{n}": CtrlCommand(k, n, _CTRL_CLASSES[k], code, feat)
    for k, n, code, feat in (
        ("RX", "PROMISC", 0, "CTRL_RX"),
        ("RX", "ALLMULTI", 1, "CTRL_RX"),
        ("RX", "ALLUNI", 2, "CTRL_RX_EXTRA"),
        ("RX", "NOMULTI", 3, "CTRL_RX_EXTRA"),
        ("RX", "NOUNI", 4, "CTRL_RX_EXTRA"),
        ("RX", "NOBCAST", 5, "CTRL_RX_EXTRA"),
        ("MAC", "TABLE_SET", 0, "CTRL_RX"),
        ("MAC", "ADDR_SET", 1, "CTRL_MAC_ADDR"),
        ("VLAN", "ADD", 0, "CTRL_VLAN"),
        ("VLAN", "DEL", 1, "CTRL_VLAN"),
        ("ANNOUNCE", "ACK", 0, "GUEST_ANNOUNCE"),
        ("MQ", "VQ_PAIRS_SET", 0, "MQ"),
        ("GUEST_OFFLOADS", "SET", 0, "CTRL_GUEST_OFFLOADS"),
        # multiqueue steering with RSS and hash reports (§5.1.6.5.5, §5.1.6.5.6.4, §5.1.6.5.7)
        ("MQ", "RSS_CONFIG", 1, "RSS"),
        ("MQ", "HASH_CONFIG", 2, "HASH_REPORT"),
    )
}
#: What the driver writes into the ack byte before the device gets the command.
ACK_UNWRITTEN = 0xA5
#: The rx-mode keywords of :meth:`VirtioNet.set_rx_mode`, by command.
RX_MODES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")

# -- data: feature dependencies (§5.1.3.1) --------------------------------------------------

#: feature -> clauses that must all hold; a clause holds when any of its features is there.
#: (CTRL_RX_EXTRA: §5.1.4.2 says a driver SHOULD NOT negotiate it without CTRL_VQ.)
FEATURE_REQUIRES: dict[str, tuple[tuple[str, ...], ...]] = {
    "GUEST_TSO4": (("GUEST_CSUM",),),
    "GUEST_TSO6": (("GUEST_CSUM",),),
    "GUEST_ECN": (("GUEST_TSO4", "GUEST_TSO6"),),
    "GUEST_UFO": (("GUEST_CSUM",),),
    "HOST_TSO4": (("CSUM",),),
    "HOST_TSO6": (("CSUM",),),
    "HOST_ECN": (("HOST_TSO4", "HOST_TSO6"),),
    "HOST_UFO": (("CSUM",),),
    "CTRL_RX": (("CTRL_VQ",),),
    "CTRL_VLAN": (("CTRL_VQ",),),
    "GUEST_ANNOUNCE": (("CTRL_VQ",),),
    "MQ": (("CTRL_VQ",),),
    "CTRL_MAC_ADDR": (("CTRL_VQ",),),
    "CTRL_RX_EXTRA": (("CTRL_VQ",),),
    "RSC_EXT": (("HOST_TSO4", "HOST_TSO6"),),
    # RSS requires CTRL_VQ; a driver SHOULD NOT negotiate HASH_REPORT without it (§5.1.4.2).
    "RSS": (("CTRL_VQ",),),
    "HASH_REPORT": (("CTRL_VQ",),),
}

# -- data: guest offloads (§5.1.6.3, §5.1.6.5.8) ----------------------------------------------

#: The offloads VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET turns on and off, by feature name (§5.1.6.5.8.1).
GUEST_OFFLOADS = ("GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "GUEST_UFO", "GUEST_USO4", "GUEST_USO6")
#: Features with which the device may pass segmentation-offload packets up (§5.1.6.3).
GUEST_GSO_FEATURES = ("GUEST_TSO4", "GUEST_TSO6", "GUEST_UFO", "GUEST_USO4", "GUEST_USO6")
#: The largest such packet: 14 + 40 + 65535 bytes (§5.1.6.3).
GSO_MAX_PACKET = 65589


def unmet_dependencies(features: Iterable[str]) -> set[str]:
    """Features of the set whose requirements (§5.1.3.1) the set does not meet, transitively."""
    kept = set(features)
    dropped: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name in sorted(kept):
            clauses = FEATURE_REQUIRES.get(name, ())
            if not all(kept.intersection(clause) for clause in clauses):
                kept.discard(name)
                dropped.add(name)
                changed = True
    return dropped


# -- frames and MAC addresses ---------------------------------------------------------------

ETH_HLEN = 14
#: The largest frame without GSO or MTU: 1500 bytes of payload plus the Ethernet header (§5.1.6.3).
ETH_MAX_FRAME = 1514
BROADCAST = b"\xff" * 6


def mac_bytes(mac: bytes | str) -> bytes:
    """``"52:54:00:12:34:56"`` or 6 raw bytes -> 6 bytes."""
    if isinstance(mac, str):
        parts = mac.split(":")
        if len(parts) != 6:
            raise ValueError(f"MAC address {mac!r} does not have six parts")
        mac = bytes(int(p, 16) for p in parts)
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    return bytes(mac)


def mac_str(mac: bytes) -> str:
    """6 bytes -> ``"52:54:00:12:34:56"`` (QEMU's spelling in query-rx-filter)."""
    return ":".join(f"{b:02x}" for b in mac)


def ethernet_frame(dst: bytes | str, src: bytes | str, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame (no FCS: neither virtio nor QEMU's socket netdev carries one)."""
    return mac_bytes(dst) + mac_bytes(src) + ethertype.to_bytes(2, "big") + payload


# -- errors ---------------------------------------------------------------------------------


class NetError(QtestVirtioError):
    """A virtio-net operation failed."""


class NetDeviceError(NetError):
    """The device broke a virtio-net rule (a short used length, a bad num_buffers, an ack byte
    that is neither OK nor ERR); the message names the device, queue and descriptor."""


class NetCtrlError(NetError):
    """The device answered a control command with VIRTIO_NET_ERR."""

    def __init__(self, message: str, command: str, ack: int) -> None:
        super().__init__(message)
        self.command = command
        self.ack = ack


# -- results --------------------------------------------------------------------------------


@dataclass
class NetConfig:
    """struct virtio_net_config by name; None where the field does not exist (§5.1.4)."""

    mac: bytes | None
    status: int | None
    max_virtqueue_pairs: int | None
    mtu: int | None
    speed: int | None
    duplex: int | None
    rss_max_key_size: int | None
    rss_max_indirection_table_length: int | None
    supported_hash_types: int | None

    @classmethod
    def from_fields(cls, values: Mapping[str, int]) -> NetConfig:
        """From the generic reader's fields by name (``mac[0]`` .. ``mac[5]`` become ``mac``)."""
        mac = bytes(values[f.name] for f in NET_CONFIG_MAC) if NET_CONFIG_MAC[0].name in values else None
        return cls(
            mac=mac,
            status=values.get("status"),
            max_virtqueue_pairs=values.get("max_virtqueue_pairs"),
            mtu=values.get("mtu"),
            speed=values.get("speed"),
            duplex=values.get("duplex"),
            rss_max_key_size=values.get("rss_max_key_size"),
            rss_max_indirection_table_length=values.get("rss_max_indirection_table_length"),
            supported_hash_types=values.get("supported_hash_types"),
        )

    @property
    def link_up(self) -> bool | None:
        return None if self.status is None else bool(NET_STATUS.LINK_UP.get(self.status))

    @property
    def announce(self) -> bool | None:
        return None if self.status is None else bool(NET_STATUS.ANNOUNCE.get(self.status))


@dataclass
class RxPacket:
    """One received packet: its header, the frame, and how the device used the buffers."""

    header: NetHdr
    frame: bytes
    #: Used length of each buffer the packet took, in order (the first includes the header).
    used_lengths: list[int]
    #: Size of each of those buffers, as posted.
    buffer_sizes: list[int]
    #: Descriptor ids (split head index / packed buffer id) of those buffers.
    ids: list[int] = field(default_factory=list)

    @property
    def buffers(self) -> int:
        return len(self.used_lengths)


# -- control command data and tagged frames (§5.1.6.5.2, §5.1.6.5.3) -----------------------


def mac_table_data(macs: Iterable[bytes | str], *, entries: int | None = None) -> bytes:
    """One table of VIRTIO_NET_CTRL_MAC_TABLE_SET: a le32 entry count then the addresses;
    ``entries`` overrides the count (a table that claims more than it holds)."""
    raw = [mac_bytes(m) for m in macs]
    count = len(raw) if entries is None else entries
    return count.to_bytes(4, "little") + b"".join(raw)


def vlan_frame(dst: bytes | str, src: bytes | str, vid: int, ethertype: int, payload: bytes) -> bytes:
    """An 802.1Q-tagged Ethernet frame: TPID 0x8100, priority 0, VLAN id ``vid`` (0..4095)."""
    if not 0 <= vid < 4096:
        raise ValueError(f"a VLAN id has 12 bits, not {vid}")
    return ethernet_frame(dst, src, 0x8100, vid.to_bytes(2, "big") + ethertype.to_bytes(2, "big") + payload)
