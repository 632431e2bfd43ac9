"""What the stop/cont scenarios share: the run state through QMP, "nothing happens" windows,
and queue interrupts read without waiting.

The machine is RUNNING when a driver is made (``Machine.resume``, on every build), so QMP
``stop`` and ``cont`` (``Machine.stop`` / ``Machine.cont``) mean the same on TCG builds with
the halt firmware and under the qtest accelerator.
"""

from __future__ import annotations

import time

from qtest_virtio import Machine
from qtest_virtio.devices.base import VirtioDriver

#: How long "the device does nothing" is watched (its work runs in QEMU's main loop, and every
#: qtest command is one turn of it).
QUIET_WINDOW = 0.05
#: Timeout for work that must happen.
SHORT = 2.0


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give QEMU's main loop turns (each qtest command is one) to read its sockets and run
    bottom halves in."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vm.qtest.readl(0)


def stop(vm: Machine) -> None:
    """QMP ``stop``, and the run state it must leave: paused, not running."""
    vm.stop()
    assert vm.run_state() == "paused"


def cont(vm: Machine) -> None:
    """QMP ``cont``, and the run state it must leave: running."""
    vm.cont()
    assert vm.run_state() == "running"


def interrupted(drv: VirtioDriver, queue: int) -> bool:
    """Whether the queue's MSI-X message has landed since the last look (and clear it): the
    scenarios run with ``interrupts="msix"``, where every queue has its own vector."""
    assert drv.msix is not None, f"{drv}: the stop/cont scenarios need MSI-X (interrupts='msix')"
    return drv.msix.fired(drv.queue_vector(queue))
