"""What every migration scenario checks once the state has moved: the destination's own view
(QMP ``x-query-virtio-status`` / ``x-query-virtio-queue-status``) is the driver's.

The device status, the negotiated features and each queue's size and ring addresses must be
what the driver set up on the source (virtio 1.2 §2.1, §4.1.4.3: none of it is re-written by a
driver that was migrated). On split rings the indices must also agree: QEMU's used index is the
one in guest RAM, and it has taken no chain the driver has not made available.
"""

from __future__ import annotations

from qtest_virtio import Machine
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.virtqueue import PackedVirtqueue, SplitVirtqueue


def assert_view_matches(vm: Machine, drv: VirtioDriver, *, in_flight: int = 0) -> None:
    """QEMU's view of ``drv``'s device on ``vm`` is the driver's; ``in_flight``: chains made
    available that the device may have taken but not yet used, on any queue."""
    view = device_view(vm, drv.dev_id)
    assert "DRIVER_OK" in view.status and "DEVICE_NEEDS_RESET" not in view.status, view.status
    assert not view.broken, "QEMU marked the device broken after migration"
    assert set(drv.negotiated) <= view.guest_features, (
        f"negotiated {sorted(drv.negotiated)}, QEMU holds {sorted(view.guest_features)}"
    )
    for vq in drv.queues:
        q = queue_view(vm, drv.dev_id, vq.index)
        assert q.num == vq.size, f"{vq.name}: size {q.num} on the destination, {vq.size} set up"
        if isinstance(vq, SplitVirtqueue):
            assert (q.desc, q.avail, q.used) == (vq.desc, vq.avail, vq.used), f"{vq.name}: ring addresses moved"
            assert q.used_idx == vq.used_idx(), f"{vq.name}: QEMU's used idx {q.used_idx}, guest RAM's {vq.used_idx()}"
            taken = (q.last_avail_idx - q.used_idx) & 0xFFFF
            assert ((vq.avail_idx - q.last_avail_idx) & 0xFFFF) <= vq.size, f"{vq.name}: took chains not made available"
            assert taken <= in_flight, f"{vq.name}: {taken} chains taken and unused, {in_flight} expected at most"
        elif isinstance(vq, PackedVirtqueue):
            assert (q.desc, q.avail, q.used) == (vq.ring, vq.driver_event, vq.device_event), f"{vq.name}: ring moved"
