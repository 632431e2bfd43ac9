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

from qtest_virtio import Machine, modes
from qtest_virtio.devices.balloon.encoding import BALLOON_CONFIG
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import backend_path, device_view, queue_view
from qtest_virtio.registers import Field
from qtest_virtio.testing import alloc_bufs
from qtest_virtio.transport import LegacyTransport, ModernTransport, VirtioTransport
from qtest_virtio.transport.layout import COMMON_CFG, LEGACY_CFG, STATUS
from qtest_virtio.virtqueue import PackedVirtqueue, SplitVirtqueue
from qtest_virtio.virtqueue.layout import DESC_F, SPLIT_DESC

#: What QEMU reports of a queue does not depend on which optional feature was refused: out of the
#: --virtio-refuse-each runs, but for the status view, which follows the negotiation.
pytestmark = pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False)

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


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",))
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


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",))
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


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",))
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


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("packed",))
def test_queue_element_refuses_packed_rings(virtio_device: VirtioRng, qemu: Machine) -> None:
    """On a packed ring QEMU does not decode elements: the command fails with "Packed ring not
    supported" (virtio.c) rather than reading the packed descriptors as split ones, and the
    queue keeps working."""
    drv = virtio_device
    assert "RING_PACKED" in drv.negotiated
    with pytest.raises(ExecuteError, match="Packed ring not supported"):
        element(qemu, drv, queue=0)
    assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",))
def test_queue_queries_refuse_a_missing_queue_or_device(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Both queue commands name the problem when the queue does not exist (virtio-rng has one:
    queue 1 and QEMU's past-the-end 1024 are refused) or the path is not a virtio device; a
    valid query still works afterwards. (Split only: the refusals come before any ring is
    read.)"""
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


@pytest.mark.virtio_device("virtio-rng-pci")  # every refusal run: QEMU's view must follow each one
def test_device_status_view_follows_the_driver(virtio_device: VirtioRng, qemu: Machine) -> None:
    """``x-query-virtio-status`` agrees with the transport: the status bits it lists are those
    device_status reads, the guest features are the set the driver accepted (ANY_LAYOUT aside:
    QEMU keeps it implicit with VERSION_1), every one of them among the host features, and the
    device is not broken; after a reset its status list is empty."""
    drv = virtio_device
    t = drv.transport
    view = device_view(qemu, drv.dev_id)
    assert view.status == set(STATUS.names_set(t.get_status()))
    assert {"ACKNOWLEDGE", "DRIVER", "DRIVER_OK"} <= view.status
    accepted = set(drv.negotiated) - {"ANY_LAYOUT"}
    assert view.guest_features - {"ANY_LAYOUT"} == accepted
    assert view.guest_features <= view.host_features
    assert view.broken is False
    t.reset()
    assert device_view(qemu, drv.dev_id).status == set()


# -- the transport's registers read back (virtio 1.2 §4.1.4.3, §4.1.4.10) --------------------------


def _halves(t: ModernTransport, field: Field) -> int:
    """A 64-bit common configuration field read as its low and high 32-bit halves (QEMU keeps
    them as two registers)."""
    common = t.map.common
    assert common is not None
    return t.map.read(common, field.offset, 4) | t.map.read(common, field.offset + 4, 4) << 32


@pytest.mark.conformance("pci-queue-addresses-read-back", spec="4.1.4.3")
@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, transports=modes.MODERN_LAYOUT_MODES)
def test_modern_queue_registers_read_back(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The driver-written common configuration fields are read-write (§4.1.4.3, each field's
    RW): queue_desc, queue_driver and queue_device read back, in 32-bit halves, the ring
    addresses the driver wrote, which are also the addresses QEMU's queue status reports;
    driver_feature_select reads back the value written; queue_reset reads 0 on a live queue."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, ModernTransport)
    vq = drv.queues[0]
    if isinstance(vq, SplitVirtqueue):
        addrs = (vq.desc, vq.avail, vq.used)
    else:
        assert isinstance(vq, PackedVirtqueue)
        addrs = (vq.ring, vq.driver_event, vq.device_event)
    t.select_queue(0)
    c = COMMON_CFG
    assert tuple(_halves(t, f) for f in (c.queue_desc, c.queue_driver, c.queue_device)) == addrs
    view = queue_view(qemu, drv.dev_id, 0)
    assert (view.desc, view.avail, view.used) == addrs
    for select in (1, 0, 7):
        t.common.write(c.driver_feature_select, select)
        assert t.common.read(c.driver_feature_select) == select
    assert t.common.read(c.queue_reset) == 0
    assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",), transports=modes.LEGACY_LAYOUT_MODES)
def test_legacy_queue_registers_read_back(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Legacy layout (§4.1.4.10): queue_address reads back the ring's page frame number (the
    4096-byte aligned ring QEMU also reports), queue_select reads back the queue selected; a
    select past QEMU's 1024 queues is ignored, leaving queue 0 selected (regression: the
    legacy layout defines no such value)."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, LegacyTransport)
    vq = split_queue(drv)
    t.regs.write(LEGACY_CFG.queue_select, 0)
    assert t.regs.read(LEGACY_CFG.queue_select) == 0
    assert t.regs.read(LEGACY_CFG.queue_address) << 12 == vq.desc == queue_view(qemu, drv.dev_id, 0).desc
    for select in (1024, 0xFFFF):
        t.regs.write(LEGACY_CFG.queue_select, select)
        assert t.regs.read(LEGACY_CFG.queue_select) == 0, f"queue_select {select:#x}"
    assert t.regs.read(LEGACY_CFG.queue_address) << 12 == vq.desc
    t.regs.write(LEGACY_CFG.queue_select, 3)
    assert (t.regs.read(LEGACY_CFG.queue_select), t.regs.read(LEGACY_CFG.queue_address)) == (3, 0)


@pytest.mark.conformance("pci-cfg-access-byte-write", spec="4.1.4.9.1")
@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",), transports=modes.MODERN_LAYOUT_MODES)
def test_pci_cfg_window_byte_write_resets_the_device(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A 1-byte write through the PCI configuration access capability performs the write in
    the BAR (MUST): 0 written to device_status that way resets the device, which device_status
    read through the BAR and QEMU's view both show; the driver then starts it again."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, ModernTransport)
    common = t.map.common
    assert common is not None and common.bar is not None
    assert t.get_status() & STATUS.DRIVER_OK.mask
    t.pci_cfg_write(common.bar, common.offset + COMMON_CFG.device_status.offset, 1, 0)
    assert t.get_status() == 0
    assert not device_view(qemu, drv.dev_id).status
    assert t.pci_cfg_read(common.bar, common.offset + COMMON_CFG.device_status.offset, 1) == 0
    drv.initialize()
    assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.conformance("pci-queue-enable-zero-needs-reset", spec="2.1.2")
@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",), transports=modes.MODERN_LAYOUT_MODES)
def test_queue_enable_zero_sets_needs_reset(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The driver MUST NOT write 0 to queue_enable (§4.1.4.3.2). A device in an error state
    that needs a reset SHOULD set DEVICE_NEEDS_RESET (§2.1.2), and QEMU does so for this one:
    device_status gains DEVICE_NEEDS_RESET, QEMU reports the device broken, the queue stays
    enabled; a reset and a new initialization bring it back."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, ModernTransport)
    t.select_queue(0)
    t.common.write(COMMON_CFG.queue_enable, 0)
    assert t.get_status() & STATUS.DEVICE_NEEDS_RESET.mask
    view = device_view(qemu, drv.dev_id)
    assert view.broken and "DEVICE_NEEDS_RESET" in view.status
    assert t.queue_enabled(0)
    drv.initialize()
    assert not t.get_status() & STATUS.DEVICE_NEEDS_RESET.mask
    assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",), transports=modes.MODERN_LAYOUT_MODES)
def test_pci_cfg_window_past_the_structures_touches_nothing(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A driver MUST NOT use the PCI configuration access window outside the BAR ranges of the
    other virtio structures (§4.1.4.9.2). QEMU drops such a write and a read through it
    returns nothing new (regression, robustness): offsets just past the modern BAR, where
    device_status and queue_enable would alias, change neither, and the device keeps running."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, ModernTransport)
    common = t.map.common
    assert common is not None and common.bar is not None
    end = t.fn.bar(common.bar).size
    status = t.get_status()
    for field in (COMMON_CFG.device_status, COMMON_CFG.queue_enable):
        t.pci_cfg_write(common.bar, end + field.offset, field.width, 0)
        t.pci_cfg_read(common.bar, end + field.offset, field.width)
    assert t.get_status() == status
    assert t.queue_enabled(0)
    assert device_view(qemu, drv.dev_id).status >= {"DRIVER_OK"}
    assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, rings=("split",), transports=modes.LEGACY_LAYOUT_MODES)
def test_legacy_bad_feature_bit_means_no_features(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Legacy bit 30 (VIRTIO_F_BAD_FEATURE, virtio 0.9.5 Appendix B) is a trap QEMU offers in
    the legacy layout: no driver implements it, so a driver that accepts it accepts bits
    blindly. QEMU then takes the device's fallback set instead, empty for virtio-rng:
    driver_features reads 0 and QEMU's view holds no guest feature. A fresh initialization
    (which declines bit 30) negotiates normally again (regression)."""
    drv = virtio_device
    t = drv.transport
    assert isinstance(t, LegacyTransport)
    offered = t.regs.read(LEGACY_CFG.device_features)
    assert offered >> 30 & 1, "QEMU no longer offers VIRTIO_F_BAD_FEATURE"
    t.regs.write(LEGACY_CFG.driver_features, offered | 1 << 30)
    assert t.regs.read(LEGACY_CFG.driver_features) == 0
    assert device_view(qemu, drv.dev_id).guest_features == set()
    drv.initialize()
    assert t.regs.read(LEGACY_CFG.driver_features) == drv.negotiated.accepted
    assert len(drv.request(8, timeout=SHORT)) > 0


# -- device configuration writes at each width (§4.1.3.1, §4.1.4.10) -------------------------------

BALLOON_ACTUAL = BALLOON_CONFIG.actual


def balloon_pages(qemu: Machine) -> int:
    """Pages in the balloon as QEMU sees them: query-balloon answers RAM - actual * 4096."""
    raw = qemu.qmp.cmd("query-balloon")
    assert isinstance(raw, dict)
    return (qemu.spec.memory_bytes - int(raw["actual"])) // 4096


def _write_actual(t: VirtioTransport, value: int, width: int) -> None:
    for off in range(0, 4, width):
        t.config_write(BALLOON_ACTUAL.offset + off, width, value >> (8 * off) & ((1 << (8 * width)) - 1))


@pytest.mark.virtio_device("virtio-balloon-pci", refuse_each=False, rings=("split",))
def test_balloon_actual_written_at_each_width(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """virtio-balloon's ``actual`` is the device-specific field the driver writes (§5.5.4). A
    4-byte write (the access width §4.1.3.1 asks of a driver for a 32-bit field) reaches the
    device: it reads back and QEMU's query-balloon follows. The legacy interface allows any
    width (§4.1.4.10), and QEMU's modern config takes 1- and 2-byte writes alike: written
    whole in pieces, the value reads back and QEMU follows (only the final value is checked:
    partial legacy values are deviation balloon-legacy-actual-whole-value's subject)."""
    drv = virtio_device
    t = drv.transport
    assert balloon_pages(qemu) == 0
    for width, value in ((4, 0x123), (2, 0x10203), (1, 0x80), (4, 0)):
        _write_actual(t, value, width)
        assert t.config_read(BALLOON_ACTUAL.offset, 4) == value, f"{width}-byte writes"
        assert balloon_pages(qemu) == value, f"{width}-byte writes of {value:#x}"
