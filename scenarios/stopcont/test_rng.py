"""virtio-rng across QMP ``stop`` / ``cont``: regression scenarios on hw/virtio/virtio-rng.c.

The device touches its queue only while the run state is RUNNING: ``virtio_rng_process`` and
``chr_read`` return early otherwise ("we can't modify the virtqueue until our state is fully
synced"), and ``virtio_rng_vm_state_change`` processes the queue again when the VM runs. The
entropy comes from ``rng-random`` on a FIFO the test writes (``backend="fifo"``), so what the
device had to give at each moment is known.
"""

from __future__ import annotations

import fcntl
import struct
import termios

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import RngFifo
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import queue_view
from qtest_virtio.testing import alloc_bufs, pattern

from ._support import SHORT, cont, interrupted, quiet, stop

#: The run state is the VM's, not the rings': a refused feature changes nothing checked here.
pytestmark = pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, interrupts="msix", backend="fifo")

SIZE = 16


def _unread(fifo: RngFifo) -> int:
    """Bytes in the FIFO that QEMU's backend has not read yet (FIONREAD)."""
    (count,) = struct.unpack("i", fcntl.ioctl(fifo.fd, termios.FIONREAD, b"\0" * 4))
    return int(count)


def test_request_notified_while_stopped_drops_the_entropy_it_fetches(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Entropy waits in the FIFO; the VM stops; a request made available and notified then is
    not served (no used entry, no interrupt, QEMU takes nothing from the ring). But the
    notification still asks the backend for entropy (``virtio_rng_process`` has no run-state
    check, only ``chr_read`` has): the backend reads the FIFO dry and ``chr_read`` drops what it
    read. At ``cont`` the device asks again, so the buffer is filled only from bytes written after
    ``cont``, with its interrupt."""
    drv = virtio_device
    vq = drv.queues[0]
    fifo = qemu.backend(drv.dev_id, RngFifo)
    interrupted(drv, 0)
    stop(qemu)
    fifo.write(pattern(SIZE, seed=7))
    quiet(qemu)
    assert _unread(fifo) == SIZE, "QEMU read the FIFO with no request outstanding"
    (buf,) = alloc_bufs(qemu.memory, [SIZE], fill=0)
    token = vq.add([buf])
    vq.kick()
    quiet(qemu)
    assert vq.poll_used() is None, "the device used a buffer while the VM was stopped"
    assert not interrupted(drv, 0)
    assert queue_view(qemu, drv.dev_id, 0).inuse == 0
    assert _unread(fifo) == 0, "the notification while stopped did not make the backend read"
    cont(qemu)
    quiet(qemu)
    assert vq.poll_used() is None, "bytes read while the VM was stopped reached the buffer"
    fresh = pattern(4 * SIZE, seed=0x21)
    fifo.write(fresh)
    elem = vq.wait_for(token, timeout=SHORT)
    assert 0 < elem.length <= SIZE
    assert qemu.memory.read(buf.addr, elem.length) == fresh[: elem.length]
    assert interrupted(drv, 0), "no used-buffer notification after cont"


def test_entropy_arriving_while_stopped_is_discarded(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A request made available while the VM runs and the FIFO is empty makes QEMU wait on the
    FIFO. Bytes written while the VM is stopped are read by the backend all the same, but
    ``chr_read`` drops them (run state not RUNNING); at ``cont`` the device asks the backend
    again, and the buffer is filled with bytes written after ``cont``, never with the dropped
    ones."""
    drv = virtio_device
    vq = drv.queues[0]
    fifo = qemu.backend(drv.dev_id, RngFifo)
    (buf,) = alloc_bufs(qemu.memory, [SIZE], fill=0)
    token = vq.add([buf])
    vq.kick()
    quiet(qemu)
    assert vq.poll_used() is None  # nothing in the FIFO yet
    stop(qemu)
    dropped = pattern(SIZE, seed=0x40)
    fifo.write(dropped)
    quiet(qemu)
    assert vq.poll_used() is None, "the device used a buffer while the VM was stopped"
    assert _unread(fifo) == 0, "the backend did not read the bytes"
    cont(qemu)
    quiet(qemu)
    assert vq.poll_used() is None, "bytes written while the VM was stopped reached the buffer"
    fresh = pattern(4 * SIZE, seed=0x80)
    fifo.write(fresh)
    elem = vq.wait_for(token, timeout=SHORT)
    assert 0 < elem.length <= SIZE
    got = qemu.memory.read(buf.addr, elem.length)
    assert got == fresh[: elem.length], f"the buffer holds {got.hex()}, not the bytes written after cont"
