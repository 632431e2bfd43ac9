"""What the virtio-net scenarios share: skips on the negotiated features, QEMU's receive filter,
and transmitq1 narrowed to its type."""

from __future__ import annotations

from typing import Any

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.net.driver import VirtioNet
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
