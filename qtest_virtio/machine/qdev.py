"""QMP's side of hot(un)plug: ``device_add`` from a ``-device`` option, ``device_del``, and
waiting for an event (``DEVICE_DELETED``). The guest's side (slot registers, ACPI) is the PCI
layer's (qtest_virtio/pci/hotplug.py); qtest_virtio/vm.py ties the two together.

QMP ``device_add`` takes JSON-typed properties (QEMU 6.2+ visits them with the strict QObject
input visitor, qdev-monitor.c ``qdev_device_add_from_qdict``), where ``-device`` takes strings:
each value is converted by the type ``-device NAME,help`` gives its property.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ..binary import QemuBinary, UnknownFlag
from ..errors import QtestVirtioError
from .spec import split_option_list

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_INT_TYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size"})
_BOOL_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


class HotplugError(QtestVirtioError):
    """QEMU refused a ``device_add`` / ``device_del``, or never deleted the device."""


def device_add_arguments(option: str, binary: QemuBinary) -> dict[str, Any]:
    """QMP ``device_add`` arguments for a ``-device`` option (``driver,key=value,...``), each
    value typed as the binary declares the property (bools, integers and sizes as JSON)."""
    driver, *pairs = split_option_list(option)
    try:
        types = {name: p.type for name, p in binary.device_properties(driver).items()}
    except UnknownFlag:
        types = {}
    args: dict[str, Any] = {"driver": driver}
    for pair in pairs:
        key, _, value = pair.partition("=")
        args[key] = _typed(value, types.get(key, "str"))
    return args


def _typed(value: str, prop_type: str) -> Any:
    if prop_type == "bool" and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    if prop_type in _INT_TYPES:
        text = value.strip()
        unit = text[-1:].upper() if prop_type == "size" and text[-1:].upper() in _SIZE_UNITS else ""
        try:
            return int(text[: len(text) - len(unit)] if unit else text, 0) * _SIZE_UNITS[unit]
        except ValueError:
            return value  # QEMU names the bad value itself
    return value


def qmp_error(exc: Exception) -> str:
    """The ``desc`` of a QMP error response (qemu.qmp's ExecuteError), else the exception."""
    error = getattr(exc, "error", None)
    desc = getattr(error, "desc", None)
    return str(desc) if desc else str(exc)


def wait_event(
    pull: Callable[[float], dict[str, Any] | None],
    name: str,
    match: Mapping[str, object],
    timeout: float,
    backlog: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The first event ``name`` whose data has every ``match`` item, pulled within ``timeout``
    seconds (None when none came); events that do not match are kept in ``backlog``, which is
    searched first (an event may arrive before the caller waits for it)."""
    from qemu.qmp import QMPError  # QMP is in use by now: imported already

    for event in list(backlog):
        if _matches(event, name, match):
            backlog.remove(event)
            return event
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            pulled = pull(remaining)
        except (TimeoutError, QMPError):  # QMPError: QEMU closed the monitor (it exited)
            return None
        if pulled is None:
            continue
        if _matches(pulled, name, match):
            return pulled
        backlog.append(pulled)
    return None


def _matches(event: dict[str, Any], name: str, match: Mapping[str, object]) -> bool:
    data = event.get("data") or {}
    return event.get("event") == name and all(
        v(data.get(k)) if callable(v) else data.get(k) == v for k, v in match.items()
    )
