"""A hostile driver's rings, and what a device that meets one must do (virtio 1.2 §2.1.2).

The hand-built layouts break one driver rule each (§2.7.4.2, §2.7.5, §2.7.5.2, §2.7.5.3.1,
§2.7.6, §2.8.7, §2.8.17, §2.8.19); everything else about the chain is what the device expects,
so the flaw is the only reason to give up. :class:`Hostile` lays them out on a queue (0 unless
told) over the rings the library set up (split: slots from the top of the table, which the
library hands out last; packed: from the driver's next slot on), and
:meth:`Hostile.expect_given_up` checks the device's answer:

- modern layout (VERSION_1 negotiated): DEVICE_NEEDS_RESET in device_status, then a
  configuration change notification, since DRIVER_OK is set (§2.1.2: SHOULD, then MUST);
- legacy layout (no VERSION_1): no status bit exists for it; QEMU marks the device broken
  (QMP ``x-query-virtio-status``) and says nothing to the driver;
- either way nothing is used, and a valid chain made available afterwards is left alone, until
  a reset and a new initialization bring the device back (§2.4, §3.1.1).

The payload of a chain is what the device under test takes as a request: a device-writable
buffer for virtio-rng (§5.4.6), a device-readable page frame number for virtio-balloon's
inflateq (§5.5.6), of a page outside guest RAM so that QEMU skips it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from qtest_virtio import Machine
from qtest_virtio.devices.balloon.driver import VirtioBalloon
from qtest_virtio.devices.balloon.encoding import PAGE_SIZE, encode_pfns
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.testing import (
    PackedDesc,
    PackedRing,
    SplitDesc,
    SplitRing,
    available_flags,
    publish_by_hand,
    take_used_by_hand,
)
from qtest_virtio.transport.layout import ISR, STATUS
from qtest_virtio.virtqueue import PackedVirtqueue, SplitVirtqueue
from qtest_virtio.virtqueue.layout import DESC_F, PACKED_F

#: How long the device gets to give up, or to (wrongly) use something.
SHORT = 2.0
#: How long "nothing happens" is watched (each qtest command is a turn of QEMU's main loop).
QUIET_WINDOW = 0.05
FILL = 0xEE
#: A guest-physical address far above the 256 MiB of RAM and every BAR the harness assigns:
#: unassigned memory, which QEMU can only reach through a bounce buffer of one page at a time.
OUTSIDE_RAM = 0x40_0000_0000
PAGE = PAGE_SIZE


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give QEMU's main loop some turns to do anything it would do."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vm.qtest.readl(0)


@dataclass(frozen=True)
class Payload:
    """One buffer of the device's request: where, how long, and whether device-writable."""

    addr: int
    len: int
    writable: bool

    @property
    def split_flags(self) -> int:
        return DESC_F.WRITE.mask if self.writable else 0

    def split(self, *, next_slot: int | None = None) -> SplitDesc:
        """As a split descriptor, chained to ``next_slot`` when given."""
        if next_slot is None:
            return SplitDesc(self.addr, self.len, self.split_flags)
        return SplitDesc(self.addr, self.len, self.split_flags | DESC_F.NEXT.mask, next_slot)

    def packed(self) -> PackedDesc:
        """As a packed descriptor (AVAIL/USED and NEXT are added where it is laid out)."""
        return PackedDesc(self.addr, self.len, 0, PACKED_F.WRITE.mask if self.writable else 0)


class Hostile:
    """One queue of a device at DRIVER_OK (queue 0 unless told), for hand-built chains (one
    queue's worth, no slot used twice)."""

    def __init__(self, vm: Machine, drv: VirtioDriver, queue: int = 0) -> None:
        self.vm = vm
        self.drv = drv
        self.queue = queue
        vq = drv.queues[queue]
        assert isinstance(vq, SplitVirtqueue | PackedVirtqueue)
        self.vq = vq
        self.size = vq.size
        self.packed = isinstance(vq, PackedVirtqueue)
        self._next_slot, self._wrap = (vq.next_avail, vq.avail_wrap) if isinstance(vq, PackedVirtqueue) else (0, 1)
        self.legacy = not drv.has("VERSION_1")

    # -- buffers ----------------------------------------------------------------------------

    def payload(self) -> Payload:
        """A fresh, valid payload buffer of the device's request (filled with FILL)."""
        if isinstance(self.drv, VirtioRng):
            addr = self.vm.memory.alloc(16, 16, tag="hostile payload")
            self.vm.qtest.memset(addr, 16, FILL)
            return Payload(addr, 16, True)
        assert isinstance(self.drv, VirtioBalloon)
        pfns = encode_pfns([OUTSIDE_RAM])
        addr = self.vm.memory.alloc(len(pfns), 16, tag="hostile pfn")
        self.vm.qtest.memwrite(addr, pfns)
        return Payload(addr, len(pfns), False)

    def table(self, descs: Sequence[SplitDesc | PackedDesc]) -> tuple[int, int]:
        """An indirect table in guest RAM: (address, length in bytes)."""
        raw = b"".join(d.pack() for d in descs)
        addr = self.vm.memory.alloc(len(raw), 16, tag="hostile indirect table")
        self.vm.qtest.memwrite(addr, raw)
        return addr, len(raw)

    def straddling_ram_end(self, length: int, align: int = 16) -> int:
        """An ``align``-aligned address whose ``length`` bytes start in the last ``align`` bytes
        of RAM and run past its end (QEMU maps guest memory one region at a time: such a range
        cannot be mapped as one piece)."""
        assert length > align, f"{length} bytes at {align} bytes before the end of RAM stay inside it"
        addr = self.vm.memory.end - align
        assert self.vm.memory.owner(addr) is None, "the allocator reached the end of RAM"
        return addr

    # -- split rings ------------------------------------------------------------------------

    @property
    def split_vq(self) -> SplitVirtqueue:
        assert isinstance(self.vq, SplitVirtqueue)
        return self.vq

    def slot(self, n: int) -> int:
        """The n-th descriptor slot counted from the top of the table (the library's last)."""
        return self.size - 1 - n

    def publish_split(self, head: int, descs: dict[int, SplitDesc]) -> None:
        """Descriptors written, ``head`` made available (avail.idx moved by one), notified."""
        publish_by_hand(self.split_vq, head, descs)
        self.drv.transport.notify(self.queue)

    def move_avail_idx(self, by: int) -> None:
        """avail.idx moved by ``by`` in one step, whatever the ring holds, then notified (the
        driver's own index moves with it: what it publishes next goes after)."""
        vq = self.split_vq
        vq.flush()
        vq.published_by_hand(by)
        SplitRing.of(vq).set_avail_idx(vq.avail_idx)
        self.drv.transport.notify(self.queue)

    # -- packed rings -----------------------------------------------------------------------

    def publish_packed(self, descs: Sequence[PackedDesc], *, endless: bool = False) -> None:
        """Descriptors laid out from the next slot, each with the AVAIL/USED bits of its lap,
        NEXT on all but the last (``endless``: on the last too); the head's flags written last
        (§2.8.6); then notified."""
        assert isinstance(self.vq, PackedVirtqueue)
        self.vq.flush()
        ring = PackedRing.of(self.vq)
        head_slot, head_flags = self._next_slot, 0
        for i, d in enumerate(descs):
            more = endless or i + 1 < len(descs)
            flags = available_flags(self._wrap, writable=bool(d.flags & PACKED_F.WRITE.mask), more=more)
            flags |= d.flags & PACKED_F.INDIRECT.mask
            if i == 0:
                head_flags = flags
                ring.write_desc(self._next_slot, PackedDesc(d.addr, d.len, d.id, 0))
            else:
                ring.write_desc(self._next_slot, PackedDesc(d.addr, d.len, d.id, flags))
            self._next_slot += 1
            if self._next_slot == self.size:
                self._next_slot, self._wrap = 0, self._wrap ^ 1
        ring.set_flags(head_slot, head_flags)
        self.drv.transport.notify(self.queue)

    # -- chains the device takes -----------------------------------------------------------

    def take_used(self, count: int = 1) -> list[tuple[int, int]]:
        """The next ``count`` used elements of hand-built chains, (id, len) each, in the order
        the device wrote them; the library's queue is moved past them so it can go on."""
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + SHORT
        while len(out) < count:
            entry = self._poll_used()
            if entry is not None:
                out.append(entry)
                continue
            status = self.drv.transport.get_status()
            assert not status & STATUS.DEVICE_NEEDS_RESET.mask, f"the device gave up (status {status:#x})"
            assert time.monotonic() < deadline, f"{len(out)} of {count} chains used within {SHORT} s"
        if isinstance(self.vq, PackedVirtqueue):  # the driver's next slot is where the hand left off
            self.vq.next_avail, self.vq.avail_wrap = self._next_slot, self._wrap
            self.vq.kicked_avail, self.vq.kicked_wrap = self._next_slot, self._wrap
        return out

    def _poll_used(self) -> tuple[int, int] | None:
        """Packed: every hand-built chain taken here is one slot (one buffer, or one indirect
        descriptor), so the next used descriptor is one slot on (§2.8.6)."""
        if isinstance(self.vq, SplitVirtqueue):
            return take_used_by_hand(self.vq)
        vq = self.vq
        desc = PackedRing.of(vq).read_desc(vq.next_used)
        used = bool(desc.flags & PACKED_F.USED.mask)
        if used != bool(vq.used_wrap) or bool(desc.flags & PACKED_F.AVAIL.mask) != used:
            return None
        vq.next_used += 1
        if vq.next_used == vq.size:
            vq.next_used, vq.used_wrap = 0, vq.used_wrap ^ 1
        return desc.id, desc.len

    # -- what the device must do ------------------------------------------------------------

    def clear_notifications(self) -> None:
        """Forget configuration change notifications so far (MSI-X mailbox, or the ISR bit)."""
        self.config_notified()

    def config_notified(self) -> bool:
        """Whether a configuration change notification came (and clear it): the MSI-X config
        vector, or the ISR's config bit (§4.1.4.5)."""
        if self.drv.msix is not None:
            return self.drv.msix.fired(0)
        return bool(self.drv.transport.read_isr() & ISR.config_change.mask)

    def used_idx(self) -> int:
        """The device's used index for the queue, as QEMU holds it (QMP)."""
        return queue_view(self.vm, self.drv.dev_id, self.queue).used_idx

    def expect_said(self, why: str, message: str) -> None:
        """QEMU's diagnostic names the flaw the layout has (not another one it tripped on)."""
        tail = self.vm.stderr_tail(50)
        assert message in tail, f"{why}: QEMU did not say {message!r}; its stderr ends: {tail[-300:]!r}"

    def expect_given_up(self, why: str, *, used_before: int = 0) -> None:
        """The device gave up on the queue: status (modern) or QMP (legacy) says so, the
        config change notification came (modern only), nothing was used, and a valid chain
        made available afterwards is left alone."""
        status = self._wait_given_up(why)
        view = device_view(self.vm, self.drv.dev_id)
        assert view.broken, f"{why}: status {status:#x} but QEMU does not call the device broken"
        if self.legacy:
            assert not status & STATUS.DEVICE_NEEDS_RESET.mask, f"{why}: legacy status {status:#x}"
            assert not self.config_notified(), f"{why}: a legacy device sent a config change notification"
        else:
            assert self.config_notified(), (
                f"{why}: DEVICE_NEEDS_RESET set while DRIVER_OK is, but no configuration change "
                "notification (§2.1.2 MUST)"
            )
        assert self.used_idx() == used_before, f"{why}: the device used a buffer of the broken chain"
        self._expect_valid_chain_ignored(why, used_before)

    def _wait_given_up(self, why: str) -> int:
        deadline = time.monotonic() + SHORT
        while True:
            status = self.drv.transport.get_status()
            if status & STATUS.DEVICE_NEEDS_RESET.mask:
                return status
            if self.legacy and device_view(self.vm, self.drv.dev_id).broken:
                return status
            if time.monotonic() > deadline:
                tail = self.vm.stderr_tail().strip().splitlines()[-1:]
                raise AssertionError(
                    f"{why}: the device did not give up within {SHORT} s (status {status:#x}, "
                    f"{'legacy: no NEEDS_RESET bit, QMP broken=False' if self.legacy else 'no DEVICE_NEEDS_RESET'}); "
                    f"QEMU said: {tail}"
                )

    def _expect_valid_chain_ignored(self, why: str, used_before: int) -> None:
        p = self.payload()
        if self.packed:
            self.publish_packed([p.packed()])
        else:
            self.publish_split(0, {0: p.split()})  # slot 0: the hostile chains take the top ones
        quiet(self.vm)
        assert self.used_idx() == used_before, f"{why}: a broken device went on using the queue"
        if p.writable:
            assert self.vm.qtest.memread(p.addr, p.len) == bytes([FILL]) * p.len, f"{why}: buffer written"

    def recover(self) -> None:
        """Reset and initialize again: the device serves a request (§2.4: reset clears the
        error state; §3.1.1)."""
        self.drv.reset()
        assert self.drv.transport.get_status() == 0
        assert not device_view(self.vm, self.drv.dev_id).broken, "still broken after a reset"
        self.drv.initialize()
        if isinstance(self.drv, VirtioRng):
            assert len(self.drv.request(16, timeout=SHORT)) >= 1
        else:
            assert isinstance(self.drv, VirtioBalloon)
            self.drv.inflate(1, update_actual=False, timeout=SHORT)
        self.drv.check_status()
