"""Guest RAM allocator: aligned alloc and free over the RAM below the PCI hole, with a leak check.

No firmware runs, so nobody else owns guest RAM: the harness places rings, buffers and MSI-X
mailboxes itself. The first MiB is left alone (real-mode area; 0xA0000-0xFFFFF is VGA and the
PAM-shadowed BIOS, where writes do not stick).
"""

from __future__ import annotations

import bisect
import os
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from .errors import QtestVirtioError

RAM_START = 1 << 20
#: Highest RAM address below 4 GiB on both pc and q35, whatever -m says (q35 puts its ECAM
#: window at 0xB0000000 and ends low RAM there).
LOW_RAM_LIMIT = 0xB000_0000
PAGE_SIZE = 4096


class WriteBatch(Protocol):
    """Writes queued and sent in order by :meth:`flush` (``qtest.CommandBatch``): the rings
    publish through one so descriptors land before the index that makes them available
    (virtio 1.2 §2.7.13)."""

    def __len__(self) -> int: ...
    def writeb(self, addr: int, value: int) -> None: ...
    def writew(self, addr: int, value: int) -> None: ...
    def writel(self, addr: int, value: int) -> None: ...
    def writeq(self, addr: int, value: int) -> None: ...
    def memwrite(self, addr: int, data: bytes) -> None: ...
    def flush(self) -> None: ...


class GuestBus(Protocol):
    """The guest-memory half of the qtest client, all the allocator and the rings call:
    ``qtest.QtestClient`` over QEMU, ``testing.FakeQtest`` over a bytearray (ring unit tests)."""

    def readw(self, addr: int) -> int: ...
    def readl(self, addr: int) -> int: ...
    def readq(self, addr: int) -> int: ...
    def writew(self, addr: int, value: int) -> None: ...
    def writel(self, addr: int, value: int) -> None: ...
    def memread(self, addr: int, size: int) -> bytes: ...
    def memwrite(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...
    def memset(self, addr: int, size: int, value: int = 0) -> None: ...
    def batch(self) -> WriteBatch: ...
    def posting(self) -> AbstractContextManager[None]: ...
    def read_many(self, spans: Iterable[tuple[int, int]]) -> list[bytes]: ...


class OutOfGuestMemory(QtestVirtioError):
    """No free region fits the request."""


class GuestMemoryLeak(QtestVirtioError):
    """Allocations still live at a leak check; the message lists them with their owners."""


@dataclass(frozen=True)
class Allocation:
    addr: int
    size: int
    tag: str
    origin: str


class GuestMemory:
    """First-fit allocator over ``[start, end)`` with coalescing free list."""

    def __init__(self, qtest: GuestBus, ram_bytes: int, *, start: int = RAM_START) -> None:
        self.qtest = qtest
        self.start = start
        self.end = min(ram_bytes, LOW_RAM_LIMIT)
        if self.end <= self.start:
            raise ValueError(f"guest RAM of {ram_bytes:#x} bytes leaves nothing above {start:#x}")
        #: Free regions as sorted, non-adjacent (addr, size) pairs.
        self._free: list[tuple[int, int]] = [(self.start, self.end - self.start)]
        self._used: dict[int, Allocation] = {}

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    @property
    def allocations(self) -> list[Allocation]:
        return sorted(self._used.values(), key=lambda a: a.addr)

    def alloc(self, size: int, align: int = 16, *, tag: str = "", zero: bool = False) -> int:
        """Allocate ``size`` bytes aligned to ``align`` (a power of two); returns the address."""
        if size <= 0:
            raise ValueError(f"allocation size must be positive, not {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        for i, (addr, length) in enumerate(self._free):
            aligned = (addr + align - 1) & ~(align - 1)
            if aligned + size > addr + length:
                continue
            pieces = []
            if aligned > addr:
                pieces.append((addr, aligned - addr))
            if aligned + size < addr + length:
                pieces.append((aligned + size, addr + length - aligned - size))
            self._free[i : i + 1] = pieces
            caller = sys._getframe(1)
            origin = f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno} in {caller.f_code.co_name}"
            self._used[aligned] = Allocation(aligned, size, tag, origin)
            if zero:
                self.qtest.memset(aligned, size, 0)
            return aligned
        raise OutOfGuestMemory(
            f"no free guest RAM for {size:#x} bytes aligned {align:#x} ({self.free_bytes:#x} bytes free, fragmented)"
        )

    def free(self, addr: int) -> None:
        try:
            a = self._used.pop(addr)
        except KeyError:
            raise ValueError(f"{addr:#x} is not an allocated address (double free?)") from None
        i = bisect.bisect_left(self._free, (a.addr, 0))
        self._free.insert(i, (a.addr, a.size))
        # Coalesce with the right, then the left neighbour.
        if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == self._free[i + 1][0]:
            self._free[i] = (self._free[i][0], self._free[i][1] + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    # -- access (little-endian guest words; x86 is the only target here) ----------------------

    def read(self, addr: int, size: int) -> bytes:
        return self.qtest.memread(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.qtest.memwrite(addr, data)

    def read16(self, addr: int) -> int:
        return self.qtest.readw(addr)

    def read32(self, addr: int) -> int:
        return self.qtest.readl(addr)

    def read64(self, addr: int) -> int:
        return self.qtest.readq(addr)

    def write16(self, addr: int, value: int) -> None:
        self.qtest.writew(addr, value)

    def write32(self, addr: int, value: int) -> None:
        self.qtest.writel(addr, value)

    def batch(self) -> WriteBatch:
        """Collect writes and send them pipelined, in order, in one round trip."""
        return self.qtest.batch()

    def posting(self) -> AbstractContextManager[None]:
        """A block whose writes go without waiting for their replies (``QtestClient.posting``)."""
        return self.qtest.posting()

    def read_many(self, spans: Iterable[tuple[int, int]]) -> list[bytes]:
        """Several ``(addr, size)`` buffers in one round trip, in order."""
        return self.qtest.read_many(spans)

    def owner(self, addr: int) -> Allocation | None:
        """The allocation containing ``addr`` (for reports: "this address is the avail ring")."""
        for a in self._used.values():
            if a.addr <= addr < a.addr + a.size:
                return a
        return None

    def check_leaks(self) -> None:
        """Raise GuestMemoryLeak if anything is still allocated (call at teardown)."""
        if self._used:
            listing = "; ".join(
                f"{a.addr:#x}+{a.size:#x} {a.tag or '(untagged)'} from {a.origin}" for a in self.allocations
            )
            raise GuestMemoryLeak(f"{len(self._used)} guest allocation(s) never freed: {listing}")
