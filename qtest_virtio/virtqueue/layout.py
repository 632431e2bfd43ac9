"""Virtqueue memory layouts as data (virtio 1.2 §2.7 split, §2.8 packed)."""

from __future__ import annotations

from ..registers import BitLayout, Bits, Field, Layout


#: struct virtq_desc, §2.7.5.
class SplitDescLayout(Layout, struct="virtq_desc", size=16):
    addr = Field(0, 8)
    len = Field(8, 4)
    flags = Field(12, 2)
    next = Field(14, 2)


SPLIT_DESC = SplitDescLayout()


class DescFBits(BitLayout, register="virtq_desc.flags"):
    NEXT = Bits(0)
    WRITE = Bits(1)
    INDIRECT = Bits(2)


DESC_F = DescFBits()


#: struct virtq_avail head, §2.7.6; ring[queue_size] of le16 follows, then used_event.
class SplitAvailLayout(Layout, struct="virtq_avail", size=4):
    flags = Field(0, 2)
    idx = Field(2, 2)


SPLIT_AVAIL = SplitAvailLayout()
AVAIL_F_NO_INTERRUPT = 1


#: struct virtq_used head, §2.7.8; ring[queue_size] of {le32 id, le32 len} follows, then avail_event.
class SplitUsedLayout(Layout, struct="virtq_used", size=4):
    flags = Field(0, 2)
    idx = Field(2, 2)


SPLIT_USED = SplitUsedLayout()


class UsedElemLayout(Layout, struct="virtq_used_elem", size=8):
    id = Field(0, 4)
    len = Field(4, 4)


USED_ELEM = UsedElemLayout()
USED_F_NO_NOTIFY = 1


#: struct pvirtq_desc, §2.8.13.
class PackedDescLayout(Layout, struct="pvirtq_desc", size=16):
    addr = Field(0, 8)
    len = Field(8, 4)
    id = Field(12, 2)
    flags = Field(14, 2)


PACKED_DESC = PackedDescLayout()


class PackedFBits(BitLayout, register="pvirtq_desc.flags"):
    NEXT = Bits(0)
    WRITE = Bits(1)
    INDIRECT = Bits(2)
    AVAIL = Bits(7)
    USED = Bits(15)


PACKED_F = PackedFBits()


#: struct pvirtq_event_suppress, §2.8.14: both the driver and the device area have one.
class EventSuppressLayout(Layout, struct="pvirtq_event_suppress", size=4):
    off_wrap = Field(0, 2)
    flags = Field(2, 2)


EVENT_SUPPRESS = EventSuppressLayout()
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
#: off_wrap: the event's descriptor offset in bits 0-14, its wrap counter in bit 15 (§2.8.14).
EVENT_WRAP_BIT = 15

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


def packed_need_event(off_wrap: int, size: int, old: tuple[int, int], new: tuple[int, int]) -> bool:
    """Has a packed ring position moved past the event an event suppression structure names
    with RING_EVENT_FLAGS_DESC (§2.8.10)? ``off_wrap`` is the event's slot and lap (wrap counter
    in bit 15); ``old`` and ``new`` are (slot, wrap counter) before and after. All three go on
    one running scale across the wrap, as Linux and QEMU put them, then :func:`need_event`."""
    event, event_wrap = off_wrap & ((1 << EVENT_WRAP_BIT) - 1), off_wrap >> EVENT_WRAP_BIT
    (old_slot, old_wrap), (new_slot, new_wrap) = old, new
    if event_wrap != new_wrap:
        event -= size
    if old_wrap != new_wrap:
        old_slot -= size
    return need_event(event & 0xFFFF, new_slot & 0xFFFF, old_slot & 0xFFFF)
