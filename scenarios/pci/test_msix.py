"""MSI-X masking while requests complete (PCI 3.0 §6.8.2.9 Vector Control, §6.8.2.10 Pending
Bits, §6.8.2.3 Message Control's Function Mask; virtio 1.2 §4.1.5.1.2 maps queues to vectors).

A masked vector's interrupt is not sent: its PBA bit is set instead, and the message goes out
when the vector is unmasked, which clears the bit. The function mask does the same for every
vector. Under qtest each vector's message lands in a mailbox word of guest RAM (pci/msix.py),
so "no message" is an empty mailbox and "delivered" is the message data there.

Regression scenarios on the PCI rules (the virtio spec defines no masking of its own). They run
on every mode and both rings: the legacy layout routes vectors through MSI-X too.
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.pci.msix import Msix
from qtest_virtio.transport import LegacyTransport, ModernTransport, VirtioTransport
from qtest_virtio.transport.layout import COMMON_CFG, LEGACY_CFG

pytestmark = pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, interrupts="msix")

SHORT = 2.0
QUIET_WINDOW = 0.02


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give the device's main loop a few turns (each qtest command is one) to do anything."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vm.qtest.readl(0)


def queue_vector(t: VirtioTransport) -> int:
    """The MSI-X vector queue 0 is mapped to, as the device reads it back."""
    if isinstance(t, LegacyTransport):
        t.regs.write(LEGACY_CFG.queue_select, 0)
        return t.regs.read(LEGACY_CFG.queue_msix_vector)
    assert isinstance(t, ModernTransport)
    t.select_queue(0)
    return t.common.read(COMMON_CFG.queue_msix_vector)


def setup(drv: VirtioRng) -> tuple[Msix, int]:
    """MSI-X and queue 0's vector, after one request whose message arrived (so the device is
    known to interrupt for used buffers) and was cleared."""
    msix = drv.msix
    assert msix is not None and msix.enabled
    vector = queue_vector(drv.transport)
    assert vector in msix.mailboxes
    drv.queues[0].set_interrupts(True)
    assert len(drv.request(8, timeout=SHORT)) > 0
    msix.wait(vector, timeout=SHORT)
    assert not msix.pending(vector)
    return msix, vector


def test_masked_vector_sets_its_pending_bit(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With queue 0's vector masked, requests still complete (used buffers are found by
    polling), no message is written and the vector's PBA bit is set; unmasking sends one
    message and clears the bit; unmasked again, the next request interrupts as before."""
    drv = virtio_device
    msix, vector = setup(drv)
    msix.mask_vector(vector)
    for _ in range(3):
        assert len(drv.request(8, timeout=SHORT)) > 0
    quiet(qemu)
    assert not msix.fired(vector), "a masked vector's message was sent"
    assert msix.pending(vector), "no pending bit for the masked vector's interrupt"
    msix.mask_vector(vector, masked=False)
    msix.wait(vector, timeout=SHORT)
    assert not msix.pending(vector), "the pending bit stayed set after the message went out"
    quiet(qemu)
    assert not msix.fired(vector), "more than one message for the pending interrupt"
    assert len(drv.request(8, timeout=SHORT)) > 0
    msix.wait(vector, timeout=SHORT)


def test_function_mask_holds_every_vector(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The function mask masks every vector whatever its own mask bit: a completed request
    leaves its vector pending with no message; clearing the function mask delivers it and
    clears the PBA bit. The vector's own mask bit stays clear throughout."""
    drv = virtio_device
    msix, vector = setup(drv)
    msix.mask_function(True)
    assert msix.function_masked
    assert len(drv.request(8, timeout=SHORT)) > 0
    quiet(qemu)
    assert not msix.fired(vector)
    assert msix.pending(vector)
    assert msix.read_vector(vector)["vector_control"] == 0
    msix.mask_function(False)
    msix.wait(vector, timeout=SHORT)
    assert not msix.pending(vector)


def test_unmasking_without_a_pending_interrupt_sends_nothing(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Masking and unmasking a vector with no interrupt in between sends no message and sets no
    pending bit: only an interrupt raised while masked is held."""
    drv = virtio_device
    msix, vector = setup(drv)
    msix.mask_vector(vector)
    quiet(qemu)
    assert not msix.pending(vector)
    msix.mask_vector(vector, masked=False)
    quiet(qemu)
    assert not msix.fired(vector)
    assert not msix.pending(vector)
