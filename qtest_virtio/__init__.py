"""qtest-virtio: play the virtio guest driver against QEMU in qtest mode.

The stable names (design.md) are importable from here.
"""

from typing import TYPE_CHECKING

from .errors import (
    ClockUnavailable,
    MigrationError,
    MigrationUnsupported,
    QemuCrashed,
    QemuStartError,
    QtestError,
    QtestTimeout,
    QtestVirtioError,
    ScenarioError,
)
from .machine import DeviceSpec, MachineSpec
from .vm import Machine

if TYPE_CHECKING:  # design.md's stable driver names, typed for mypy; at run time from the registry
    from .devices.balloon.driver import VirtioBalloon
    from .devices.blk.driver import VirtioBlk
    from .devices.console.driver import VirtioConsole
    from .devices.net.driver import VirtioNet
    from .devices.rng.driver import VirtioRng
    from .devices.scsi.driver import VirtioScsi


def __getattr__(name: str) -> object:
    """The device drivers, from the device registry on first use (``from qtest_virtio import VirtioBlk``)."""
    from .devices import registry

    for info in registry.devices().values():
        if info.driver.__name__ == name:
            return info.driver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ClockUnavailable",
    "DeviceSpec",
    "Machine",
    "MachineSpec",
    "MigrationError",
    "MigrationUnsupported",
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
