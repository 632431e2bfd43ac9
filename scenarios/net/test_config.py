"""virtio-net conformance, the configuration and the feature set (virtio 1.2 §5.1.3, §5.1.4):
what the device advertises in its config structure and keeps consistent with the link, the
properties it was built with, and the features it offers."""

from __future__ import annotations

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import FEATURE_REQUIRES, NET_STATUS, ethernet_frame, mac_bytes
from qtest_virtio.transport.layout import feature_names

from ._support import need, rx_filter

pytestmark = pytest.mark.virtio_device("virtio-net-pci")

PEER = "02:00:00:00:00:01"
MAC = "52:54:00:c0:ff:ee"


def _offered(net: VirtioNet) -> set[str]:
    return set(feature_names(net.negotiated.offered, net.device_bits))


@pytest.mark.conformance("net-config-mac", spec="5.1.4")
@pytest.mark.virtio_device("virtio-net-pci", flags={"mac": MAC})
def test_config_mac_is_the_devices_address(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With VIRTIO_NET_F_MAC the device has a given address and config ``mac`` holds it: the
    address the device was built with, which its receive filter also uses (§5.1.3 feature
    definition, §5.1.4; no MUST keyword, the field's meaning)."""
    net = virtio_device
    need(net, "MAC")
    assert net.config().mac == mac_bytes(MAC)
    info = rx_filter(qemu, net)
    assert info["main-mac"] == MAC


@pytest.mark.conformance("net-status-link-up", spec="5.1.4")
def test_link_status_follows_the_link(virtio_device: VirtioNet, qemu: Machine) -> None:
    """status bit VIRTIO_NET_S_LINK_UP reports the link: set while the link is up, clear once
    it goes down, and each change is signalled by a configuration change notification
    (§4.1.5.3); the statement is the field's definition with STATUS offered."""
    net = virtio_device
    need(net, "STATUS")
    assert net.config().link_up is True
    for up in (False, True, False):
        qemu.qmp.cmd("set_link", name=net.dev_id, up=up)
        net.wait_config_interrupt(timeout=2)
        config = net.config()
        assert config.status is not None
        assert bool(NET_STATUS.LINK_UP.get(config.status)) is up


@pytest.mark.conformance("net-config-generation-on-change", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-net-pci", transports=["transitional-modern", "modern"])
def test_config_generation_moves_when_status_changes(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST present a changed config_generation after the driver has read a config
    field if any part of the config changed since: a link change rewrites status (MUST)."""
    net = virtio_device
    need(net, "STATUS")
    before = net.transport.config_generation()
    assert net.config().link_up is True
    qemu.qmp.cmd("set_link", name=net.dev_id, up=False)
    net.wait_config_interrupt(timeout=2)
    assert net.transport.config_generation() != before
    assert net.config().link_up is False


@pytest.mark.conformance("net-mtu-valid", spec="5.1.4.1")
@pytest.mark.virtio_device("virtio-net-pci", flags={"host_mtu": "1400"})
def test_mtu_is_in_range_and_stable(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With MTU offered the device MUST set mtu between 68 and 65535 (SHOULD at least 1280),
    and MUST NOT modify it once set: it reads the same after traffic and a device reset."""
    net = virtio_device
    need(net, "MTU")
    mtu = net.config().mtu
    assert mtu is not None and 68 <= mtu <= 65535
    assert mtu >= 1280
    frame = ethernet_frame(PEER, PEER, 0x88B5, bytes(mtu))
    net.send(frame)
    assert qemu.backend(net.dev_id, NetBackend).receive(timeout=2) == frame
    net.restart()
    assert net.config().mtu == mtu


@pytest.mark.conformance("net-rx-mtu-limit", spec="5.1.4.1")
@pytest.mark.virtio_device("virtio-net-pci", flags={"host_mtu": "1400"})
def test_received_frames_longer_than_mtu_are_not_passed(virtio_device: VirtioNet, qemu: Machine) -> None:
    """After VIRTIO_NET_F_MTU is negotiated the device MUST NOT pass received packets that
    exceed mtu plus the Ethernet header with gso_type NONE: a 1514-byte frame with mtu 1400
    never reaches the driver, while an mtu-sized one does (MUST)."""
    net = virtio_device
    need(net, "MTU")
    mtu = net.config().mtu
    assert mtu is not None, "MTU negotiated, but the config has no mtu"
    too_big = ethernet_frame(net.mac, PEER, 0x88B5, bytes(i & 0xFF for i in range(mtu + 1)))
    fits = ethernet_frame(net.mac, PEER, 0x88B5, b"\x5a" * mtu)
    if not net.has("MRG_RXBUF"):  # buffers that could hold it: only the mtu rule may keep it out
        net.restart(rx_buffer_size=net.header_size + len(too_big), rx_buffers=4)
    host = qemu.backend(net.dev_id, NetBackend)
    host.send(too_big)
    host.send(fits)
    first = net.receive_packet(timeout=2)
    assert first.header.gso_type == 0
    assert first.frame == fits, f"a {len(first.frame)}-byte frame was passed with mtu {mtu}"


@pytest.mark.conformance("net-max-virtqueue-pairs-valid", spec="5.1.4.1")
@pytest.mark.virtio_device("virtio-net-pci", flags={"mq": "on"})
def test_max_virtqueue_pairs_is_in_range(virtio_device: VirtioNet, qemu: Machine) -> None:
    """If the device offers VIRTIO_NET_F_MQ it MUST set max_virtqueue_pairs between 1 and
    0x8000; the control queue then sits at index 2 * max_virtqueue_pairs, where the driver
    found it (MUST)."""
    net = virtio_device
    if "MQ" not in _offered(net):
        pytest.skip("MQ not offered")
    pairs = net.config().max_virtqueue_pairs
    assert pairs is not None and 1 <= pairs <= 0x8000
    if net.has("MQ"):
        assert net.ctrl_index == 2 * pairs
        net.set_queue_pairs(1)  # acked OK: the queue found there is the control queue


@pytest.mark.conformance("net-feature-dependencies-offered", spec="2.2.2")
@pytest.mark.virtio_device("virtio-net-pci", flags={"ctrl_vq": "off"})
def test_no_feature_is_offered_without_what_it_requires(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST NOT offer a feature which requires another feature which was not
    offered (§2.2.2, requirements of §5.1.3.1; CTRL_RX_EXTRA: SHOULD NOT, §5.1.4.1): a device
    built without the control queue offers none of the control-queue features."""
    offered = _offered(virtio_device)
    assert "CTRL_VQ" not in offered
    broken = sorted(
        name for name in offered for clause in FEATURE_REQUIRES.get(name, ()) if not offered.intersection(clause)
    )
    assert broken == [], f"offered without what they require: {', '.join(broken)}"
