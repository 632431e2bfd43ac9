"""What the virtio-net scenarios share: skips on the negotiated features, QEMU's receive filter,
and transmitq1 narrowed to its type."""

from __future__ import annotations

from typing import Any

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import ethernet_frame
from qtest_virtio.introspect import device_view
from qtest_virtio.transport.layout import STATUS
from qtest_virtio.virtqueue import Virtqueue


def need(net: VirtioNet, *features: str) -> None:
    """Skip where a feature the statement is about was not negotiated (refused, not offered)."""
    missing = [f for f in features if not net.has(f)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not negotiated in this run")


def need_not(net: VirtioNet, *features: str) -> None:
    """Skip where a feature is negotiated whose absence the statement is about."""
    present = [f for f in features if net.has(f)]
    if present:
        pytest.skip(f"{', '.join(present)} negotiated in this run; the statement is about its absence")


def rx_filter(qemu: Machine, net: VirtioNet) -> dict[str, Any]:
    """QEMU's view of the NIC's receive filter (QMP ``query-rx-filter``: one entry per NIC named)."""
    result = qemu.qmp.cmd("query-rx-filter", name=net.dev_id)
    assert isinstance(result, list), f"query-rx-filter returned {result!r}"
    (info,) = result
    assert isinstance(info, dict), f"query-rx-filter returned {result!r}"
    return info


def txq(net: VirtioNet) -> Virtqueue:
    """transmitq1, which the driver sets up with the device (§5.1.2)."""
    assert net.txq is not None, f"{net.dev_id}: transmitq1 is not set up"
    return net.txq


def marker_frame(dst: bytes | str, seed: int = 0x77) -> bytes:
    """A small frame to an address the device accepts, sent after one it may drop."""
    return ethernet_frame(dst, "02:00:00:00:00:01", 0x88B5, bytes((seed + 5 * i) & 0xFF for i in range(50)))


def delivered(qemu: Machine, net: VirtioNet, frame: bytes, marker_to: bytes | str | None = None) -> bool:
    """Inject ``frame`` then a marker the device accepts; True if ``frame`` came first (so
    "dropped" is an observation, not a timeout)."""
    host = qemu.backend(net.dev_id, NetBackend)
    marker = marker_frame(marker_to or net.mac)
    host.send(frame)
    host.send(marker)
    got = net.receive(timeout=2)
    if got == marker:
        return False
    assert got == frame, "a frame came back altered"
    assert net.receive(timeout=2) == marker
    return True


def gave_up(qemu: Machine, net: VirtioNet) -> bool:
    """QEMU marked the device broken (virtio_error); with VERSION_1 it also sets
    DEVICE_NEEDS_RESET (§2.1.2), which the driver reads in device_status."""
    status = net.transport.get_status()  # qtest first: a QEMU that died raises QemuCrashed here
    view = device_view(qemu, net.dev_id)
    if net.has("VERSION_1"):
        if view.broken and not status & STATUS.DEVICE_NEEDS_RESET.mask:
            # it gave up between the two reads; virtio_error sets the bit before it marks the
            # device broken, in one main-loop turn, so the bit is there now
            status = net.transport.get_status()
        assert bool(status & STATUS.DEVICE_NEEDS_RESET.mask) == view.broken, (
            f"QMP broken={view.broken}, but device_status is {status:#x}"
        )
    return view.broken
