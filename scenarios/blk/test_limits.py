"""virtio-blk: the limits the device reports and holds requests to (discard and write zeroes,
the logical block size), the cache mode the driver switches through ``writeback``, QEMU's
merging of adjacent requests, and the device properties QEMU refuses.

The limits come from device properties (``max-discard-sectors``, ``max-write-zeroes-sectors``,
``discard_granularity``, ``logical_block_size``) and are checked both in the config space
(§5.2.4) and against what QEMU does with a request past them (hw/block/virtio-blk.c
``virtio_blk_handle_discard_write_zeroes``, ``virtio_blk_sect_range_ok``: IOERR; more than one
segment: UNSUPP). The host side is read over QMP: ``query-block`` (the cache mode QEMU uses) and
``query-blockstats`` (how many requests it merged).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import pytest

from qtest_virtio import Machine, MachineSpec, QemuStartError
from qtest_virtio.binary import QemuBinary
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.blk.encoding import (
    SECTOR_SIZE,
    BlkReqType,
    BlkRequest,
    BlkStatus,
    encode_dwz_segment,
)
from qtest_virtio.transport import feature_bit

pytestmark = pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False)

MAX_DISCARD = 64
MAX_WRITE_ZEROES = 32
LIMITS = {
    "max-discard-sectors": str(MAX_DISCARD),
    "max-write-zeroes-sectors": str(MAX_WRITE_ZEROES),
    "discard_granularity": "4096",
}


def _backend_info(qemu: Machine, blk: VirtioBlk, command: str) -> dict[str, Any]:
    """The ``query-block`` or ``query-blockstats`` entry of the device's backend."""
    entries = qemu.qmp.cmd(command)
    assert isinstance(entries, list)
    for entry in entries:
        if str(entry.get("qdev", "")).startswith(f"/machine/peripheral/{blk.dev_id}/"):
            return dict(entry)
    raise AssertionError(f"{command} lists no device {blk.dev_id}")


def _stats(qemu: Machine, blk: VirtioBlk) -> dict[str, int]:
    return dict(_backend_info(qemu, blk, "query-blockstats")["stats"])


def _host_writeback(qemu: Machine, blk: VirtioBlk) -> bool:
    """Whether QEMU runs the backend with a writeback cache (query-block's cache.writeback)."""
    return bool(_backend_info(qemu, blk, "query-block")["inserted"]["cache"]["writeback"])


def _segments(*ranges: tuple[int, int]) -> bytes:
    return b"".join(encode_dwz_segment(sector, count) for sector, count in ranges)


# -- discard and write zeroes ---------------------------------------------------------------------


@pytest.mark.virtio_requires("DISCARD", "WRITE_ZEROES")
@pytest.mark.virtio_device("virtio-blk-pci", flags=LIMITS, refuse_each=["DISCARD", "WRITE_ZEROES"])
def test_discard_and_write_zeroes_limits_are_reported_and_held(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The config says max_discard_sectors and max_write_zeroes_sectors (the properties),
    max_discard_seg and max_write_zeroes_seg 1 (QEMU takes one segment), discard_sector_alignment
    (discard_granularity / 512) and write_zeroes_may_unmap 1 (§5.2.4). A discard of
    max_discard_sectors succeeds; one sector more, or a range past the capacity, is IOERR; two
    segments are UNSUPP. A write zeroes of max_write_zeroes_sectors zeroes its range; one sector
    more is IOERR and two segments UNSUPP, both leaving the data as it was."""
    blk = virtio_device
    cfg = blk.config()
    assert (cfg.max_discard_sectors, cfg.max_discard_seg, cfg.discard_sector_alignment) == (MAX_DISCARD, 1, 8)
    assert (cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg, cfg.write_zeroes_may_unmap) == (
        MAX_WRITE_ZEROES,
        1,
        1,
    )
    discards = [
        (_segments((0, MAX_DISCARD)), BlkStatus.OK),
        (_segments((0, MAX_DISCARD + 1)), BlkStatus.IOERR),
        (_segments((cfg.capacity - 8, 16)), BlkStatus.IOERR),
        (_segments((0, 8), (64, 8)), BlkStatus.UNSUPP),
    ]
    for segments, expected in discards:
        assert blk.execute(BlkRequest(BlkReqType.DISCARD, data_out=segments)).status is expected, segments.hex()
    data = os.urandom((MAX_WRITE_ZEROES + 1) * SECTOR_SIZE)
    blk.write(256, data)
    for segments, expected in [
        (_segments((256, MAX_WRITE_ZEROES + 1)), BlkStatus.IOERR),
        (_segments((256, 1), (258, 1)), BlkStatus.UNSUPP),
    ]:
        assert blk.execute(BlkRequest(BlkReqType.WRITE_ZEROES, data_out=segments)).status is expected
        assert blk.image.read(256 * SECTOR_SIZE, len(data)) == data
    blk.write_zeroes(256, MAX_WRITE_ZEROES)
    assert blk.read(256, MAX_WRITE_ZEROES + 1) == bytes(MAX_WRITE_ZEROES * SECTOR_SIZE) + data[-SECTOR_SIZE:]


@pytest.mark.virtio_requires("BLK_SIZE")
@pytest.mark.virtio_device(
    "virtio-blk-pci", refuse_each=False, flags={"logical_block_size": "4096", "physical_block_size": "4096"}
)
def test_logical_block_size_is_reported_and_io_must_align_to_it(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """logical_block_size=4096: blk_size says 4096 (§5.2.4; the protocol's unit stays 512
    bytes), and QEMU completes I/O that does not start and end on a 4096-byte block with IOERR
    (virtio_blk_sect_range_ok); aligned I/O works."""
    blk = virtio_device
    assert blk.config().blk_size == 4096
    block = 4096 // SECTOR_SIZE
    assert blk.execute(BlkRequest(BlkReqType.IN, block, data_in_len=SECTOR_SIZE)).status is BlkStatus.IOERR
    assert blk.execute(BlkRequest(BlkReqType.IN, 1, data_in_len=4096)).status is BlkStatus.IOERR
    data = os.urandom(4096)
    blk.write(block, data)
    assert blk.read(block, block) == data == blk.image.read(4096, 4096)


# -- the cache mode -------------------------------------------------------------------------------


@pytest.mark.virtio_requires("CONFIG_WCE")
@pytest.mark.virtio_device("virtio-blk-pci", flags={"write-cache": "off"}, refuse_each=["FLUSH"])
@pytest.mark.conformance("blk-writeback-sets-the-cache-mode", spec="5.2.5")
def test_writeback_field_switches_the_cache_mode(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """With CONFIG_WCE the cache mode can be read or set through writeback, 0 writethrough, 1
    writeback (§5.2.5): on a writethrough device (write-cache=off) writeback reads 0, and
    writing 1 and 0 switches the cache QEMU runs the backend with and reads back. FLUSH is still
    offered (§5.2.5.2: a must with CONFIG_WCE). The mode after reset is the device's own again
    (§5.2.5 lets it be either: QEMU's is the one it started with)."""
    blk = virtio_device
    assert blk.negotiated.offered >> feature_bit("FLUSH", blk.device_bits) & 1
    assert blk.initial_config.writeback == 0 and not _host_writeback(qemu, blk)
    blk.set_writeback(True)
    assert blk.config().writeback == 1 and _host_writeback(qemu, blk)
    blk.write(10, b"\xab" * SECTOR_SIZE)
    blk.set_writeback(False)
    assert blk.config().writeback == 0 and not _host_writeback(qemu, blk)
    blk.set_writeback(True)
    blk.initialize()  # reset, then the driver starts over
    assert blk.initial_config.writeback == 0 and not _host_writeback(qemu, blk)
    assert blk.read(10, 1) == b"\xab" * SECTOR_SIZE


# -- request merging ------------------------------------------------------------------------------


def _writes(sectors: list[int]) -> list[BlkRequest]:
    return [BlkRequest(BlkReqType.OUT, s, data_out=bytes([s % 251]) * SECTOR_SIZE) for s in sectors]


#: Adjacent sectors out of order, and one apart from them.
BATCH = [12, 10, 11, 13, 20]


def test_adjacent_requests_in_one_notification_are_merged(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """Requests the device finds together are merged by QEMU when adjacent and of one direction
    (virtio_blk_submit_multireq sorts them by sector): five writes, four of them adjacent, made
    available with one notification, are four backend writes merged into one plus one
    (query-blockstats wr_merged 3); each completes with OK and the image holds each one's data.
    The same for reads (rd_merged 3). A flush after writes in one batch sends the writes first."""
    blk = virtio_device
    before = _stats(qemu, blk)
    for pending in blk.submit_batch(_writes(BATCH)):
        assert blk.complete(pending).ok
    after = _stats(qemu, blk)
    assert after["wr_operations"] - before["wr_operations"] == len(BATCH)
    assert after["wr_merged"] - before["wr_merged"] == 3
    for s in BATCH:
        assert blk.image.read(s * SECTOR_SIZE, SECTOR_SIZE) == bytes([s % 251]) * SECTOR_SIZE
    reads = [BlkRequest(BlkReqType.IN, s, data_in_len=SECTOR_SIZE) for s in BATCH]
    for s, pending in zip(BATCH, blk.submit_batch(reads), strict=True):
        resp = blk.complete(pending)
        assert resp.ok and resp.data == bytes([s % 251]) * SECTOR_SIZE
    assert _stats(qemu, blk)["rd_merged"] - after["rd_merged"] == 3
    if blk.has("FLUSH"):
        flushed = blk.submit_batch([*_writes([30, 31]), BlkRequest(BlkReqType.FLUSH)])
        assert [blk.complete(p).status for p in flushed] == [BlkStatus.OK] * 3
        assert blk.image.read(30 * SECTOR_SIZE, 2 * SECTOR_SIZE) == bytes([30]) * 512 + bytes([31]) * 512


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, flags={"request-merging": "off"})
def test_request_merging_off_keeps_requests_apart(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """request-merging=off: the same batch of adjacent writes is submitted one by one (no
    wr_merged), and a read between writes changes nothing either; all complete with their data."""
    blk = virtio_device
    before = _stats(qemu, blk)
    batch = [*_writes(BATCH[:2]), BlkRequest(BlkReqType.IN, 40, data_in_len=SECTOR_SIZE), *_writes(BATCH[2:])]
    statuses = [blk.complete(p).status for p in blk.submit_batch(batch)]
    assert statuses == [BlkStatus.OK] * len(batch)
    after = _stats(qemu, blk)
    assert after["wr_merged"] == before["wr_merged"]
    assert after["wr_operations"] - before["wr_operations"] == len(BATCH)
    for s in BATCH:
        assert blk.image.read(s * SECTOR_SIZE, SECTOR_SIZE) == bytes([s % 251]) * SECTOR_SIZE


# -- properties QEMU refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prop", "value", "message"),
    [
        ("max-discard-sectors", "0", "invalid max-discard-sectors property (0), must be between 1 and"),
        ("max-write-zeroes-sectors", "0", "invalid max-write-zeroes-sectors property (0), must be between 1 and"),
        ("num-queues", "0", "num-queues property must be larger than 0"),
        ("queue-size", "2", "invalid queue-size property (2), must be > 2"),
        ("queue-size", "48", "invalid queue-size property (48), must be a power of 2"),
    ],
)
def test_invalid_properties_refuse_to_start(
    machine_factory: Callable[..., Machine], qemu_binary: QemuBinary, prop: str, value: str, message: str
) -> None:
    """The device checks its properties when it is realized and QEMU exits naming the property
    and its valid range (virtio_blk_device_realize) instead of offering a device with an
    impossible limit or queue."""
    spec = MachineSpec(qemu=qemu_binary.path)
    spec.add_virtio("virtio-blk-pci", {prop: value})
    with pytest.raises(QemuStartError, match=re.escape(message)):
        machine_factory(spec)


# -- where requests are served --------------------------------------------------------------------


def _thread_syscalls(qemu: Machine, thread_id: int) -> tuple[int, int]:
    """(read, write) system calls made so far by one of QEMU's threads (/proc/PID/task/TID/io)."""
    with open(f"/proc/{qemu.pid}/task/{thread_id}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, iothread=True, flags={"num-queues": "2"})
def test_requests_are_served_in_the_iothread(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """With an IOThread (``iothread`` property) the device serves every request queue there:
    writes and reads on each queue complete with their data, and the IOThread is the thread
    that took the notifications and signalled the completions (its eventfd reads and writes
    grow with the requests; hw/block/virtio-blk.c ``virtio_blk_vq_aio_context_init``, the
    completions through ``virtio_notify_irqfd``)."""
    blk = virtio_device
    threads = qemu.qmp.cmd("query-iothreads")
    assert isinstance(threads, list) and len(threads) == 1, threads
    thread_id = int(threads[0]["thread-id"])
    before = _thread_syscalls(qemu, thread_id)
    queues = len(blk.queues)
    for q in range(queues):
        data = os.urandom(2 * SECTOR_SIZE)
        blk.write(64 + 2 * q, data, queue=q)
        assert blk.read(64 + 2 * q, 2, queue=q) == data == blk.image.read((64 + 2 * q) * SECTOR_SIZE, len(data))
    reads, writes = (a - b for a, b in zip(_thread_syscalls(qemu, thread_id), before, strict=True))
    assert reads >= 1 and writes >= 2 * queues, f"the IOThread made {reads} reads, {writes} writes"


@pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, flags={"ioeventfd": "off"})
def test_requests_are_served_without_ioeventfd(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """ioeventfd=off: a notification is handled in the thread the driver's register write lands
    in (virtio_blk_handle_output, with no event notifier in between); requests complete with
    their data, and a batch found in one notification is still merged (wr_merged)."""
    blk = virtio_device
    before = _stats(qemu, blk)
    for pending in blk.submit_batch(_writes(BATCH)):
        assert blk.complete(pending, timeout=1).ok
    assert _stats(qemu, blk)["wr_merged"] - before["wr_merged"] == 3
    for s in BATCH:
        assert blk.read(s, 1) == bytes([s % 251]) * SECTOR_SIZE
