"""virtio-rng conformance (virtio 1.2 §5.4): the entropy device's device-side requirements.

The device reads its entropy from a FIFO the test writes (``backend="fifo"``), so every byte the
device places in a buffer is known and can be compared with what the used ring reports.
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import RngFifo
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.testing import alloc_bufs, pattern
from qtest_virtio.virtqueue import Buf

pytestmark = pytest.mark.virtio_device("virtio-rng-pci", backend="fifo")

#: How long a request with no entropy behind it is watched before concluding it stays pending.
PENDING_WINDOW = 0.05


def _in_buffers(vm: Machine, sizes: list[int]) -> list[Buf]:
    """Device-writable buffers filled with 0xEE, so untouched bytes stand out."""
    return alloc_bufs(vm.memory, sizes, fill=0xEE, tag="rng scenario")


@pytest.mark.conformance("rng-fills-buffer-with-entropy", spec="5.4.6.2")
def test_request_is_filled_from_the_entropy_source(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device puts at least one random byte into a request buffer, and what it reports as
    used (the used length) is entropy from its source, in order (MUST)."""
    data = pattern(32)
    qemu.backend(virtio_device.dev_id, RngFifo).write(data)
    got = virtio_device.request(32)
    assert 1 <= len(got) <= 32
    assert got == data[: len(got)]


@pytest.mark.conformance("rng-short-fill-reports-length", spec="5.4.6.2")
def test_partial_fill_is_reported_by_the_used_length(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The device may use less than the whole buffer (MAY); when it does, the used length says
    exactly how many bytes it placed, and those bytes come first in the buffer (MUST, with the
    used-ring rule of §2.7.8.2)."""
    data = pattern(5, seed=3)
    qemu.backend(virtio_device.dev_id, RngFifo).write(data)
    got = virtio_device.request(64)
    assert 1 <= len(got) <= len(data)
    assert got == data[: len(got)]


@pytest.mark.conformance("rng-never-completes-empty", spec="5.4.6.2")
def test_request_waits_for_entropy_instead_of_completing_empty(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A request is only returned with one or more random bytes in it: with no entropy available
    the device keeps the buffer instead of returning it with a used length of 0 (MUST)."""
    vq = virtio_device.queues[0]
    (buf,) = _in_buffers(qemu, [16])
    token = vq.add([buf])
    vq.kick()
    deadline = time.monotonic() + PENDING_WINDOW
    while time.monotonic() < deadline:
        assert vq.poll_used() is None, "the device returned a request while its entropy source was empty"
    data = pattern(16, seed=9)
    qemu.backend(virtio_device.dev_id, RngFifo).write(data)
    elem = vq.wait_for(token)
    assert 1 <= elem.length <= 16
    assert qemu.memory.read(buf.addr, elem.length) == data[: elem.length]


@pytest.mark.conformance("rng-every-buffer-gets-bytes", spec="5.4.6.2")
def test_each_of_several_requests_gets_entropy(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Several requests outstanding at once, with entropy enough for all: every buffer the device
    returns holds at least one byte, and those bytes came from the entropy source (MUST)."""
    vq = virtio_device.queues[0]
    bufs = _in_buffers(qemu, [8, 8, 8, 8])
    tokens = [vq.add([b]) for b in bufs]
    data = pattern(32, seed=5)
    qemu.backend(virtio_device.dev_id, RngFifo).write(data)
    vq.kick()
    for n, token in enumerate(tokens):
        elem = vq.wait_for(token)
        assert 1 <= elem.length <= 8, f"request {n}: used length {elem.length}"
        piece = qemu.memory.read(elem.bufs[0].addr, elem.length)
        assert piece in data, f"request {n}: {piece.hex()} is not from the entropy source"


@pytest.mark.conformance("rng-chain-filled-from-first-writable", spec="2.7.8.2")
@pytest.mark.virtio_device("virtio-rng-pci", backend="fifo", rings=("split",))
def test_chained_buffers_are_filled_from_the_first_one(virtio_device: VirtioRng, qemu: Machine) -> None:
    """One request made of three device-writable buffers: the device writes the used length's
    worth of bytes starting at the first writable buffer and continuing into the next ones
    (MUST), so the buffers read back in chain order as the entropy stream."""
    vq = virtio_device.queues[0]
    bufs = _in_buffers(qemu, [3, 5, 9])
    data = pattern(17, seed=11)
    qemu.backend(virtio_device.dev_id, RngFifo).write(data)
    token = vq.add(bufs)
    vq.kick()
    elem = vq.wait_for(token)
    assert 1 <= elem.length <= 17
    written = b"".join(qemu.memory.read(b.addr, b.length) for b in bufs)
    assert written[: elem.length] == data[: elem.length]
