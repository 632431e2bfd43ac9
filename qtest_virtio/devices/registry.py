"""The devices qtest-virtio drives: one :class:`DeviceInfo` per device, registered by its package.

Each device is one folder, ``qtest_virtio/devices/<name>/``: ``encoding.py`` (config layout with
each field's ``requires``, request and response formats, feature bits: no I/O), ``driver.py``
(the ``Virtio*`` class) and ``__init__.py`` holding the one ``DEVICE = DeviceInfo(...)``. Every
device table (the drivers by model, the feature names by virtio ID, the config layouts, the
fuzzer's profiles) is derived from here, so a new device is a new folder plus its name in
:data:`PACKAGES`.

The packages are imported on first use (:func:`devices`), so importing this module costs nothing
and a package may import :class:`DeviceInfo` from here without a cycle.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import QtestVirtioError
from ..registers import Layout
from .base import VirtioDriver

#: The device packages under qtest_virtio/devices/, in the order reports list them.
PACKAGES: tuple[str, ...] = ("blk", "net", "rng", "console", "balloon", "scsi")

#: QEMU builds each virtio-pci model also as ``-transitional`` and ``-non-transitional``
#: (hw/virtio/virtio-pci.c, VirtioPCIDeviceTypeInfo); the suffixes fix the mode, the driver is one.
#: The longer suffix first: "-non-transitional" also ends with "-transitional".
VARIANT_SUFFIXES: tuple[str, ...] = ("-non-transitional", "-transitional")

D = TypeVar("D", bound=VirtioDriver)

#: One buffer of a raw request: (length, device-writable, contents of a device-readable buffer).
FuzzBuffer = tuple[int, bool, bytes]
#: A valid request as buffers, first to last.
FuzzRequest = tuple[FuzzBuffer, ...]


class UnknownDevice(QtestVirtioError, KeyError):
    """A device model qtest-virtio has no driver for (a KeyError too, for lookups)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class FuzzProfile(Generic[D]):
    """What the fuzzer needs of a device: the queues it aims at, each with one valid request
    (the first queue is the default), and a check that a valid request still works through
    the driver (``check(driver, timeout)`` raises when it does not)."""

    queues: Mapping[int, FuzzRequest]
    check: Callable[[D, float], None]

    @property
    def default_queue(self) -> int:
        return next(iter(self.queues))


@dataclass(frozen=True)
class DeviceInfo(Generic[D]):
    """One device's registration: its names, its virtio identity, its driver and its data."""

    #: Our name for it (the package name: ``blk``).
    name: str
    #: The QEMU virtio-pci model (``virtio-blk-pci``); see :attr:`models` for its variants.
    model: str
    driver: type[D]
    fuzz: FuzzProfile[D]
    #: Virtio device ID (§5), config layout (§2.5) and feature bits, from the driver's class.
    device_id: int = field(init=False)
    config: Layout | None = field(init=False)
    feature_bits: Mapping[int, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_id", self.driver.DEVICE_TYPE)
        object.__setattr__(self, "config", self.driver.CONFIG_LAYOUT)
        object.__setattr__(self, "feature_bits", self.driver.FEATURE_BITS)

    @property
    def models(self) -> tuple[str, ...]:
        """The model and its -transitional / -non-transitional variants."""
        return (self.model, *(self.model + suffix for suffix in reversed(VARIANT_SUFFIXES)))


@functools.cache
def devices() -> Mapping[str, DeviceInfo[Any]]:
    """Every registered device by QEMU model name, in :data:`PACKAGES` order."""
    found: dict[str, DeviceInfo[Any]] = {}
    for package in PACKAGES:
        info = importlib.import_module(f"{__package__}.{package}").DEVICE
        if not isinstance(info, DeviceInfo) or info.name != package:
            raise TypeError(f"{__package__}.{package}.DEVICE must be the DeviceInfo named {package!r}")
        found[info.model] = info
    return found


def base_model(model: str) -> str:
    """The model without a -transitional / -non-transitional suffix."""
    for suffix in VARIANT_SUFFIXES:
        if model.endswith(suffix):
            return model.removesuffix(suffix)
    return model


def lookup(model: str) -> DeviceInfo[Any]:
    """The device of a QEMU model name (variants included); UnknownDevice with a hint if none."""
    info = devices().get(base_model(model))
    if info is None:
        close = difflib.get_close_matches(model, list(devices()), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownDevice(
            f"no driver for {model!r}{hint} (devices: {', '.join(devices())}, also as -transitional/-non-transitional)"
        )
    return info


def by_id(device_id: int | None) -> DeviceInfo[Any] | None:
    """The registered device with this virtio device ID, if any."""
    return next((info for info in devices().values() if info.device_id == device_id), None)


def drivers() -> dict[str, type[VirtioDriver]]:
    """Driver class by model name (the base models)."""
    return {model: info.driver for model, info in devices().items()}


def feature_bits() -> dict[int, dict[int, str]]:
    """Device-specific feature names by virtio device ID, then by bit."""
    return {info.device_id: dict(info.feature_bits) for info in devices().values()}


def config_layouts() -> dict[int, Layout]:
    """Device config layouts by virtio device ID (devices with a config only)."""
    return {info.device_id: info.config for info in devices().values() if info.config is not None}
