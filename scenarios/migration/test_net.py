"""virtio-net across a live migration: rings, buffers, filters and interrupts carry over, the
destination's new socket backend carries the frames (virtio 1.2 §5.1, §2.7, §2.8; QEMU's
docs/devel/migration: device state and guest RAM move, the guest does not re-initialise).

The destination's backend is a new socket (``virtio_device.backend`` after the migration), as on
a new host. QEMU announces the NIC there after loading (net/announce.c ``qemu_announce_self``:
reverse-ARP frames from the NIC's MAC), so what the host end reads skips those
(:func:`host_frame`). Each scenario ends with a full round trip and QEMU's own view of the device
against the driver's (``assert_view_matches``).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend, TapBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import NET_STATUS, ethernet_frame, mac_bytes, vlan_frame
from qtest_virtio.devices.net.packets import Flow, ip_frame
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.virtqueue import Virtqueue, VirtqueueTimeout

from ..net._support import delivered, need, rx_filter
from ._notify import (
    let_virtual_time_pass,
    masked_vector_survives_across,
    notified,
    quiet,
    suppression_holds_across,
    wait_notified,
    wait_used_idx_moves,
)
from ._support import assert_view_matches

pytestmark = pytest.mark.virtio_device("virtio-net-pci", refuse_each=False)

PEER = "02:00:00:00:00:01"
ETH_P_RARP = 0x8035
#: A MAC the driver sets, and addresses for the filter tables.
NEW_MAC = "02:12:34:56:78:9a"
TABLE_UNICAST = "02:aa:00:00:00:01"
TABLE_MULTICAST = "01:00:5e:00:00:fb"
STRANGER = "02:99:99:99:99:99"


def _frame(dst: bytes | str, seed: int) -> bytes:
    return ethernet_frame(dst, PEER, 0x88B5, bytes((seed + 7 * i) & 0xFF for i in range(80)))


def _out(seed: int) -> bytes:
    """A frame the guest sends (to the peer)."""
    return ethernet_frame(PEER, "02:00:00:00:00:02", 0x88B5, bytes((seed + 3 * i) & 0xFF for i in range(70)))


def host(vm: Machine, net: VirtioNet) -> NetBackend:
    """The host end of ``vm``'s socket backend for the NIC."""
    return vm.backend(net.dev_id, NetBackend)


def host_frame(end: NetBackend | TapBackend, timeout: float = 2.0) -> bytes:
    """The next frame the NIC sent to the link, past QEMU's reverse-ARP self-announcements."""
    deadline = time.monotonic() + timeout
    while True:
        frame = end.receive(timeout=max(deadline - time.monotonic(), 0.01))
        if struct.unpack_from(">H", frame, 12)[0] != ETH_P_RARP:
            return frame


def _rxq(net: VirtioNet) -> Virtqueue:
    assert net.rxq is not None
    return net.rxq


def _txq(net: VirtioNet) -> Virtqueue:
    assert net.txq is not None
    return net.txq


def round_trip(vm: Machine, net: VirtioNet, seed: int = 0x40) -> None:
    """One frame in from the link and one out to it, on ``vm``'s backend."""
    end = host(vm, net)
    frame = _frame(net.mac, seed)
    end.send(frame)
    assert net.receive(timeout=2) == frame
    net.send(_out(seed))
    assert host_frame(end) == _out(seed)


# -- rings and buffers ---------------------------------------------------------------------


def test_idle_device_migrates(virtio_device: VirtioNet, qemu: Machine, migrate: Migrate) -> None:
    """At DRIVER_OK with receive buffers posted and nothing in flight: on the destination the
    buffers posted on the source take a frame from the new backend, a frame sent goes out there,
    the MAC in config is the same, and QEMU's view is the driver's."""
    net = virtio_device
    round_trip(qemu, net, 1)
    mac = net.mac
    dest = migrate()
    assert net.backend is host(dest, net), "the driver's backend is not the destination's"
    assert_view_matches(dest, net)
    assert net.mac == mac
    round_trip(dest, net, 2)


def test_available_frames_are_sent_from_the_destination(
    virtio_device: VirtioNet, qemu: Machine, migrate: Migrate
) -> None:
    """Frames made available on transmitq1 (published, not notified) before the migration are
    the destination's to send: after a notification there they reach the new backend, in order,
    each used with length 0 (nothing device-writable, §2.7.8.2), and nothing went out of the
    source."""
    net = virtio_device
    txq = _txq(net)
    pending = [net.transmit(_out(10 + i), kick=False) for i in range(2)]
    txq.flush()
    assert not host(qemu, net).pending(0.01), "the source sent a frame it was never notified of"
    dest = migrate()
    assert_view_matches(dest, net, in_flight=2)
    txq.kick(force=True)
    end = host(dest, net)
    assert [host_frame(end), host_frame(end)] == [_out(10), _out(11)]
    assert [txq.complete(r, timeout=2)[0] for r in pending] == [0, 0]
    round_trip(dest, net, 3)


def test_used_buffers_not_yet_consumed_are_popped_on_the_destination(
    virtio_device: VirtioNet, qemu: Machine, migrate: Migrate
) -> None:
    """A frame received and a frame sent on the source, used by the device and not yet taken by
    the driver: on the destination the driver finds both used entries in guest RAM, the received
    one with used length header + frame (§5.1.6.4) and its data, the sent one with length 0; the
    next frames both ways work."""
    net = virtio_device
    rx_before = queue_view(qemu, net.dev_id, _rxq(net).index).used_idx
    frame = _frame(net.mac, 5)
    host(qemu, net).send(frame)
    wait_used_idx_moves(qemu, net.dev_id, _rxq(net).index, rx_before)
    tx_before = queue_view(qemu, net.dev_id, _txq(net).index).used_idx
    sent = net.transmit(_out(5))
    assert host_frame(host(qemu, net)) == _out(5)
    wait_used_idx_moves(qemu, net.dev_id, _txq(net).index, tx_before)
    dest = migrate()
    assert_view_matches(dest, net)
    packet = net.receive_packet(timeout=2)
    assert packet.frame == frame
    assert packet.used_lengths == [net.header_size + len(frame)]
    assert _txq(net).complete(sent, timeout=2)[0] == 0
    round_trip(dest, net, 6)


# -- features ------------------------------------------------------------------------------


def test_renegotiated_features_are_the_destinations(virtio_device: VirtioNet, qemu: Machine, migrate: Migrate) -> None:
    """After a reset and a new negotiation without EVENT_IDX (and INDIRECT_DESC), the
    destination's guest features are the new set, and it behaves by it: with EVENT_IDX gone it
    honours the available ring's NO_INTERRUPT flag (split, §2.7.7.2) or the driver event flags
    (packed, §2.8.10) on a frame it receives, and notifies once they are cleared."""
    net = virtio_device
    need(net, "EVENT_IDX")
    dropped = {"EVENT_IDX"} | ({"INDIRECT_DESC"} & set(net.negotiated))
    net.refused_names |= dropped
    net.restart()
    assert not dropped & set(net.negotiated)
    round_trip(qemu, net, 7)
    dest = migrate()
    view = device_view(dest, net.dev_id)
    assert not dropped & view.guest_features, f"the destination still holds {sorted(dropped & view.guest_features)}"
    assert_view_matches(dest, net)
    rxq = _rxq(net)
    rxq.set_interrupts(False)
    notified(net, rxq.index)
    frame = _frame(net.mac, 8)
    host(dest, net).send(frame)
    assert net.receive(timeout=2) == frame
    quiet(dest)
    assert not notified(net, rxq.index), "a notification despite suppression, after renegotiation"
    rxq.set_interrupts(True)
    host(dest, net).send(frame)
    assert net.receive(timeout=2) == frame
    assert wait_notified(net, rxq.index), "no notification once suppression was lifted"
    round_trip(dest, net, 9)


# -- notification suppression --------------------------------------------------------------


def _receiver(net: VirtioNet) -> Callable[[Machine], None]:
    """``produce`` for the suppression checks: one frame in from ``vm``'s backend, received."""
    seeds = itertools.count(0x60)

    def produce(vm: Machine) -> None:
        frame = _frame(net.mac, next(seeds))
        host(vm, net).send(frame)
        assert net.receive(timeout=2) == frame

    return produce


@pytest.mark.conformance("mig-used-event-not-reached-quiet", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
def test_used_event_suppression_holds_on_the_destination(
    virtio_device: VirtioNet, qemu: Machine, migrate: Migrate
) -> None:
    """With EVENT_IDX, used_event kept one behind the used index (the driver wants no
    notification): used entries placed before the index used_event names SHOULD NOT be
    notified, on the destination as on the source (the device has notified before; the
    migrated used_event is in guest RAM). Then used_event reached MUST notify."""
    net = virtio_device
    rxq = _rxq(net)
    dest = suppression_holds_across(qemu, net, rxq, migrate, _receiver(net))
    round_trip(dest, net, 0x30)


@pytest.mark.conformance("mig-net-no-interrupt-suppresses", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, rings=("split",), refuse={"EVENT_IDX"})
def test_no_interrupt_flag_holds_on_the_destination(virtio_device: VirtioNet, qemu: Machine, migrate: Migrate) -> None:
    """Without EVENT_IDX, the available ring's NO_INTERRUPT flag set: the device SHOULD NOT
    notify used buffers, on the destination as on the source; once it is clear, the device
    MUST notify."""
    net = virtio_device
    rxq = _rxq(net)
    suppression_holds_across(qemu, net, rxq, migrate, _receiver(net))


@pytest.mark.conformance("mig-net-packed-event-disable", spec="2.8.10")
@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, rings=("packed",))
def test_packed_event_disable_holds_on_the_destination(
    virtio_device: VirtioNet, qemu: Machine, migrate: Migrate
) -> None:
    """Packed ring, driver event suppression flags RING_EVENT_FLAGS_DISABLE: no used-buffer
    notification, on the destination as on the source; RING_EVENT_FLAGS_ENABLE again: one.
    Level: the meaning of the event suppression structure (§2.8.10, no MUST keyword)."""
    net = virtio_device
    rxq = _rxq(net)
    suppression_holds_across(qemu, net, rxq, migrate, _receiver(net))


# -- MSI-X ---------------------------------------------------------------------------------


def test_msix_vectors_and_a_masked_pending_vector_carry_over(
    virtio_device: VirtioNet, qemu: Machine, migrate: Migrate
) -> None:
    """The config and queue vectors read back the same on the destination (§4.1.4.3); receiveq1's
    vector masked with an interrupt pending on the source (PCI 3.0 §6.8.2.10: its PBA bit set, no
    message) stays masked and pending there, holds a second interrupt too, and unmasking sends one
    message and clears the bit; then the next frame interrupts as before."""
    net = virtio_device
    rxq = _rxq(net)
    produce = _receiver(net)
    dest = masked_vector_survives_across(qemu, net, rxq, migrate, produce)
    produce(dest)
    assert wait_notified(net, rxq.index), "no interrupt after unmasking"
    assert_view_matches(dest, net)
    round_trip(dest, net, 0x31)


# -- device state: MAC, filters, announce ------------------------------------------------


def _without_vlans(info: dict[str, Any]) -> dict[str, Any]:
    """``query-rx-filter`` less the VLAN table (test_vlan_table_carries_over's subject)."""
    return {k: v for k, v in info.items() if k not in ("vlan", "vlan-table")}


def test_mac_and_filter_tables_carry_over(virtio_device: VirtioNet, qemu: Machine, migrate: Migrate) -> None:
    """The MAC the driver set (CTRL_MAC_ADDR_SET, or the legacy config write), the rx mode
    (promiscuous and all-multicast off) and the MAC filtering table (§5.1.6.5.1, §5.1.6.5.2) are
    the destination's: QMP ``query-rx-filter`` reads the same there, the config ``mac`` is the
    new one, and frames from the new backend are filtered as on the source."""
    net = virtio_device
    need(net, "CTRL_RX")
    net.set_rx_mode(promisc=False, allmulti=False)
    mac = mac_bytes(net.mac)
    if net.has("CTRL_MAC_ADDR") or net.transport.uses_legacy_layout:
        net.set_mac(NEW_MAC)
        mac = mac_bytes(NEW_MAC)
    net.set_mac_table(unicast=[TABLE_UNICAST], multicast=[TABLE_MULTICAST])
    before = _without_vlans(rx_filter(qemu, net))
    dest = migrate()
    assert _without_vlans(rx_filter(dest, net)) == before
    assert net.mac == mac
    assert delivered(dest, net, _frame(mac, 1), marker_to=mac)
    assert delivered(dest, net, _frame(TABLE_UNICAST, 2), marker_to=mac)
    assert delivered(dest, net, _frame(TABLE_MULTICAST, 3), marker_to=mac)
    assert not delivered(dest, net, _frame(STRANGER, 4), marker_to=mac)
    assert not delivered(dest, net, _frame("01:00:5e:00:00:01", 5), marker_to=mac)
    assert_view_matches(dest, net)


@pytest.mark.conformance("mig-net-vlan-table", spec="5.1.6.5.3")
def test_vlan_table_carries_over(virtio_device: VirtioNet, qemu: Machine, migrate: Migrate) -> None:
    """The VLAN filter table the driver built (VLAN_DEL 5 and 6, VLAN_ADD 5) is the destination's:
    ``query-rx-filter`` lists the same ids there, and the device MUST accept tagged frames of an
    id in the table (and SHOULD drop one that is not), out of promiscuous mode. What the table
    holds besides differs between versions after a reset (deviation net-vlan-filter): the
    destination's must be the source's, whatever it is."""
    net = virtio_device
    need(net, "CTRL_RX", "CTRL_VLAN")
    net.set_rx_mode(promisc=False, allmulti=False)
    for vid in (5, 6):
        net.vlan_del(vid)
    net.vlan_add(5)
    table = rx_filter(qemu, net)["vlan-table"]
    assert 5 in table and 6 not in table
    dest = migrate()
    assert rx_filter(dest, net)["vlan-table"] == table, "the VLAN table changed in the migration"
    mac = net.mac
    assert delivered(dest, net, vlan_frame(mac, PEER, 5, 0x88B5, bytes(range(60))))
    assert not delivered(dest, net, vlan_frame(mac, PEER, 6, 0x88B5, bytes(range(60))))
    assert_view_matches(dest, net)


def test_reverse_arp_announces_the_nic_on_the_new_backend(
    virtio_device: VirtioNet, qemu: Machine, migrate: Migrate
) -> None:
    """Regression (migration/migration.c ``process_incoming_migration_bh`` -> net/announce.c
    ``qemu_announce_self``): once loaded, the destination announces the NIC on its own link with
    broadcast reverse-ARP requests from the NIC's MAC (the ``mac`` property)."""
    net = virtio_device
    mac = mac_bytes(net.mac)
    assert not host(qemu, net).pending(0.01), "the source sent a frame before the migration"
    dest = migrate()
    frame = host(dest, net).receive(timeout=2)
    assert frame[0:6] == b"\xff" * 6 and frame[6:12] == mac, frame[:14].hex()
    assert struct.unpack_from(">H", frame, 12)[0] == ETH_P_RARP
    round_trip(dest, net, 0x32)


def test_guest_announce_is_requested_after_load(virtio_device: VirtioNet, qemu: Machine, migrate: Migrate) -> None:
    """Regression (hw/net/virtio-net.c ``virtio_net_post_load_device``): with GUEST_ANNOUNCE and
    CTRL_VQ the destination sets VIRTIO_NET_S_ANNOUNCE in status and sends a configuration change
    notification once loaded (§5.1.6.5.4: the device asks the driver to announce itself); the
    source never did. VIRTIO_NET_CTRL_ANNOUNCE_ACK clears the bit (a later round may set it again,
    with a new notification)."""
    net = virtio_device
    need(net, "GUEST_ANNOUNCE", "CTRL_VQ", "STATUS")
    assert not net.status & NET_STATUS.ANNOUNCE.mask, "ANNOUNCE set before any migration"
    if net.msix is not None:  # start from no configuration change notification
        net.msix.fired(0)
    else:
        net.transport.read_isr()
    dest = migrate()
    let_virtual_time_pass(dest, 1_000_000)
    net.wait_config_interrupt(timeout=2)
    assert net.status & NET_STATUS.ANNOUNCE.mask, f"status {net.status:#x} after load: no ANNOUNCE"
    net.announce_ack()
    if net.status & NET_STATUS.ANNOUNCE.mask:  # the next round already: it notifies again
        net.wait_config_interrupt(timeout=2)
    assert_view_matches(dest, net)
    round_trip(dest, net, 0x33)


# -- multiqueue on a tap -------------------------------------------------------------------

MQ_PAIRS = 4


def _tap_queues(vm: Machine, net: VirtioNet) -> int:
    """How many queues of ``vm``'s tap QEMU keeps attached (the kernel lists tx-N per queue)."""
    name = vm.backend(net.dev_id, TapBackend).name
    return sum(1 for q in os.listdir(f"/sys/class/net/{name}/queues") if q.startswith("tx-"))


@pytest.mark.virtio_device(
    "virtio-net-pci", backend=f"tap,queues={MQ_PAIRS}", flags={"mq": "on"}, queue_pairs=MQ_PAIRS, refuse_each=False
)
def test_enabled_queue_pairs_carry_over(virtio_device: VirtioNet, qemu: Machine, migrate: Migrate) -> None:
    """The queue pairs VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET enabled (2 of 4) are the destination's
    (hw/net/virtio-net.c ``virtio_net_post_load_device`` re-applies curr_queue_pairs): its new
    tap has exactly 2 queues attached, flows land on receiveq1 and receiveq2 only (the device
    MUST NOT use the pairs beyond, §5.1.6.5.6.2), and both transmit queues reach the link."""
    net = virtio_device
    need(net, "MQ")
    assert len(net.rxqs) == MQ_PAIRS
    net.set_queue_pairs(2)
    assert _tap_queues(qemu, net) == 2
    dest = migrate()
    assert_view_matches(dest, net)
    assert _tap_queues(dest, net) == 2
    tap = dest.backend(net.dev_id, TapBackend)
    landed = set()
    for n in range(16):
        frame = ip_frame(Flow("10.0.0.1", "10.0.0.2", 1000 + n, 2000), bytes([n]) * 60, dst_mac=net.mac, src_mac=PEER)
        tap.send(frame)
        pair, packet = net.receive_any(timeout=2)
        assert packet.frame == frame
        landed.add(pair)
    assert landed == {0, 1}, f"with 2 pairs enabled, frames landed on receive queues {sorted(landed)}"
    for pair in range(2):
        out = ip_frame(Flow("10.0.0.2", "10.0.0.1", 3000 + pair, 4000), bytes(50), dst_mac=PEER, src_mac=net.mac)
        net.send(out, pair=pair)
        assert host_frame(tap) == out, f"transmitq{pair + 1}: the frame did not reach the link"


# -- a frame the backend could not take ------------------------------------------------------

#: Frames big enough that a few fill a socket buffer (as scenarios/net/test_tx_corners.py).
BIG = 60_000


@pytest.mark.conformance("mig-net-held-tx-frame", spec="5.1.6.2")
def test_chains_held_for_a_blocked_backend_are_all_used(
    virtio_device: VirtioNet, qemu: Machine, migrate: Migrate
) -> None:
    """Frames sent while the source's socket backend takes none (its host end is not read): the
    device uses what fits, holds one chain popped for the backend (virtio_net_flush_tx's -EBUSY
    path) and leaves the rest available. Stopping the VM for the migration may drop what the
    backend holds (net/net.c ``net_vm_change_state_handler`` purges queued packets), but every
    chain must still be used, on the source or on the destination (the transmit path of
    §5.1.6.2 returns each buffer; a chain never used is lost to the driver for good); frames that
    reach the new link are this test's, in order, once each."""
    net = virtio_device
    txq = _txq(net)
    src_end = host(qemu, net)
    size = max(src_end.sock.getsockopt(socket.SOL_SOCKET, opt) for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF))
    frames = [ethernet_frame(PEER, "02:00:00:00:00:02", 0x88B5, bytes([i]) * BIG) for i in range(size // BIG + 3)]
    if txq.free_descriptors < 2 * len(frames):
        pytest.skip(f"transmitq1 has {txq.free_descriptors} free descriptors, fewer than {2 * len(frames)}")
    requests = [net.transmit(f) for f in frames]
    used = _quiet_used_idx(qemu, net, txq.index)
    q = queue_view(qemu, net.dev_id, txq.index)
    assert used < len(frames), "every frame was used although the backend read none"
    assert (q.last_avail_idx - q.used_idx) & 0xFFFF == 1, "the device does not hold one chain for the backend"
    dest = migrate()
    txq.kick(force=True)
    end = host(dest, net)
    arrived = []
    while end.pending(0.3):
        frame = end.receive(timeout=1)
        if struct.unpack_from(">H", frame, 12)[0] == ETH_P_RARP:
            continue
        assert frame in frames, "a frame reached the new link that the driver never sent"
        arrived.append(frames.index(frame))
    assert arrived == sorted(set(arrived)), f"frames {arrived} reached the new link out of order or twice"
    lost = []
    for i, r in enumerate(requests):
        try:
            assert txq.complete(r, timeout=1)[0] == 0
        except VirtqueueTimeout:
            lost.append(i)
    assert not lost, f"chains {lost} of {len(frames)} were never used (frames {arrived} reached the new link)"
    assert_view_matches(dest, net)
    round_trip(dest, net, 0x34)


def _quiet_used_idx(vm: Machine, net: VirtioNet, index: int, quiet_for: float = 0.2, limit: float = 5.0) -> int:
    """QEMU's used index of queue ``index`` once it has not moved for ``quiet_for`` seconds."""
    deadline = time.monotonic() + limit
    last, since = queue_view(vm, net.dev_id, index).used_idx, time.monotonic()
    while time.monotonic() - since < quiet_for and time.monotonic() < deadline:
        time.sleep(0.01)
        now = queue_view(vm, net.dev_id, index).used_idx
        if now != last:
            last, since = now, time.monotonic()
    return last
