"""QEMU's own view of a virtqueue over QMP, cross-checked against the driver's ring state:
``x-query-virtio-queue-element`` (the chain at the avail head, or at a given avail slot) and
``x-query-virtio-queue-status`` (the device's indices). Regression scenarios: the commands are
QEMU's debugging interface (qapi/virtio.json, since 7.2), not the spec's, so what they must say
is what the driver laid out in guest memory (virtio 1.2 §2.7.5, §2.7.6, §2.7.13).

A chain is made available without a notification, so it sits at the avail head while the
commands look at it; the device takes it only once notified (§2.7.13: the driver notifies
after publishing). Driven on virtio-rng: a request is device-writable buffers only.
"""

from __future__ import annotations

from typing import Any

import pytest
from qemu.qmp import ExecuteError

from qtest_virtio import Machine
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import backend_path, queue_view
from qtest_virtio.testing import alloc_bufs
from qtest_virtio.virtqueue import SplitVirtqueue
from qtest_virtio.virtqueue.layout import DESC_F, SPLIT_DESC

pytestmark = pytest.mark.virtio_device("virtio-rng-pci")

SHORT = 2.0
#: QEMU's names of the descriptor flags (virtio.c qmp_decode_vring_desc_flags).
FLAG_NAMES = {DESC_F.NEXT.mask: "next", DESC_F.WRITE.mask: "write", DESC_F.INDIRECT.mask: "indirect"}


def element(qemu: Machine, drv: VirtioRng, **args: Any) -> dict[str, Any]:
    raw = qemu.qmp.cmd("x-query-virtio-queue-element", path=backend_path(drv.dev_id), **args)
    assert isinstance(raw, dict)
    return raw


def flag_names(flags: int) -> set[str]:
    return {name for mask, name in FLAG_NAMES.items() if flags & mask}


def descriptors(drv: VirtioRng, table: int, ids: list[int]) -> list[tuple[int, int, set[str]]]:
    """(addr, len, flag names) of descriptors ``ids`` of ``table``, read back from guest memory:
    what the driver wrote, as the device must read it (§2.7.5)."""
    out = []
    for i in ids:
        addr, length, flags, _next = SPLIT_DESC.struct.unpack(drv.memory.read(table + SPLIT_DESC.size * i, 16))
        out.append((addr, length, flag_names(flags)))
    return out


def reported(elem: dict[str, Any]) -> list[tuple[int, int, set[str]]]:
    """The element's descriptors in chain order: QEMU lists the last one first (it prepends)."""
    return [(d["addr"], d["len"], set(d["flags"])) for d in reversed(elem["descs"])]


def split_queue(drv: VirtioRng) -> SplitVirtqueue:
    vq = drv.queues[0]
    if not isinstance(vq, SplitVirtqueue):
        pytest.skip("x-query-virtio-queue-element reads split rings only (see the packed scenario)")
    return vq


@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
def test_queue_element_is_the_chain_at_the_avail_head(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A three-buffer chain made available but not yet notified is the element QEMU reports at
    the head: its head descriptor index, every descriptor's address, length and flags in chain
    order (NEXT on all but the last, WRITE on each), and avail idx / ring entry / used idx as
    the driver wrote and read them. Once notified it completes, and the queue status agrees
    with the driver's indices."""
    drv = virtio_device
    vq = split_queue(drv)
    drv.request(8, timeout=SHORT)  # the device has consumed and used one chain already
    bufs = alloc_bufs(drv.memory, [16, 32, 64], fill=0)
    token = vq.add(bufs, indirect=False)
    vq.flush()
    chain = vq.in_flight[next(h for h, c in vq.in_flight.items() if c.token == token)]
    head = chain.descriptors[0]
    elem = element(qemu, drv, queue=0)
    assert elem["name"] == "virtio-rng"
    assert elem["index"] == head
    assert elem["avail"]["idx"] == vq.avail_idx
    assert elem["avail"]["ring"] == head
    assert elem["used"]["idx"] == vq.used_idx() == vq.last_used
    want = [(b.addr, b.length, {"write"} | ({"next"} if i < len(bufs) - 1 else set())) for i, b in enumerate(bufs)]
    assert reported(elem) == want == descriptors(drv, vq.desc, chain.descriptors)
    view = queue_view(qemu, drv.dev_id, 0)
    assert view.last_avail_idx == (vq.avail_idx - 1) & 0xFFFF, "the device took a chain it was not told of"
    assert view.inuse == 0
    vq.kick(force=True)
    used = vq.wait_for(token, timeout=SHORT)
    assert used.id == head and 0 < used.length <= 16 + 32 + 64
    view = queue_view(qemu, drv.dev_id, 0)
    assert (view.last_avail_idx, view.used_idx, view.inuse) == (vq.avail_idx, vq.last_used, 0)
    assert (view.desc, view.avail, view.used, view.num) == (vq.desc, vq.avail, vq.used, vq.size)


@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
def test_queue_element_at_a_given_avail_slot(virtio_device: VirtioRng, qemu: Machine) -> None:
    """``index`` names an avail ring slot: a slot the device already consumed still reports the
    chain the driver put there (the ring entry is not rewritten), and slots are taken modulo
    the queue size, as the free-running avail index is (§2.7.6)."""
    drv = virtio_device
    vq = split_queue(drv)
    slot = vq.avail_idx
    bufs = alloc_bufs(drv.memory, [24], fill=0)
    token = vq.add(bufs, indirect=False)
    head = next(h for h, c in vq.in_flight.items() if c.token == token)
    vq.kick(force=True)
    vq.wait_for(token, timeout=SHORT)
    for index in (slot, slot + vq.size):
        elem = element(qemu, drv, queue=0, index=index)
        assert (elem["index"], elem["avail"]["ring"]) == (head, head), f"index {index}"
        assert reported(elem) == [(bufs[0].addr, 24, {"write"})]
        assert elem["avail"]["idx"] == elem["used"]["idx"] == vq.avail_idx


@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
@pytest.mark.virtio_requires("INDIRECT_DESC")
def test_queue_element_follows_an_indirect_table(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A chain behind one INDIRECT descriptor (§2.7.5.3) is reported as the descriptors of the
    indirect table, with their own NEXT/WRITE flags; the ring's one descriptor is its head."""
    drv = virtio_device
    vq = split_queue(drv)
    bufs = alloc_bufs(drv.memory, [8, 16, 40], fill=0)
    token = vq.add(bufs, indirect=True)
    vq.flush()
    chain = next(c for c in vq.in_flight.values() if c.token == token)
    assert chain.indirect_table is not None and len(chain.descriptors) == 1
    (ring_desc,) = descriptors(drv, vq.desc, chain.descriptors)
    assert ring_desc == (chain.indirect_table, 3 * SPLIT_DESC.size, {"indirect"})
    elem = element(qemu, drv, queue=0)
    assert elem["index"] == chain.descriptors[0]
    assert reported(elem) == descriptors(drv, chain.indirect_table, [0, 1, 2])
    assert [d[:2] for d in reported(elem)] == [(b.addr, b.length) for b in bufs]
    vq.kick(force=True)
    assert vq.wait_for(token, timeout=SHORT).length > 0


@pytest.mark.virtio_device("virtio-rng-pci", rings=("packed",))
def test_queue_element_refuses_packed_rings(virtio_device: VirtioRng, qemu: Machine) -> None:
    """On a packed ring QEMU does not decode elements: the command fails with "Packed ring not
    supported" (virtio.c) rather than reading the packed descriptors as split ones, and the
    queue keeps working."""
    drv = virtio_device
    assert "RING_PACKED" in drv.negotiated
    with pytest.raises(ExecuteError, match="Packed ring not supported"):
        element(qemu, drv, queue=0)
    assert len(drv.request(8, timeout=SHORT)) > 0


def test_queue_queries_refuse_a_missing_queue_or_device(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Both queue commands name the problem when the queue does not exist (virtio-rng has one:
    queue 1 and QEMU's past-the-end 1024 are refused) or the path is not a virtio device; a
    valid query still works afterwards."""
    drv = virtio_device
    path = backend_path(drv.dev_id)
    for command in ("x-query-virtio-queue-element", "x-query-virtio-queue-status"):
        for queue in (1, 1024):
            with pytest.raises(ExecuteError, match=f"Invalid virtqueue number {queue}"):
                qemu.qmp.cmd(command, path=path, queue=queue)
        with pytest.raises(ExecuteError, match="is not a VirtIO"):
            qemu.qmp.cmd(command, path=f"/machine/peripheral/{drv.dev_id}", queue=0)
    assert queue_view(qemu, drv.dev_id, 0).num == drv.queues[0].size


def test_queue_status_indices_follow_the_driver(virtio_device: VirtioRng, qemu: Machine) -> None:
    """After each request the device's last_avail_idx and used_idx are the driver's avail and
    used positions (split: free-running indices, §2.7.6/§2.7.8; packed: the ring positions the
    next descriptor goes to, §2.8.1) and nothing is in use."""
    drv = virtio_device
    vq = drv.queues[0]
    for n in range(1, vq.size + 3):  # round the ring once
        assert len(drv.request(4, timeout=SHORT)) > 0
        view = queue_view(qemu, drv.dev_id, 0)
        if isinstance(vq, SplitVirtqueue):
            assert (view.last_avail_idx, view.used_idx, view.shadow_avail_idx) == (vq.avail_idx,) * 3, f"request {n}"
            assert vq.last_used == vq.avail_idx
        else:
            assert view.last_avail_idx == view.used_idx == n % vq.size, f"request {n}"
        assert view.inuse == 0
