"""virtio-net, the corners of the data path on the socket backend: queue reset on a live device
(RING_RESET, §2.6.1), the link going down (QMP ``set_link``), a backend that cannot take frames
right away, QEMU's transmit burst limit, descriptor layouts the device must not assume
(§2.7.4), and the chains a driver must never make (the device gives up on them, §2.1.2).

The backend is a socket netdev whose other end the test holds (``qemu.backend(dev_id)``). QEMU
writes each transmitted frame to it (net/socket.c ``net_socket_receive``); when the socket
buffer is full the write stops at EAGAIN, the frame is queued, and virtio-net keeps its chain
(``async_tx``) until the socket drains and ``virtio_net_tx_complete`` runs: the test makes that
happen by not reading.
"""

from __future__ import annotations

import socket
import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend
from qtest_virtio.devices.net.driver import RX_QUEUE, TX_QUEUE, VirtioNet
from qtest_virtio.devices.net.encoding import NetHdr, ethernet_frame
from qtest_virtio.modes import MODERN_LAYOUT_MODES
from qtest_virtio.testing import alloc_bufs, free_bufs
from qtest_virtio.virtqueue import Buf, Request, UsedElem, Virtqueue, VirtqueueTimeout

from ._support import delivered, gave_up, marker_frame, rx_filter, txq

#: Descriptor layouts change with ANY_LAYOUT and MRG_RXBUF; queue reset, link, timer and
#: backend corners do not depend on a refusal (their markers say refuse_each=False).
pytestmark = pytest.mark.virtio_device("virtio-net-pci", refuse_each=["ANY_LAYOUT", "MRG_RXBUF"])

PEER = "02:00:00:00:00:01"
POISON = 0xEE
#: How long something that must not happen is watched for.
WINDOW = 0.1
#: A frame far larger than a normal one, so a few fill the socket buffer (no MTU is offered,
#: so nothing limits a transmitted frame but QEMU's 68 KiB NET_BUFSIZE).
BIG = 60_000
#: The tx=timer period of the timer scenario (virtual clock).
TX_TIMER_NS = 2_000_000


def _frame(dst: bytes | str, size: int = 200, seed: int = 0) -> bytes:
    return ethernet_frame(dst, PEER, 0x88B5, bytes((seed + 13 * i + 1) & 0xFF for i in range(size - 14)))


def _used_within(vq: Virtqueue, seconds: float) -> list[UsedElem]:
    """Everything the device uses on ``vq`` within ``seconds``."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (elem := vq.poll_used()) is not None:
            out.append(elem)
    return out


def _quiet(qemu: Machine, seconds: float = WINDOW) -> None:
    """Main-loop turns (each qtest command is one) for QEMU to read its sockets in."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        qemu.qtest.readl(0)


def _used_until_quiet(vq: Virtqueue, quiet: float = 2 * WINDOW, limit: float = 5.0) -> list[UsedElem]:
    """Everything the device uses on ``vq`` until it has used nothing for ``quiet`` seconds
    (a loaded machine takes a while to fill the socket), within ``limit`` seconds."""
    out: list[UsedElem] = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        more = _used_within(vq, quiet)
        if not more:
            break
        out += more
    return out


def _chain(net: VirtioNet, parts: list[bytes]) -> list[Buf]:
    """Device-readable buffers holding ``parts``, one descriptor each."""
    bufs = alloc_bufs(net.memory, [max(len(p), 1) for p in parts], writable=False, tag="tx corner")
    for b, p in zip(bufs, parts, strict=True):
        net.memory.write(b.addr, p)
    return [Buf(b.addr, len(p)) for b, p in zip(bufs, parts, strict=True)]


# -- queue reset (§2.6.1) ---------------------------------------------------------------------

RESET = pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, transports=MODERN_LAYOUT_MODES, flags={"queue_reset": "on"}
)
"""queue_reset is a register of the modern common configuration (§4.1.4.3): modern layouts only."""


@pytest.mark.conformance("net-rx-queue-reset", spec="2.6.1.1.1")
@RESET
@pytest.mark.virtio_requires("RING_RESET")
def test_reset_rx_queue_keeps_frames_out_of_the_old_buffers(virtio_device: VirtioNet, qemu: Machine) -> None:
    """After receiveq1 is reset the device MUST NOT execute requests from it (MUST): a frame that
    arrives while it is reset is not written into the buffers posted before the reset (they
    keep their 0xEE fill). Re-enabled with fresh rings and buffers (§2.6.1.2), the queue works:
    QEMU held the frame in the NIC's queue (the socket is not read while nothing can receive)
    and delivers it first, then new traffic."""
    net = virtio_device
    net.restart(rx_buffers=4, rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    host.send(_frame(net.mac, seed=1))
    assert net.receive(timeout=2) == _frame(net.mac, seed=1)
    old = net.rx_buffers_posted()
    assert len(old) >= 4
    net.reset_queue(RX_QUEUE)
    waiting = _frame(net.mac, 300, seed=2)
    host.send(waiting)
    _quiet(qemu)  # main-loop turns for the device to misbehave in
    for b in old:
        assert net.memory.read(b.addr, b.length) == bytes([POISON]) * b.length, (
            f"the device wrote the buffer at {b.addr:#x} of the reset receiveq1"
        )
    net.reenable_queue(RX_QUEUE)
    assert net.receive(timeout=2) == waiting
    assert delivered(qemu, net, _frame(net.mac, seed=3))


@pytest.mark.conformance("net-tx-queue-reset", spec="2.6.1.1.1")
@RESET
@pytest.mark.virtio_requires("RING_RESET")
def test_reset_tx_queue_does_not_send_what_it_held(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A frame made available on transmitq1 before the queue is reset, and notified after it,
    is never sent: the device MUST NOT execute requests from a reset queue (MUST). Re-enabled
    in fresh memory (§2.6.1.2), the queue transmits again, and only the new frame reaches
    the link."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    net.send(_frame(PEER, seed=4))
    assert host.receive(timeout=2) == _frame(PEER, seed=4)
    vq = txq(net)
    stale = _chain(net, [NetHdr().encode(net.header_size) + _frame(PEER, seed=5)])
    vq.add(stale)
    vq.flush()  # published, not notified
    net.reset_queue(TX_QUEUE)
    net.transport.notify(TX_QUEUE)
    assert not host.pending(WINDOW), "a chain of the reset transmitq1 was sent"
    free_bufs(net.memory, stale)
    net.reenable_queue(TX_QUEUE)
    net.send(_frame(PEER, seed=6))
    assert host.receive(timeout=2) == _frame(PEER, seed=6)
    assert not host.pending(WINDOW)


@pytest.mark.conformance("net-ctrl-queue-reset", spec="2.6.1.2.1")
@RESET
@pytest.mark.virtio_requires("RING_RESET", "CTRL_RX")
def test_reset_control_queue_runs_again(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The control queue can be reset and re-enabled like the others; re-enabled, the device
    MUST follow the configuration the driver wrote this time (§2.6.1.2.1): commands on the new
    ring are acked and applied, and the state set before the reset stays (a queue reset is not
    a device reset: the filter keeps its settings)."""
    net = virtio_device
    assert net.ctrl_index is not None
    net.set_rx_mode(promisc=False)
    net.reset_queue(net.ctrl_index)
    assert rx_filter(qemu, net)["promiscuous"] is False
    net.reenable_queue(net.ctrl_index)
    net.set_rx_mode(allmulti=True)
    info = rx_filter(qemu, net)
    assert (info["promiscuous"], info["multicast"]) == (False, "all")


@pytest.mark.conformance("net-tx-queue-reset-backend-busy", spec="2.6.1.1.1")
@RESET
@pytest.mark.virtio_requires("RING_RESET")
def test_reset_tx_queue_while_the_backend_holds_a_frame(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST reset a queue the driver resets (MUST), also while its backend cannot
    take the frame it is sending: with the socket full (the test reads nothing), transmitq1 is
    reset; the reset completes (queue_reset reads 0 again), the device has not given up, and
    once the socket is drained the re-enabled queue transmits. What the backend got of the
    frames in flight is not checked: a reset may cut them."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    frames = [_frame(PEER, BIG, seed=i) for i in range(_frames_to_fill(host))]
    requests = [net.transmit(f) for f in frames]
    used = _used_until_quiet(txq(net))
    assert len(used) < len(frames), "every frame was used although the backend read none"
    net.reset_queue(TX_QUEUE)
    for r in requests:
        for addr in r.allocations:
            net.memory.free(addr)
    assert not gave_up(qemu, net)
    while host.pending(WINDOW):
        host.sock.recv(1 << 20)
    net.reenable_queue(TX_QUEUE)
    request = net.transmit(_frame(PEER, seed=7))
    assert txq(net).complete(request, timeout=2)[0] == 0


# -- the link (QMP set_link) ------------------------------------------------------------------


@pytest.mark.conformance("net-link-down-drop", spec="5.1.6.2")
def test_link_down_drops_frames_and_up_resumes(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device takes what the driver transmits and sends it to the link (§5.1, §5.1.6.2,
    descriptive); QEMU's way with a link that is down (virtio_net_handle_tx_bh,
    virtio_net_drop_tx_queue_data; net/net.c drops what reaches a NIC whose link is down): every
    transmit chain is still used, with length 0, nothing reaches the backend, config status
    says the link is down (with STATUS), and a frame arriving meanwhile is dropped, not held. A
    link that went down is no driver error: once it is back, frames flow both ways and the
    device has not given up."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.qmp.cmd("set_link", name=net.dev_id, up=False)
    if net.has("STATUS"):
        assert net.config().link_up is False
    for seed in (10, 11):  # the second after the device has dropped the first
        request = net.transmit(_frame(PEER, seed=seed))
        assert txq(net).complete(request, timeout=2)[0] == 0, "a chain made available while the link was down"
    assert not host.pending(WINDOW), "a frame went out while the link was down"
    lost = _frame(net.mac, seed=20)
    host.send(lost)
    _quiet(qemu)  # QEMU reads it while the link is still down
    qemu.qmp.cmd("set_link", name=net.dev_id, up=True)
    if net.has("STATUS"):
        assert net.config().link_up is True
    request = net.transmit(_frame(PEER, seed=30))
    assert host.receive(timeout=2) == _frame(PEER, seed=30), "nothing sent after the link came back"
    assert txq(net).complete(request, timeout=2)[0] == 0
    marker = marker_frame(net.mac)
    host.send(marker)
    got = net.receive(timeout=2)
    assert got != lost, "a frame that arrived while the link was down was kept"
    assert got == marker
    assert not gave_up(qemu, net)


@pytest.mark.virtual_clock
@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, flags={"tx": "timer", "x-txtimer": str(TX_TIMER_NS)})
def test_link_down_drops_frames_the_tx_timer_holds(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_set_status): with tx=timer a frame waits for the timer; if the
    link goes down meanwhile the device uses the chain at once, with length 0, without the
    clock moving, and the timer sends nothing when it would have fired. (What follows a drop is
    scenario net-link-down-drop's.)"""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.qtest.clock_step(TX_TIMER_NS)  # let the timer armed at DRIVER_OK run out (see test_timers)
    held = net.transmit(_frame(PEER, seed=40))
    assert not host.pending(WINDOW)
    qemu.qmp.cmd("set_link", name=net.dev_id, up=False)
    assert txq(net).complete(held, timeout=2)[0] == 0
    qemu.qtest.clock_step(2 * TX_TIMER_NS)
    assert not host.pending(WINDOW), "a frame went out while the link was down"


TIMER = pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, flags={"tx": "timer", "x-txtimer": str(TX_TIMER_NS)}
)


@pytest.mark.virtual_clock
@TIMER
def test_tx_timer_drops_frames_sent_while_the_link_is_down(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_handle_tx_timer): with tx=timer and the link already down, a
    notification does not arm the timer: the chain is used at once, with length 0, and no
    period later anything reaches the backend."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.qtest.clock_step(TX_TIMER_NS)
    qemu.qmp.cmd("set_link", name=net.dev_id, up=False)
    request = net.transmit(_frame(PEER, seed=43))
    assert txq(net).complete(request, timeout=2)[0] == 0
    qemu.qtest.clock_step(2 * TX_TIMER_NS)
    assert not host.pending(WINDOW), "a frame went out while the link was down"


@pytest.mark.virtual_clock
@pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, flags={"tx": "timer", "x-txtimer": str(TX_TIMER_NS), "x-txburst": "1"}
)
def test_tx_timer_sends_one_burst_per_period(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_tx_timer): with tx=timer a flush that sends a whole burst
    (x-txburst) re-arms the timer instead of polling on: with a burst of one, three frames
    behind one notification leave one per period, in order, and each chain is used as its
    frame leaves."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.qtest.clock_step(TX_TIMER_NS)
    frames = [_frame(PEER, seed=44 + i) for i in range(3)]
    requests = [net.transmit(f) for f in frames]
    assert not host.pending(WINDOW)
    for frame, request in zip(frames, requests, strict=True):
        qemu.qtest.clock_step(TX_TIMER_NS)
        assert host.receive(timeout=2) == frame
        assert txq(net).complete(request, timeout=2)[0] == 0
        assert not host.pending(WINDOW), "more than one frame left in one period with x-txburst=1"


# -- a stopped VM -----------------------------------------------------------------------------


def test_stopped_vm_holds_the_data_path(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_handle_tx_bh, virtio_net_can_receive, virtio_net_set_status): while
    the VM is stopped (QMP stop) the device neither sends what the driver makes available nor
    fills receive buffers; both wait, and on cont the frame goes out and the received one is
    delivered, intact and once."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.qmp.cmd("stop")
    request = net.transmit(_frame(PEER, seed=90))
    incoming = _frame(net.mac, 400, seed=91)
    host.send(incoming)
    _quiet(qemu)
    assert not host.pending(WINDOW), "a frame went out while the VM was stopped"
    assert txq(net).poll_used() is None, "a chain was used while the VM was stopped"
    assert net.poll_packet() is None, "a frame was delivered while the VM was stopped"
    qemu.qmp.cmd("cont")
    assert host.receive(timeout=2) == _frame(PEER, seed=90)
    assert txq(net).complete(request, timeout=2)[0] == 0
    assert net.receive(timeout=2) == incoming
    assert not host.pending(WINDOW) and net.poll_packet() is None


@pytest.mark.virtual_clock
@pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, flags={"tx": "timer", "x-txtimer": str(TX_TIMER_NS), "ioeventfd": "off"}
)
def test_tx_timer_restarts_its_period_on_cont(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_set_status): a frame the tx timer holds when the VM stops stays
    held, and on cont the timer is armed afresh: the frame leaves one whole period after cont,
    not before. Without ioeventfd: with it, cont restarts the host notifiers, whose kick of every
    queue flushes an armed tx timer at once (virtio_device_start_ioeventfd_impl)."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.qtest.clock_step(TX_TIMER_NS)
    request = net.transmit(_frame(PEER, seed=92))
    qemu.qtest.clock_step(TX_TIMER_NS // 2)
    qemu.qmp.cmd("stop")
    qemu.qmp.cmd("cont")
    qemu.qtest.clock_step(TX_TIMER_NS - 1_000)
    assert not host.pending(WINDOW), "the held frame left before a whole period after cont"
    qemu.qtest.clock_step(1_000)
    assert host.receive(timeout=2) == _frame(PEER, seed=92)
    assert txq(net).complete(request, timeout=2)[0] == 0


# -- a backend that cannot take frames right away ---------------------------------------------


def _frames_to_fill(host: NetBackend) -> int:
    """More BIG frames than the socket buffer holds (QEMU's end has the same default size as
    ours: net.core.wmem_default), so some wait and some are not even taken from the ring."""
    size = max(
        host.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        host.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    )
    return size // BIG + 3


def _blocked_backend_holds_the_chains(net: VirtioNet, qemu: Machine) -> None:
    host = qemu.backend(net.dev_id, NetBackend)
    frames = [_frame(PEER, BIG, seed=i) for i in range(_frames_to_fill(host))]
    vq = txq(net)
    if vq.free_descriptors < 2 * len(frames):
        pytest.skip(f"transmitq1 has {vq.free_descriptors} free descriptors, fewer than {2 * len(frames)}")
    requests: list[Request] = [net.transmit(f) for f in frames]
    used = _used_until_quiet(vq)
    assert len(used) < len(frames), "every frame was used although the backend read none"
    assert [e.token for e in used] == [r.token for r in requests[: len(used)]], "chains used out of order"
    vq.kick(force=True)  # a notification while a frame is pending changes nothing
    assert _used_within(vq, WINDOW) == [], "a chain was used while the backend still held its frame"
    for i, f in enumerate(frames):
        got = host.receive(timeout=5)
        assert len(got) == len(f) and got == f, f"frame {i} of {len(frames)} arrived altered or out of order"
    for r in requests[len(used) :]:
        assert vq.complete(r, timeout=5)[0] == 0
    for r in requests[: len(used)]:  # used already: only the buffers to free
        for addr in r.allocations:
            net.memory.free(addr)
    assert not host.pending(WINDOW)


def test_tx_waits_for_a_blocked_backend(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_flush_tx's -EBUSY path, virtio_net_tx_complete): while the socket
    backend cannot take a frame, the device keeps that chain and the ones after it unused, also
    across a new notification; once the backend drains, every frame arrives whole and in order
    and every chain is used, with length 0 (§2.7.8.2: nothing device-writable)."""
    _blocked_backend_holds_the_chains(virtio_device, qemu)


@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, flags={"x-txburst": "1"})
def test_tx_burst_of_one_with_a_blocked_backend(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The same with x-txburst=1, one frame per flush: after each completion the device must
    reschedule itself for the rest (virtio_net_tx_complete: "we will not receive notification
    for the remaining part"), so no frame is stranded."""
    _blocked_backend_holds_the_chains(virtio_device, qemu)


@pytest.mark.virtual_clock
@pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, flags={"tx": "timer", "x-txtimer": str(TX_TIMER_NS), "x-txburst": "1"}
)
def test_tx_timer_waits_for_a_blocked_backend(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_tx_timer, virtio_net_tx_complete with tx=timer): one frame per
    period while the socket takes them; once it is full, further periods send and use nothing
    more; as the backend drains, each completion re-arms the timer for the rest, so every
    frame arrives, in order, and every chain is used."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    qemu.qtest.clock_step(TX_TIMER_NS)
    frames = [_frame(PEER, BIG, seed=i) for i in range(_frames_to_fill(host))]
    vq = txq(net)
    requests = [net.transmit(f) for f in frames]
    for _ in range(len(frames) + 2):
        qemu.qtest.clock_step(TX_TIMER_NS)
    used = _used_until_quiet(vq)
    assert len(used) < len(frames), "every frame was used although the backend read none"
    qemu.qtest.clock_step(TX_TIMER_NS)
    assert _used_within(vq, WINDOW) == [], "a chain was used while the backend still held its frame"
    for i, f in enumerate(frames):
        for _ in range(3):  # a period or two for the re-armed timer, no more
            if host.pending(WINDOW):
                break
            qemu.qtest.clock_step(TX_TIMER_NS)
        assert host.receive(timeout=5) == f, f"frame {i} of {len(frames)} arrived altered or out of order"
    for r in requests[len(used) :]:
        assert vq.complete(r, timeout=5)[0] == 0
    for r in requests[: len(used)]:
        for addr in r.allocations:
            net.memory.free(addr)


@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, flags={"x-txburst": "2"})
def test_tx_burst_limit_does_not_strand_frames(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_tx_bh): x-txburst=2 lets one flush send two frames; eight frames
    behind one notification still all reach the link, in order, each chain used."""
    net = virtio_device
    host = qemu.backend(net.dev_id, NetBackend)
    frames = [_frame(PEER, 100 + 10 * i, seed=50 + i) for i in range(8)]
    net.send_many(frames)
    assert [host.receive(timeout=2) for _ in frames] == frames
    assert not host.pending(WINDOW)


# -- descriptor layouts (§2.7.4) ---------------------------------------------------------------


@pytest.mark.conformance("net-tx-any-layout", spec="2.7.4.1")
def test_tx_header_split_over_descriptors(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST NOT make assumptions about the arrangement of descriptors (MUST; with
    VERSION_1, or ANY_LAYOUT on the legacy interface, §2.7.4.3): a transmit chain whose
    virtio_net_hdr is split over two descriptors, the second also holding the frame's first
    bytes, and the rest of the frame in two more, reaches the link as that frame, header
    stripped."""
    net = virtio_device
    if not (net.has("VERSION_1") or net.has("ANY_LAYOUT")):
        pytest.skip("neither VERSION_1 nor ANY_LAYOUT negotiated: the legacy framing applies")
    host = qemu.backend(net.dev_id, NetBackend)
    hdr = NetHdr().encode(net.header_size)
    frame = _frame(PEER, 333, seed=60)
    bufs = _chain(net, [hdr[:3], hdr[3:] + frame[:7], frame[7:100], frame[100:]])
    vq = txq(net)
    vq.add(bufs)
    vq.kick()
    assert host.receive(timeout=2) == frame
    assert not host.pending(WINDOW)
    free_bufs(net.memory, bufs)


@pytest.mark.conformance("net-rx-any-layout", spec="2.7.4.1")
def test_rx_buffer_split_over_descriptors(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The same on receive: a buffer made of descriptors of 3, 9 and 2000 bytes gets the header
    across the first two and the frame after it, and the used length counts both (MUST)."""
    net = virtio_device
    if not (net.has("VERSION_1") or net.has("ANY_LAYOUT")):
        pytest.skip("neither VERSION_1 nor ANY_LAYOUT negotiated: the legacy framing applies")
    net.restart(rx_buffers=0)
    assert net.rxq is not None
    bufs = alloc_bufs(net.memory, [3, 9, 2000], fill=POISON, tag="rx corner")
    token = net.rxq.add(bufs)
    net.rxq.kick()
    frame = _frame(net.mac, 500, seed=61)
    qemu.backend(net.dev_id, NetBackend).send(frame)
    elem = net.rxq.wait_for(token, timeout=2)
    assert elem.length == net.header_size + len(frame)
    data = b"".join(net.memory.read(b.addr, b.length) for b in bufs)[: elem.length]
    header = NetHdr.decode(data[: net.header_size])
    assert (header.flags, header.gso_type) == (0, 0)
    assert data[net.header_size :] == frame
    free_bufs(net.memory, bufs)


# -- chains a driver must not make (§2.1.2) ----------------------------------------------------


def _broken_by(net: VirtioNet, qemu: Machine, parts: list[bytes], what: str) -> None:
    """Transmit one chain of ``parts``; the device must give up on it, send and use nothing,
    and come back after a device reset."""
    host = qemu.backend(net.dev_id, NetBackend)
    bufs = _chain(net, parts)
    vq = txq(net)
    vq.add(bufs)
    vq.kick()
    deadline = time.monotonic() + 5  # generous: a loaded machine is slow, a pass is fast
    while not gave_up(qemu, net):
        assert time.monotonic() < deadline, f"{what} did not break the device"
    assert not host.pending(WINDOW)
    assert vq.poll_used() is None
    net.restart()
    free_bufs(net.memory, bufs)
    assert not gave_up(qemu, net)
    net.send(_frame(PEER, seed=70))
    assert host.receive(timeout=2) == _frame(PEER, seed=70)


@pytest.mark.conformance("net-tx-short-header-needs-reset", spec="2.1.2")
def test_tx_chain_shorter_than_the_header_breaks_the_device(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A transmit chain shorter than virtio_net_hdr is a driver error the device cannot act on
    (the header comes first in every packet, §5.1.6.2); the device SHOULD set
    DEVICE_NEEDS_RESET when it enters such an error state (SHOULD): with VERSION_1 it does, on
    the legacy interface QEMU marks it broken alike; nothing is sent or used, and a device reset
    brings it back."""
    hdr = NetHdr().encode(virtio_device.header_size)
    _broken_by(virtio_device, qemu, [hdr[:-2]], "a transmit chain shorter than the header")


def test_tx_header_without_a_frame_breaks_the_device(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_flush_tx on a backend without a vnet header, as the socket is): a
    transmit chain that is a whole header and no frame leaves nothing to send; QEMU takes it as
    a driver error and gives up on the device (DEVICE_NEEDS_RESET with VERSION_1, §2.1.2) until
    it is reset."""
    hdr = NetHdr().encode(virtio_device.header_size)
    _broken_by(virtio_device, qemu, [hdr], "a header without a frame")


def test_rx_buffer_the_device_cannot_write_breaks_it(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_receive_rcu): a receive chain with no device-writable descriptor
    (§5.1.6.3: receive buffers are for the device to write) is a driver error; when a frame
    reaches it QEMU marks the device broken (DEVICE_NEEDS_RESET with VERSION_1, §2.1.2) and
    uses nothing. With MRG_RXBUF the chain before it, already partly filled, is not used
    either. A device reset brings the device back."""
    net = virtio_device
    net.restart(rx_buffers=0)
    vq = net.rxq
    assert vq is not None
    sizes = [64, 64, 2048] if net.has("MRG_RXBUF") else [2048]
    bufs = alloc_bufs(net.memory, sizes, fill=POISON, tag="rx corner")
    chains = [[b] for b in bufs]
    readable = 1 if net.has("MRG_RXBUF") else 0
    chains[readable] = [Buf(bufs[readable].addr, bufs[readable].length, writable=False)]
    for c in chains:
        vq.add(c)
    vq.kick()
    qemu.backend(net.dev_id, NetBackend).send(_frame(net.mac, 1000, seed=71))
    deadline = time.monotonic() + 5  # generous: a loaded machine is slow, a pass is fast
    while not gave_up(qemu, net):
        assert time.monotonic() < deadline, "a receive chain without writable buffers did not break the device"
    with pytest.raises(VirtqueueTimeout):
        vq.wait_used(WINDOW)
    net.restart(rx_buffers=None)
    free_bufs(net.memory, bufs)
    assert not gave_up(qemu, net)
    assert delivered(qemu, net, _frame(net.mac, seed=72))
