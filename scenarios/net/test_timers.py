"""virtio-net regression scenarios on QEMU's timers: the transmit timer (``tx=timer``), which runs
on the virtual clock, and ``announce-self``, whose rounds run on the realtime clock.

With the qtest accelerator the virtual clock moves only when the test steps it (``clock_step``),
so the transmit timer's period can be checked to the nanosecond; Debian's builds have no such
clock and skip those scenarios (marker ``virtual_clock``). These are QEMU behaviours a driver meets
(hw/net/virtio-net.c ``virtio_net_handle_tx_timer``, net/announce.c), not spec requirements.
"""

from __future__ import annotations

import itertools
import struct
import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import ethernet_frame, mac_bytes

from ._support import txq

#: A transmit timer period unlike QEMU's default (150 us), so that honouring x-txtimer shows.
TX_TIMER_NS = 2_000_000
#: How long a frame the device holds is watched before concluding it stays held.
HELD_WINDOW = 0.05
PEER = "02:00:00:00:00:01"
ETH_P_RARP = 0x8035
ARP_OP_REQUEST_REVERSE = 3

pytestmark = pytest.mark.virtio_device("virtio-net-pci", flags={"tx": "timer", "x-txtimer": str(TX_TIMER_NS)})


def _frame(seed: int) -> bytes:
    return ethernet_frame(PEER, "02:00:00:00:00:02", 0x88B5, bytes((seed + i) & 0xFF for i in range(64)))


def _settle(qemu: Machine) -> None:
    """With ioeventfd QEMU kicks every queue once at DRIVER_OK (virtio_device_start_ioeventfd_impl),
    which arms the timer on an empty ring; a notification while it is armed would flush at once.
    One period of virtual time lets that timer run out, so the next notification arms afresh."""
    qemu.qtest.clock_step(TX_TIMER_NS)


@pytest.mark.virtual_clock
def test_tx_timer_holds_frames_for_its_period(virtio_device: VirtioNet, qemu: Machine) -> None:
    """tx=timer: the first notification arms a timer of x-txtimer ns on the virtual clock and
    turns notifications off; the frame reaches the link when the timer fires, not before, and is
    used with length 0 (§2.7.8.2: nothing device-writable)."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    _settle(qemu)
    frame = _frame(1)
    request = net.transmit(frame)
    assert not host.pending(HELD_WINDOW), "tx=timer sent the frame before its timer ran"
    qemu.qtest.clock_step(TX_TIMER_NS - 1_000)
    assert not host.pending(HELD_WINDOW), f"the frame left before {TX_TIMER_NS} ns of virtual time"
    qemu.qtest.clock_step(1_000)
    assert host.receive(timeout=2) == frame
    assert txq(net).complete(request, timeout=2)[0] == 0
    assert not host.pending()


@pytest.mark.virtual_clock
def test_tx_timer_rearms_for_the_next_burst(virtio_device: VirtioNet, qemu: Machine) -> None:
    """After a flush the timer is idle again: the next frame waits a whole period of its own,
    counted from its notification, not from the first frame's."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    _settle(qemu)
    first = net.transmit(_frame(1))
    qemu.qtest.clock_step(TX_TIMER_NS)
    assert host.receive(timeout=2) == _frame(1)
    txq(net).complete(first, timeout=2)
    qemu.qtest.clock_step(TX_TIMER_NS // 2)  # time passes with nothing to send
    second = net.transmit(_frame(2))
    qemu.qtest.clock_step(TX_TIMER_NS - 1_000)
    assert not host.pending(HELD_WINDOW), "the second frame rode on the first period"
    qemu.qtest.clock_step(1_000)
    assert host.receive(timeout=2) == _frame(2)
    txq(net).complete(second, timeout=2)


@pytest.mark.virtual_clock
def test_tx_timer_flushes_at_once_on_a_notification_while_armed(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A notification while the timer is armed flushes every frame made available so far at once,
    without the clock moving (the timer is for batching, not a minimum delay)."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    _settle(qemu)
    first = net.transmit(_frame(1))
    assert not host.pending(HELD_WINDOW)
    second = net.transmit(_frame(2))  # notifies or not, as the ring's suppression says
    txq(net).kick(force=True)
    assert [host.receive(timeout=2), host.receive(timeout=2)] == [_frame(1), _frame(2)]
    for request in (first, second):
        assert txq(net).complete(request, timeout=2)[0] == 0


def _check_rarp(frame: bytes, mac: bytes) -> None:
    """The self-announcement QEMU sends for a NIC: a broadcast reverse-ARP request naming the
    NIC's MAC as sender and target, padded to the 60-byte minimum."""
    assert len(frame) == 60
    assert frame[0:6] == b"\xff" * 6 and frame[6:12] == mac
    ethertype, htype, ptype, hlen, plen, op = struct.unpack_from(">HHHBBH", frame, 12)
    assert (ethertype, htype, ptype, hlen, plen, op) == (ETH_P_RARP, 1, 0x0800, 6, 4, ARP_OP_REQUEST_REVERSE)
    assert frame[22:28] == mac and frame[32:38] == mac
    assert frame[28:32] == frame[38:42] == bytes(4) and frame[42:] == bytes(18)


@pytest.mark.virtio_device("virtio-net-pci")
def test_announce_self_sends_one_rarp_per_round(virtio_device: VirtioNet, qemu: Machine) -> None:
    """QMP announce-self: one RARP from the NIC's MAC on the link per round, the first at once and
    the next ones ``initial`` ms and more apart, then nothing. Its rounds run on the realtime
    clock (net/announce.c qemu_announce_self), so this runs on every build."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.resume()  # frames from a stopped VM are queued, not sent
    mac = mac_bytes(net.mac)
    rounds, initial, step = 3, 40, 20
    # Receive times only ever trail the send times, so a round is checked against the command:
    # round n leaves no sooner than initial + (initial+step) + ... ms after it (a bound a loaded
    # machine cannot break, unlike the gaps between two late reads).
    start = time.monotonic()
    qemu.qmp.cmd("announce-self", initial=initial, max=100, rounds=rounds, step=step)
    seen = []
    for _ in range(rounds):
        _check_rarp(host.receive(timeout=2), mac)
        seen.append((time.monotonic() - start) * 1000)
    earliest = list(itertools.accumulate(initial + step * n for n in range(rounds - 1)))
    assert all(t >= e * 0.95 for t, e in zip(seen[1:], earliest, strict=True)), (
        f"rounds at {seen} ms after announce-self, expected no sooner than {[0, *earliest]} ms"
    )
    assert not host.pending(0.3), "more frames than rounds"
