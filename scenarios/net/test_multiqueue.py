"""virtio-net conformance, multiqueue (virtio 1.2 §5.1.2, §5.1.6.5.5, §5.1.6.5.6): several queue
pairs on a tap backend with one tap queue per pair (``mq=on``, ``tap,queues=4``).

Which receive queue a frame lands on is the device's observable steering decision. Each frame
is injected alone and waited for before the next one, so no assertion depends on the order in
which the kernel's per-queue tap fds are read. The kernel spreads flows over the tap queues QEMU
keeps attached (by flow hash, or by the queue a flow was last transmitted on), which is how
QEMU's automatic receive steering works on a tap.
"""

from __future__ import annotations

import os

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import TapBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import CTRL_COMMANDS, Ack
from qtest_virtio.devices.net.packets import Flow, ip_frame

from ._support import need, need_not

PAIRS = 4


def mq_device(**kwargs: object) -> pytest.MarkDecorator:
    """The marker of a multiqueue scenario: a 4-queue tap, ``mq=on``, the driver setting up all
    pairs (with MQ). Of the refusal runs only MRG_RXBUF's changes what is checked (each receive
    queue's buffer accounting, num_buffers against what that queue has posted); refusing
    CTRL_VQ or MQ only skips, and test_without_mq_the_control_queue_follows_the_first_pair
    refuses MQ itself."""
    return pytest.mark.virtio_device(
        "virtio-net-pci",
        backend=f"tap,queues={PAIRS}",
        flags={"mq": "on"},
        queue_pairs=PAIRS,
        refuse_each=["MRG_RXBUF"],
        **kwargs,
    )


pytestmark = mq_device()

PEER = "02:00:00:00:00:01"
#: Enough distinct flows that a spread over 4 queues cannot plausibly miss all but one.
FLOWS = 24
VQ_PAIRS_SET = CTRL_COMMANDS["MQ_VQ_PAIRS_SET"]


def _inbound(net: VirtioNet, n: int, sport: int = 1000) -> bytes:
    return ip_frame(Flow("10.0.0.1", "10.0.0.2", sport + n, 2000), bytes([n]) * (40 + n), dst_mac=net.mac, src_mac=PEER)


def _landing(qemu: Machine, net: VirtioNet, frames: list[bytes]) -> list[int]:
    """Inject each frame alone; the receive queue (pair index) it arrived on, in order."""
    host = qemu.backend(net.dev_id, TapBackend)
    where = []
    for frame in frames:
        host.send(frame)
        pair, packet = net.receive_any(timeout=2)
        assert packet.frame == frame, f"receiveq{pair + 1} delivered another frame than the one injected"
        where.append(pair)
    return where


def _tap_queues(qemu: Machine, net: VirtioNet) -> int:
    """How many queues of the tap QEMU keeps attached (the kernel lists tx-N per queue)."""
    name = qemu.backend(net.dev_id, TapBackend).name
    return sum(1 for q in os.listdir(f"/sys/class/net/{name}/queues") if q.startswith("tx-"))


def _multiqueue(net: VirtioNet) -> VirtioNet:
    need(net, "MQ")
    assert net.config().max_virtqueue_pairs == PAIRS
    assert len(net.rxqs) == PAIRS and net.ctrl_index == 2 * PAIRS
    return net


@pytest.mark.conformance("net-mq-receiveq1-only-by-default", spec="5.1.6.5.6.2")
def test_only_receiveq1_is_used_before_vq_pairs_set(virtio_device: VirtioNet, qemu: Machine) -> None:
    """After initialization or reset the device MUST queue packets only on receiveq1: with all
    pairs set up but no VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET sent, every flow lands on receiveq1
    (QEMU keeps only the first tap queue attached) (MUST)."""
    net = _multiqueue(virtio_device)
    assert _landing(qemu, net, [_inbound(net, n) for n in range(FLOWS)]) == [0] * FLOWS
    assert _tap_queues(qemu, net) == 1


@pytest.mark.conformance("net-mq-vq-pairs-set", spec="5.1.6.5.6.2")
def test_vq_pairs_set_spreads_flows_over_the_pairs_enabled(virtio_device: VirtioNet, qemu: Machine) -> None:
    """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET with N pairs is acked; the device then steers flows over
    receiveq1..N, and once it has used a command for fewer pairs it MUST NOT queue packets on
    the receive queues beyond them. Every transmitq1..N delivers to the link (MUST; QEMU
    attaches exactly N tap queues)."""
    net = _multiqueue(virtio_device)
    host = qemu.backend(net.dev_id, TapBackend)
    net.set_queue_pairs(PAIRS)
    assert _tap_queues(qemu, net) == PAIRS
    spread = _landing(qemu, net, [_inbound(net, n) for n in range(FLOWS)])
    assert len(set(spread)) > 1, f"{FLOWS} flows all landed on receiveq{spread[0] + 1}: no steering"
    for pair in range(PAIRS):
        frame = ip_frame(
            Flow("10.0.0.2", "10.0.0.1", 3000 + pair, 4000), bytes(50 + pair), dst_mac=PEER, src_mac=net.mac
        )
        net.send(frame, pair=pair)
        assert host.receive(timeout=2) == frame, f"transmitq{pair + 1}: the frame did not reach the link"
    net.set_queue_pairs(2)
    assert _tap_queues(qemu, net) == 2
    fewer = _landing(qemu, net, [_inbound(net, n, sport=5000) for n in range(FLOWS)])
    assert set(fewer) <= {0, 1}, f"with 2 pairs enabled frames landed on receive queues {sorted(set(fewer))}"
    assert set(fewer) == {0, 1}
    net.set_queue_pairs(1)
    assert _landing(qemu, net, [_inbound(net, n, sport=6000) for n in range(8)]) == [0] * 8


@pytest.mark.conformance("net-mq-rx-follows-tx", spec="5.1.6.5.6")
def test_incoming_packets_follow_the_flows_transmit_queue(virtio_device: VirtioNet, qemu: Machine) -> None:
    """After the driver transmitted a packet of a flow on transmitqX, the device SHOULD steer
    incoming packets of that flow to receiveqX (SHOULD; on a tap the kernel records the queue
    each flow was transmitted on)."""
    net = _multiqueue(virtio_device)
    host = qemu.backend(net.dev_id, TapBackend)
    net.set_queue_pairs(PAIRS)
    for round_ in range(2):
        for pair in range(PAIRS):
            out = Flow("10.0.0.2", "10.0.0.1", 7000 + pair, 8000 + round_)
            frame = ip_frame(out, bytes(60), dst_mac=PEER, src_mac=net.mac)
            net.send(frame, pair=(pair + round_) % PAIRS)
            assert host.receive(timeout=2) == frame
        for pair in range(PAIRS):
            reply = ip_frame(
                Flow("10.0.0.1", "10.0.0.2", 8000 + round_, 7000 + pair), bytes(70), dst_mac=net.mac, src_mac=PEER
            )
            assert _landing(qemu, net, [reply]) == [(pair + round_) % PAIRS], f"the reply of flow {pair}"


@pytest.mark.conformance("net-mq-vq-pairs-out-of-range", spec="5.1.6.5.6.1")
def test_vq_pairs_out_of_range_is_refused(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A driver MUST NOT request 0 pairs or more than max_virtqueue_pairs; QEMU answers such a
    VQ_PAIRS_SET with VIRTIO_NET_ERR and keeps the pairs it had, as it does for a command
    without its data (regression)."""
    net = _multiqueue(virtio_device)
    net.set_queue_pairs(2)
    for bad in (b"\x00\x00", (PAIRS + 1).to_bytes(2, "little"), (0x8001).to_bytes(2, "little"), b"\x02"):
        assert net.ctrl_raw(VQ_PAIRS_SET.class_code, VQ_PAIRS_SET.code, bad) == Ack.ERR, f"VQ_PAIRS_SET {bad.hex()}"
    assert _tap_queues(qemu, net) == 2
    assert set(_landing(qemu, net, [_inbound(net, n) for n in range(FLOWS)])) == {0, 1}


@pytest.mark.conformance("net-mq-not-negotiated-one-pair", spec="5.1.2")
@mq_device(refuse={"MQ"})
def test_without_mq_the_control_queue_follows_the_first_pair(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With neither MQ nor RSS negotiated N is 1: the control queue is queue 2, whatever
    max_virtqueue_pairs says (MUST). QEMU removes the other pairs' queues (queue 3 reads size 0)
    and refuses VQ_PAIRS_SET (regression); everything arrives on receiveq1."""
    net = virtio_device
    need_not(net, "MQ", "RSS")
    need(net, "CTRL_VQ", "CTRL_RX")
    # queue_pairs=4 (the marker's) only applies with MQ or RSS: one pair is set up
    assert len(net.rxqs) == 1 and net.ctrl_index == 2
    assert net.transport.queue_max_size(3) == 0
    assert net.transport.queue_max_size(2 * PAIRS) == 0, f"queue {2 * PAIRS} is the control queue only with MQ"
    net.set_rx_mode(promisc=True)  # a command on queue 2 is acked: it is the control queue
    assert net.ctrl_raw(VQ_PAIRS_SET.class_code, VQ_PAIRS_SET.code, (2).to_bytes(2, "little")) == Ack.ERR
    assert _landing(qemu, net, [_inbound(net, n) for n in range(8)]) == [0] * 8
    assert _tap_queues(qemu, net) == 1
