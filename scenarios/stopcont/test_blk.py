"""virtio-blk across QMP ``stop`` / ``cont``: regression scenarios on what QEMU's code does.

Unlike virtio-net and virtio-rng, virtio-blk's request path has no run-state check: a
notification while stopped reaches ``virtio_blk_handle_output``, which restarts the ioeventfd
handler the stop took down (its "guests kick before DRIVER_OK" path) or, without ioeventfd,
runs ``virtio_blk_handle_vq`` itself, and the block layer does the I/O whatever the run state.
So a request made available while the VM is stopped completes while it is stopped, with its
used-buffer notification. The device's only run-state handler is ``virtio_blk_dma_restart_cb``:
at ``cont`` it submits again the requests the error policy holds (``werror=stop``). And
``stop`` itself drains the block layer before it returns (``do_vm_stop``: ``bdrv_drain_all``),
which also lets through a request that I/O throttling holds.
"""

from __future__ import annotations

import os
import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import blkdebug_kind
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.blk.encoding import SECTOR_SIZE, BlkReqType, BlkRequest, BlkStatus
from qtest_virtio.introspect import queue_view
from qtest_virtio.virtqueue.base import VirtqueueTimeout

from ._support import QUIET_WINDOW, SHORT, cont, interrupted, quiet, stop

#: The run state is the VM's, not the rings': a refused feature changes nothing checked here.
pytestmark = pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False, interrupts="msix")

#: The sector the werror=stop fault sits on (nothing else touches it).
BAD_WRITE = 2048


def _wait_run_state(qemu: Machine, state: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := qemu.run_state()) != state:
        assert time.monotonic() < deadline, f"run state {now!r}, expected {state!r} within {timeout} s"
        time.sleep(0.01)


def test_requests_notified_while_stopped_complete_while_stopped(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """A write and a read made available and notified while the VM is stopped complete while it
    is still stopped (virtio-blk has no run-state check), correctly: the write with OK and used
    length 1 (only the status byte is device-writable, §2.7.8.2) and the image holds it; the
    read with OK, the written data and used length data + 1; the queue's MSI-X message is sent
    while stopped. The run state stays paused, and after ``cont`` the device works on."""
    blk = virtio_device
    data = os.urandom(4 * SECTOR_SIZE)
    interrupted(blk, 0)
    stop(qemu)
    write = blk.submit(BlkRequest(BlkReqType.OUT, 64, data_out=data))
    resp = blk.complete(write, timeout=SHORT)
    assert (resp.status, resp.used_len) == (BlkStatus.OK, 1)
    assert blk.image.read(64 * SECTOR_SIZE, len(data)) == data
    read = blk.submit(BlkRequest(BlkReqType.IN, 64, data_in_len=len(data)))
    resp = blk.complete(read, timeout=SHORT)
    assert (resp.status, resp.data, resp.used_len) == (BlkStatus.OK, data, len(data) + 1)
    assert interrupted(blk, 0), "no used-buffer notification for requests completed while stopped"
    assert qemu.run_state() == "paused"
    assert queue_view(qemu, blk.dev_id, 0).inuse == 0
    cont(qemu)
    assert blk.read(64, 4) == data


def test_stop_drains_a_request_throttling_holds(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """A read that QEMU's I/O throttling holds (one read a second, the budget spent) is in
    flight when ``stop`` comes: ``stop`` drains the block layer before it returns, and a drain
    lifts the limits of the requests it waits for (``throttle_group_restart_tgm``), so by the
    time the command has answered the read has completed, OK with its data, with the VM paused."""
    blk = virtio_device
    data = os.urandom(SECTOR_SIZE)
    blk.image.write(16 * SECTOR_SIZE, data)
    qemu.throttle_reads(blk.dev_id, 1)
    blk.read(8, 1)  # spends the throttle's budget: the next read waits
    held = blk.submit(BlkRequest(BlkReqType.IN, 16, data_in_len=SECTOR_SIZE))
    with pytest.raises(VirtqueueTimeout):
        blk.complete(held, timeout=QUIET_WINDOW)
    stop(qemu)
    resp = blk.complete(held, timeout=0)  # used already when stop answered: one look, no waiting
    assert resp.ok and resp.data == data
    assert qemu.run_state() == "paused"
    qemu.throttle_reads(blk.dev_id, 0)
    cont(qemu)


@pytest.mark.virtio_device(
    "virtio-blk-pci",
    refuse_each=False,
    interrupts="msix",
    flags={"werror": "stop"},
    backend=blkdebug_kind(f"write@{BAD_WRITE}:once"),
)
def test_werror_stop_request_completes_once_across_stop_cont_cycles(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """A write whose I/O fails once under ``werror=stop`` stops the VM (run state io-error) and
    is held. A QMP ``stop`` then changes nothing (``do_vm_stop`` acts only on a live VM: the run
    state stays io-error) and the request stays held (it waits for the VM to run,
    virtio_blk_dma_restart_cb); at ``cont`` it is
    submitted again, succeeds and is used exactly once: OK, used length 1, one used entry and
    one interrupt. More stop/cont cycles after it use nothing again (the held list is empty),
    and QEMU's queue status agrees: nothing in use."""
    blk = virtio_device
    vq = blk.queues[0]
    data = os.urandom(SECTOR_SIZE)
    interrupted(blk, 0)
    pending = blk.submit(BlkRequest(BlkReqType.OUT, BAD_WRITE, data_out=data))
    _wait_run_state(qemu, "io-error")
    qemu.stop()
    assert qemu.run_state() == "io-error"
    quiet(qemu)
    with pytest.raises(VirtqueueTimeout):
        blk.complete(pending, timeout=0)
    assert not interrupted(blk, 0), "an interrupt for a request the error policy holds"
    cont(qemu)
    resp = blk.complete(pending, timeout=SHORT)
    assert (resp.status, resp.used_len) == (BlkStatus.OK, 1)
    assert interrupted(blk, 0)
    assert blk.image.read(BAD_WRITE * SECTOR_SIZE, SECTOR_SIZE) == data
    for _ in range(3):
        stop(qemu)
        cont(qemu)
    quiet(qemu)
    assert vq.poll_used() is None, "the request was used again after a later cont"
    assert not interrupted(blk, 0)
    assert queue_view(qemu, blk.dev_id, 0).inuse == 0
