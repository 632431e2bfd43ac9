"""Guest RAM allocator: pure logic without QEMU, and zeroing against real QEMU."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.memory import LOW_RAM_LIMIT, RAM_START, GuestMemory, GuestMemoryLeak, OutOfGuestMemory
from qtest_virtio.testing import FakeQtest


def mem(ram: int = 16 << 20) -> GuestMemory:
    """The allocator only touches guest memory to zero it; these tests never ask it to, and the
    fake bus holds no RAM where the allocator hands out addresses, so any access would raise."""
    return GuestMemory(FakeQtest(4096), ram)


def test_range_skips_first_mib_and_stops_below_the_pci_hole() -> None:
    m = mem(256 << 20)
    assert (m.start, m.end) == (RAM_START, 256 << 20)
    assert mem(4 << 30).end == LOW_RAM_LIMIT
    with pytest.raises(ValueError):
        mem(1 << 20)


@pytest.mark.parametrize("align", [1, 16, 4096, 1 << 16])
def test_alignment(align: int) -> None:
    m = mem()
    m.alloc(3)
    a = m.alloc(100, align)
    assert a % align == 0 and a >= RAM_START


def test_no_overlap_and_free_coalesces() -> None:
    m = mem()
    total = m.free_bytes
    blocks = [m.alloc(size, 64) for size in (10, 4096, 77, 1 << 16, 1)]
    spans = sorted((a.addr, a.addr + a.size) for a in m.allocations)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    for b in blocks[::2] + blocks[1::2]:  # free out of order
        m.free(b)
    assert m.free_bytes == total
    assert len(m._free) == 1  # fully coalesced back into one region
    assert m.alloc(total) == RAM_START  # the whole range fits again


def test_errors_name_the_problem() -> None:
    m = mem(2 << 20)
    with pytest.raises(OutOfGuestMemory, match="no free guest RAM"):
        m.alloc(2 << 20)
    with pytest.raises(ValueError, match="power of two"):
        m.alloc(8, align=3)
    with pytest.raises(ValueError, match="positive"):
        m.alloc(0)
    a = m.alloc(8)
    m.free(a)
    with pytest.raises(ValueError, match="double free"):
        m.free(a)


def test_leak_check_lists_owner_and_tag() -> None:
    m = mem()
    a = m.alloc(32, tag="avail ring")
    owner = m.owner(a + 5)
    assert owner is not None and owner.tag == "avail ring"
    with pytest.raises(GuestMemoryLeak, match=r"1 guest allocation.*avail ring from test_memory.py:\d+"):
        m.check_leaks()
    m.free(a)
    m.check_leaks()


def test_zeroed_allocation_in_real_guest_ram(machine_factory: Callable[..., Machine]) -> None:
    vm = machine_factory(MachineSpec(memory="64M"))
    m = vm.memory
    assert m.end == 64 << 20
    a = m.alloc(4096, 4096)
    vm.qtest.memset(a, 4096, 0xAB)
    m.free(a)
    b = m.alloc(4096, 4096, zero=True)
    assert b == a
    assert vm.qtest.memread(b, 4096) == bytes(4096)
