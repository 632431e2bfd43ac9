"""qtest-virtio: play the virtio guest driver against QEMU in qtest mode.

The stable names (design.md) are importable from here.
"""

from .errors import (
    ClockUnavailable,
    QemuCrashed,
    QemuStartError,
    QtestError,
    QtestTimeout,
    QtestVirtioError,
    ScenarioError,
)
from .machine import DeviceSpec, MachineSpec
from .vm import Machine

__all__ = [
    "ClockUnavailable",
    "DeviceSpec",
    "Machine",
    "MachineSpec",
    "QemuCrashed",
    "QemuStartError",
    "QtestError",
    "QtestTimeout",
    "QtestVirtioError",
    "ScenarioError",
]
