"""virtio-net, the device's tables and the config the driver may write (virtio 1.2 §5.1.4,
§5.1.6.5.2, §5.1.6.5.3): the VLAN filter table and the MAC filtering table through the control
queue, their limits and malformed commands, the legacy driver-writable ``mac``, and the speed
and duplex the device is built with.

What the device took is checked twice, by QMP ``query-rx-filter`` (QEMU's view) and by frames
injected on the socket backend; a frame the device should drop is followed by a marker frame it
must deliver (``_support.delivered``), so "dropped" is an observation, not a timeout. Filtering
only shows out of promiscuous mode, which QEMU starts in (virtio_net_reset), so every scenario
that looks at frames turns it off first (and needs CTRL_RX for that).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from qtest_virtio import Machine, MachineSpec, QemuStartError
from qtest_virtio.backends import NetBackend
from qtest_virtio.binary import QemuBinary
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import (
    CTRL_COMMANDS,
    NET_CONFIG_MAC,
    Ack,
    NetCtrlError,
    ethernet_frame,
    mac_bytes,
    mac_str,
    mac_table_data,
    vlan_frame,
)
from qtest_virtio.modes import MODERN_LAYOUT_MODES
from qtest_virtio.testing import alloc_bufs, free_bufs
from qtest_virtio.transport import feature_bit
from qtest_virtio.transport.layout import STATUS

from ._support import delivered, gave_up, need, rx_filter

#: The control features decide what the tables do; other refusals change nothing here.
pytestmark = pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=["CTRL_VQ", "CTRL_RX", "CTRL_RX_EXTRA", "CTRL_VLAN", "CTRL_MAC_ADDR"]
)

PEER = "02:00:00:00:00:01"
STRANGER = "02:99:99:99:99:99"
MULTICAST = "01:00:5e:00:00:fb"
#: QEMU's MAC filtering table holds this many addresses, unicast and multicast together
#: (MAC_TABLE_ENTRIES in hw/net/virtio-net.c, 7.2 to 10.2.2).
MAC_TABLE_ENTRIES = 64
#: 802.1Q VLAN ids are 12 bits; QEMU's table has one bit per id (MAX_VLAN).
MAX_VLAN = 4096

VLAN_ADD, VLAN_DEL, MAC_TABLE_SET = CTRL_COMMANDS["VLAN_ADD"], CTRL_COMMANDS["VLAN_DEL"], CTRL_COMMANDS["MAC_TABLE_SET"]


def _frame(dst: bytes | str, seed: int = 0) -> bytes:
    return ethernet_frame(dst, PEER, 0x88B5, bytes((seed + 11 * i) & 0xFF for i in range(86)))


def _tagged(net: VirtioNet, vid: int) -> bytes:
    return vlan_frame(net.mac, PEER, vid, 0x88B5, bytes(range(60)))


def _unicast(n: int) -> list[str]:
    """``n`` distinct locally administered unicast addresses."""
    return [f"02:aa:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(n)]


def _multicast(n: int) -> list[str]:
    """``n`` distinct IPv4-mapped multicast addresses."""
    return [f"01:00:5e:01:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(n)]


def _filter_off(net: VirtioNet) -> None:
    need(net, "CTRL_RX")
    net.set_rx_mode(promisc=False, allmulti=False)


# -- VLAN filtering (§5.1.6.5.3) -----------------------------------------------------------


@pytest.mark.conformance("net-vlan-add-del", spec="5.1.6.5.3")
def test_vlan_add_and_del_follow_the_table(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD and _DEL are acked VIRTIO_NET_OK and edit the
    filter table: the device MUST accept tagged packets whose id is in the table and SHOULD drop
    those whose id is not, so an id passes after ADD and is dropped again after DEL, while an id
    never added stays dropped (MUST / SHOULD). The ids are deleted first: the table's state
    after a reset differs between QEMU versions (deviation net-vlan-filter), the statement here
    does not."""
    net = virtio_device
    need(net, "CTRL_VLAN")
    _filter_off(net)
    for vid in (5, 6):
        net.vlan_del(vid)
    assert not {5, 6} & set(rx_filter(qemu, net)["vlan-table"])
    assert not delivered(qemu, net, _tagged(net, 5))
    net.vlan_add(5)
    assert 5 in rx_filter(qemu, net)["vlan-table"]
    assert delivered(qemu, net, _tagged(net, 5))
    assert not delivered(qemu, net, _tagged(net, 6))
    net.vlan_del(5)
    info = rx_filter(qemu, net)
    assert 5 not in info["vlan-table"]
    assert not delivered(qemu, net, _tagged(net, 5))
    assert delivered(qemu, net, _frame(net.mac, seed=1)), "an untagged frame was caught by the VLAN filter"


def test_vlan_commands_it_cannot_apply_are_acked_err(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (hw/net/virtio-net.c virtio_net_handle_vlan_table): a VLAN id outside the 12
    bits of 802.1Q (4096, 0xffff), a VLAN command without its 2-byte id, and a VLAN command
    code that does not exist are acked VIRTIO_NET_ERR (the ack's definition, §5.1.6.5) and
    change nothing: the table is the same before and after."""
    net = virtio_device
    need(net, "CTRL_VLAN")
    net.vlan_add(7)
    before = rx_filter(qemu, net)["vlan-table"]
    for vid in (MAX_VLAN, 0xFFFF):
        with pytest.raises(NetCtrlError):
            net.vlan_add(vid)
        with pytest.raises(NetCtrlError):
            net.vlan_del(vid)
    assert net.ctrl_raw(VLAN_ADD.class_code, VLAN_ADD.code, b"\x07") == Ack.ERR
    assert net.ctrl_raw(VLAN_DEL.class_code, VLAN_DEL.code) == Ack.ERR
    assert net.ctrl_raw(VLAN_ADD.class_code, 2, (8).to_bytes(2, "little")) == Ack.ERR
    assert rx_filter(qemu, net)["vlan-table"] == before
    net.vlan_add(MAX_VLAN - 1)  # the highest id is in range
    assert MAX_VLAN - 1 in rx_filter(qemu, net)["vlan-table"]


# -- MAC filtering table (§5.1.6.5.2) ------------------------------------------------------


#: (unicast, multicast) table sizes: either kind over the limit, both sharing it, an exact fit.
MAC_TABLE_CASES = ((MAC_TABLE_ENTRIES + 1, 0), (0, MAC_TABLE_ENTRIES + 1), (40, 30), (MAC_TABLE_ENTRIES, 0))


def test_mac_table_overflow_lets_that_kind_through(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression on QEMU's 64-entry table (MAC_TABLE_ENTRIES, unicast and multicast share it):
    a VIRTIO_NET_CTRL_MAC_TABLE_SET with more addresses than fit is acked OK; the kind that does
    not fit is not stored, QMP reports its overflow, and every frame of that kind passes (the
    device "can ... silently switch to allmulti or promiscuous mode if it is given too many
    addresses", §5.1.6.5.2), while the kind that fits still filters: listed addresses pass,
    others are dropped. 64 unicast addresses fit exactly; a table that fits clears the overflow."""
    net = virtio_device
    _filter_off(net)
    for n_uni, n_multi in MAC_TABLE_CASES:
        uni, multi = _unicast(n_uni), _multicast(n_multi)
        net.set_mac_table(uni, multi)
        uni_over = n_uni > MAC_TABLE_ENTRIES
        multi_over = n_multi > MAC_TABLE_ENTRIES - (0 if uni_over else n_uni)
        info = rx_filter(qemu, net)
        case = f"{n_uni} unicast + {n_multi} multicast"
        assert (info["unicast-overflow"], info["multicast-overflow"]) == (uni_over, multi_over), case
        assert sorted(info["unicast-table"]) == ([] if uni_over else sorted(uni)), case
        assert sorted(info["multicast-table"]) == ([] if multi_over else sorted(multi)), case
        assert delivered(qemu, net, _frame(STRANGER, seed=2)) is uni_over, case
        assert delivered(qemu, net, _frame(MULTICAST, seed=3)) is multi_over, case
        if uni:
            assert delivered(qemu, net, _frame(uni[-1], seed=4)), case
        if multi:
            assert delivered(qemu, net, _frame(multi[-1], seed=5)), case
        net.set_mac_table([STRANGER], [])
        info = rx_filter(qemu, net)
        assert (info["unicast-overflow"], info["multicast-overflow"]) == (False, False), case
        assert not delivered(qemu, net, _frame(MULTICAST, seed=6)), case


#: MAC_TABLE_SET data that is not two well-formed tables, by what is wrong with it.
MALFORMED_MAC_TABLES: dict[str, list[bytes]] = {
    "the first count cut short": [b"\x01\x00"],
    "the multicast table missing": [mac_table_data([STRANGER])],
    "a unicast count of 3 with 1 address": [mac_table_data([STRANGER], entries=3), mac_table_data([])],
    "a multicast count of 2 with 1 address": [mac_table_data([]), mac_table_data([MULTICAST], entries=2)],
    "a byte after the multicast table": [mac_table_data([]), mac_table_data([MULTICAST]) + b"\x00"],
}


def test_malformed_mac_table_is_acked_err(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A VIRTIO_NET_CTRL_MAC_TABLE_SET whose data is not two tables, each a le32 count and
    that many addresses (§5.1.6.5.2 driver requirement), is acked VIRTIO_NET_ERR (the ack's
    definition, §5.1.6.5) and changes nothing: the table set before it stays, overflow flags
    included (regression: virtio_net_handle_mac checks each count against the buffer)."""
    net = virtio_device
    need(net, "CTRL_RX")
    net.set_mac_table([STRANGER], [MULTICAST])
    for what, tables in MALFORMED_MAC_TABLES.items():
        assert net.ctrl_raw(MAC_TABLE_SET.class_code, MAC_TABLE_SET.code, tables) == Ack.ERR, what
        info = rx_filter(qemu, net)
        assert (info["unicast-table"], info["multicast-table"]) == ([STRANGER], [MULTICAST]), what
        assert (info["unicast-overflow"], info["multicast-overflow"]) == (False, False), what


# -- the config mac (§5.1.4, §5.1.4.3) -------------------------------------------------------


@pytest.mark.conformance("net-legacy-mac-writable", spec="5.1.4.3")
@pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, transports=["legacy", "transitional-legacy"], refuse={"CTRL_MAC_ADDR"}
)
def test_legacy_driver_sets_the_mac_through_config(virtio_device: VirtioNet, qemu: Machine) -> None:
    """On the legacy interface ``mac`` is driver-writable, the way to change the address without
    VIRTIO_NET_F_CTRL_MAC_ADDR: after the six byte writes config reads the new address, QEMU's
    filter uses it (main-mac), and out of promiscuous mode frames to it pass while frames to the
    old address are dropped. Legacy transports only: with VERSION_1 the field is read-only."""
    net = virtio_device
    assert not net.has("CTRL_MAC_ADDR") and not net.has("VERSION_1")
    old = net.mac
    new = "02:11:22:33:44:66"
    net.set_mac(new)  # byte by byte through config: CTRL_MAC_ADDR is refused
    assert net.mac == mac_bytes(new)
    assert rx_filter(qemu, net)["main-mac"] == new
    if net.has("CTRL_RX"):
        _filter_off(net)
        assert delivered(qemu, net, _frame(new, seed=7))
        assert not delivered(qemu, net, _frame(old, seed=8))
    net.restart()  # a reset brings back the address the device was built with
    assert net.mac == old


def test_config_mac_write_is_ignored_with_version_1_or_ctrl_mac_addr(virtio_device: VirtioNet, qemu: Machine) -> None:
    """All config fields are read-only for the driver (§5.1.4) once the legacy exception does
    not apply: with VERSION_1 (modern layout) or with CTRL_MAC_ADDR negotiated (legacy layout),
    writes to ``mac`` change neither what config reads nor the address QEMU filters on
    (regression: virtio_net_set_config only takes mac without both)."""
    net = virtio_device
    if not (net.has("VERSION_1") or net.has("CTRL_MAC_ADDR")):
        pytest.skip("legacy without CTRL_MAC_ADDR: mac is driver-writable there")
    old = net.mac
    for f, b in zip(NET_CONFIG_MAC, mac_bytes("02:de:ad:be:ef:01"), strict=True):
        net.write_config(f, b)
    assert net.mac == old
    assert rx_filter(qemu, net)["main-mac"] == mac_str(old)


# -- speed and duplex (§5.1.4) ---------------------------------------------------------------


@pytest.mark.conformance("net-speed-duplex", spec="5.1.4.1")
@pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, flags={"speed": "2500", "duplex": "half"}, transports=MODERN_LAYOUT_MODES
)
def test_speed_and_duplex_report_the_built_values(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A device built with speed and duplex offers VIRTIO_NET_F_SPEED_DUPLEX, and ``speed``
    holds the speed in Mbit/s (0 to 0x7fffffff, MUST) and ``duplex`` 0x00 for half duplex, as
    the field's definition in §5.1.4 has it (the normative list of §5.1.4.1 swaps the two
    values; Linux and QEMU follow the definition). Modern layout only: bit 63 is beyond the
    32 feature bits of the legacy interface."""
    config = virtio_device.config()
    assert (config.speed, config.duplex) == (2500, 0)


@pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, flags={"duplex": "full"}, transports=MODERN_LAYOUT_MODES
)
def test_duplex_without_speed_reports_unknown_speed(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_device_realize): duplex alone offers SPEED_DUPLEX too, with the
    speed unknown, 0xffffffff (§5.1.4), and full duplex 0x01."""
    config = virtio_device.config()
    assert (config.speed, config.duplex) == (0xFFFFFFFF, 1)


@pytest.mark.parametrize(
    ("prop", "value", "says"),
    [
        ("duplex", "quarter", "'duplex' must be 'half' or 'full'"),
        ("speed", "-2", "'speed' must be between 0 and INT_MAX"),
        ("rx_queue_size", "100", "Invalid rx_queue_size"),
        ("tx_queue_size", "2048", "Invalid tx_queue_size"),
    ],
)
def test_invalid_link_properties_refuse_to_start(
    machine_factory: Callable[..., Machine], qemu_binary: QemuBinary, prop: str, value: str, says: str
) -> None:
    """Regression (virtio_net_device_realize): a duplex other than half or full, a negative
    speed other than -1 (unknown), and queue sizes that are not a power of two between 256
    and 1024 (tx: at most 1024, the virtqueue maximum) stop QEMU at start with an error naming
    the property. No driver runs, so there is nothing to vary by transport or ring."""
    spec = MachineSpec(qemu=qemu_binary.path)
    spec.add_virtio("virtio-net-pci", {prop: value}, mode="modern", id="net0")
    with pytest.raises(QemuStartError, match=says.replace("(", r"\(")):
        machine_factory(spec)


# -- control commands the device cannot act on (§5.1.6.5) -------------------------------------


#: Control chains without their framing: the command with no ack buffer; one header byte.
UNFRAMED_CONTROL = {"no ack buffer": ([b"\x00\x00\x01"], False), "a one-byte header": ([b"\x00"], True)}


def test_control_chain_without_its_framing_breaks_the_device(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_handle_ctrl_iov): every control command is a class and command
    byte, its data, then a device-writable ack byte (§5.1.6.5); a chain with no writable byte
    for the ack, or with less than the two header bytes, is a driver error: QEMU uses nothing
    and gives up on the device (DEVICE_NEEDS_RESET with VERSION_1, §2.1.2) until it is reset."""
    net = virtio_device
    need(net, "CTRL_RX")
    for what, (parts, with_ack) in UNFRAMED_CONTROL.items():
        vq = net.ctrlq
        assert vq is not None
        chain = alloc_bufs(net.memory, [len(p) for p in parts], writable=False, tag="ctrl corner")
        for b, p in zip(chain, parts, strict=True):
            net.memory.write(b.addr, p)
        if with_ack:
            chain += alloc_bufs(net.memory, [1], fill=0xA5, tag="ctrl corner")
        vq.add(chain)
        vq.kick()
        deadline = time.monotonic() + 5  # generous: a loaded machine is slow, a pass is fast
        while not gave_up(qemu, net):
            assert time.monotonic() < deadline, f"a control chain with {what} did not break the device"
        assert vq.poll_used() is None, what
        net.restart()
        free_bufs(net.memory, chain)
        assert not gave_up(qemu, net), what
        net.set_rx_mode(promisc=False)
        assert rx_filter(qemu, net)["promiscuous"] is False, what
        net.set_rx_mode(promisc=True)


def test_announce_ack_without_an_announcement_is_acked_err(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_handle_announce): VIRTIO_NET_CTRL_ANNOUNCE_ACK acknowledges an
    announcement the device asked for (§5.1.6.5.4); with none pending (status ANNOUNCE clear)
    QEMU acks it VIRTIO_NET_ERR, as it does an ANNOUNCE command code that does not exist."""
    net = virtio_device
    need(net, "GUEST_ANNOUNCE")
    if net.has("STATUS"):
        assert net.config().announce is False
    with pytest.raises(NetCtrlError):
        net.announce_ack()
    ack = CTRL_COMMANDS["ANNOUNCE_ACK"]
    assert net.ctrl_raw(ack.class_code, 1) == Ack.ERR


# -- properties the device is built with -------------------------------------------------------


@pytest.mark.virtio_device(
    "virtio-net-pci", refuse_each=False, flags={"failover": "on"}, transports=MODERN_LAYOUT_MODES
)
def test_failover_offers_standby(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_device_realize): failover=on makes the device offer
    VIRTIO_NET_F_STANDBY, "may act as a standby for a primary device with the same MAC"
    (§5.1.3); the device works as a NIC meanwhile. Modern layout only: bit 62 is beyond the 32
    legacy feature bits."""
    net = virtio_device
    assert net.negotiated.offered >> feature_bit("STANDBY", net.device_bits) & 1
    net.send(_frame(PEER, seed=9))
    assert qemu.backend(net.dev_id, NetBackend).receive(timeout=2) == _frame(PEER, seed=9)


@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, flags={"tx": "fast"})
def test_unknown_tx_mode_falls_back_to_bh(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_net_device_realize): a tx= other than timer or bh is not an error; QEMU
    warns and uses the bottom half, so a frame leaves at once on its notification."""
    net = virtio_device
    assert "Defaulting to" in qemu.stderr_tail(50) and "bh" in qemu.stderr_tail(50)
    net.send(_frame(PEER, seed=10))
    assert qemu.backend(net.dev_id, NetBackend).receive(timeout=2) == _frame(PEER, seed=10)


#: Feature bit 30 of the legacy interface (virtio 0.9.5 VIRTIO_F_BAD_FEATURE; §6.3 reserves it:
#: "used by qemu's implementation to check for experimental early versions of virtio").
BAD_FEATURE = 30
#: What QEMU grants a legacy driver that sets it (virtio_net_bad_features: "Linux kernel 2.6.25").
BAD_FEATURE_GRANTS = ("MAC", "CSUM", "HOST_TSO4", "HOST_TSO6", "HOST_ECN")


@pytest.mark.virtio_device("virtio-net-pci", refuse_each=False, transports=["legacy", "transitional-legacy"])
def test_legacy_bad_feature_gets_the_old_linux_set(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Regression (virtio_ioport_write, virtio_net_bad_features): a legacy driver that writes
    reserved bit 30 into its features (§6.3: bit 30 marks early drivers that did not negotiate)
    gets, instead of what it wrote, the features Linux 2.6.25 understood that the device offers:
    MAC, and the host offloads where the backend has them (a socket has none). Legacy layout
    only: the modern feature registers know no such bit."""
    net = virtio_device
    t = net.transport
    net.reset()
    t.add_status(STATUS.ACKNOWLEDGE.mask)
    t.add_status(STATUS.DRIVER.mask)
    t.set_driver_features(1 << BAD_FEATURE | 1 << feature_bit("MRG_RXBUF", net.device_bits))
    granted = 0
    for name in BAD_FEATURE_GRANTS:
        granted |= 1 << feature_bit(name, net.device_bits)
    assert t.driver_features() == granted & t.device_features()
    assert t.driver_features() >> feature_bit("MAC", net.device_bits) & 1
    net.restart()
    net.send(_frame(PEER, seed=11))
    assert qemu.backend(net.dev_id, NetBackend).receive(timeout=2) == _frame(PEER, seed=11)
