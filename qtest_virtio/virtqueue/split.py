"""The split virtqueue (virtio 1.2 §2.7): descriptor table, available ring, used ring.

Free descriptors are a stack; a chain links them with NEXT. Indices are free-running 16-bit
counters. With EVENT_IDX the driver reads ``avail_event`` (after the used ring) before a kick and
writes ``used_event`` (after the avail ring) as it consumes; without it, the device's NO_NOTIFY
flag decides the kick (§2.7.10).

With IN_ORDER the descriptors are handed out in ring order instead, from 0 up and round again
(§2.7.5, §2.7.5.2: each ``next`` is x + 1, 0 after the last), and one used ring entry may stand
for a batch: the entry at the position of the batch's first chain names its last chain, and
used.idx moves by the size of the batch (§2.7.9).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from ..transport.legacy import legacy_ring_bytes, legacy_ring_offsets
from .base import Buf, InFlight, UsedElem, Virtqueue, VirtqueueError
from .layout import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F,
    SPLIT_AVAIL,
    SPLIT_DESC,
    SPLIT_USED,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    avail_ring_size,
    need_event,
    used_ring_size,
)

_DESC = SPLIT_DESC.struct
_USED = USED_ELEM.struct


class SplitVirtqueue(Virtqueue):
    kind = "split"

    def setup(self) -> None:
        self._suppression_seen = None
        n = self.size
        self._allocs: list[int] = []
        if self.transport.uses_legacy_layout:
            base = self.memory.alloc(legacy_ring_bytes(n), 4096, tag=f"{self.name} rings", zero=True)
            self._allocs.append(base)
            avail_off, used_off = legacy_ring_offsets(n)
            self.desc, self.avail, self.used = base, base + avail_off, base + used_off
        else:
            self.desc = self.memory.alloc(SPLIT_DESC.size * n, 16, tag=f"{self.name} desc", zero=True)
            self.avail = self.memory.alloc(avail_ring_size(n), 2, tag=f"{self.name} avail", zero=True)
            self.used = self.memory.alloc(used_ring_size(n), 4, tag=f"{self.name} used", zero=True)
            self._allocs += [self.desc, self.avail, self.used]
        self.used_event_addr = self.avail + SPLIT_AVAIL.size + 2 * n
        self.avail_event_addr = self.used + SPLIT_USED.size + USED_ELEM.size * n
        # Free descriptors: a stack (0 on top) or, with IN_ORDER, a queue in ring order. Chains
        # come back in the order they went out there, so the queue stays one run from next up.
        self._free: deque[int] = deque(range(n)) if self.in_order else deque(range(n - 1, -1, -1))
        self.avail_idx = 0
        self.kicked_idx = 0
        self.last_used = 0
        self.interrupts_enabled = True
        self.transport.setup_queue(self.index, n, self.desc, self.avail, self.used)
        self.transport.enable_queue(self.index)

    def release(self) -> None:
        for addr in getattr(self, "_allocs", []):
            self.memory.free(addr)
        self._allocs = []
        self._drop_in_flight()

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def _desc_flags(self, buf: Buf, has_next: bool) -> int:
        flags = DESC_F.WRITE.mask if buf.writable else 0
        return flags | (DESC_F.NEXT.mask if has_next else 0)

    def add(self, bufs: Sequence[Buf], *, indirect: bool | None = None) -> int:
        use_indirect = self._use_indirect(bufs, indirect)
        if use_indirect and len(bufs) > 1:
            table = self.memory.alloc(SPLIT_DESC.size * len(bufs), 16, tag=f"{self.name} indirect")
            entries = b"".join(
                _DESC.pack(b.addr, b.length, self._desc_flags(b, i + 1 < len(bufs)), i + 1 if i + 1 < len(bufs) else 0)
                for i, b in enumerate(bufs)
            )
            self._batch.memwrite(table, entries)
            chain = [(table, len(entries), DESC_F.INDIRECT.mask)]
        else:
            table = None
            chain = [(b.addr, b.length, self._desc_flags(b, False)) for b in bufs]
        if len(chain) > len(self._free):
            raise VirtqueueError(f"{self.name}: queue full ({len(self._free)} free descriptors, chain of {len(chain)})")
        take = self._free.popleft if self.in_order else self._free.pop
        ids = [take() for _ in chain]
        for i, (addr, length, flags) in enumerate(chain):
            last = i + 1 == len(chain)
            self._batch.memwrite(
                self.desc + SPLIT_DESC.size * ids[i],
                _DESC.pack(addr, length, flags | (0 if last else DESC_F.NEXT.mask), 0 if last else ids[i + 1]),
            )
        head = ids[0]
        token = self._track(head, InFlight(tuple(bufs), ids, table))
        slot = self.avail + SPLIT_AVAIL.size + 2 * (self.avail_idx % self.size)
        self._batch.writew(slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._batch.writew(self.avail + SPLIT_AVAIL.idx.offset, self.avail_idx)
        return token

    def published_by_hand(self, entries: int = 1) -> None:
        """Count ``entries`` avail ring entries someone else wrote at ``avail_idx`` on (a
        hand-built chain, ``testing.publish_by_hand``) and notified the device of: the driver's
        next entry goes after them and its next kick compares from there (§2.7.13, §2.7.10).
        Their chains are not tracked: read their used entries by hand too."""
        self.avail_idx = (self.avail_idx + entries) & 0xFFFF
        self.kicked_idx = self.avail_idx
        self._suppression_seen = None

    def consumed_by_hand(self, entries: int = 1) -> None:
        """Skip ``entries`` used ring entries at ``last_used`` that someone else read (the used
        side of hand-built chains, or an entry a test wrote to play a broken device)."""
        self.last_used = (self.last_used + entries) & 0xFFFF

    def _needs_notification(self) -> bool:
        old, new = self.kicked_idx, self.avail_idx
        self.kicked_idx = new
        return self._notify_wanted(lambda seen: self._wants_notification(seen, new, old), self._read_suppression)

    def _read_suppression(self) -> bytes:
        """used.flags or avail_event, whichever decides a kick, read now (after publishing)."""
        if self.event_idx:
            return b"\0\0" + self.memory.read(self.avail_event_addr, 2)
        return self.memory.read(self.used + SPLIT_USED.flags.offset, 2) + b"\0\0"

    def _wants_notification(self, seen: bytes, new: int, old: int) -> bool:
        """``seen``: used.flags then avail_event, 2 bytes each (§2.7.10)."""
        if self.event_idx:
            return need_event(int.from_bytes(seen[2:4], "little"), new, old)
        return not int.from_bytes(seen[0:2], "little") & USED_F_NO_NOTIFY

    def used_idx(self) -> int:
        return self.memory.read16(self.used + SPLIT_USED.idx.offset)

    def _collect(self) -> list[UsedElem]:
        self.flush()
        # used.flags, used.idx, the whole ring and avail_event in one read: one round trip per
        # poll, and the suppression snapshot the next kick may go by.
        ring = self._read_ring(self.used, used_ring_size(self.size))
        self._suppression_seen = ring[SPLIT_USED.flags.offset : SPLIT_USED.flags.end] + ring[-2:]
        used_idx = int.from_bytes(ring[SPLIT_USED.idx.offset : SPLIT_USED.idx.end], "little")
        count = (used_idx - self.last_used) & 0xFFFF
        if count == 0:
            return []
        if count > self.size:
            raise VirtqueueError(
                f"{self.transport}: {self.name}: used.idx moved {count} past last_used={self.last_used}, "
                f"more than the {self.size} buffers a queue can hold"
            )
        elems: list[UsedElem] = []
        try:
            self._take_used(ring, count, elems)
        except VirtqueueError:
            self._pending.extend(elems)  # already off the ring: keep them for their waiters
            raise
        if self.event_idx and self.interrupts_enabled:
            # Ask for an interrupt when the next buffer is used (§2.7.10). Queued: it reaches
            # the device before the next chain is published, which is all that matters.
            self._batch.writew(self.used_event_addr, self.last_used)
        elif self.event_idx:
            self._batch.writew(self.used_event_addr, (self.last_used - 1) & 0xFFFF)
        return elems

    def _take_used(self, ring: bytes, count: int, elems: list[UsedElem]) -> None:
        taken = 0
        while taken < count:
            slot = self.last_used % self.size
            used_id, length = _USED.unpack_from(ring, SPLIT_USED.size + USED_ELEM.size * slot)
            if used_id >= self.size:
                raise VirtqueueError(
                    f"{self.transport}: {self.name}: used ring entry {slot} has id {used_id}, "
                    f"outside the {self.size} descriptors"
                )
            chain = self._check_used(used_id, length)
            batch = self._batch_of(used_id)
            if len(batch) > count - taken:
                raise VirtqueueError(
                    f"{self.transport}: {self.name}: IN_ORDER: used ring entry {slot} names id {used_id}, "
                    f"chain {len(batch)} in the order they were made available, so it stands for a batch of "
                    f"{len(batch)} (§2.7.9), but used.idx covers only {count - taken} more: the device used "
                    f"id {used_id} before id {batch[0]}"
                )
            for ring_id in batch[:-1]:  # IN_ORDER: used along with the one the entry names
                earlier = self.in_flight[ring_id]
                self._release(earlier)
                elems.append(self._used(ring_id, earlier.writable_bytes, earlier, skipped=True))
            self._release(chain)
            self.last_used = (self.last_used + len(batch)) & 0xFFFF
            taken += len(batch)
            elems.append(self._used(used_id, length, chain))

    def _release(self, chain: InFlight) -> None:
        """A used chain's descriptors are free again (back on the stack, or at the end of the
        ring-order queue), and so is its indirect table."""
        if self.in_order:
            self._free.extend(chain.descriptors)
        else:
            self._free += reversed(chain.descriptors)
        if chain.indirect_table is not None:
            self.memory.free(chain.indirect_table)

    def set_interrupts(self, enabled: bool) -> None:
        self.interrupts_enabled = enabled
        if self.event_idx:
            # used_event one behind what we consumed: the device's index passes it only after
            # 65535 more buffers, so in practice never (the flags field is ignored, §2.7.10).
            event = self.last_used if enabled else (self.last_used - 1) & 0xFFFF
            self._batch.writew(self.used_event_addr, event)
        else:
            self._batch.writew(self.avail + SPLIT_AVAIL.flags.offset, 0 if enabled else AVAIL_F_NO_INTERRUPT)
        self.flush()

    def describe_state(self) -> str:
        flags = self.memory.read16(self.used + SPLIT_USED.flags.offset)
        return (
            f"split ring: avail.idx={self.avail_idx} used.idx={self.used_idx()} last_used={self.last_used} "
            f"used.flags={flags:#x} in flight={len(self.in_flight)} device status={self.transport.get_status():#x}"
        )
