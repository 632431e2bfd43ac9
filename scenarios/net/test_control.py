"""virtio-net conformance, the control queue (virtio 1.2 §5.1.6.5): MAC address, receive
filtering, VLAN filtering and announcements. What the device took is checked twice: by QMP
``query-rx-filter`` (QEMU's view) and by frames injected on the backend (the device's
behaviour). A frame the device should drop is followed by a marker frame it must deliver, so
"dropped" is an observation, not a timeout."""

from __future__ import annotations

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import BROADCAST, ethernet_frame, mac_bytes, mac_str

from ._support import delivered, need, rx_filter

pytestmark = pytest.mark.virtio_device("virtio-net-pci")

PEER = "02:00:00:00:00:01"
STRANGER = "02:99:99:99:99:99"
MULTICAST = "01:00:5e:00:00:fb"


def _frame(dst: bytes | str, size: int = 100, seed: int = 0) -> bytes:
    return ethernet_frame(dst, PEER, 0x88B5, bytes((seed + 7 * i) & 0xFF for i in range(size - 14)))


def _tagged(dst: bytes | str, vid: int) -> bytes:
    """An 802.1Q-tagged frame (TPID 0x8100, priority 0, VLAN id ``vid``)."""
    return ethernet_frame(dst, PEER, 0x8100, vid.to_bytes(2, "big") + b"\x88\xb5" + bytes(60))


@pytest.mark.conformance("net-ctrl-mac-addr-set", spec="5.1.6.5.2.1")
def test_mac_addr_set_is_acked_and_applied(virtio_device: VirtioNet, qemu: Machine) -> None:
    """VIRTIO_NET_CTRL_MAC_ADDR_SET is acked VIRTIO_NET_OK, and with MAC negotiated the device
    MUST update config ``mac`` before it consumes the command: the new address reads back as
    soon as the ack is there, QEMU's filter uses it, and frames to it are accepted (MUST)."""
    net = virtio_device
    need(net, "CTRL_MAC_ADDR", "MAC")
    new = "02:11:22:33:44:55"
    net.set_mac(new)  # raises unless acked OK
    assert net.mac == mac_bytes(new)
    assert rx_filter(qemu, net)["main-mac"] == new
    if net.has("CTRL_RX"):
        net.set_rx_mode(promisc=False)
        assert delivered(qemu, net, _frame(new, seed=1))


@pytest.mark.conformance("net-ctrl-promisc", spec="5.1.6.5.1")
def test_promisc_is_acked_and_applied(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With CTRL_RX the device MUST support VIRTIO_NET_CTRL_RX_PROMISC (acked OK, QEMU's filter
    follows it both ways); while promiscuous it SHOULD receive all packets, a frame to a
    foreign unicast address included (MUST / SHOULD)."""
    net = virtio_device
    need(net, "CTRL_RX")
    net.set_rx_mode(promisc=False)
    assert rx_filter(qemu, net)["promiscuous"] is False
    net.set_rx_mode(promisc=True)
    assert rx_filter(qemu, net)["promiscuous"] is True
    assert delivered(qemu, net, _frame(STRANGER, seed=2))


@pytest.mark.conformance("net-ctrl-allmulti", spec="5.1.6.5.1")
def test_allmulti_is_acked_and_applied(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With CTRL_RX the device MUST support VIRTIO_NET_CTRL_RX_ALLMULTI; when on it SHOULD
    allow all incoming multicast packets (MUST / SHOULD)."""
    net = virtio_device
    need(net, "CTRL_RX")
    net.set_rx_mode(promisc=False, allmulti=True)
    assert rx_filter(qemu, net)["multicast"] == "all"
    assert delivered(qemu, net, _frame(MULTICAST, seed=3))
    net.set_rx_mode(allmulti=False)
    assert rx_filter(qemu, net)["multicast"] == "normal"


@pytest.mark.conformance("net-ctrl-rx-extra", spec="5.1.6.5.1")
def test_rx_extra_commands_are_supported(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With CTRL_RX_EXTRA the device MUST support ALLUNI, NOMULTI, NOUNI and NOBCAST: each is
    acked OK and QEMU's filter state follows (MUST)."""
    net = virtio_device
    need(net, "CTRL_RX_EXTRA")
    net.set_rx_mode(alluni=True)
    assert rx_filter(qemu, net)["unicast"] == "all"
    net.set_rx_mode(nouni=True)
    assert rx_filter(qemu, net)["unicast"] == "none"
    net.set_rx_mode(nouni=False, alluni=False, nomulti=True)
    info = rx_filter(qemu, net)
    assert (info["unicast"], info["multicast"]) == ("normal", "none")
    net.set_rx_mode(nomulti=False, nobcast=True)
    # (QEMU 7.2's query-rx-filter reports broadcast-allowed inverted; the frames decide below.)
    assert rx_filter(qemu, net)["multicast"] == "normal"


@pytest.mark.conformance("net-ctrl-nobcast", spec="5.1.6.5.1")
def test_nobcast_suppresses_broadcast(virtio_device: VirtioNet, qemu: Machine) -> None:
    """When broadcast receive is suppressed (NOBCAST on) the device SHOULD NOT send broadcast
    packets to the driver, even with ALLMULTI on; with it off, broadcast comes through (SHOULD)."""
    net = virtio_device
    need(net, "CTRL_RX_EXTRA", "CTRL_RX")
    net.set_rx_mode(promisc=False)
    assert delivered(qemu, net, _frame(BROADCAST, seed=4))
    net.set_rx_mode(nobcast=True, allmulti=True)
    assert not delivered(qemu, net, _frame(BROADCAST, seed=5))
    net.set_rx_mode(nobcast=False)
    assert delivered(qemu, net, _frame(BROADCAST, seed=6))


@pytest.mark.conformance("net-rx-filter-foreign-mac", spec="5.1.6.5.2.1")
def test_frames_for_other_addresses_are_dropped(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Out of promiscuous mode the device SHOULD drop incoming packets whose destination matches
    neither ``mac`` nor the MAC filtering table (SHOULD), and still deliver its own. All-multicast
    is turned off explicitly: the spec gives it no value after reset (§5.1.6.5.1)."""
    net = virtio_device
    need(net, "CTRL_RX")
    net.set_rx_mode(promisc=False, allmulti=False)
    assert not delivered(qemu, net, _frame(STRANGER, seed=7))
    assert not delivered(qemu, net, _frame(MULTICAST, seed=8))
    assert delivered(qemu, net, _frame(net.mac, seed=9))


@pytest.mark.conformance("net-ctrl-mac-table-set", spec="5.1.6.5.2.1")
def test_mac_table_is_updated_before_the_command_is_used(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST update the MAC filtering table before it consumes
    VIRTIO_NET_CTRL_MAC_TABLE_SET: once acked, QEMU's filter lists both tables and frames to
    those addresses pass the filter (MUST)."""
    net = virtio_device
    need(net, "CTRL_RX")
    net.set_rx_mode(promisc=False)
    net.set_mac_table([STRANGER], [MULTICAST])
    info = rx_filter(qemu, net)
    assert (info["unicast-table"], info["multicast-table"]) == ([STRANGER], [MULTICAST])
    assert delivered(qemu, net, _frame(STRANGER, seed=10))
    assert delivered(qemu, net, _frame(MULTICAST, seed=11))
    net.set_mac_table([], [])
    assert not delivered(qemu, net, _frame(STRANGER, seed=12))


@pytest.mark.conformance("net-mac-table-empty-on-reset", spec="5.1.6.5.2.1")
def test_mac_table_is_empty_after_reset(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device MUST have an empty MAC filtering table on reset: a table set before a device
    reset is gone after it, and the default address is back (MUST)."""
    net = virtio_device
    need(net, "CTRL_RX")
    net.set_mac_table([STRANGER], [MULTICAST])
    assert rx_filter(qemu, net)["unicast-table"] == [STRANGER]
    net.restart()
    info = rx_filter(qemu, net)
    assert (info["unicast-table"], info["multicast-table"]) == ([], [])
    if net.has("CTRL_RX"):
        net.set_rx_mode(promisc=False)
        assert not delivered(qemu, net, _frame(STRANGER, seed=13))


@pytest.mark.conformance("net-vlan-filter", spec="5.1.6.5.3")
def test_vlan_table_filters_tagged_frames(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With CTRL_VLAN the device MUST accept VLAN-tagged packets whose tag is in the filter table
    and SHOULD drop those whose tag is not (the table starts empty); tested out of promiscuous
    mode (MUST / SHOULD)."""
    net = virtio_device
    need(net, "CTRL_VLAN", "CTRL_RX")
    net.set_rx_mode(promisc=False)
    tagged = {
        vid: ethernet_frame(net.mac, PEER, 0x8100, vid.to_bytes(2, "big") + b"\x88\xb5" + bytes(60)) for vid in (5, 6)
    }
    assert not delivered(qemu, net, tagged[5])
    net.vlan_add(5)
    assert rx_filter(qemu, net)["vlan-table"] == [5]
    assert delivered(qemu, net, tagged[5])
    assert not delivered(qemu, net, tagged[6])
    net.vlan_del(5)
    assert not delivered(qemu, net, tagged[5])


@pytest.mark.conformance("net-vlan-accept-all-without-ctrl-vlan", spec="5.1.6.5.3")
@pytest.mark.virtio_device("virtio-net-pci", refuse={"CTRL_VLAN"})
def test_without_ctrl_vlan_tagged_frames_pass(virtio_device: VirtioNet, qemu: Machine) -> None:
    """When VIRTIO_NET_F_CTRL_VLAN is not negotiated the device MUST accept all VLAN-tagged
    packets (checked out of promiscuous mode, where a filter would show) (MUST)."""
    net = virtio_device
    assert not net.has("CTRL_VLAN")
    need(net, "CTRL_RX")
    net.set_rx_mode(promisc=False)
    for vid in (1, 5, 4095):
        assert delivered(qemu, net, _tagged(net.mac, vid))


@pytest.mark.conformance("net-announce-ack-clears", spec="5.1.6.5.4")
def test_announce_ack_clears_the_announce_bit(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With GUEST_ANNOUNCE the device asks for an announcement with VIRTIO_NET_S_ANNOUNCE (and a
    configuration change notification); it MUST clear the bit upon VIRTIO_NET_CTRL_ANNOUNCE_ACK
    before marking the command used (MUST)."""
    net = virtio_device
    need(net, "GUEST_ANNOUNCE", "STATUS")
    assert net.config().announce is False
    qemu.qmp.cmd("announce-self", initial=50, max=100, rounds=1, step=100)
    net.wait_config_interrupt(timeout=2)
    assert net.config().announce is True
    net.announce_ack()
    assert net.config().announce is False


@pytest.mark.conformance("net-ctrl-ack-err-malformed", spec="5.1.6.5")
def test_malformed_command_is_acked_err(virtio_device: VirtioNet, qemu: Machine) -> None:
    """The device sets the ack byte of every command: VIRTIO_NET_OK for a well-formed one and
    VIRTIO_NET_ERR for one it cannot apply (a PROMISC command without its data byte), and a
    rejected command changes nothing (the ack's definition, §5.1.6.5)."""
    net = virtio_device
    need(net, "CTRL_RX")
    before = rx_filter(qemu, net)["promiscuous"]
    assert net.ctrl_raw(0, 0) == 1  # VIRTIO_NET_CTRL_RX / PROMISC, no data
    assert rx_filter(qemu, net)["promiscuous"] is before
    assert net.ctrl_raw(0, 0, bytes([0 if before else 1])) == 0
    assert rx_filter(qemu, net)["promiscuous"] is (not before)
    assert mac_str(net.mac) == rx_filter(qemu, net)["main-mac"]
