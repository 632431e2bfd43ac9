"""The virtio-balloon driver (virtio 1.2 §5.5): inflate/deflate by PFN, ``actual``, the stats queue,
free page hinting and free page reporting.

The device asks for pages through ``num_pages``; the driver gives guest pages to it on the
inflateq and takes them back on the deflateq, then tells the device how many pages the balloon
holds by writing ``actual`` (§5.5.6). With STATS_VQ the driver keeps one buffer of tagged
statistics in the statsq; the device uses it when it wants fresh numbers and the driver answers
with a new one (§5.5.6.3). PFN arrays, statistics and the config are in :mod:`.encoding`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import QtestTimeout
from ...memory import GuestMemory
from ...modes import Interrupts
from ...pci import PciFunction
from ...transport import feature_bit
from ...transport.layout import ISR
from ...virtqueue import Buf, Virtqueue
from ..base import VirtioDriver
from . import encoding
from .encoding import (
    BALLOON_CONFIG,
    CMD_ID_STOP,
    DEFLATEQ,
    FREE_PAGE_VQ,
    INFLATEQ,
    PAGE_SIZE,
    QUEUE_NAMES,
    STATSQ,
    BalloonConfig,
    BalloonError,
    StatTag,
    encode_cmd_id,
    encode_pfns,
    encode_stats,
    page_frame,
)


class VirtioBalloon(VirtioDriver):
    """A virtio-balloon driver: inflate/deflate by PFN, ``actual``, the stats queue."""

    DEVICE_TYPE = encoding.DEVICE_ID
    CONFIG_LAYOUT = BALLOON_CONFIG
    FEATURE_BITS = encoding.FEATURE_BITS
    #: ``interrupts="auto"`` without MSI-X (QEMU's virtio-balloon-pci has none): INTx.
    AUTO_WITHOUT_MSIX = Interrupts.INTX
    FEATURES = frozenset(
        {"MUST_TELL_HOST", "STATS_VQ", "DEFLATE_ON_OOM", "FREE_PAGE_HINT", "PAGE_POISON", "PAGE_REPORTING"}
    )
    QUEUES = 2
    #: PFNs per inflate/deflate descriptor (Linux sends up to 256).
    PFNS_PER_REQUEST = 256

    def __init__(
        self,
        fn: PciFunction,
        mode: str,
        memory: GuestMemory,
        *,
        stats: Mapping[int, int] | Sequence[tuple[int, int]] | None = None,
        poison_val: int = 0,
        **kwargs: Any,
    ) -> None:
        """``stats``: the statistics each statsq buffer carries, in order
        (default: MEMTOT and MEMFREE of the allocator). ``poison_val``: written to the config
        with PAGE_POISON, and into deflated pages before reuse (§5.5.6.6)."""
        #: Addresses of the pages in the balloon, in the order they went in.
        self.pages: list[int] = []
        self.poison_val = poison_val
        self._stats: list[tuple[int, int]] | None = None if stats is None else self._stat_list(stats)
        self._stats_buf: int | None = None
        self._stats_token: int | None = None
        #: Tags of the buffers made available since initialization (§5.5.6.3.1: always the same).
        self._stats_tags: list[int] | None = None
        #: Statistics requests the device made (buffers it used) since initialization.
        self.stats_requests = 0
        #: The reporting_vq's index, decided by setup_device from what the device offers.
        self.reporting_queue = FREE_PAGE_VQ + 1
        super().__init__(fn, mode, memory, **kwargs)

    @staticmethod
    def _stat_list(stats: Mapping[int, int] | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        pairs = stats.items() if isinstance(stats, Mapping) else stats
        return [(int(tag), int(value)) for tag, value in pairs]

    # -- initialization (§5.5.5) ----------------------------------------------------------

    def setup_device(self) -> None:
        """Queue count from the features; with PAGE_POISON, poison_val before DRIVER_OK
        (§5.5.5 step 4). The free_page_vq is queue 3 (§5.5.2), so with FREE_PAGE_HINT but not
        STATS_VQ queue 2 is set up too (QEMU always has it) and left unused. The reporting_vq
        comes after the queues QEMU creates (virtio_balloon_device_realize: statsq always, the
        free_page_vq whenever it offers FREE_PAGE_HINT), so it is queue 4 or, without hinting
        offered, 3."""
        self.QUEUES = 4 if self.has("FREE_PAGE_HINT") else 3 if self.has("STATS_VQ") else 2
        hint_offered = self.negotiated.offered >> feature_bit("FREE_PAGE_HINT", self.device_bits) & 1
        self.reporting_queue = FREE_PAGE_VQ + hint_offered
        if self.has("PAGE_REPORTING"):
            self.QUEUES = self.reporting_queue + 1
        if self.has("PAGE_POISON"):
            self.write_config(BALLOON_CONFIG.poison_val, self.poison_val)

    def create_queue(self, index: int) -> Virtqueue:
        vq = super().create_queue(index)
        name = "reporting_vq" if self.has("PAGE_REPORTING") and index == self.reporting_queue else None
        vq.name = f"{type(self).__name__} {name or QUEUE_NAMES.get(index, '?')} (queue {index})"
        return vq

    def initialize(self) -> None:
        """§3.1.1 to DRIVER_OK, then the first statsq buffer (§5.5.5 steps 2 and 7)."""
        self._free_stats_buffer()
        if self.pages:  # a re-initialized device has forgotten the balloon
            for addr in self.pages:
                self.memory.free(addr)
            self.pages = []
        self.stats_requests = 0
        super().initialize()
        if self.has("STATS_VQ"):
            self._post_stats()

    def reset(self) -> None:
        super().reset()
        self._free_stats_buffer()

    def close(self) -> None:
        """Reset, then give back the balloon's pages and the stats buffer."""
        super().close()
        for addr in self.pages:
            self.memory.free(addr)
        self.pages = []

    # -- config ---------------------------------------------------------------------------

    def config(self) -> BalloonConfig:
        """struct virtio_balloon_config as one consistent snapshot (§2.5.1); free_page_hint_cmd_id
        and poison_val only when their feature was negotiated (§5.5.4), else None."""
        return BalloonConfig.from_fields(self.read_config())

    @property
    def num_pages(self) -> int:
        """The device's target (pages it wants in the balloon)."""
        return self.read_config(["num_pages"])["num_pages"]

    @property
    def actual(self) -> int:
        return self.read_config(["actual"])["actual"]

    def set_actual(self, pages: int | None = None) -> None:
        """Write ``actual`` (default: the pages the balloon holds) in one 4-byte access, as
        the legacy interface requires (§5.5.6.2.1)."""
        self.write_config(BALLOON_CONFIG.actual, len(self.pages) if pages is None else pages)

    def wait_config_change(self, timeout: float = 5.0) -> None:
        """Wait for a configuration change notification (§4.1.4.5: MSI-X config vector, or
        the ISR's config bit with INTx)."""
        if self.msix is not None:
            self.msix.wait(0, timeout)
            return
        deadline = time.monotonic() + timeout
        isr = 0
        while True:
            remaining = deadline - time.monotonic()
            if self.intx is not None and not self.intx.level() and remaining > 0:
                try:
                    self.intx.wait(True, remaining)
                except QtestTimeout:
                    pass
            isr = self.transport.read_isr()
            if isr & ISR.config_change.mask:
                return
            if time.monotonic() > deadline:
                line = f"INTx line {self.intx.gsi} low, " if self.intx is not None else ""
                raise BalloonError(
                    f"{self}: no configuration change notification within {timeout:g} s ({line}ISR {isr:#x})"
                )

    # -- inflate and deflate (§5.5.6) -----------------------------------------------------

    def _pfn_request(self, queue: int, addrs: Sequence[int], timeout: float) -> None:
        vq = self.queues[queue]
        requests = [
            vq.submit([encode_pfns(addrs[i : i + self.PFNS_PER_REQUEST])], [])
            for i in range(0, len(addrs), self.PFNS_PER_REQUEST)
        ]
        for req in requests:
            vq.complete(req, timeout)

    def inflate(self, count: int, *, update_actual: bool = True, timeout: float = 5.0) -> list[int]:
        """Give ``count`` free guest pages to the balloon; returns their addresses."""
        addrs = [self.memory.alloc(PAGE_SIZE, PAGE_SIZE, tag=f"{self} balloon page") for _ in range(count)]
        try:
            self.inflate_pages(addrs, update_actual=update_actual, timeout=timeout)
        except BaseException:
            for addr in addrs:
                if addr not in self.pages:
                    self.memory.free(addr)
            raise
        return addrs

    def inflate_pages(self, addrs: Sequence[int], *, update_actual: bool = True, timeout: float = 5.0) -> None:
        """Give these pages (4096-byte aligned guest allocations) to the balloon: they belong
        to it from now on, and :meth:`deflate` frees them. The driver must not touch them
        before the device has used the request (§5.5.6.1)."""
        for addr in addrs:  # alignment and range checked before anything is sent
            page_frame(addr)
        self._pfn_request(INFLATEQ, addrs, timeout)
        self.pages += addrs
        if update_actual:
            self.set_actual()

    def deflate(self, count: int, *, update_actual: bool = True, timeout: float = 5.0) -> list[int]:
        """Take ``count`` pages back from the balloon (the newest first), wait for the device's
        acknowledgement (as MUST_TELL_HOST requires), poison them if PAGE_POISON was negotiated,
        and return them to the allocator."""
        if count > len(self.pages):
            raise BalloonError(f"{self}: cannot deflate {count} pages, the balloon holds {len(self.pages)}")
        addrs = self.pages[len(self.pages) - count :]
        self._pfn_request(DEFLATEQ, addrs, timeout)
        del self.pages[len(self.pages) - count :]
        if self.has("PAGE_POISON"):
            pattern = self.poison_val.to_bytes(4, "little") * (PAGE_SIZE // 4)
            for addr in addrs:
                self.memory.write(addr, pattern)
        for addr in addrs:
            self.memory.free(addr)
        if update_actual:
            self.set_actual()
        return addrs

    def follow_target(self, timeout: float = 5.0) -> int:
        """Inflate or deflate until the balloon holds ``num_pages`` pages, then update
        ``actual`` (§5.5.6 step 1); returns the new size."""
        target = self.num_pages
        if target > len(self.pages):
            self.inflate(target - len(self.pages), timeout=timeout)
        elif target < len(self.pages):
            self.deflate(len(self.pages) - target, timeout=timeout)
        else:
            self.set_actual()
        return len(self.pages)

    # -- statistics (§5.5.6.3) ------------------------------------------------------------

    def default_stats(self) -> list[tuple[int, int]]:
        return [(int(StatTag.MEMTOT), self.memory.end), (int(StatTag.MEMFREE), self.memory.free_bytes)]

    @property
    def stats(self) -> list[tuple[int, int]]:
        """The (tag, value) entries the next statsq buffer carries, in order."""
        return self._stats if self._stats is not None else self.default_stats()

    @stats.setter
    def stats(self, stats: Mapping[int, int] | Sequence[tuple[int, int]]) -> None:
        """New values; the tags must stay those of the buffers already sent (the driver MUST
        supply the same subset of statistics in all buffers, §5.5.6.3.1) until the device
        is initialized again."""
        entries = self._stat_list(stats)
        tags = sorted(tag for tag, _ in entries)
        if self._stats_tags is not None and tags != self._stats_tags:
            raise BalloonError(
                f"{self}: statistics {tags} differ from the subset {self._stats_tags} already sent; "
                "all statsq buffers carry the same subset (§5.5.6.3.1): set them before initialize()"
            )
        self._stats = entries

    def _post_stats(self) -> None:
        """Make the one statsq buffer available, initialized with the statistics (§5.5.6.3.1)."""
        if not self.has("STATS_VQ"):
            raise BalloonError(f"{self}: STATS_VQ was not negotiated")
        if self._stats_token is not None:
            raise BalloonError(f"{self}: a statsq buffer is already available (at most one, §5.5.6.3.1)")
        entries = self.stats
        data = encode_stats(entries)
        self._stats_tags = sorted(tag for tag, _ in entries)
        if self._stats_buf is not None:
            self.memory.free(self._stats_buf)
        self._stats_buf = self.memory.alloc(max(len(data), 1), 16, tag=f"{self} stats")
        if data:
            self.memory.write(self._stats_buf, data)
        vq = self.queues[STATSQ]
        self._stats_token = vq.add([Buf(self._stats_buf, len(data))])
        vq.kick()

    def _free_stats_buffer(self) -> None:
        if self._stats_buf is not None:
            self.memory.free(self._stats_buf)
        self._stats_buf = None
        self._stats_token = None
        self._stats_tags = None

    def poll_stats(self) -> bool:
        """If the device has used the statsq buffer (a request for statistics), answer with a
        fresh one; returns whether it had."""
        if self._stats_token is None:
            return False
        vq = self.queues[STATSQ]
        elem = vq.poll_used()
        if elem is None:
            return False
        if elem.token != self._stats_token:
            raise BalloonError(f"{self}: statsq used descriptor {elem.id}, which is not the stats buffer")
        self._stats_token = None
        self.stats_requests += 1
        self._post_stats()
        return True

    def wait_stats_request(self, timeout: float = 5.0) -> None:
        """Wait until the device asks for statistics (uses the buffer), and answer it."""
        deadline = time.monotonic() + timeout
        while not self.poll_stats():
            if time.monotonic() > deadline:
                vq = self.queues[STATSQ]
                raise BalloonError(
                    f"{self}: the device did not use the statsq buffer within {timeout:g} s; {vq.describe_state()}"
                )
            time.sleep(0.001)

    # -- free page hinting (§5.5.6.5) ---------------------------------------------------------

    @property
    def free_page_hint_cmd_id(self) -> int:
        """The config's command ID: a non-reserved value starts a round of hinting, STOP and
        DONE end it (§5.5.6.5)."""
        return self.read_config(["free_page_hint_cmd_id"])["free_page_hint_cmd_id"]

    def _free_page_vq(self) -> Virtqueue:
        if not self.has("FREE_PAGE_HINT"):
            raise BalloonError(f"{self}: FREE_PAGE_HINT was not negotiated")
        return self.queues[FREE_PAGE_VQ]

    def send_cmd_id(self, cmd_id: int, timeout: float = 5.0) -> None:
        """An output buffer of 4 bytes holding ``cmd_id`` on the free_page_vq (§5.5.6.5.1): the
        current command ID starts hinting, CMD_ID_STOP ends it; wait until it is used."""
        vq = self._free_page_vq()
        vq.complete(vq.submit([encode_cmd_id(cmd_id)], []), timeout)

    def hint_free_pages(self, addrs: Sequence[int], timeout: float = 5.0) -> None:
        """Each page (4096-byte aligned) as an input buffer of its own on the free_page_vq, as
        Linux hints them (§5.5.6.5 step 2b); wait until the device has used them all."""
        vq = self._free_page_vq()
        for addr in addrs:
            page_frame(addr)
        tokens = [vq.add([Buf(addr, PAGE_SIZE, writable=True)]) for addr in addrs]
        vq.kick()
        for token in tokens:
            vq.wait_for(token, timeout)

    def stop_hinting(self, timeout: float = 5.0) -> None:
        """The driver has no more pages to hint: an output buffer with CMD_ID_STOP (§5.5.6.5.1)."""
        self.send_cmd_id(CMD_ID_STOP, timeout)

    # -- free page reporting (§5.5.6.7) -------------------------------------------------------

    def report_free_pages(self, addrs: Sequence[int], timeout: float = 5.0) -> int:
        """One report: the pages (4096-byte aligned, free in the guest) as the device-writable
        buffers of one chain on the reporting_vq; wait for the device's acknowledgement (it uses
        the chain, §5.5.6.7 step 3) and return its used length. Until then the driver MUST NOT
        use the pages (§5.5.6.7.1)."""
        if not self.has("PAGE_REPORTING"):
            raise BalloonError(f"{self}: PAGE_REPORTING was not negotiated")
        for addr in addrs:
            page_frame(addr)
        vq = self.queues[self.reporting_queue]
        token = vq.add([Buf(addr, PAGE_SIZE, writable=True) for addr in addrs])
        vq.kick()
        return vq.wait_for(token, timeout).length
