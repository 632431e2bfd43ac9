"""The one Virtqueue interface for split and packed rings, and request helpers on top of it.

A virtqueue knows guest memory (where its rings and buffers live) and its transport (to set the
queue up and to notify); nothing else. Completion is found by polling the used ring, so it works
the same whatever interrupt path is configured.

The ring writes are posted (``GuestMemory.posting``). A poll reads the used ring, the device's
suppression state and, speculatively, the waited-for chain's device-writable buffers in one
exchange (their data counts only if the used ring, read first, says the chain is used: §2.7.14).
A kick then sends the publishing writes and the notification with one wait when that snapshot says
"notify"; otherwise it reads the suppression state after publishing, as §2.7.10 / §2.8.10 ask, and
notifies with a second wait. So a request one at a time costs two round trips: kick, and poll.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import QtestVirtioError
from ..memory import GuestMemory


class _Function(Protocol):
    @property
    def bdf(self) -> str: ...


class QueueTransport(Protocol):
    """What a virtqueue asks of its transport: the ring layout rule, where to tell the device
    the rings are, the kick, and the status (for messages). ``transport.VirtioTransport`` is
    one; ``testing.FakeTransport`` another, for ring unit tests without QEMU."""

    @property
    def uses_legacy_layout(self) -> bool: ...
    @property
    def fn(self) -> _Function: ...
    def setup_queue(self, queue: int, size: int, desc: int, driver: int, device: int) -> None: ...
    def enable_queue(self, queue: int) -> None: ...
    def notify(self, queue: int) -> None: ...
    def get_status(self) -> int: ...


class VirtqueueError(QtestVirtioError):
    """The device broke a ring rule (bad id, used length past the buffer) or the queue is full."""


class VirtqueueTimeout(VirtqueueError):
    """No used buffer within the timeout; the message says which queue and what it saw."""


@dataclass(frozen=True)
class Buf:
    """One guest buffer of a chain: device-readable unless ``writable``."""

    addr: int
    length: int
    writable: bool = False


@dataclass
class InFlight:
    """What the driver remembers of a chain it made available."""

    bufs: tuple[Buf, ...]
    descriptors: list[int]
    indirect_table: int | None = None
    #: Unique per chain for the queue's life: ring ids are reused as soon as a chain is used.
    token: int = -1

    @property
    def writable_bytes(self) -> int:
        return sum(b.length for b in self.bufs if b.writable)


@dataclass(frozen=True)
class UsedElem:
    """A completed chain: its id (head index or buffer id), the used length, its buffers,
    and the token :meth:`Virtqueue.add` returned for it."""

    id: int
    length: int
    bufs: tuple[Buf, ...]
    token: int = -1
    #: IN_ORDER only: no used entry named this chain; a later one stood for it as part of a
    #: batch, and the device is taken to have used it completely (§2.7.9, §2.8.8), so
    #: ``length`` is all its device-writable bytes.
    skipped: bool = False


@dataclass
class Request:
    """A chain built by :meth:`Virtqueue.submit`: guest buffers allocated for the data."""

    token: int
    out_addrs: list[int]
    in_bufs: list[Buf]
    allocations: list[int] = field(default_factory=list)


class Virtqueue(ABC):
    """A virtqueue in guest memory, driven as a driver drives it."""

    kind: str

    def __init__(
        self,
        transport: QueueTransport,
        memory: GuestMemory,
        index: int,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        in_order: bool = False,
        name: str = "",
    ) -> None:
        if size <= 0 or (size & (size - 1) and not transport.uses_legacy_layout):
            raise VirtqueueError(f"queue {index}: size {size} is not a power of two")
        self.transport = transport
        self.memory = memory
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        #: VIRTIO_F_IN_ORDER negotiated: the device uses chains in the order they were made
        #: available, and one used entry may stand for a batch (§2.7.9, §2.8.8).
        self.in_order = in_order
        self.name = name or f"{transport.fn.bdf} queue {index}"
        self.in_flight: dict[int, InFlight] = {}
        self._completed: dict[int, UsedElem] = {}
        self._pending: deque[UsedElem] = deque()
        self._next_token = 0
        self._tokens_in_flight: set[int] = set()
        #: IN_ORDER: the ring ids in flight, in the order they were made available.
        self._avail_order: deque[int] = deque()
        self._batch = memory.batch()
        #: Buffers read along with the used ring by the next poll (``wait_for(prefetch=)``), and
        #: what that poll read: the data of the chain whose token is ``_prefetched_token``.
        self._prefetch_spans: Sequence[tuple[int, int]] = ()
        self._prefetched: list[bytes] = []
        self._prefetched_token = -1
        self.notifications = 0
        self.kicks_suppressed = 0
        #: Polls of the used ring that found nothing new: the device was slower than the reply.
        #: How many there are depends on timing, so round-trip figures are held net of them.
        self.polls_empty = 0
        #: The device-written suppression state (split: used.flags and avail_event; packed: the
        #: device event structure) as the last poll read it, or None once a notification went out.
        self._suppression_seen: bytes | None = None

    #: Whether a kick may notify on the last poll's snapshot of the suppression state. Only a
    #: snapshot that says "notify" is trusted: if the device has since asked not to be notified,
    #: the cost is one notification it did not need (devices take notifications at any time,
    #: §2.7.10 is a SHOULD NOT); a snapshot that says "suppress" is always read again after
    #: publishing, so no notification the device asked for is ever missed (the MUST). False
    #: reads after publishing every time, as a driver on real memory does.
    notify_on_snapshot: bool = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} size={self.size}>"

    # -- ring operations (per layout) -----------------------------------------------------

    @abstractmethod
    def setup(self) -> None:
        """Allocate and zero the rings, tell the transport where they are, enable the queue."""

    @abstractmethod
    def release(self) -> None:
        """Free the ring memory (after a reset; the device must not touch it any more).
        Chains still in flight are dropped with it."""

    @abstractmethod
    def add(self, bufs: Sequence[Buf], *, indirect: bool | None = None) -> int:
        """Make a chain available (published at the next kick or flush); returns its token."""

    def _use_indirect(self, bufs: Sequence[Buf], indirect: bool | None) -> bool:
        """Check a chain before it is laid out; whether it goes through an indirect table
        (only when INDIRECT_DESC was negotiated, §2.7.5.3 / §2.8.19)."""
        if not bufs:
            raise VirtqueueError(f"{self.name}: a chain needs at least one buffer")
        use_indirect = self.indirect if indirect is None else indirect
        if use_indirect and not self.indirect:
            raise VirtqueueError(f"{self.name}: INDIRECT_DESC was not negotiated")
        return use_indirect

    def _track(self, ring_id: int, chain: InFlight) -> int:
        """Record a chain made available under ``ring_id``; returns its unique token."""
        chain.token = self._next_token
        self._next_token += 1
        self.in_flight[ring_id] = chain
        self._tokens_in_flight.add(chain.token)
        if self.in_order:
            self._avail_order.append(ring_id)
        return chain.token

    def _drop_in_flight(self) -> None:
        """Forget every chain in flight and free their indirect tables (queue or device reset)."""
        for chain in self.in_flight.values():
            if chain.indirect_table is not None:
                self.memory.free(chain.indirect_table)
        self.in_flight.clear()
        self._tokens_in_flight.clear()
        self._avail_order.clear()
        self._pending.clear()
        self._completed.clear()
        self._suppression_seen = None

    def _used(self, ring_id: int, length: int, chain: InFlight, *, skipped: bool = False) -> UsedElem:
        del self.in_flight[ring_id]
        self._tokens_in_flight.discard(chain.token)
        if self.in_order:
            oldest = self._avail_order.popleft()
            if oldest != ring_id:  # batches are taken oldest first: this cannot happen
                raise VirtqueueError(f"{self.name}: IN_ORDER bookkeeping: used {ring_id} before {oldest}")
        return UsedElem(ring_id, length, chain.bufs, chain.token, skipped)

    def _batch_of(self, used_id: int) -> list[int]:
        """The chains one used entry stands for: with IN_ORDER, every chain made available up
        to and including ``used_id``, oldest first (§2.7.9 split, §2.8.8 packed); without it,
        that chain alone. ``used_id`` must be in flight (checked by :meth:`_check_used`)."""
        if not self.in_order:
            return [used_id]
        batch = []
        for ring_id in self._avail_order:
            batch.append(ring_id)
            if ring_id == used_id:
                return batch
        raise VirtqueueError(f"{self.name}: id {used_id} is in flight but not in the available order")

    @abstractmethod
    def _needs_notification(self) -> bool:
        """Whether the device asked to be notified of what was published since the last kick."""

    def _notify_wanted(self, wants: Callable[[bytes], bool], read_now: Callable[[], bytes]) -> bool:
        """The kick's decision from the device's suppression state (``wants``: the layout's
        rule): on the last poll's snapshot, used once, when it says "notify" (see
        :attr:`notify_on_snapshot`); otherwise on the state read now, after publishing."""
        seen, self._suppression_seen = self._suppression_seen, None
        if seen is not None and self.notify_on_snapshot and wants(seen):
            return True
        return wants(read_now())

    @abstractmethod
    def _collect(self) -> list[UsedElem]:
        """Every chain the device has used since the last call, in ring order, read with as
        few round trips as possible; their descriptors are free again."""

    def poll_used(self) -> UsedElem | None:
        """The next used chain, or None."""
        if not self._pending:
            found = self._collect()
            self.polls_empty += not found
            self._pending.extend(found)
        return self._pending.popleft() if self._pending else None

    @abstractmethod
    def describe_state(self) -> str:
        """Indices and flags as the driver and the device see them (for timeout messages)."""

    @property
    @abstractmethod
    def free_descriptors(self) -> int: ...

    @abstractmethod
    def set_interrupts(self, enabled: bool) -> None:
        """Ask the device for used-buffer notifications, or not (driver-side suppression:
        NO_INTERRUPT or used_event on split rings §2.7.10, driver event flags on packed §2.8.10).
        It is a hint the device may ignore; completion is always found by polling."""

    # -- shared logic ---------------------------------------------------------------------

    def flush(self) -> None:
        """Send the queued ring writes (descriptors, then ring entries, then indices), posted."""
        with self.memory.posting():
            self._batch.flush()

    def kick(self, *, force: bool = False) -> bool:
        """Publish, then notify if the device wants it (event index or NO_NOTIFY/flags). The
        writes go ahead of the suppression read in its exchange, or, when the last poll's
        snapshot already says "notify", ahead of the notification. The notify itself waits for
        its reply: with ioeventfd (the qtest accelerator) it only signals an eventfd, and the
        device runs it in a later main-loop pass; a command in the same input as the notify (a
        ``clock_step``, a status read) would run before it."""
        with self.memory.posting():
            self._batch.flush()
            notify = force or self._needs_notification()
        self._suppression_seen = None
        if notify:
            self.transport.notify(self.index)
            self.notifications += 1
            return True
        self.kicks_suppressed += 1
        return False

    def _read_ring(self, addr: int, size: int, suppression: tuple[int, int] | None = None) -> bytes:
        """The device-written ring area, read with the suppression state (kept as the snapshot
        the next kick may go by) and the prefetch buffers in one exchange."""
        spans = [(addr, size), *([suppression] if suppression else []), *self._prefetch_spans]
        ring, *rest = self.memory.read_many(spans)
        if suppression:
            self._suppression_seen = rest.pop(0)
        self._prefetched = rest
        return ring

    def _check_used(self, used_id: int, length: int) -> InFlight:
        """A used element must name a chain in flight, and its length fit the writable part."""
        chain = self.in_flight.get(used_id)
        if chain is None:
            order = ""
            if self.in_order and self._avail_order:
                order = (
                    f"; IN_ORDER: the next chain to be used is id {self._avail_order[0]}, and a chain "
                    "used out of the order it was made available can show up like this (§2.7.9, §2.8.8)"
                )
            raise VirtqueueError(
                f"{self.transport}: {self.name}: device returned id {used_id}, which is not in flight "
                f"(in flight: {sorted(self.in_flight)[:16]}){order}"
            )
        if length > chain.writable_bytes:
            raise VirtqueueError(
                f"{self.transport}: {self.name}: descriptor {used_id}: used length {length} is longer than "
                f"the {chain.writable_bytes} device-writable bytes of the chain (§2.7.8.2)"
            )
        return chain

    def wait_used(self, timeout: float = 5.0) -> UsedElem:
        deadline = time.monotonic() + timeout
        while (elem := self.poll_used()) is None:
            if time.monotonic() > deadline:
                raise VirtqueueTimeout(
                    f"{self.transport}: {self.name}: nothing used within {timeout:g} s; {self.describe_state()}"
                )
        return elem

    def wait_for(self, token: int, timeout: float = 5.0, *, prefetch: Sequence[tuple[int, int]] = ()) -> UsedElem:
        """Wait for one chain (by the token add() returned); others completing meanwhile are
        kept for their own waiters (in-order completion is not assumed unless IN_ORDER was
        negotiated). ``prefetch``: ``(addr, size)`` buffers each poll reads too; when the poll
        that finds the chain used read them, ``_prefetched_token`` is ``token``."""
        deadline = time.monotonic() + timeout
        self._prefetched_token = -1
        while True:
            while self._pending:
                elem = self._pending.popleft()
                self._completed[elem.token] = elem
            if token in self._completed:
                return self._completed.pop(token)
            if token not in self._tokens_in_flight:
                raise VirtqueueError(f"{self.name}: token {token} is not in flight")
            self._prefetch_spans = prefetch
            try:
                found = self._collect()
            finally:
                self._prefetch_spans = ()
            if prefetch and any(e.token == token for e in found):
                self._prefetched_token = token
            self.polls_empty += not found
            self._pending.extend(found)
            if not self._pending and time.monotonic() > deadline:
                raise VirtqueueTimeout(
                    f"{self.transport}: {self.name}: chain {token} not used within {timeout:g} s; "
                    f"{self.describe_state()}"
                )

    # -- requests with their own buffers --------------------------------------------------

    def submit(
        self, out: Sequence[bytes], in_sizes: Sequence[int], *, indirect: bool | None = None, kick: bool = True
    ) -> Request:
        """Allocate guest buffers, write ``out``, make the chain available and kick (or, with
        ``kick=False``, leave publishing and the notification to a later :meth:`kick`, so
        several chains reach the device in one pass)."""
        allocations = []
        out_addrs = []
        bufs: list[Buf] = []
        for data in out:
            addr = self.memory.alloc(max(len(data), 1), 16, tag=f"{self.name} out")
            allocations.append(addr)
            if len(data) > 4096:
                self.memory.write(addr, data)
            elif data:
                self._batch.memwrite(addr, data)
            out_addrs.append(addr)
            bufs.append(Buf(addr, len(data)))
        in_bufs = []
        for size in in_sizes:
            addr = self.memory.alloc(max(size, 1), 16, tag=f"{self.name} in")
            allocations.append(addr)
            in_bufs.append(Buf(addr, size, writable=True))
        bufs += in_bufs
        token = self.add(bufs, indirect=indirect)
        if kick:
            self.kick()
        return Request(token, out_addrs, in_bufs, allocations)

    def complete(self, request: Request, timeout: float = 5.0) -> tuple[int, list[bytes]]:
        """Wait for ``request``; return the used length and the device-written buffers, then
        free its memory. Only the first ``used length`` bytes are meaningful (§2.7.8.2)."""
        spans = [(b.addr, b.length) for b in request.in_bufs if b.length]
        elem = self.wait_for(request.token, timeout, prefetch=spans)
        got = iter(self._prefetched if self._prefetched_token == request.token else self.memory.read_many(spans))
        data = [next(got) if b.length else b"" for b in request.in_bufs]
        for addr in request.allocations:
            self.memory.free(addr)
        return elem.length, data

    def exchange(self, out: Sequence[bytes], in_sizes: Sequence[int], **kw: bool | None) -> tuple[int, list[bytes]]:
        return self.complete(self.submit(out, in_sizes, indirect=kw.get("indirect")))
