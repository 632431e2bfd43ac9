"""A hostile driver (virtio 1.2 §2.1.2): chains that break one descriptor rule each, and the
device's answer. The device SHOULD set DEVICE_NEEDS_RESET when it enters an error state that
needs a reset, and once DRIVER_OK is set it MUST then send a configuration change notification;
it must not crash, must stop using the queue, and a reset brings it back (``_hostile``).

Two devices, because QEMU finds a broken chain in two places: virtio-rng sizes a request with
``virtqueue_get_avail_bytes`` before it pops anything, virtio-balloon pops straight away
(``virtqueue_pop``). Each runs the layouts its own path rejects. The flaws only
``virtqueue_pop`` sees (a zero-length buffer, a buffer outside guest RAM, an indirect table past
QEMU's 1024 buffers, a device-writable buffer before a device-readable one) pass virtio-rng's
sizing and reach the same pop as on virtio-balloon, where on a packed ring virtio-rng then
spins for good (reproducer ``virtio-rng-packed-zero-length-livelock.qtest``): they run on
virtio-balloon only.

Layouts that need a field one ring format does not have run on that ring alone: a ``next``
index (out of the table, or looping inside an indirect table) and the available ring's index
and entries exist only in split rings (§2.7.5, §2.7.6); packed chains run in ring order
(§2.8.6), so their loop is a chain longer than the ring.

On the legacy layout (no VERSION_1) there is no DEVICE_NEEDS_RESET: QEMU marks the device
broken, says nothing to the driver, and otherwise behaves the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import RngFifo
from qtest_virtio.devices.balloon.encoding import STATSQ
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.testing import MODERN_LAYOUT_MODES, PackedDesc, SplitDesc, pattern
from qtest_virtio.transport import DeviceNeedsReset
from qtest_virtio.virtqueue.layout import (
    DESC_F,
    EVENT_SUPPRESS,
    PACKED_DESC,
    PACKED_F,
    SPLIT_DESC,
    avail_ring_size,
    used_ring_size,
)

from ._hostile import FILL, OUTSIDE_RAM, PAGE, SHORT, Hostile, Payload


@dataclass(frozen=True)
class Case:
    """One broken layout: its conformance id, what it breaks, and how it is laid out."""

    conformance: pytest.MarkDecorator  # the requirement: §2.1.2 for every layout
    breaks: str  # the driver rule, with its section
    said: str  # what QEMU reports (7.2 to 10.2 alike), so the scenario knows which flaw it hit
    split: Callable[[Hostile], None] | None = None
    packed: Callable[[Hostile], None] | None = None
    indirect: bool = False

    @property
    def name(self) -> str:
        return str(self.conformance.args[0]).removeprefix("vq-hostile-")

    def lay_out(self, h: Hostile) -> None:
        build = self.packed if h.packed else self.split
        assert build is not None, f"{self.name} has no {'packed' if h.packed else 'split'} layout"
        build(h)


# -- the layouts -----------------------------------------------------------------------------


def _split_loop(h: Hostile) -> None:
    a, b = h.slot(0), h.slot(1)
    p = h.payload()
    h.publish_split(a, {a: p.split(next_slot=b), b: p.split(next_slot=a)})


def _packed_longer_than_ring(h: Hostile) -> None:
    p = h.payload().packed()
    h.publish_packed([p] * h.size, endless=True)


def _split_next_out_of_table(h: Hostile) -> None:
    a = h.slot(0)
    h.publish_split(a, {a: h.payload().split(next_slot=h.size)})


def _split_head_out_of_table(h: Hostile) -> None:
    h.publish_split(h.size, {})


def _split_avail_idx_jump(h: Hostile) -> None:
    h.move_avail_idx(h.size + 1)


def _indirect_entries(h: Hostile, n: int) -> list[SplitDesc] | list[PackedDesc]:
    ps = [h.payload() for _ in range(n)]
    if h.packed:
        return [p.packed() for p in ps]
    return [p.split(next_slot=i + 1) for i, p in enumerate(ps[:-1])] + [ps[-1].split()]


def _indirect_head(h: Hostile, addr: int, length: int) -> None:
    if h.packed:
        h.publish_packed([PackedDesc(addr, length, 0, PACKED_F.INDIRECT.mask)])
    else:
        a = h.slot(0)
        h.publish_split(a, {a: SplitDesc(addr, length, DESC_F.INDIRECT.mask)})


def _indirect_bad_length(h: Hostile) -> None:
    addr, length = h.table(_indirect_entries(h, 2))
    _indirect_head(h, addr, length - 8)  # one and a half descriptors


def _indirect_unmappable(h: Hostile) -> None:
    _indirect_head(h, h.straddling_ram_end(32), 32)


def _split_indirect_loop(h: Hostile) -> None:
    p, q = h.payload(), h.payload()
    addr, length = h.table([p.split(next_slot=1), q.split(next_slot=0)])
    _indirect_head(h, addr, length)


def _zero_length(h: Hostile) -> None:
    p = h.payload()
    if h.packed:
        h.publish_packed([PackedDesc(p.addr, 0, 0, p.packed().flags)])
    else:
        a = h.slot(0)
        h.publish_split(a, {a: SplitDesc(p.addr, 0, p.split_flags)})


def _outside_ram(h: Hostile) -> None:
    """Two pages of unassigned memory: more than QEMU's one-page bounce buffer can stand for."""
    flags = DESC_F.WRITE.mask if h.payload().writable else 0
    if h.packed:
        h.publish_packed([PackedDesc(OUTSIDE_RAM, 2 * PAGE, 0, flags)])
    else:
        a = h.slot(0)
        h.publish_split(a, {a: SplitDesc(OUTSIDE_RAM, 2 * PAGE, flags)})


def _indirect_too_long(h: Hostile) -> None:
    """One entry more than QEMU's limit of 1024 buffers a request (VIRTQUEUE_MAX_SIZE)."""
    p = h.payload()
    n = 1025
    if h.packed:
        entries: list[SplitDesc] | list[PackedDesc] = [p.packed()] * n
    else:
        entries = [p.split(next_slot=i + 1) for i in range(n - 1)] + [p.split()]
    addr, length = h.table(entries)
    _indirect_head(h, addr, length)


def _writable_first(h: Hostile) -> None:
    readable = h.payload()
    assert not readable.writable, "a device whose requests are device-readable"
    out = h.vm.memory.alloc(16, 16, tag="hostile writable")
    if h.packed:
        h.publish_packed([PackedDesc(out, 16, 0, PACKED_F.WRITE.mask), readable.packed()])
    else:
        a, b = h.slot(0), h.slot(1)
        h.publish_split(a, {a: SplitDesc(out, 16, DESC_F.WRITE.mask | DESC_F.NEXT.mask, b), b: readable.split()})


LOOP = Case(
    pytest.mark.conformance("vq-hostile-descriptor-loop", spec="2.1.2"),
    "loops in a chain (§2.7.5.2), a list longer than the queue size (§2.8.17)",
    "Looped descriptor",
    _split_loop,
    _packed_longer_than_ring,
)
INDIRECT_BAD_LENGTH = Case(
    pytest.mark.conformance("vq-hostile-indirect-table-length", spec="2.1.2"),
    "an indirect table is whole descriptors (§2.7.5.3, §2.8.7)",
    "Invalid size for indirect buffer table",
    _indirect_bad_length,
    _indirect_bad_length,
    indirect=True,
)
INDIRECT_UNMAPPABLE = Case(
    pytest.mark.conformance("vq-hostile-indirect-table-outside-ram", spec="2.1.2"),
    "an indirect table is guest memory (§2.7.5.3, §2.8.7): this one runs past the end of RAM",
    "Cannot map indirect buffer",
    _indirect_unmappable,
    _indirect_unmappable,
    indirect=True,
)
NEXT_OUT_OF_TABLE = Case(
    pytest.mark.conformance("vq-hostile-next-outside-table", spec="2.1.2"),
    "next names a descriptor of the table (§2.7.5)",
    "Desc next is",
    _split_next_out_of_table,
)
HEAD_OUT_OF_TABLE = Case(
    pytest.mark.conformance("vq-hostile-avail-head-outside-table", spec="2.1.2"),
    "a ring entry names the head of a chain in the table (§2.7.6)",
    "is available",
    _split_head_out_of_table,
)
AVAIL_IDX_JUMP = Case(
    pytest.mark.conformance("vq-hostile-avail-idx-jump", spec="2.1.2"),
    "at most Queue Size buffers are in the queue (§2.7, §2.7.6): idx moved by size + 1",
    "Guest moved used index",
    _split_avail_idx_jump,
)
INDIRECT_LOOP = Case(
    pytest.mark.conformance("vq-hostile-indirect-loop", spec="2.1.2"),
    "no loop in a chain (§2.7.5.2), here inside an indirect table (§2.7.5.3)",
    "Looped descriptor",
    _split_indirect_loop,
    indirect=True,
)
ZERO_LENGTH = Case(
    pytest.mark.conformance("vq-hostile-zero-length-buffer", spec="2.1.2"),
    "a buffer of no bytes (no rule allows or forbids one; QEMU takes it for an error)",
    "zero sized buffers are not allowed",
    _zero_length,
    _zero_length,
)
OUTSIDE_RAM_CASE = Case(
    pytest.mark.conformance("vq-hostile-buffer-outside-ram", spec="2.1.2"),
    "addr is a guest-physical address (§2.7.5, §2.8.13): two pages far past RAM",
    "bogus descriptor or out of resources",
    _outside_ram,
    _outside_ram,
)
INDIRECT_TOO_LONG = Case(
    pytest.mark.conformance("vq-hostile-indirect-table-too-long", spec="2.1.2"),
    "a chain no longer than the queue size, indirect ones too (§2.7.5.3.1, §2.8.19): 1025 entries",
    "too many write descriptors in indirect table",
    _indirect_too_long,
    _indirect_too_long,
    indirect=True,
)
WRITABLE_FIRST = Case(
    pytest.mark.conformance("vq-hostile-writable-before-readable", spec="2.1.2"),
    "device-writable elements after the device-readable ones (§2.7.4.2, §2.8.17)",
    "Incorrect order for descriptors",
    _writable_first,
    _writable_first,
)


def params(cases: Sequence[Case]) -> list[object]:
    return [pytest.param(c, id=c.name, marks=c.conformance) for c in cases]


def run(case: Case, drv: VirtioDriver, vm: Machine) -> None:
    """Lay the broken chain out; the device gives up on it; a reset brings it back."""
    if case.indirect and not drv.has("INDIRECT_DESC"):
        pytest.skip("INDIRECT_DESC is not negotiated in this run: a driver may not use indirect tables")
    h = Hostile(vm, drv)
    h.clear_notifications()
    used_before = h.used_idx()
    case.lay_out(h)
    why = f"{case.name} ({case.breaks})"
    h.expect_given_up(why, used_before=used_before)
    h.expect_said(why, case.said)
    h.recover()


# -- virtio-rng: found while sizing the request (virtqueue_get_avail_bytes) --------------------


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, queue_size=16)
@pytest.mark.parametrize("case", params([LOOP, INDIRECT_BAD_LENGTH, INDIRECT_UNMAPPABLE]))
def test_rng_gives_up_on_a_broken_chain(virtio_device: VirtioDriver, qemu: Machine, case: Case) -> None:
    """A chain the device cannot follow: DEVICE_NEEDS_RESET and a config change notification
    (modern), the device broken (legacy); nothing used until reset and re-initialized."""
    run(case, virtio_device, qemu)


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, queue_size=16, rings=("split",))
@pytest.mark.parametrize("case", params([NEXT_OUT_OF_TABLE, INDIRECT_LOOP, HEAD_OUT_OF_TABLE, AVAIL_IDX_JUMP]))
def test_rng_gives_up_on_a_broken_split_ring(virtio_device: VirtioDriver, qemu: Machine, case: Case) -> None:
    """The same for what only a split ring can get wrong: a next index or an available ring
    entry outside the table, a loop inside an indirect table, avail.idx moved past a queue."""
    run(case, virtio_device, qemu)


# -- virtio-balloon: found while popping the request (virtqueue_pop) --------------------------


@pytest.mark.virtio_device("virtio-balloon-pci", refuse_each=False, queue_size=16)
@pytest.mark.parametrize(
    "case",
    params(
        [
            LOOP,
            INDIRECT_BAD_LENGTH,
            INDIRECT_UNMAPPABLE,
            INDIRECT_TOO_LONG,
            ZERO_LENGTH,
            OUTSIDE_RAM_CASE,
            WRITABLE_FIRST,
        ]
    ),
)
def test_balloon_gives_up_on_a_broken_chain(virtio_device: VirtioDriver, qemu: Machine, case: Case) -> None:
    """A chain the device cannot take as a request, found as it pops it: the device gives up
    on the queue as above."""
    run(case, virtio_device, qemu)


@pytest.mark.virtio_device("virtio-balloon-pci", refuse_each=False, queue_size=16, rings=("split",))
@pytest.mark.parametrize("case", params([NEXT_OUT_OF_TABLE, INDIRECT_LOOP, HEAD_OUT_OF_TABLE]))
def test_balloon_gives_up_on_a_broken_split_ring(virtio_device: VirtioDriver, qemu: Machine, case: Case) -> None:
    """The split-ring-only layouts, found as the device pops them."""
    run(case, virtio_device, qemu)


# -- rings the device cannot map (virtio_init_region_cache) ---------------------------------

#: Each queue area, its alignment (§2.7, §2.8.10.1) and what QEMU's report of it says: "Cannot
#: map desc" up to 10.0, "Failed to map descriptor ring for device ..." in 10.2 (its "avalaible"
#: spelt so), hence the words both have.
AREAS = {"desc": (16, "map desc"), "driver": (2, "map ava"), "device": (4, "map used")}


def _rings_outside_ram(drv: VirtioDriver, vm: Machine, monkeypatch: pytest.MonkeyPatch, area: str) -> None:
    """Initialize again with one area of queue 0 starting just before the end of RAM and
    running past it: the device gives up when the queue is enabled, before DRIVER_OK (so no
    configuration change notification is due, §2.1.2), and the driver sees DEVICE_NEEDS_RESET
    once it sets DRIVER_OK (§3.1.1 step 8). A reset and a proper layout bring it back."""
    h = Hostile(vm, drv)
    align, said = AREAS[area]
    index = list(AREAS).index(area)
    setup_queue = drv.transport.setup_queue

    def misplaced(queue: int, size: int, desc: int, driver: int, device: int) -> None:
        where = [desc, driver, device]
        if queue == 0:
            if h.packed:
                sizes = [PACKED_DESC.size * size, EVENT_SUPPRESS.size, EVENT_SUPPRESS.size]
            else:
                sizes = [SPLIT_DESC.size * size, avail_ring_size(size), used_ring_size(size)]
            where[index] = h.straddling_ram_end(sizes[index], align)
        setup_queue(queue, size, *where)

    drv.reset()
    with monkeypatch.context() as m:
        m.setattr(drv.transport, "setup_queue", misplaced)
        with pytest.raises(DeviceNeedsReset):
            drv.initialize()
    why = f"queue 0's {area} area runs past the end of RAM (each part is in guest memory, §2.7, §2.8.10.1)"
    assert device_view(vm, drv.dev_id).broken, f"{why}: QEMU does not call the device broken"
    h.expect_said(why, said)
    h.recover()


@pytest.mark.conformance("vq-hostile-ring-outside-ram", spec="2.1.2")
@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, queue_size=16, transports=MODERN_LAYOUT_MODES)
def test_rng_gives_up_on_a_descriptor_area_outside_ram(
    virtio_device: VirtioDriver, qemu: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The descriptor table (split) or ring (packed) runs past the end of RAM. Modern layouts
    only: the legacy layout puts the parts in one block from a page frame number, with the
    used ring on a page boundary (§2.7.2), so no part can straddle the (page-aligned) end of
    RAM, and QEMU takes a block wholly outside RAM for memory it cannot tell from RAM."""
    _rings_outside_ram(virtio_device, qemu, monkeypatch, "desc")


@pytest.mark.conformance("vq-hostile-ring-outside-ram", spec="2.1.2")
@pytest.mark.virtio_device(
    "virtio-rng-pci", refuse_each=False, queue_size=16, transports=MODERN_LAYOUT_MODES, rings=("split",)
)
@pytest.mark.parametrize("area", ["driver", "device"])
def test_rng_gives_up_on_a_split_ring_area_outside_ram(
    virtio_device: VirtioDriver, qemu: Machine, monkeypatch: pytest.MonkeyPatch, area: str
) -> None:
    """The available or the used ring runs past the end of RAM. Split rings only: a packed
    ring's driver and device areas are 4 bytes, 4-aligned (§2.8.10.1), and cannot straddle it."""
    _rings_outside_ram(virtio_device, qemu, monkeypatch, area)


# -- layouts QEMU does not take for errors ----------------------------------------------------
#
# A driver must not put INDIRECT inside an indirect table, nor INDIRECT and NEXT on one
# descriptor (§2.7.5.3.1, §2.8.19), but no device requirement says what then: QEMU follows the
# one table it was given and goes on. For packed rings §2.8.7 does say it: flags other than
# WRITE in an indirect table are reserved and ignored by the device.


def _nested_indirect(h: Hostile, fifo: RngFifo) -> None:
    """An indirect table whose one entry is flagged INDIRECT (and WRITE), pointing at a second
    table: the device takes the entry for a plain device-writable buffer, so the entropy lands
    in the second table and the buffer that table names is never written."""
    inner = h.payload()
    inner_table, inner_len = h.table([inner.packed() if h.packed else inner.split()])
    nested = Payload(inner_table, inner_len, True)
    if h.packed:
        entry: SplitDesc | PackedDesc = PackedDesc(
            nested.addr, nested.len, 0, PACKED_F.WRITE.mask | PACKED_F.INDIRECT.mask
        )
    else:
        entry = SplitDesc(nested.addr, nested.len, DESC_F.WRITE.mask | DESC_F.INDIRECT.mask)
    before = h.vm.qtest.memread(inner_table, inner_len)
    outer, outer_len = h.table([entry])
    data = pattern(inner_len, seed=7)
    fifo.write(data)
    _indirect_head(h, outer, outer_len)
    ((used_id, length),) = h.take_used()
    assert used_id == (0 if h.packed else h.slot(0))
    assert 1 <= length <= inner_len
    written = h.vm.qtest.memread(inner_table, inner_len)
    assert written[:length] == data[:length], f"the entry was not used as a buffer: {before.hex()} -> {written.hex()}"
    assert h.vm.qtest.memread(inner.addr, inner.len) == bytes([FILL]) * inner.len, "a nested table was followed"


@pytest.mark.conformance("vq-packed-indirect-entry-flags-ignored", spec="2.8.7")
@pytest.mark.virtio_device(
    "virtio-rng-pci",
    refuse_each=False,
    queue_size=16,
    rings=("packed",),
    transports=MODERN_LAYOUT_MODES,
    backend="fifo",
)
@pytest.mark.virtio_requires("INDIRECT_DESC")
def test_packed_indirect_flag_inside_a_table_is_ignored(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """In a packed indirect table only WRITE is a valid flag; the others are reserved and
    ignored by the device (§2.8.7): an entry flagged INDIRECT is a plain buffer, and the
    queue goes on working."""
    h = Hostile(qemu, virtio_device)
    _nested_indirect(h, qemu.backend(virtio_device.dev_id, RngFifo))
    _still_working(h)


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, queue_size=16, rings=("split",), backend="fifo")
@pytest.mark.virtio_requires("INDIRECT_DESC")
def test_split_nested_indirect_table_is_not_followed(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """Regression (QEMU's behaviour; the driver broke §2.7.5.3.1): in a split indirect table an
    entry flagged INDIRECT is a plain buffer too, not an error, and the queue goes on working."""
    h = Hostile(qemu, virtio_device)
    _nested_indirect(h, qemu.backend(virtio_device.dev_id, RngFifo))
    _still_working(h)


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, queue_size=16, backend="fifo")
@pytest.mark.virtio_requires("INDIRECT_DESC")
def test_indirect_descriptor_with_next(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """Regression (QEMU's behaviour; the driver broke §2.7.5.3.1 / §2.8.19): a descriptor with
    both INDIRECT and NEXT. The device follows the table and ends the chain there. On a split
    ring the descriptor NEXT names is never looked at; on a packed ring the next slot, made
    available after it, is the head of a chain of its own and is used as one."""
    h = Hostile(qemu, virtio_device)
    fifo = qemu.backend(virtio_device.dev_id, RngFifo)
    tabled, extra = h.payload(), h.payload()
    data = pattern(2 * tabled.len, seed=9)
    fifo.write(data)
    if h.packed:
        table, length = h.table([tabled.packed()])
        h.publish_packed(
            [
                PackedDesc(table, length, 0, PACKED_F.INDIRECT.mask),
                PackedDesc(extra.addr, extra.len, 1, PACKED_F.WRITE.mask),
            ]
        )
        (first_id, first_len), (second_id, second_len) = h.take_used(2)
        assert (first_id, second_id) == (0, 1), "the slot after the indirect one was not a chain of its own"
        assert first_len == tabled.len and second_len == extra.len
        assert h.vm.qtest.memread(extra.addr, extra.len) == data[tabled.len :]
    else:
        table, length = h.table([tabled.split()])
        a, b = h.slot(0), h.slot(1)
        flags = DESC_F.INDIRECT.mask | DESC_F.NEXT.mask
        h.publish_split(a, {a: SplitDesc(table, length, flags, b), b: extra.split()})
        ((used_id, used_len),) = h.take_used()
        assert used_id == a and 1 <= used_len <= tabled.len
        assert h.vm.qtest.memread(extra.addr, extra.len) == bytes([FILL]) * extra.len, "NEXT was followed"
    assert h.vm.qtest.memread(tabled.addr, 1) == data[:1]
    _still_working(h)


def _still_working(h: Hostile) -> None:
    """Not an error: no DEVICE_NEEDS_RESET, not broken, and the driver's next request is served."""
    h.drv.check_status()
    assert not device_view(h.vm, h.drv.dev_id).broken
    assert isinstance(h.drv, VirtioRng)
    h.vm.backend(h.drv.dev_id, RngFifo).write(pattern(8))
    assert len(h.drv.request(8, timeout=SHORT)) >= 1


# -- more buffers than the queue holds ----------------------------------------------------------


@pytest.mark.conformance("vq-hostile-more-buffers-than-queue-size", spec="2.1.2")
@pytest.mark.virtio_device("virtio-balloon-pci", refuse_each=False, queue_size=1, transports=MODERN_LAYOUT_MODES)
@pytest.mark.virtio_requires("STATS_VQ")
def test_balloon_gives_up_on_more_buffers_than_the_queue_holds(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """At most Queue Size buffers are in a queue (§2.7, §2.8): with 1-entry queues, the device
    holds the driver's statistics buffer until it wants statistics (§5.5.6.3), and a second
    buffer made available on the statsq (its one descriptor slot named again) is one too many.
    Modern layouts only: the legacy layout has no queue size to choose (§4.1.4.10), and at the
    device's 128 the balloon never holds more than that one buffer."""
    drv = virtio_device
    h = Hostile(qemu, drv, queue=STATSQ)
    deadline = time.monotonic() + SHORT
    while queue_view(qemu, drv.dev_id, STATSQ).inuse != 1:  # the device took the first buffer
        assert time.monotonic() < deadline, "the device never took the driver's statistics buffer"
    h.clear_notifications()
    used_before = h.used_idx()
    p = h.payload()
    if h.packed:
        h.publish_packed([p.packed()])
    else:
        h.publish_split(0, {})  # the slot of the buffer the device holds
    why = "more buffers than the queue size (§2.7, §2.8)"
    h.expect_given_up(why, used_before=used_before)
    h.expect_said(why, "Virtqueue size exceeded")
    h.recover()
