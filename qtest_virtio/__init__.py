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

_DRIVERS = {
    "VirtioBlk": "blk",
    "VirtioNet": "net",
    "VirtioRng": "rng",
    "VirtioConsole": "console",
    "VirtioBalloon": "balloon",
    "VirtioScsi": "scsi",
}


def __getattr__(name: str) -> object:
    """The device drivers, imported on first use (``from qtest_virtio import VirtioBlk``)."""
    if name in _DRIVERS:
        import importlib

        return getattr(importlib.import_module(f".devices.{_DRIVERS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "VirtioBalloon",
    "VirtioBlk",
    "VirtioConsole",
    "VirtioNet",
    "VirtioRng",
    "VirtioScsi",
]
