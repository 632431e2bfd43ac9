"""VIRTIO_F_IN_ORDER conformance (virtio 1.2 §6.2, §2.7.9 split, §2.8.8 packed): with the feature
negotiated the device uses buffers in the order they were made available, and one used entry may
stand for a batch of them.

Each scenario sets ``in_order=on`` on the device itself (QEMU 10.0 and later have it, default off)
and requires IN_ORDER, so it skips, saying why, where the binary lacks the property (7.2) or the
run refuses the feature. IN_ORDER is bit 35: the legacy register layout only shows bits 0-31, so
only the modern layouts can negotiate it.

The driver (``qtest_virtio.virtqueue``) holds the device to the order as it reads the rings: a
used entry that names a chain made available later than one still in flight is either a batch
(the earlier chains are then reported as used completely, ``UsedElem.skipped``) or, when the used
index does not cover that batch, an error. So what a scenario checks for every reported chain is
that the device really had finished it: a device that used chains out of order shows up as a
chain reported before its bytes were written.
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend, RngFifo
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.blk.encoding import BlkReqType, BlkStatus, encode_header
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import ethernet_frame
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import queue_view
from qtest_virtio.testing import MODERN_LAYOUT_MODES, alloc_bufs, pattern
from qtest_virtio.virtqueue import Buf, PackedVirtqueue, SplitVirtqueue, UsedElem, Virtqueue

IN_ORDER_ON = {"in_order": "on"}
PATTERN = 0xEE
SHORT = 2.0
#: How long the device gets to (wrongly) use what sits behind a held request.
HOLD_WINDOW = 0.05
SERIAL = "QTEST-IN-ORDER-01"
SECTOR = 512


def _buffers(qemu: Machine, sizes: list[int]) -> list[Buf]:
    """Device-writable buffers pre-filled with PATTERN, so bytes the device did not write show."""
    return alloc_bufs(qemu.memory, sizes, fill=PATTERN, tag="in-order scenario")


def _driver_used(vq: Virtqueue) -> int:
    """Where the driver, having skipped over every batch, reads the next used entry: the packed
    ring's next_used slot, the split ring's last_used index."""
    if isinstance(vq, PackedVirtqueue):
        return vq.next_used
    assert isinstance(vq, SplitVirtqueue), f"{vq!r} is neither a split nor a packed ring"
    return vq.last_used


def _device_used_position(qemu: Machine, drv: VirtioDriver, vq: Virtqueue) -> tuple[int, int]:
    """(QEMU's used index, the driver's): where the device writes its next used entry, and where
    the driver, having skipped over every batch, reads the next one."""
    view = queue_view(qemu, drv.dev_id, 0)
    return view.used_idx, _driver_used(vq)


# -- the order itself (§6.2), where QEMU completes out of order without the feature -------------


def _blk_request(qemu: Machine, req_type: BlkReqType, sector: int, data_len: int) -> list[Buf]:
    """header, a data-in buffer and the status byte, both pre-filled with PATTERN."""
    header = encode_header(req_type, sector)
    hdr = qemu.memory.alloc(len(header), tag="in-order scenario header")
    qemu.memory.write(hdr, header)
    return [Buf(hdr, len(header)), *_buffers(qemu, [data_len, 1])]


def _written(qemu: Machine, buf: Buf) -> bytes:
    return qemu.memory.read(buf.addr, buf.length)


@pytest.mark.conformance("vq-in-order-used-in-avail-order", spec="6.2")
@pytest.mark.virtio_device("virtio-blk-pci", transports=MODERN_LAYOUT_MODES, flags={**IN_ORDER_ON, "serial": SERIAL})
@pytest.mark.virtio_requires("IN_ORDER")
def test_held_request_is_not_overtaken(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """With IN_ORDER negotiated the device uses buffers in the order they were made available
    (MUST, §6.2). A READ that QEMU's I/O throttling holds, then a GET_ID behind it: without
    IN_ORDER QEMU answers the GET_ID at once and the READ later (tests/test_virtqueue.py shows
    it); with it, nothing may be used while the READ is held, and once it goes both are used,
    the READ first, each already complete when it is reported (a used entry for a batch stands
    for chains used completely, §2.7.9 / §2.8.8)."""
    blk = virtio_device
    vq = blk.queues[0]
    data = pattern(8 * SECTOR, seed=3)
    blk.image.write(0, data)
    qemu.throttle_reads(blk.dev_id, 1)
    blk.read(8, 1)  # spends the throttle's budget: the next read waits
    read = _blk_request(qemu, BlkReqType.IN, 0, len(data))
    get_id = _blk_request(qemu, BlkReqType.GET_ID, 0, 20)
    tokens = [vq.add(read), vq.add(get_id)]
    vq.kick()

    def check_complete(elem: UsedElem) -> None:
        bufs = read if elem.token == tokens[0] else get_id
        status = _written(qemu, bufs[2])[0]
        what = "READ" if bufs is read else "GET_ID"
        assert status == BlkStatus.OK, f"{what} reported used (skipped={elem.skipped}) with status byte {status:#x}"
        if bufs is read:
            assert _written(qemu, bufs[1]) == data, "READ reported used before its data was written"
        else:
            assert _written(qemu, bufs[1]).split(b"\0")[0] == SERIAL.encode()

    reported: list[UsedElem] = []
    held_until = time.monotonic() + HOLD_WINDOW
    released = False
    while len(reported) < 2:
        elem = vq.poll_used()
        if elem is not None:
            check_complete(elem)  # at once: a chain reported early is still unwritten now
            reported.append(elem)
        elif not released and time.monotonic() > held_until:
            qemu.throttle_reads(blk.dev_id, 0)
            released, deadline = True, time.monotonic() + SHORT
        elif released and time.monotonic() > deadline:
            pytest.fail(
                f"{len(reported)} of 2 requests used {SHORT} s after the throttle was lifted; {vq.describe_state()}"
            )
    assert [e.token for e in reported] == tokens
    device, driver = _device_used_position(qemu, blk, vq)
    assert device == driver, f"QEMU's used index is {device}, the driver's reading of the ring ended at {driver}"


@pytest.mark.conformance("vq-in-order-net-rx-in-order", spec="6.2")
@pytest.mark.virtio_device("virtio-net-pci", transports=MODERN_LAYOUT_MODES, flags=IN_ORDER_ON)
@pytest.mark.virtio_requires("IN_ORDER")
def test_receive_buffers_are_used_in_order(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With IN_ORDER the device fills receive buffers in the order they were made available
    (MUST, §6.2): frames of mixed sizes, some spanning several small buffers where MRG_RXBUF is
    negotiated, arrive whole and in sequence, and the device's used index ends where the
    driver's reading of the ring does."""
    net = virtio_device
    net.restart(rx_buffer_size=net.header_size + 600, rx_buffers=24, rx_poison=PATTERN)
    host = qemu.backend(net.dev_id, NetBackend)
    frames = [
        ethernet_frame(net.mac, "02:00:00:00:00:01", 0x88B5, pattern(size - 14, seed=i))
        for i, size in enumerate((60, 1514, 64, 600, 1000))
    ]
    # Without MRG_RXBUF (refused in this run) a frame must fit one buffer.
    sent = [f for f in frames if net.has("MRG_RXBUF") or len(f) <= 600]
    for frame in sent:
        host.send(frame)
    packets = [net.receive_packet(timeout=SHORT) for _ in sent]
    assert [p.frame for p in packets] == sent
    rx = net.rxq
    assert rx is not None
    assert queue_view(qemu, net.dev_id, 0).used_idx == _driver_used(rx)


@pytest.mark.conformance("vq-in-order-net-tx-in-order", spec="6.2")
@pytest.mark.virtio_device("virtio-net-pci", transports=MODERN_LAYOUT_MODES, flags=IN_ORDER_ON)
@pytest.mark.virtio_requires("IN_ORDER")
def test_transmit_buffers_are_used_in_order(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With IN_ORDER the device uses transmit buffers in the order they were made available
    (MUST, §6.2): eight frames made available with one notification are used in that order
    (the driver would report a chain used out of order) and reach the link in that order."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    frames = [
        ethernet_frame("02:00:00:00:00:01", net.mac, 0x88B5, pattern(size, seed=i))
        for i, size in enumerate((46, 1500, 100, 46, 700, 1200, 46, 300))
    ]
    net.send_many(frames, timeout=SHORT)
    assert [host.receive(timeout=SHORT) for _ in frames] == frames
    tx = net.txq
    assert tx is not None
    assert queue_view(qemu, net.dev_id, 1).used_idx == _driver_used(tx)


# -- batches (§2.7.9 split, §2.8.8 packed) ------------------------------------------------------


def _stream_in_order(drv: VirtioRng, qemu: Machine) -> None:
    """Four buffers made available at once and filled from one entropy stream: whatever batches
    the device writes, the chains come back in order, the device's used index ends where the
    driver's skipping over batches took it, every buffer holds the next piece of the stream, and
    a chain no used entry named (skipped) holds all of its piece."""
    vq = drv.queues[0]
    sizes = [3, 5, 9, 4]
    bufs = _buffers(qemu, sizes)
    data = pattern(sum(sizes), seed=5)
    qemu.backend(drv.dev_id, RngFifo).write(data)
    tokens = [vq.add([b]) for b in bufs]
    vq.kick()
    elems = [vq.wait_used(SHORT) for _ in tokens]
    assert [e.token for e in elems] == tokens
    offset = 0
    for elem, buf in zip(elems, bufs, strict=True):
        assert 1 <= elem.length <= buf.length
        if elem.skipped:
            assert elem.length == buf.length  # the driver's reading: used completely
        assert _written(qemu, buf)[: elem.length] == data[offset : offset + elem.length], (
            f"buffer {tokens.index(elem.token)} (skipped={elem.skipped}) does not hold the next {elem.length} "
            "bytes of the stream"
        )
        offset += elem.length
    device, driver = _device_used_position(qemu, drv, vq)
    assert device == driver, f"QEMU's used index is {device}, the driver's reading of the ring ended at {driver}"


@pytest.mark.conformance("vq-in-order-split-batch", spec="2.7.9")
@pytest.mark.virtio_device(
    "virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT_MODES, flags=IN_ORDER_ON, backend="fifo"
)
@pytest.mark.virtio_requires("IN_ORDER")
def test_split_used_entries_account_for_batches(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With IN_ORDER a split ring's used entry for a batch sits at the position of the batch's
    first chain and names its last, used.idx moves by the size of the batch, and the chains no
    entry names were used completely (§2.7.9)."""
    if virtio_device.queues[0].kind != "split":
        pytest.skip("a split-ring scenario; this run uses packed rings")
    _stream_in_order(virtio_device, qemu)


@pytest.mark.conformance("vq-in-order-packed-batch", spec="2.8.8")
@pytest.mark.virtio_device(
    "virtio-rng-pci", rings=("packed",), transports=MODERN_LAYOUT_MODES, flags=IN_ORDER_ON, backend="fifo"
)
@pytest.mark.virtio_requires("IN_ORDER")
def test_packed_used_descriptors_account_for_batches(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With IN_ORDER a packed ring's used descriptor for a batch overwrites the batch's first
    available descriptor and carries the buffer id of its last, the device skips the slots of the
    whole batch, and the buffers no descriptor names were used completely (§2.8.8)."""
    if virtio_device.queues[0].kind != "packed":
        pytest.skip("a packed-ring scenario; this run uses split rings")
    _stream_in_order(virtio_device, qemu)
