"""Typed access for the virtqueue scenarios: the host end of a device's backend, narrowed to
the kind the scenario's marker asked for (``Machine.backend`` returns any handle)."""

from __future__ import annotations

from typing import TypeVar

from qtest_virtio import Machine
from qtest_virtio.devices.base import VirtioDriver

H = TypeVar("H")


def backend(qemu: Machine, drv: VirtioDriver, kind: type[H]) -> H:
    """``qemu.backend(drv.dev_id)``, checked to be a ``kind`` (an ``RngFifo``, a ``NetBackend``)."""
    end = qemu.backend(drv.dev_id)
    assert isinstance(end, kind), f"{drv.dev_id}: the backend is {end!r}, not a {kind.__name__}"
    return end
