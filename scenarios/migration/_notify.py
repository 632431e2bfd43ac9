"""Interrupts across a migration, for the net, console and balloon migration scenarios: what the
destination must honour of the driver's notification suppression (virtio 1.2 §2.7.7, §2.8.10)
and of its MSI-X table (PCI 3.0 §6.8.2.9, §6.8.2.10; virtio 1.2 §4.1.5.1.2); the virtual time
QEMU's post-load timers need to run; and waiting for QEMU's used index to move (buffers used
that the driver has not popped, to migrate them unconsumed).

A used-buffer notification is the queue's MSI-X message in its mailbox, or, without MSI-X, the
ISR's queue bit (reading it clears it, §4.1.4.5). Each check makes the device use buffers by a
device-specific action (``produce``) and looks for the notification afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.introspect import queue_view
from qtest_virtio.pci.msix import Msix
from qtest_virtio.transport import LegacyTransport, ModernTransport, VirtioTransport
from qtest_virtio.transport.layout import COMMON_CFG, ISR, LEGACY_CFG
from qtest_virtio.virtqueue import Virtqueue

from . import _rings
from ._support import assert_view_matches

#: How long a notification that should not come is watched for.
QUIET_WINDOW = 0.02


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give the device's main loop a few turns (each qtest command is one) to do anything."""
    _rings.quiet(vm.qtest, seconds)


def let_virtual_time_pass(vm: Machine, ns: int) -> None:
    """Let ``ns`` of virtual time pass, for QEMU's post-load timers (virtio-net's announce,
    virtio-serial's port state): stepped where the qtest accelerator owns the clock; a running
    TCG machine's clock moves by itself."""
    if vm.binary.has_qtest_accel:
        vm.qtest.clock_step(ns)


def wait_used_idx_moves(vm: Machine, dev_id: str, index: int, before: int, timeout: float = 2.0) -> None:
    """Wait until QEMU's used index of queue ``index`` is past ``before`` (QMP
    ``x-query-virtio-queue-status``; the driver pops nothing, so the entries stay unconsumed)."""
    deadline = time.monotonic() + timeout
    while queue_view(vm, dev_id, index).used_idx == before:
        assert time.monotonic() < deadline, f"{dev_id} queue {index}: nothing used within {timeout:g} s"
        time.sleep(0.002)


def notified(drv: VirtioDriver, index: int) -> bool:
    """Whether queue ``index`` sent a used-buffer notification since the last look (cleared):
    its MSI-X mailbox, or the ISR's queue bit without MSI-X."""
    if drv.msix is not None:
        return drv.msix.fired(drv.queue_vector(index))
    return bool(drv.transport.read_isr() & ISR.queue_interrupt.mask)


def wait_notified(drv: VirtioDriver, index: int, timeout: float = 2.0) -> bool:
    """Whether queue ``index``'s notification arrives within ``timeout`` (polled, cleared)."""
    deadline = time.monotonic() + timeout
    while not notified(drv, index):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def need_msix(drv: VirtioDriver) -> Msix:
    """The driver's MSI-X, or a skip where it runs without (the device or the run has none)."""
    if drv.msix is None:
        pytest.skip(f"{drv.dev_id} runs without MSI-X here (interrupts={drv.interrupts.value})")
    return drv.msix


def vectors(t: VirtioTransport, queues: range) -> tuple[int, list[int]]:
    """(config vector, queue vectors) as the device reads them back (§4.1.4.3, §4.1.4.8)."""
    if isinstance(t, LegacyTransport):
        config = t.regs.read(LEGACY_CFG.config_msix_vector)
        out = []
        for q in queues:
            t.regs.write(LEGACY_CFG.queue_select, q)
            out.append(t.regs.read(LEGACY_CFG.queue_msix_vector))
        return config, out
    assert isinstance(t, ModernTransport)
    config = t.common.read(COMMON_CFG.config_msix_vector)
    out = []
    for q in queues:
        t.select_queue(q)
        out.append(t.common.read(COMMON_CFG.queue_msix_vector))
    return config, out


def suppressed_across(
    src: Machine,
    drv: VirtioDriver,
    vq: Virtqueue,
    migrate: Callable[[], Machine],
    produce: Callable[[Machine], None],
) -> tuple[Machine, list[bool]]:
    """Notifications suppressed on ``vq`` across a migration (NO_INTERRUPT without EVENT_IDX,
    used_event behind the used index with it, §2.7.7; driver event flags DISABLE on packed,
    §2.8.10): one buffer used with notifications on (so the device has notified once and has
    something to compare with), then suppressed and one more used on the source, then
    migrated and two more used on the destination. ``produce(vm)`` makes the device use one
    buffer of ``vq`` and returns once the driver has seen it used. Returns the destination
    and, per suppressed buffer, whether it was notified (the source's first)."""
    vq.set_interrupts(True)
    produce(src)
    assert wait_notified(drv, vq.index), f"{vq.name}: no notification with notifications enabled"
    vq.set_interrupts(False)
    seen = []
    produce(src)
    quiet(src)
    seen.append(notified(drv, vq.index))
    dest = migrate()
    for _ in range(2):
        produce(dest)
        quiet(dest)
        seen.append(notified(drv, vq.index))
    return dest, seen


def suppression_holds_across(
    src: Machine,
    drv: VirtioDriver,
    vq: Virtqueue,
    migrate: Callable[[], Machine],
    produce: Callable[[Machine], None],
    *,
    in_flight: int = 0,
) -> Machine:
    """:func:`suppressed_across`, asserted: no suppressed buffer notified (source, then two on
    the destination), and once notifications are on again the next buffer is notified there;
    QEMU's view of the device is the driver's. Returns the destination."""
    dest, seen = suppressed_across(src, drv, vq, migrate, produce)
    assert seen == [False, False, False], f"notified per suppressed buffer (source, destination x2): {seen}"
    vq.set_interrupts(True)
    produce(dest)
    assert wait_notified(drv, vq.index), f"{vq.name}: no notification on the destination once enabled again"
    assert_view_matches(dest, drv, in_flight=in_flight)
    return dest


def masked_vector_survives_across(
    src: Machine,
    drv: VirtioDriver,
    vq: Virtqueue,
    migrate: Callable[[], Machine],
    produce: Callable[[Machine], None],
) -> Machine:
    """The config and queue vectors read back the same on the destination (§4.1.4.3); ``vq``'s
    vector masked with an interrupt pending on the source (PCI 3.0 §6.8.2.10: its PBA bit set,
    no message) stays masked and pending there, holds a second interrupt too, and unmasking
    sends one message and clears the bit. Returns the destination."""
    msix = need_msix(drv)
    queues = range(len(drv.queues))
    before = vectors(drv.transport, queues)
    vector = drv.queue_vector(vq.index)
    produce(src)
    assert wait_notified(drv, vq.index)
    msix.mask_vector(vector)
    produce(src)
    quiet(src)
    assert not msix.fired(vector) and msix.pending(vector), "masked: expected no message and the PBA bit"
    dest = migrate()
    assert vectors(drv.transport, queues) == before, "vectors moved in the migration"
    assert msix.enabled and not msix.function_masked
    assert msix.read_vector(vector)["vector_control"] & 1, "the vector is unmasked on the destination"
    assert msix.pending(vector), "the pending bit was lost in the migration"
    assert not msix.fired(vector)
    produce(dest)
    quiet(dest)
    assert not msix.fired(vector), "a masked vector's message was sent on the destination"
    msix.mask_vector(vector, masked=False)
    assert wait_notified(drv, vq.index), "unmasking did not deliver the pending interrupt"
    assert not msix.pending(vector)
    return dest
