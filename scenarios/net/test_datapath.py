"""virtio-net conformance, the data path (virtio 1.2 §5.1.6): what the device does with the
frames the driver transmits, and how it fills the receive buffers the driver posts.

The backend is a socket netdev whose other end the test holds (``qemu.backend(dev_id)``):
frames sent there arrive on the device's receive queue, frames the device transmits can be read
there. Receive buffers are filled with 0xEE before they are posted, so a header field the device
did not write stands out.
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import NET_HDR, GsoType, NetHdr, ethernet_frame
from qtest_virtio.virtqueue import VirtqueueTimeout

from ._support import need, need_not

pytestmark = pytest.mark.virtio_device("virtio-net-pci")

PEER = "02:00:00:00:00:01"
POISON = 0xEE
SIZES = (14, 60, 64, 333, 1000, 1514)
#: How long a frame the device cannot deliver is watched before concluding it stays queued.
PENDING_WINDOW = 0.05


def _frame(dst: bytes | str, size: int, seed: int = 0) -> bytes:
    body = bytes((seed + 29 * i + 3) & 0xFF for i in range(size - 14))
    return ethernet_frame(dst, PEER, 0x88B5, body)


# -- transmit (§5.1.6.2) ---------------------------------------------------------------------


@pytest.mark.conformance("net-tx-frame-intact", spec="5.1.6.2.2")
def test_transmitted_frame_arrives_unmodified(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Without VIRTIO_NET_HDR_F_NEEDS_CSUM in flags the device MUST NOT use csum_start and
    csum_offset: frames sent with those fields set to nonsense reach the link byte for byte,
    header stripped (MUST)."""
    host = qemu.backend(virtio_device.dev_id, NetBackend)
    header = NetHdr(csum_start=7, csum_offset=3)
    for i, size in enumerate(SIZES):
        frame = _frame(PEER, size, seed=i)
        virtio_device.send(frame, header=header)
        assert host.receive(timeout=2) == frame
    assert not host.pending()


@pytest.mark.conformance("net-tx-unknown-flags-ignored", spec="5.1.6.2.2")
def test_transmit_ignores_unknown_header_flags(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST ignore flag bits that it does not recognize: bits 3-7 of flags set on a
    transmitted packet change nothing about the frame on the link (MUST)."""
    host = qemu.backend(virtio_device.dev_id, NetBackend)
    frame = _frame(PEER, 200)
    virtio_device.send(frame, header=NetHdr(flags=0xF8))
    assert host.receive(timeout=2) == frame


@pytest.mark.conformance("net-tx-mtu-forwarded", spec="5.1.4.1")
@pytest.mark.virtio_device("virtio-net-pci", flags={"host_mtu": "1400"})
def test_frames_up_to_mtu_are_forwarded_whole(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With VIRTIO_NET_F_MTU negotiated the device MUST forward transmitted packets of up to
    mtu plus the Ethernet header with gso_type NONE, without fragmentation (MUST)."""
    need(virtio_device, "MTU")
    host = qemu.backend(virtio_device.dev_id, NetBackend)
    mtu = virtio_device.config().mtu
    assert mtu is not None, "MTU negotiated, but the config has no mtu"
    for size in (mtu + 14, mtu + 13, 60):
        frame = _frame(PEER, size, seed=size)
        virtio_device.send(frame)
        assert host.receive(timeout=2) == frame


# -- receive (§5.1.6.3, §5.1.6.4) ---------------------------------------------------------


@pytest.mark.conformance("net-rx-used-length", spec="2.7.8.2")
def test_received_frame_and_used_length(virtio_device: VirtioNet, qemu: Machine) -> None:
    """An injected frame lands in one receive buffer right after the virtio_net_hdr, and the
    used length is exactly header + frame: the device MUST write at least the used length's
    worth of bytes from the start of the buffer (§2.7.8.2), and the driver learns the frame's
    length from it alone (§5.1.6.4), so it can be neither short nor padded (MUST)."""
    net = virtio_device
    net.restart(rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    for i, size in enumerate(SIZES):
        frame = _frame(net.mac, size, seed=i)
        host.send(frame)
        pkt = net.receive_packet(timeout=2)
        assert pkt.frame == frame
        assert pkt.used_lengths == [net.header_size + size]


@pytest.mark.conformance("net-rx-hdr-no-offloads", spec="5.1.6.4.1")
def test_received_header_reports_no_offloads(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Without GUEST_CSUM the device MUST set flags to zero; without GUEST_TSO4/TSO6/UFO it MUST
    set gso_type to VIRTIO_NET_HDR_GSO_NONE (MUST; the fields are checked in buffers that held
    0xEE before the device wrote them)."""
    net = virtio_device
    need_not(net, "GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_UFO")
    net.restart(rx_poison=POISON)
    frame = _frame(net.mac, 128)
    qemu.backend(net.dev_id, NetBackend).send(frame)
    pkt = net.receive_packet(timeout=2)
    assert pkt.frame == frame
    assert pkt.header.flags == 0
    assert pkt.header.gso_type == GsoType.NONE


@pytest.mark.conformance("net-rx-num-buffers-mrg", spec="5.1.6.4.1")
def test_num_buffers_counts_the_buffers_used(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With MRG_RXBUF the device MUST set num_buffers to the number of buffers the packet
    (header included) is spread over; 128-byte buffers make a 1514-byte frame take 12 (MUST)."""
    net = virtio_device
    need(net, "MRG_RXBUF")
    net.restart(rx_buffer_size=128, rx_buffers=64, rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    for size in (60, 116, 117, 1514):
        frame = _frame(net.mac, size, seed=size)
        host.send(frame)
        pkt = net.receive_packet(timeout=2)
        assert pkt.frame == frame
        expected = -(-(net.header_size + size) // 128)
        assert pkt.header.num_buffers == pkt.buffers == expected


@pytest.mark.conformance("net-rx-mrg-buffers-filled", spec="5.1.6.4.1")
def test_spread_packet_fills_all_but_the_last_buffer(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A packet spread over several buffers: the device MUST use all buffers but the last
    completely, up to the full length of each, and only the first starts with a header (MUST)."""
    net = virtio_device
    need(net, "MRG_RXBUF")
    net.restart(rx_buffer_size=200, rx_buffers=32, rx_poison=POISON)
    frame = _frame(net.mac, 1514, seed=5)
    qemu.backend(net.dev_id, NetBackend).send(frame)
    pkt = net.receive_packet(timeout=2)
    assert pkt.buffers > 1
    assert pkt.used_lengths[:-1] == pkt.buffer_sizes[:-1]
    assert 0 < pkt.used_lengths[-1] <= pkt.buffer_sizes[-1]
    assert sum(pkt.used_lengths) == net.header_size + len(frame)
    assert pkt.frame == frame  # the continuation buffers hold frame bytes, no further header


@pytest.mark.conformance("net-rx-num-buffers-one", spec="5.1.6.4.1")
@pytest.mark.virtio_device("virtio-net-pci", flags={"mrg_rxbuf": "off"}, transports=["transitional-modern", "modern"])
def test_num_buffers_is_one_without_mrg_rxbuf(virtio_device: VirtioNet, qemu: Machine) -> None:
    """If MRG_RXBUF has not been negotiated the device MUST set num_buffers to 1 (the field
    exists in every 1.x header; buffers held 0xEE before the device wrote them) (MUST)."""
    net = virtio_device
    need(net, "VERSION_1")
    need_not(net, "MRG_RXBUF")
    net.restart(rx_poison=POISON)
    frame = _frame(net.mac, 100)
    qemu.backend(net.dev_id, NetBackend).send(frame)
    pkt = net.receive_packet(timeout=2)
    assert pkt.frame == frame
    assert pkt.header.num_buffers == 1


@pytest.mark.conformance("net-rx-single-buffer-without-mrg", spec="5.1.6.3.2")
@pytest.mark.virtio_device("virtio-net-pci", flags={"mrg_rxbuf": "off"})
def test_without_mrg_rxbuf_a_packet_never_spans_buffers(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST use only a single buffer per packet if MRG_RXBUF was not negotiated:
    with buffers too small for a 1514-byte frame, that frame never comes back spread over
    several of them, and a frame that fits still arrives in exactly one (MUST)."""
    net = virtio_device
    need_not(net, "MRG_RXBUF")
    net.restart(rx_buffer_size=net.header_size + 600, rx_buffers=8, rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    big, small = _frame(net.mac, 1514, seed=1), _frame(net.mac, 600, seed=2)
    host.send(big)
    host.send(small)
    pkt = net.receive_packet(timeout=2)
    assert pkt.buffers == 1
    assert pkt.frame == small  # the big one was dropped, not spread
    assert net.poll_packet() is None


@pytest.mark.conformance("net-rx-legacy-hdr-10-bytes", spec="5.1.6.1")
@pytest.mark.virtio_device("virtio-net-pci", flags={"mrg_rxbuf": "off"}, transports=["legacy", "transitional-legacy"])
def test_legacy_header_without_mrg_rxbuf_is_10_bytes(virtio_device: VirtioNet, qemu: Machine) -> None:
    """On the legacy interface without MRG_RXBUF, struct virtio_net_hdr has no num_buffers and
    is 10 bytes: transitional devices MUST use that layout, so the frame starts at byte 10 and
    the used length is 10 + frame (MUST)."""
    net = virtio_device
    need_not(net, "VERSION_1", "MRG_RXBUF")
    assert net.header_size == NET_HDR.csum_offset.end == 10
    net.restart(rx_poison=POISON)
    frame = _frame(net.mac, 300)
    qemu.backend(net.dev_id, NetBackend).send(frame)
    pkt = net.receive_packet(timeout=2)
    assert pkt.used_lengths == [10 + len(frame)]
    assert pkt.frame == frame
    assert pkt.header.num_buffers is None
    # And the transmit side takes the same 10-byte header.
    net.send(frame)
    assert qemu.backend(net.dev_id, NetBackend).receive(timeout=2) == frame


@pytest.mark.conformance("net-rx-waits-for-buffers", spec="5.1.6.3")
def test_no_frame_is_delivered_without_receive_buffers(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With no receive buffer available the device places nothing in the receive queue (it only
    fills buffers the driver made available, §2.7: MUST); the frames wait or are dropped, and
    whatever arrives once buffers are posted is intact. Not their order: §5.1.6.3 does not
    require in-order delivery of frames that waited."""
    net = virtio_device
    net.restart(rx_buffers=0, rx_poison=POISON)
    host = qemu.backend(net.dev_id, NetBackend)
    frames = [_frame(net.mac, 100 + 50 * i, seed=i) for i in range(3)]
    for f in frames:
        host.send(f)
    deadline = time.monotonic() + PENDING_WINDOW
    while time.monotonic() < deadline:
        assert net.poll_packet() is None, "the device used a receive buffer the driver never posted"
    net.post_rx_buffers(4)
    got = [net.receive(timeout=2)]
    while len(got) < len(frames):
        try:
            got.append(net.receive(timeout=0.2))
        except VirtqueueTimeout:
            break  # dropped while no buffer was there: allowed
    assert all(g in frames for g in got), "a frame came back altered"
