"""virtio-net across QMP ``stop`` / ``cont`` (the driver-level version of qos-test's
``rx_stop_cont``): regression scenarios on QEMU's run-state handling of the data path.

What QEMU does (hw/net/virtio-net.c, net/net.c): while the VM is stopped
``virtio_net_can_receive`` is false and ``qemu_can_send_packet`` refuses any sender, so a frame
the socket backend reads is queued in the net layer and the backend stops reading (the rest wait
in the socket); ``cont`` runs ``virtio_net_set_status``, which flushes that queue
(``qemu_flush_queued_packets``). A transmit notification while stopped only records that
transmission is waiting (``virtio_net_handle_tx_bh``: ``tx_waiting``, "device was stopped but VCPU
wasn't"); ``cont`` schedules the flush. So nothing is used, and no used-buffer notification is
sent, while the VM is stopped; at ``cont`` everything goes, in order. One exception, pinned
below: a receive-queue notification while stopped drops the frames the net layer holds.
"""

from __future__ import annotations

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import FRAME_LEN, NetBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import ethernet_frame
from qtest_virtio.introspect import queue_view

from ._support import SHORT, cont, interrupted, quiet, stop

#: The run state is the VM's, not the rings': a refused feature changes nothing checked here.
pytestmark = pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, interrupts="msix")

PEER = "02:00:00:00:00:01"
POISON = 0xEE
#: Frame sizes sent while stopped: the smallest, odd ones, a full-size one.
SIZES = (60, 333, 1000, 1514)
#: Queue indexes of receiveq1 and transmitq1 (§5.1.2).
RXQ, TXQ = 0, 1


def _frame(dst: bytes | str, size: int, seed: int) -> bytes:
    return ethernet_frame(dst, PEER, 0x88B5, bytes((seed + 31 * i + 7) & 0xFF for i in range(size - 14)))


def test_frames_received_while_stopped_arrive_in_order_after_cont(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Receive buffers are posted; the VM stops; frames sent to the backend then are not placed
    in the used ring and no receive interrupt comes while stopped (QEMU's queue status: nothing
    taken from the ring); after ``cont`` every one arrives, in the order sent, none lost, none
    twice, each used length exactly header + frame (§2.7.8.2, §5.1.6.4), with an interrupt."""
    net = virtio_device
    net.restart(rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    interrupted(net, RXQ)
    before = queue_view(qemu, net.dev_id, RXQ)
    stop(qemu)
    frames = [_frame(net.mac, size, seed=i) for i, size in enumerate(SIZES)]
    for f in frames:
        host.send(f)
    quiet(qemu)
    assert net.poll_packet() is None, "a frame was placed in the used ring while the VM was stopped"
    assert not interrupted(net, RXQ), "a receive interrupt while the VM was stopped"
    view = queue_view(qemu, net.dev_id, RXQ)
    assert (view.last_avail_idx, view.used_idx, view.inuse) == (before.last_avail_idx, before.used_idx, 0)
    cont(qemu)
    for i, f in enumerate(frames):
        pkt = net.receive_packet(timeout=SHORT)
        assert pkt.frame == f, f"frame {i} of {len(frames)} after cont is not the {i}th sent"
        assert pkt.used_lengths == [net.header_size + len(f)]
    assert interrupted(net, RXQ), "no receive interrupt after cont"
    quiet(qemu)
    assert net.poll_packet() is None, "more frames than were sent"


def test_buffers_posted_while_stopped_take_frames_after_cont(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The reverse: the queue has no receive buffers; the VM stops and the driver posts some
    and notifies. Nothing is used (there is nothing to receive) and QEMU takes nothing; after
    ``cont`` frames sent from the backend land in exactly those buffers, in order, with the
    used lengths the header layout says."""
    net = virtio_device
    net.restart(rx_buffers=0, rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    stop(qemu)
    net.post_rx_buffers(len(SIZES))
    quiet(qemu)
    assert net.poll_packet() is None
    assert queue_view(qemu, net.dev_id, RXQ).inuse == 0
    cont(qemu)
    interrupted(net, RXQ)
    frames = [_frame(net.mac, size, seed=10 + i) for i, size in enumerate(SIZES)]
    for f in frames:
        host.send(f)
    for f in frames:
        pkt = net.receive_packet(timeout=SHORT)
        assert pkt.frame == f
        assert pkt.used_lengths == [net.header_size + len(f)]
    assert interrupted(net, RXQ)


def test_receive_notification_while_stopped_drops_the_queued_frames(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Frames that reach QEMU while the VM is stopped wait in the net layer's queue, but a
    receive-queue notification while still stopped flushes that queue into a device that
    cannot receive: ``virtio_net_handle_rx`` calls ``qemu_flush_queued_packets``,
    ``virtio_net_receive_rcu`` answers -1 for a stopped VM, and ``qemu_net_queue_flush`` takes
    any answer but 0 as delivered, so the frames are dropped (virtio-net does not promise
    delivery, §5.1.6.3: no MUST is broken). What it pins: the frames QEMU held (sent in one
    write, so one read takes them all) never arrive, neither while stopped nor after
    ``cont``; a frame sent after the notification does, and nothing else."""
    net = virtio_device
    net.restart(rx_buffers=0, rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    stop(qemu)
    frames = [_frame(net.mac, size, seed=20 + i) for i, size in enumerate(SIZES)]
    host.sock.sendall(b"".join(FRAME_LEN.pack(len(f)) + f for f in frames))
    quiet(qemu)
    net.post_rx_buffers(2 * len(SIZES))
    quiet(qemu)
    assert net.poll_packet() is None, "a frame was delivered while the VM was stopped"
    assert not interrupted(net, RXQ)
    after = _frame(net.mac, 128, seed=29)
    host.send(after)
    quiet(qemu)
    assert net.poll_packet() is None
    cont(qemu)
    assert net.receive(timeout=SHORT) == after, "a frame queued before the notification survived it"
    quiet(qemu)
    assert net.poll_packet() is None


def test_transmit_notified_while_stopped_goes_out_at_cont(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Frames made available and notified (one notification each) while the VM is stopped: the
    device sends nothing, uses no chain and sends no transmit interrupt (virtio_net_handle_tx_bh
    only sets tx_waiting; QEMU's queue status: nothing taken); after ``cont`` every frame reaches
    the backend, in order, and every chain is used with length 0 (the device writes nothing
    into a transmit buffer, §2.7.8.2), with an interrupt."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    assert net.txq is not None
    txq = net.txq
    interrupted(net, TXQ)
    before = queue_view(qemu, net.dev_id, TXQ)
    stop(qemu)
    frames = [_frame(PEER, size, seed=30 + i) for i, size in enumerate(SIZES)]
    requests = [net.transmit(f) for f in frames]
    quiet(qemu)
    assert not host.pending(), "a frame went out while the VM was stopped"
    assert txq.poll_used() is None, "a transmit chain was used while the VM was stopped"
    assert not interrupted(net, TXQ), "a transmit interrupt while the VM was stopped"
    view = queue_view(qemu, net.dev_id, TXQ)
    assert (view.last_avail_idx, view.used_idx, view.inuse) == (before.last_avail_idx, before.used_idx, 0)
    cont(qemu)
    for f in frames:
        assert host.receive(timeout=SHORT) == f
    for request in requests:
        assert txq.complete(request, timeout=SHORT)[0] == 0
    assert interrupted(net, TXQ), "no transmit interrupt after cont"
    assert not host.pending(), "a frame went out twice"


def test_stop_cont_cycles_lose_and_repeat_nothing(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Several stop/cont cycles, each with a frame in each direction while stopped: each cycle's
    frames go at its ``cont`` and only then; over all cycles every frame arrives exactly once."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    for cycle in range(3):
        stop(qemu)
        out, incoming = _frame(PEER, 200, seed=40 + cycle), _frame(net.mac, 300, seed=50 + cycle)
        request = net.transmit(out)
        host.send(incoming)
        quiet(qemu)
        assert not host.pending() and net.poll_packet() is None, f"cycle {cycle}: data moved while stopped"
        cont(qemu)
        assert host.receive(timeout=SHORT) == out
        assert net.receive(timeout=SHORT) == incoming
        assert net.txq is not None and net.txq.complete(request, timeout=SHORT)[0] == 0
    quiet(qemu)
    assert not host.pending() and net.poll_packet() is None
