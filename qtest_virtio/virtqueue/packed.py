"""The packed virtqueue (virtio 1.2 §2.8, RING_PACKED): one descriptor ring plus two event
suppression structures.

A descriptor is available when its AVAIL flag equals the driver's wrap counter and USED the
inverse; used when both equal the used wrap counter (§2.8.1). The head's flags are written last
so the device never sees a half-written chain (§2.8.21). The device returns a buffer id and
skips as many slots as that buffer's chain had; completion order is not assumed.

With IN_ORDER one used descriptor may stand for a batch: it sits where the batch's first chain
began and carries the buffer id of its last, and the device skips the slots of the whole batch
(§2.8.8); the chains before the named one are taken as used completely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import Buf, InFlight, UsedElem, Virtqueue, VirtqueueError
from .layout import (
    EVENT_SUPPRESS,
    PACKED_DESC,
    PACKED_F,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    packed_avail_flags,
    packed_need_event,
)

_DESC = PACKED_DESC.struct


@dataclass
class _PackedChain(InFlight):
    slots: int = 1


class PackedVirtqueue(Virtqueue):
    kind = "packed"

    def setup(self) -> None:
        self._suppression_seen = None
        if self.transport.uses_legacy_layout:
            raise VirtqueueError(f"{self.name}: packed rings need the modern layout (RING_PACKED is a 1.x feature)")
        n = self.size
        self.ring = self.memory.alloc(PACKED_DESC.size * n, 16, tag=f"{self.name} packed ring", zero=True)
        self.driver_event = self.memory.alloc(EVENT_SUPPRESS.size, 4, tag=f"{self.name} driver event", zero=True)
        self.device_event = self.memory.alloc(EVENT_SUPPRESS.size, 4, tag=f"{self.name} device event", zero=True)
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.kicked_avail, self.kicked_wrap = 0, 1
        self._free_slots = n
        self._free_ids = list(range(n - 1, -1, -1))
        self.transport.setup_queue(self.index, n, self.ring, self.driver_event, self.device_event)
        self.transport.enable_queue(self.index)

    def release(self) -> None:
        for name in ("ring", "driver_event", "device_event"):
            addr = getattr(self, name, None)
            if addr is not None:
                self.memory.free(addr)
                setattr(self, name, None)
        self._drop_in_flight()

    @property
    def free_descriptors(self) -> int:
        return self._free_slots

    def add(self, bufs: Sequence[Buf], *, indirect: bool | None = None) -> int:
        use_indirect = self._use_indirect(bufs, indirect)
        table = None
        if use_indirect and len(bufs) > 1:
            table = self.memory.alloc(PACKED_DESC.size * len(bufs), 16, tag=f"{self.name} indirect")
            entries = b"".join(_DESC.pack(b.addr, b.length, 0, PACKED_F.WRITE.mask if b.writable else 0) for b in bufs)
            self._batch.memwrite(table, entries)
            chain = [(table, len(entries), PACKED_F.INDIRECT.mask)]
        else:
            chain = [(b.addr, b.length, PACKED_F.WRITE.mask if b.writable else 0) for b in bufs]
        if len(chain) > self._free_slots or not self._free_ids:
            raise VirtqueueError(f"{self.name}: queue full ({self._free_slots} free slots, chain of {len(chain)})")
        buffer_id = self._free_ids.pop()
        head_slot, head_flags = self.next_avail, 0
        slots = []
        for i, (addr, length, flags) in enumerate(chain):
            flags |= PACKED_F.NEXT.mask if i + 1 < len(chain) else 0
            flags |= packed_avail_flags(self.avail_wrap)
            slot_addr = self.ring + PACKED_DESC.size * self.next_avail
            if i == 0:
                head_flags = flags
                # Everything of the head but its flags now; the flags last, after the rest.
                self._batch.memwrite(slot_addr, _DESC.pack(addr, length, buffer_id, 0)[: PACKED_DESC.flags.offset])
            else:
                self._batch.memwrite(slot_addr, _DESC.pack(addr, length, buffer_id, flags))
            slots.append(self.next_avail)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self._batch.writew(self.ring + PACKED_DESC.size * head_slot + PACKED_DESC.flags.offset, head_flags)
        self._free_slots -= len(chain)
        return self._track(buffer_id, _PackedChain(tuple(bufs), slots, table, slots=len(chain)))

    def _needs_notification(self) -> bool:
        """Device event suppression (§2.8.10): ENABLE, DISABLE, or DESC with an event offset."""
        old, old_wrap = self.kicked_avail, self.kicked_wrap
        new, new_wrap = self.next_avail, self.avail_wrap
        self.kicked_avail, self.kicked_wrap = new, new_wrap
        return self._notify_wanted(
            lambda seen: self._wants_notification(seen, (old, old_wrap), (new, new_wrap)),
            lambda: self.memory.read(self.device_event, EVENT_SUPPRESS.size),
        )

    def _wants_notification(self, raw: bytes, old: tuple[int, int], new: tuple[int, int]) -> bool:
        """``raw``: the device event structure, off_wrap then flags (§2.8.14)."""
        off_wrap, flags = EVENT_SUPPRESS.off_wrap.get(raw), EVENT_SUPPRESS.flags.get(raw)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        return packed_need_event(off_wrap, self.size, old, new)

    def _collect(self) -> list[UsedElem]:
        self.flush()
        if not self.in_flight:
            return []
        ring = self._read_ring(self.ring, PACKED_DESC.size * self.size, (self.device_event, EVENT_SUPPRESS.size))
        elems: list[UsedElem] = []
        try:
            self._take_used(ring, elems)
        except VirtqueueError:
            self._pending.extend(elems)  # already off the ring: keep them for their waiters
            raise
        return elems

    def _take_used(self, ring: bytes, elems: list[UsedElem]) -> None:
        while self.in_flight:
            _, length, buffer_id, flags = _DESC.unpack_from(ring, PACKED_DESC.size * self.next_used)
            avail = 1 if flags & PACKED_F.AVAIL.mask else 0
            used = 1 if flags & PACKED_F.USED.mask else 0
            if not (avail == used == self.used_wrap):
                break
            chain = self._check_used(buffer_id, length)
            for earlier_id in self._batch_of(buffer_id)[:-1]:  # IN_ORDER: used along with it
                earlier = self.in_flight[earlier_id]
                self._release(earlier_id, earlier)
                elems.append(self._used(earlier_id, earlier.writable_bytes, earlier, skipped=True))
            self._release(buffer_id, chain)
            elems.append(self._used(buffer_id, length, chain))

    def _release(self, buffer_id: int, chain: InFlight) -> None:
        """A used chain's buffer id and slots are free again; the device's next used descriptor
        is past its slots (§2.8.6), and its indirect table is freed."""
        assert isinstance(chain, _PackedChain)
        self._free_ids.append(buffer_id)
        self._free_slots += chain.slots
        self.next_used += chain.slots
        if self.next_used >= self.size:
            self.next_used -= self.size
            self.used_wrap ^= 1
        if chain.indirect_table is not None:
            self.memory.free(chain.indirect_table)

    def set_interrupts(self, enabled: bool) -> None:
        flags = RING_EVENT_FLAGS_ENABLE if enabled else RING_EVENT_FLAGS_DISABLE
        self._batch.writew(self.driver_event + EVENT_SUPPRESS.flags.offset, flags)
        self.flush()

    def describe_state(self) -> str:
        raw = self.memory.read32(self.device_event)
        flags = self.memory.read16(self.ring + PACKED_DESC.size * self.next_used + PACKED_DESC.flags.offset)
        return (
            f"packed ring: next_avail={self.next_avail} avail_wrap={self.avail_wrap} next_used={self.next_used} "
            f"used_wrap={self.used_wrap} flags@next_used={flags:#x} device_event={raw:#x} "
            f"in flight={len(self.in_flight)} device status={self.transport.get_status():#x}"
        )
