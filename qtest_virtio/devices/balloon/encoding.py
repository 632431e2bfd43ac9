"""virtio-balloon, the traditional memory balloon (virtio 1.2 §5.5): the encoding of the config,
the inflateq/deflateq PFN arrays (le32 page frame numbers, addresses divided by 4096, §5.5.6)
and the statsq's tagged statistics (§5.5.6.3).

Queues (§5.5.2): 0 inflateq, 1 deflateq, 2 statsq (STATS_VQ), 3 free_page_vq (FREE_PAGE_HINT).
The balloon config is little-endian in every mode, legacy included (§5.5.4.1).
Pure data and functions (no I/O): unit-testable without QEMU.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum

from ...errors import QtestVirtioError
from ...registers import Field, Layout

#: Virtio device ID of the traditional memory balloon (virtio 1.2 §5).
DEVICE_ID = 5
#: Feature bits (§5.5.3), named without the VIRTIO_BALLOON_F_ prefix.
FEATURE_BITS: dict[int, str] = {
    0: "MUST_TELL_HOST",
    1: "STATS_VQ",
    2: "DEFLATE_ON_OOM",
    3: "FREE_PAGE_HINT",
    4: "PAGE_POISON",
    5: "PAGE_REPORTING",
}


#: struct virtio_balloon_config (§5.5.4).
class BalloonConfigLayout(Layout, struct="virtio_balloon_config"):
    num_pages = Field(0, 4, "pages the device wants in the balloon")
    actual = Field(4, 4, "pages in the balloon, written by the driver")
    free_page_hint_cmd_id = Field(8, 4, "read-only for the driver", requires="FREE_PAGE_HINT")
    poison_val = Field(12, 4, "written by the driver before DRIVER_OK", requires="PAGE_POISON")


BALLOON_CONFIG = BalloonConfigLayout()


#: struct virtio_balloon_stat (§5.5.6.3), packed: le16 tag, le64 val.
class BalloonStatLayout(Layout, struct="virtio_balloon_stat"):
    tag = Field(0, 2)
    val = Field(2, 8)


BALLOON_STAT = BalloonStatLayout()
_STAT = BALLOON_STAT.struct

#: Page frame numbers count 4096-byte pages whatever the guest's page size (§5.5.6).
PFN_SHIFT = 12
PAGE_SIZE = 1 << PFN_SHIFT
_PFN = struct.Struct("<I")

#: Queue indices (§5.5.2).
INFLATEQ = 0
DEFLATEQ = 1
STATSQ = 2
FREE_PAGE_VQ = 3
QUEUE_NAMES = {INFLATEQ: "inflateq", DEFLATEQ: "deflateq", STATSQ: "statsq", FREE_PAGE_VQ: "free_page_vq"}

#: Reserved free_page_hint_cmd_id values (§5.5.6.5, free page hinting); any other is a command ID.
CMD_ID_STOP = 0
CMD_ID_DONE = 1
#: The size of every output buffer on the free_page_vq: one command ID (§5.5.6.5.1).
_CMD_ID = struct.Struct("<I")


def encode_cmd_id(cmd_id: int) -> bytes:
    """A free_page_vq output buffer: the le32 command ID (guest-native on the legacy interface,
    little-endian on x86 too, §5.5.6.5.3)."""
    return _CMD_ID.pack(cmd_id)


class StatTag(IntEnum):
    """virtio_balloon_stat.tag values (§5.5.6.4)."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9


class BalloonError(QtestVirtioError):
    """The balloon device broke a rule, or the driver was asked for something impossible."""


def page_frame(addr: int) -> int:
    """The PFN of a page address (§5.5.6: the address divided by 4096, a le32 on the wire)."""
    if addr % PAGE_SIZE:
        raise BalloonError(f"address {addr:#x} is not 4096-byte aligned")
    if addr >> (32 + PFN_SHIFT):
        raise BalloonError(f"address {addr:#x} is past the 32-bit PFN range (16 TiB)")
    return addr >> PFN_SHIFT


def encode_pfns(addrs: Iterable[int]) -> bytes:
    """The le32 PFN array of an inflate or deflate request."""
    return b"".join(_PFN.pack(page_frame(addr)) for addr in addrs)


def decode_pfns(data: bytes) -> list[int]:
    """Page addresses of a PFN array; a trailing partial entry is an error."""
    if len(data) % _PFN.size:
        raise BalloonError(f"PFN array of {len(data)} bytes is not a whole number of le32 entries")
    return [pfn << PFN_SHIFT for (pfn,) in _PFN.iter_unpack(data)]


def encode_stats(stats: Iterable[tuple[int, int]]) -> bytes:
    """A statsq buffer: struct virtio_balloon_stat entries in the given order (§5.5.6.3)."""
    return b"".join(_STAT.pack(tag, value) for tag, value in stats)


def decode_stats(data: bytes) -> list[tuple[int, int]]:
    if len(data) % _STAT.size:
        raise BalloonError(f"stats buffer of {len(data)} bytes is not a whole number of 10-byte entries")
    return [(tag, value) for tag, value in _STAT.iter_unpack(data)]


@dataclass(frozen=True)
class BalloonConfig:
    """struct virtio_balloon_config by field name (§5.5.4); None where the field does not exist
    (its feature was not negotiated)."""

    num_pages: int
    actual: int
    free_page_hint_cmd_id: int | None = None
    poison_val: int | None = None

    @classmethod
    def from_fields(cls, values: Mapping[str, int]) -> BalloonConfig:
        return cls(
            values["num_pages"],
            values["actual"],
            values.get("free_page_hint_cmd_id"),
            values.get("poison_val"),
        )
