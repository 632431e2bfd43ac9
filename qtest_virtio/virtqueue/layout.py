"""Virtqueue memory layouts as data (virtio 1.2 §2.7 split, §2.8 packed)."""

from __future__ import annotations

from ..registers import BitLayout, Bits, Field, Layout

#: struct virtq_desc, §2.7.5.
SPLIT_DESC = Layout(
    "virtq_desc",
    [Field("addr", 0, 8), Field("len", 8, 4), Field("flags", 12, 2), Field("next", 14, 2)],
    size=16,
)
DESC_F = BitLayout("virtq_desc.flags", [Bits("NEXT", 0), Bits("WRITE", 1), Bits("INDIRECT", 2)])

#: struct virtq_avail head, §2.7.6; ring[queue_size] of le16 follows, then used_event.
SPLIT_AVAIL = Layout("virtq_avail", [Field("flags", 0, 2), Field("idx", 2, 2)], size=4)
AVAIL_F_NO_INTERRUPT = 1
#: struct virtq_used head, §2.7.8; ring[queue_size] of {le32 id, le32 len} follows, then avail_event.
SPLIT_USED = Layout("virtq_used", [Field("flags", 0, 2), Field("idx", 2, 2)], size=4)
USED_ELEM = Layout("virtq_used_elem", [Field("id", 0, 4), Field("len", 4, 4)], size=8)
USED_F_NO_NOTIFY = 1

#: struct pvirtq_desc, §2.8.13.
PACKED_DESC = Layout(
    "pvirtq_desc",
    [Field("addr", 0, 8), Field("len", 8, 4), Field("id", 12, 2), Field("flags", 14, 2)],
    size=16,
)
PACKED_F = BitLayout(
    "pvirtq_desc.flags",
    [Bits("NEXT", 0), Bits("WRITE", 1), Bits("INDIRECT", 2), Bits("AVAIL", 7), Bits("USED", 15)],
)
#: struct pvirtq_event_suppress, §2.8.14: both the driver and the device area have one.
EVENT_SUPPRESS = Layout("pvirtq_event_suppress", [Field("off_wrap", 0, 2), Field("flags", 2, 2)], size=4)
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

MAX_QUEUE_SIZE = 32768


def packed_avail_flags(wrap: int) -> int:
    """AVAIL = wrap, USED = !wrap: a descriptor made available in lap ``wrap`` (§2.8.1)."""
    return (PACKED_F.AVAIL.mask if wrap else 0) | (0 if wrap else PACKED_F.USED.mask)


def avail_ring_size(n: int) -> int:
    """flags, idx, ring[n], used_event (§2.7.6)."""
    return SPLIT_AVAIL.size + 2 * n + 2


def used_ring_size(n: int) -> int:
    """flags, idx, ring[n] of 8-byte elements, avail_event (§2.7.8)."""
    return SPLIT_USED.size + USED_ELEM.size * n + 2


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event (§2.7.10): did the index move past ``event`` between old and new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
