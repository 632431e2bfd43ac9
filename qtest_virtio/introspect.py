"""The device's own view, from QMP (QEMU 7.2+: ``x-query-virtio-status`` and
``x-query-virtio-queue-status``), in the names the driver side uses, so tests can compare what
the driver believes with what QEMU holds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .machine import QemuMachine
from .transport.layout import FEATURE_BITS

#: QEMU's decoded feature strings use the kernel's macro names.
_QEMU_FEATURE_NAMES = {
    "VIRTIO_RING_F_EVENT_IDX": "EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC": "INDIRECT_DESC",
    "VIRTIO_F_NOTIFY_ON_EMPTY": "NOTIFY_ON_EMPTY",
    "VIRTIO_F_ANY_LAYOUT": "ANY_LAYOUT",
    "VIRTIO_F_BAD_FEATURE": "BAD_FEATURE",
}
_STATUS_RE = re.compile(r"VIRTIO_CONFIG_S_(\w+):")


@dataclass
class DeviceView:
    status: set[str]
    guest_features: set[str]
    host_features: set[str]
    broken: bool
    raw: dict[str, Any]


@dataclass
class QueueView:
    last_avail_idx: int
    shadow_avail_idx: int
    used_idx: int
    num: int
    desc: int
    avail: int
    used: int
    inuse: int


def _names(block: dict[str, Any]) -> set[str]:
    out = set()
    for text in block.get("transports", []) + block.get("dev-features", []):
        macro = text.split(":", 1)[0]
        out.add(_QEMU_FEATURE_NAMES.get(macro) or re.sub(r"^VIRTIO_(?:[A-Z]+_)?F_", "", macro))
    unknown = int(block.get("unknown-dev-features", 0))
    for bit in range(64):
        if unknown >> bit & 1:
            out.add(FEATURE_BITS.get(bit, f"bit {bit}"))
    return out


def backend_path(dev_id: str) -> str:
    return f"/machine/peripheral/{dev_id}/virtio-backend"


def device_view(vm: QemuMachine, dev_id: str) -> DeviceView:
    raw = vm.qmp.cmd("x-query-virtio-status", path=backend_path(dev_id))
    assert isinstance(raw, dict)
    status = {m.group(1) for s in raw["status"]["statuses"] if (m := _STATUS_RE.match(s))}
    status = {"DEVICE_NEEDS_RESET" if s == "NEEDS_RESET" else s for s in status}  # spec's name
    return DeviceView(status, _names(raw["guest-features"]), _names(raw["host-features"]), raw["broken"], raw)


def queue_view(vm: QemuMachine, dev_id: str, queue: int) -> QueueView:
    raw = vm.qmp.cmd("x-query-virtio-queue-status", path=backend_path(dev_id), queue=queue)
    assert isinstance(raw, dict)
    return QueueView(
        raw["last-avail-idx"],
        raw["shadow-avail-idx"],
        raw["used-idx"],
        raw["vring-num"],
        raw["vring-desc"],
        raw["vring-avail"],
        raw["vring-used"],
        raw["inuse"],
    )
