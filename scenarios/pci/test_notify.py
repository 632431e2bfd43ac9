"""virtio-pci notifications and ISR status (virtio 1.2 §4.1.4.4, §4.1.4.5, §4.1.5.2): the
notification structure in an I/O BAR (QEMU's ``modern-pio-notify=on``), what reading the
notification structure does (nothing), ISR status being read-only on both register layouts,
and notifications while the VM is stopped (served at ``cont``).

Driven on virtio-rng: one queue whose requests are device-writable buffers, so "the device
took the chain" is visible in QEMU's queue status and in the used ring.
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine, modes
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import queue_view
from qtest_virtio.testing import alloc_bufs
from qtest_virtio.transport import LegacyTransport, ModernTransport, VirtioTransport
from qtest_virtio.transport.layout import CFG_TYPE_NOTIFY, ISR, LEGACY_CFG, STATUS
from qtest_virtio.virtqueue import SplitVirtqueue

pytestmark = pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False)

MODERN_LAYOUT = modes.MODERN_LAYOUT_MODES
SHORT = 2.0
#: How long "nothing happens" is watched (the device's work runs in QEMU's main loop).
QUIET_WINDOW = 0.02
PIO_NOTIFY = {"modern-pio-notify": "on"}


def modern(drv: VirtioRng) -> ModernTransport:
    t = drv.transport
    assert isinstance(t, ModernTransport), f"{t} does not drive the modern layout"
    return t


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give the device's main loop a few turns (each qtest command is one) to do anything."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vm.qtest.readl(0)


def post_unnotified(drv: VirtioRng, qemu: Machine) -> int:
    """Make a one-buffer chain available without notifying; returns its token. QEMU's queue
    status confirms the device has not taken it."""
    vq = drv.queues[0]
    token = vq.add(alloc_bufs(drv.memory, [16], fill=0), indirect=False)
    vq.flush()
    quiet(qemu)
    assert vq.poll_used() is None
    return token


def write_isr(t: VirtioTransport, value: int) -> None:
    """A driver write to ISR status, through the layout's own access path."""
    if isinstance(t, LegacyTransport):
        t.regs.write(LEGACY_CFG.isr_status, value)
    else:
        assert isinstance(t, ModernTransport)
        t.map.write(t.isr_window, 0, 1, value)


# -- notification structure in an I/O BAR (§4.1.4.4) ---------------------------------------------


@pytest.mark.conformance("pci-notify-io-cap-layout", spec="4.1.4.4.1")
@pytest.mark.virtio_device(
    "virtio-rng-pci", refuse_each=False, rings=("split",), transports=MODERN_LAYOUT, flags=PIO_NOTIFY
)
def test_pio_notify_capability_layout(virtio_device: VirtioRng) -> None:
    """With ``modern-pio-notify=on`` a second notification capability points into an I/O BAR.
    Its offset is 2-byte aligned, notify_off_multiplier is 0 or an even power of two, and
    cap.length covers queue_notify_off * multiplier + 2 for every queue (MUST). (QEMU gives it
    multiplier 0, one register for all queues: the scenario below relies on that.)"""
    t = modern(virtio_device)
    io = t.map.notify_io
    assert io is not None and io.cap is not None, "no notify capability in an I/O BAR"
    assert t.fn.bar(io.cap.bar).is_io
    notify = [c for c in t.map.caps if c.cfg_type == CFG_TYPE_NOTIFY]
    assert len(notify) == 2, "a memory notify structure and an I/O one"
    mult = io.cap.notify_off_multiplier
    assert io.cap.offset % 2 == 0
    assert mult == 0 or (mult & (mult - 1) == 0 and mult % 2 == 0), f"notify_off_multiplier {mult}"
    for q in range(t.num_queues()):
        t.select_queue(q)
        assert io.length >= t.common.read(t.common.layout["queue_notify_off"]) * mult + 2


@pytest.mark.conformance("pci-notify-io-kicks-the-queue", spec="4.1.5.2")
@pytest.mark.virtio_device(
    "virtio-rng-pci", refuse_each=False, transports=MODERN_LAYOUT, flags=PIO_NOTIFY, notify_via="pio"
)
def test_requests_complete_when_notified_through_the_port(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The driver notifies by writing the queue index to the queue's notification address
    (§4.1.5.2), here the I/O port of the I/O notify structure; the device then processes the
    queue: a chain made available without a notification stays put until the port write, and
    then completes; a run of requests round the ring all complete."""
    drv = virtio_device
    t = modern(drv)
    assert t.notify_window.access == "io"
    vq = drv.queues[0]
    token = post_unnotified(drv, qemu)
    before = vq.notifications
    vq.kick(force=True)
    assert vq.notifications == before + 1
    assert vq.wait_for(token, timeout=SHORT).length > 0
    for _ in range(vq.size + 2):
        assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device(
    "virtio-rng-pci", refuse_each=False, rings=("split",), transports=MODERN_LAYOUT, flags=PIO_NOTIFY
)
def test_port_write_of_a_missing_queue_notifies_nothing(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With one register for all queues, the value written selects the queue (virtio_pci
    notify_write_pio): a write naming a queue the device does not have, or QEMU's past-the-end
    1024, does not run queue 0; writing 0 then does. (Regression: the spec defines only the
    driver's write of a valid index.)"""
    drv = virtio_device
    t = modern(drv)
    io = t.map.notify_io
    assert io is not None and io.cap is not None
    assert io.cap.notify_off_multiplier == 0, "QEMU's I/O notify structure is one shared register"
    vq = drv.queues[0]
    assert isinstance(vq, SplitVirtqueue)
    token = post_unnotified(drv, qemu)
    for value in (1, 5, 1024, 0xFFFF):
        t.map.write(io, 0, 2, value)
    quiet(qemu)
    assert vq.poll_used() is None
    assert queue_view(qemu, drv.dev_id, 0).last_avail_idx == (vq.avail_idx - 1) & 0xFFFF
    t.map.write(io, 0, 2, 0)
    assert vq.wait_for(token, timeout=SHORT).length > 0


@pytest.mark.virtio_device(
    "virtio-rng-pci", refuse_each=False, rings=("split",), transports=MODERN_LAYOUT, flags=PIO_NOTIFY
)
def test_reading_the_notify_structure_notifies_nothing(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The notification structure is written by the driver (§4.1.4.4); QEMU reads it as 0 at
    every width, in the memory BAR and the I/O BAR, and a read does not notify: a chain left
    unnotified stays unused until the driver's write. (Regression: the spec does not define a
    read.)"""
    drv = virtio_device
    t = modern(drv)
    token = post_unnotified(drv, qemu)
    windows = [w for w in (t.map.notify, t.map.notify_io) if w is not None]
    assert len(windows) == 2
    for window in windows:
        for width in (1, 2, 4):
            assert t.map.read(window, 0, width) == 0, f"{window} read at width {width}"
    quiet(qemu)
    assert drv.queues[0].poll_used() is None
    drv.queues[0].kick(force=True)
    assert drv.queues[0].wait_for(token, timeout=SHORT).length > 0


# -- ISR status (§4.1.4.5) -------------------------------------------------------------------------


@pytest.mark.conformance("pci-isr-read-only", spec="4.1.4.5")
@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",), interrupts="isr")
def test_isr_status_ignores_driver_writes(virtio_device: VirtioRng) -> None:
    """ISR status is read-only to the driver (the field's R in §4.1.4.5 and in the legacy table
    of §4.1.4.10): a write of 0 does not clear a pending queue interrupt (the next read still
    returns it, and clears it, MUST of §4.1.4.5.1), and a write of ones sets nothing."""
    drv = virtio_device
    t = drv.transport
    assert t.read_isr() == 0
    drv.request(8, timeout=SHORT)
    write_isr(t, 0)
    assert t.read_isr() & ISR.queue_interrupt.mask, "a write of 0 cleared ISR status"
    assert t.read_isr() == 0, "the read did not clear ISR status"
    write_isr(t, 0xFF)
    assert t.read_isr() == 0, "a write of ones set ISR bits"


# -- notifications while the VM is stopped -----------------------------------------------------------


def _running(qemu: Machine) -> bool:
    status = qemu.qmp.cmd("query-status")
    assert isinstance(status, dict)
    return bool(status["running"])


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False)
def test_notification_while_stopped_is_served_at_cont(virtio_device: VirtioRng, qemu: Machine) -> None:
    """While the VM is stopped (QMP ``stop``) the device runs nothing: a chain notified then
    stays unused, and QEMU takes nothing from the ring. At ``cont`` the device picks up what
    was made available meanwhile and the chain completes (QEMU's run-state handling:
    virtio_vmstate_change / virtio_pci_vmstate_change; regression)."""
    drv = virtio_device
    vq = drv.queues[0]
    assert len(drv.request(8, timeout=SHORT)) > 0
    token = post_unnotified(drv, qemu)
    qemu.qmp.cmd("stop")
    try:
        assert not _running(qemu)
        vq.kick(force=True)
        quiet(qemu)
        assert vq.poll_used() is None, "the device ran while the VM was stopped"
        assert queue_view(qemu, drv.dev_id, 0).inuse == 0
    finally:
        qemu.qmp.cmd("cont")
    assert _running(qemu)
    assert vq.wait_for(token, timeout=SHORT).length > 0
    assert len(drv.request(8, timeout=SHORT)) > 0


def _driver_ok_without_bus_master(drv: VirtioRng) -> None:
    """Play a driver that runs the device with Bus Master Enable clear (Linux before 2.6.34):
    clear the bit (QEMU then drops DRIVER_OK, see test_pcie) and set DRIVER_OK again."""
    fn, t = drv.fn, drv.transport
    fn.enable(bus_master=False)
    assert "bus_master" not in fn.command_flags
    t.add_status(STATUS.DRIVER_OK.mask)
    assert t.get_status() & STATUS.DRIVER_OK.mask


@pytest.mark.virtio_device(
    "virtio-rng-pci", refuse_each=False, rings=("split",), flags={"virtio-pci-bus-master-bug-migration": "on"}
)
def test_bus_master_bug_compat_sets_bus_master_at_cont(virtio_device: VirtioRng, qemu: Machine) -> None:
    """``virtio-pci-bus-master-bug-migration=on`` keeps a compatibility rule for drivers that
    never set Bus Master Enable: when the VM resumes with the device started (DRIVER_OK) and
    the bit clear, QEMU sets the bit itself (virtio_pci_vmstate_change). (The rule is for
    drivers that never cleared the bit; this one did, so QEMU still holds the device disabled,
    which is not asserted here.)"""
    drv = virtio_device
    _driver_ok_without_bus_master(drv)
    qemu.qmp.cmd("stop")
    qemu.qmp.cmd("cont")
    assert "bus_master" in drv.fn.command_flags, "QEMU did not set Bus Master Enable at cont"


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",))
def test_resume_leaves_bus_master_alone(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The counterpart: without the compatibility property, stop/cont keeps Bus Master Enable
    as the driver left it (clear)."""
    drv = virtio_device
    _driver_ok_without_bus_master(drv)
    qemu.qmp.cmd("stop")
    qemu.qmp.cmd("cont")
    assert "bus_master" not in drv.fn.command_flags


# -- one page per queue (page-per-vq=on) ---------------------------------------------------------------


@pytest.mark.conformance("pci-notify-page-per-vq", spec="4.1.4.4.1")
@pytest.mark.virtio_device(
    "virtio-blk-pci",
    refuse_each=False,
    rings=("split",),
    transports=MODERN_LAYOUT,
    backend="null",
    flags={"page-per-vq": "on", "num-queues": "3"},
)
@pytest.mark.virtio_requires("MQ")
def test_page_per_vq_notify_layout(virtio_device: VirtioDriver) -> None:
    """``page-per-vq=on`` gives each queue its own 4096-byte page of the notification
    structure: notify_off_multiplier is 4096 (0 or an even power of two, MUST), every queue's
    address queue_notify_off * 4096 lies inside cap.length (MUST) and no two queues share one;
    requests on every queue complete when notified at their own address."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, ModernTransport)
    assert t.notify_off_multiplier == 4096
    addresses = []
    for q in range(t.num_queues()):
        bar, off = t.notify_address(q)
        assert off + 2 <= t.notify_window.offset + t.notify_window.length, f"queue {q}"
        addresses.append((bar, off))
    assert len(set(addresses)) == t.num_queues() == 3
    assert isinstance(drv, VirtioBlk)
    for q in range(3):
        assert drv.read(q, 1, queue=q) == bytes(512)
