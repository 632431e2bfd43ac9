# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""virtio-net driver: header and control encoding (no QEMU), then frames, the control queue
and the config against real QEMU in every transport mode, split and packed rings."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from conftest import redriven, ring_of

from qtest_virtio import Machine, deviations, modes
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import (
    ACK_UNWRITTEN,
    BROADCAST,
    CTRL_COMMANDS,
    FEATURE_BITS,
    FEATURE_REQUIRES,
    NET_CONFIG,
    NET_CONFIG_MAC,
    NET_HDR,
    Ack,
    GsoType,
    NetCtrlError,
    NetDeviceError,
    NetError,
    NetHdr,
    ethernet_frame,
    header_size,
    mac_bytes,
    mac_str,
    unmet_dependencies,
)
from qtest_virtio.introspect import device_view
from qtest_virtio.transport.layout import feature_names
from qtest_virtio.virtqueue import PackedVirtqueue, SplitVirtqueue, VirtqueueError, VirtqueueTimeout
from qtest_virtio.virtqueue.layout import SPLIT_USED, USED_ELEM

NET_FEATURES = set(FEATURE_BITS.values())
LEGACY_LAYOUT = {modes.LEGACY, modes.TRANSITIONAL_LEGACY}
PEER = "02:00:00:00:00:01"
CTRL_DEPENDENTS = {"CTRL_RX_EXTRA", "CTRL_MAC_ADDR", "GUEST_ANNOUNCE", "CTRL_VLAN", "MQ"}
OTHER = "02:99:99:99:99:99"

# -- header and control encoding (no QEMU) --------------------------------------------------


@pytest.mark.parametrize(
    ("features", "size"),
    [
        (set(), 10),  # legacy without MRG_RXBUF: no num_buffers (§5.1.6.1)
        ({"MRG_RXBUF"}, 12),
        ({"VERSION_1"}, 12),  # 1.x always has num_buffers
        ({"VERSION_1", "MRG_RXBUF"}, 12),
        ({"VERSION_1", "HASH_REPORT"}, 20),
    ],
)
def test_header_size_follows_features(features: set[str], size: int) -> None:
    assert header_size(features) == size


def test_header_layout_is_the_spec_struct() -> None:
    offsets = {f.name: (f.offset, f.width) for f in NET_HDR}
    assert offsets == {
        "flags": (0, 1),
        "gso_type": (1, 1),
        "hdr_len": (2, 2),
        "gso_size": (4, 2),
        "csum_start": (6, 2),
        "csum_offset": (8, 2),
        "num_buffers": (10, 2),
        "hash_value": (12, 4),
        "hash_report": (16, 2),
        "padding_reserved": (18, 2),
    }
    config = {f.name: (f.offset, f.width) for f in NET_CONFIG}
    assert config["status"] == (6, 2) and config["max_virtqueue_pairs"] == (8, 2) and config["mtu"] == (10, 2)
    assert config["speed"] == (12, 4) and config["duplex"] == (16, 1)
    assert [(f.name, f.offset, f.width) for f in NET_CONFIG_MAC] == [(f"mac[{i}]", i, 1) for i in range(6)]
    assert all(f.requires for f in NET_CONFIG)  # every net config field exists with a feature (§5.1.4)
    assert NET_CONFIG.max_virtqueue_pairs.requires == "MQ|RSS" and NET_CONFIG.mtu.requires == "MTU"


def test_header_encodes_little_endian_fields() -> None:
    hdr = NetHdr(flags=1, gso_type=GsoType.TCPV4, hdr_len=0x36, gso_size=0x5B4, csum_start=34, csum_offset=16)
    assert hdr.encode(10) == bytes.fromhex("0101 3600 b405 2200 1000")
    hdr.num_buffers = 0x0203
    assert hdr.encode(12) == bytes.fromhex("0101 3600 b405 2200 1000 0302")
    assert hdr.encode(20)[12:] == bytes(8)  # absent hash fields encode as zero
    assert hdr.flag_names == ["NEEDS_CSUM"]


def test_header_decodes_what_is_there() -> None:
    data = bytes.fromhex("02 80 1000 2000 3000 4000 0500 78563412 0300 0000")
    h12 = NetHdr.decode(data[:12])
    assert (h12.flags, h12.gso_type, h12.hdr_len, h12.gso_size) == (2, 0x80, 0x10, 0x20)
    assert (h12.csum_start, h12.csum_offset, h12.num_buffers, h12.hash_value) == (0x30, 0x40, 5, None)
    assert NetHdr.decode(data[:10]).num_buffers is None
    h20 = NetHdr.decode(data)
    assert (h20.hash_value, h20.hash_report) == (0x12345678, 3)
    for size in (10, 12, 20):
        assert NetHdr.decode(data[:size]).encode(size) == data[:size]


def test_header_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="hdr_len"):
        NetHdr(hdr_len=0x10000).encode(12)
    with pytest.raises(ValueError, match="at least 10"):
        NetHdr.decode(bytes(9))


def test_control_commands_are_the_spec_codes() -> None:
    codes = {name: (c.class_code, c.code) for name, c in CTRL_COMMANDS.items()}
    assert codes["RX_PROMISC"] == (0, 0) and codes["RX_ALLMULTI"] == (0, 1) and codes["RX_NOBCAST"] == (0, 5)
    assert codes["MAC_TABLE_SET"] == (1, 0) and codes["MAC_ADDR_SET"] == (1, 1)
    assert codes["VLAN_ADD"] == (2, 0) and codes["ANNOUNCE_ACK"] == (3, 0) and codes["MQ_VQ_PAIRS_SET"] == (4, 0)
    assert (Ack.OK, Ack.ERR) == (0, 1)
    # Every feature name used as data is one the feature table knows (a typo would be silent).
    assert {c.feature for c in CTRL_COMMANDS.values()} <= NET_FEATURES
    assert set(FEATURE_REQUIRES) | {f for cl in FEATURE_REQUIRES.values() for c in cl for f in c} <= NET_FEATURES
    assert VirtioNet.FEATURES <= NET_FEATURES


@pytest.mark.parametrize(
    ("features", "dropped"),
    [
        ({"CTRL_RX", "MAC"}, {"CTRL_RX"}),
        ({"CTRL_VQ", "CTRL_RX", "CTRL_RX_EXTRA", "MQ"}, set()),
        (CTRL_DEPENDENTS, CTRL_DEPENDENTS),
        ({"GUEST_TSO4", "GUEST_ECN"}, {"GUEST_TSO4", "GUEST_ECN"}),  # transitively
        ({"GUEST_CSUM", "GUEST_TSO6", "GUEST_ECN"}, set()),  # ECN needs TSO4 *or* TSO6
    ],
)
def test_feature_dependencies(features: set[str], dropped: set[str]) -> None:
    assert unmet_dependencies(features) == dropped


def test_mac_helpers() -> None:
    assert mac_bytes("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert mac_str(bytes.fromhex("0211223344ff")) == "02:11:22:33:44:ff"
    assert mac_bytes(BROADCAST) == BROADCAST
    for bad in ("52:54:00:12:34", b"\x01" * 7):
        with pytest.raises(ValueError):
            mac_bytes(bad)
    frame = ethernet_frame(BROADCAST, PEER, 0x0806, b"abc")
    assert frame == BROADCAST + bytes.fromhex("020000000001") + b"\x08\x06abc"


# -- against QEMU ---------------------------------------------------------------------------


def driven(device: VirtioDriver, vm: Machine, **options: Any):
    """The marker's driver as the VirtioNet it is, and the host end of its network backend.
    With driver options (``rx_buffers=``, ``interrupts=``...), which the marker does not pass,
    its driver is closed and the device driven again with them."""
    net = redriven(device, vm, VirtioNet, **options)
    return vm, net, vm.backend(net.dev_id)


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((seed + 13 * i + 5) & 0xFF for i in range(n))


def frame_to(dst: bytes | str, size: int, seed: int = 0) -> bytes:
    return ethernet_frame(dst, PEER, 0x88B5, payload(size - 14, seed))


def rx_filter(vm: Machine, net: VirtioNet) -> dict[str, Any]:
    filters = vm.qmp.cmd("query-rx-filter", name=net.dev_id)  # qemu.qmp types the result as object
    assert isinstance(filters, list)
    (info,) = filters
    assert isinstance(info, dict)
    return info


SIZES = (14, 60, 61, 64, 128, 511, 1000, 1513, 1514)


@pytest.mark.virtio_device("virtio-net-pci", flags={"mrg_rxbuf": "on"})
def test_frames_both_ways(virtio_device: VirtioDriver, qemu: Machine, request) -> None:
    frames_both_ways(virtio_device, qemu, ring_of(request), "on")


@pytest.mark.virtio_device("virtio-net-pci", flags={"mrg_rxbuf": "off"})
def test_frames_both_ways_without_mrg_rxbuf(virtio_device: VirtioDriver, qemu: Machine, request) -> None:
    frames_both_ways(virtio_device, qemu, ring_of(request), "off")


def frames_both_ways(device: VirtioDriver, qemu: Machine, ring: str, mrg: str) -> None:
    vm, net, host = driven(device, qemu, rx_poison=0xEE)
    legacy = net.mode in LEGACY_LAYOUT
    assert isinstance(net.rxq, PackedVirtqueue if ring == "packed" and not legacy else SplitVirtqueue)
    assert net.has("MRG_RXBUF") == (mrg == "on")
    assert net.header_size == (10 if legacy and mrg == "off" else 12)
    assert net.ctrl_index == 2 and net.queues == [net.rxq, net.txq, net.ctrlq]
    for i, size in enumerate(SIZES):
        out = frame_to(PEER, size, seed=i)
        net.send(out)
        assert host.receive(timeout=2) == out
        into = frame_to(net.mac, size, seed=100 + i)
        host.send(into)
        pkt = net.receive_packet(timeout=2)
        assert pkt.frame == into
        assert pkt.used_lengths == [net.header_size + size]
        assert (pkt.header.flags, pkt.header.gso_type) == (0, GsoType.NONE)
        if mrg == "on":
            assert pkt.header.num_buffers == 1
    # Several frames in one notification, in order.
    frames = [frame_to(PEER, 100 + i, seed=i) for i in range(5)]
    net.send_many(frames)
    assert [host.receive(timeout=2) for _ in frames] == frames
    assert not host.pending()
    net.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-net-pci")
def test_mrg_rxbuf_spreads_a_frame_over_buffers(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm, net, host = driven(virtio_device, qemu, rx_buffer_size=128, rx_buffers=40)
    assert net.has("MRG_RXBUF") and net.header_size == 12
    frame = frame_to(net.mac, 1514)
    host.send(frame)
    pkt = net.receive_packet(timeout=2)
    assert pkt.frame == frame
    assert pkt.header.num_buffers == pkt.buffers == -(-(12 + 1514) // 128)
    assert pkt.used_lengths[:-1] == [128] * (pkt.buffers - 1)
    assert sum(pkt.used_lengths) == 12 + 1514
    # The buffers went back: many more such frames than buffers posted still arrive.
    for i in range(8):
        frame = frame_to(net.mac, 1000 + i, seed=i)
        host.send(frame)
        assert net.receive(timeout=2) == frame
    net.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-net-pci", rings=["split"], refuse={"CTRL_VQ"})
def test_refusing_ctrl_vq_drops_what_depends_on_it(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm, net, host = driven(virtio_device, qemu)
    for dependent in ("CTRL_RX", "CTRL_RX_EXTRA", "CTRL_VLAN", "CTRL_MAC_ADDR", "GUEST_ANNOUNCE"):
        assert not net.has(dependent)
    assert net.ctrlq is None and net.ctrl_index is None and len(net.queues) == 2
    assert "CTRL_VQ" not in device_view(vm, net.dev_id).guest_features
    with pytest.raises(NetError, match="controlq"):
        net.ctrl_raw(0, 0, b"\x01")
    with pytest.raises(NetError, match="needs CTRL_RX"):
        net.set_rx_mode(promisc=False)
    frame = frame_to(net.mac, 300)
    host.send(frame)
    assert net.receive(timeout=2) == frame
    net.send(frame)
    assert host.receive(timeout=2) == frame


@pytest.mark.virtio_device(
    "virtio-net-pci", transports=[modes.TRANSITIONAL_MODERN, modes.MODERN], rings=["split"], flags={"ctrl_vq": "off"}
)
def test_device_without_ctrl_vq_still_gets_a_consistent_feature_set(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """ctrl_vq=off: QEMU still offers CTRL_RX & co.; the driver must not accept them (§2.2.1)."""
    _vm, net, _ = driven(virtio_device, qemu)
    offered = set(feature_names(net.negotiated.offered, net.device_bits))
    assert "CTRL_VQ" not in offered and "CTRL_RX" in offered
    assert not {"CTRL_RX", "CTRL_MAC_ADDR", "CTRL_VLAN", "GUEST_ANNOUNCE"} & net.negotiated
    assert net.ctrlq is None


@pytest.mark.virtio_device("virtio-net-pci")
def test_ctrl_mac_and_rx_mode(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm, net, _host = driven(virtio_device, qemu)
    assert mac_str(net.mac) == rx_filter(vm, net)["main-mac"] == "52:54:00:12:34:56"
    net.set_mac("02:11:22:33:44:55")
    assert rx_filter(vm, net)["main-mac"] == "02:11:22:33:44:55"
    assert net.mac == bytes.fromhex("021122334455")
    assert rx_filter(vm, net)["promiscuous"] is True  # QEMU's default after reset
    net.set_rx_mode(promisc=False)
    assert rx_filter(vm, net)["promiscuous"] is False
    net.set_rx_mode(allmulti=True, alluni=True)
    info = rx_filter(vm, net)
    assert (info["multicast"], info["unicast"]) == ("all", "all")
    net.set_rx_mode(allmulti=False, alluni=False, promisc=True)
    info = rx_filter(vm, net)
    assert (info["multicast"], info["unicast"], info["promiscuous"]) == ("normal", "normal", True)
    net.set_mac_table([OTHER], ["01:00:5e:00:00:01"])
    info = rx_filter(vm, net)
    assert (info["unicast-table"], info["multicast-table"]) == ([OTHER], ["01:00:5e:00:00:01"])
    # A reset forgets all of it.
    net.restart()
    info = rx_filter(vm, net)
    assert (info["main-mac"], info["unicast-table"], info["multicast-table"]) == ("52:54:00:12:34:56", [], [])


@pytest.mark.virtio_device("virtio-net-pci", rings=["split"])
def test_rx_filtering_applies(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm, net, host = driven(virtio_device, qemu)
    me = net.mac
    marker = frame_to(me, 80, seed=99)

    def delivered(frame: bytes, after: bytes = marker) -> bool:
        host.send(frame)
        host.send(after)
        got = net.receive(timeout=2)
        if got == after:
            return False
        assert got == frame
        assert net.receive(timeout=2) == after
        return True

    assert delivered(frame_to(OTHER, 100))  # promiscuous by default
    net.set_rx_mode(promisc=False)
    assert not delivered(frame_to(OTHER, 100))
    assert delivered(frame_to(BROADCAST, 100))
    assert not delivered(frame_to("01:00:5e:00:00:01", 100))
    net.set_rx_mode(allmulti=True)
    assert delivered(frame_to("01:00:5e:00:00:01", 100))
    net.set_rx_mode(allmulti=False, nobcast=True)
    assert not delivered(frame_to(BROADCAST, 100))
    net.set_mac_table([OTHER])
    assert delivered(frame_to(OTHER, 100))
    vlan5 = ethernet_frame(me, PEER, 0x8100, b"\x00\x05\x08\x00" + payload(60))
    # CTRL_VLAN negotiated: an empty table, but for the versions where every VLAN passes after a
    # reset (the deviation table says which: 10.0.2)
    all_pass = deviations.table()["net-vlan-filter"].status(vm.binary.version) is deviations.Status.VERIFIED
    assert delivered(vlan5) is all_pass
    net.vlan_add(5)
    table = rx_filter(vm, net)["vlan-table"]
    assert delivered(vlan5) and (5 in table if all_pass else table == [5])
    net.vlan_del(5)
    assert not delivered(vlan5)


@pytest.mark.virtio_device(
    "virtio-net-pci", transports=[modes.LEGACY, modes.MODERN], rings=["split"], refuse={"CTRL_RX_EXTRA"}
)
def test_ctrl_ack_err_and_feature_gate(virtio_device: VirtioDriver, qemu: Machine) -> None:
    _vm, net, _ = driven(virtio_device, qemu)
    assert net.ctrl_raw(0, 0) == Ack.ERR  # PROMISC without its data byte
    assert net.ctrl_raw(0x7F, 0) == Ack.ERR  # unknown class
    with pytest.raises(NetCtrlError, match="RX_PROMISC answered VIRTIO_NET_ERR") as info:
        net.ctrl("RX_PROMISC")
    assert (info.value.command, info.value.ack) == ("RX_PROMISC", Ack.ERR)
    with pytest.raises(NetError, match="needs CTRL_RX_EXTRA"):
        net.set_rx_mode(nobcast=True)
    with pytest.raises(ValueError, match="unknown rx mode"):
        net.set_rx_mode(promiscuous=True)
    net.ctrl("RX_NOBCAST", b"\x01", force=True)  # the driver can still probe the device on purpose
    with pytest.raises(ValueError):
        net.set_queue_pairs(2)


@pytest.mark.parametrize("interrupts", ["msix", "intx", "isr"])
@pytest.mark.virtio_device("virtio-net-pci", rings=["split"], flags={"mac": "52:54:00:ab:cd:ef"})
def test_config_and_link_status(virtio_device: VirtioDriver, qemu: Machine, interrupts: str) -> None:
    vm, net, _ = driven(virtio_device, qemu, interrupts=interrupts)
    assert net.interrupts == interrupts
    config = net.config()
    assert config.mac == bytes.fromhex("525400abcdef") == net.mac
    assert config.link_up is True and net.link_up
    assert config.max_virtqueue_pairs is None and config.mtu is None  # MQ, MTU not offered
    vm.qmp.cmd("set_link", name=net.dev_id, up=False)
    net.wait_config_interrupt(timeout=2)
    assert not net.link_up
    vm.qmp.cmd("set_link", name=net.dev_id, up=True)
    net.wait_config_interrupt(timeout=2)
    assert net.link_up


@pytest.mark.virtio_device("virtio-net-pci", rings=["split"], flags={"host_mtu": "1400", "mq": "on"})
def test_mtu_and_multiqueue_config(virtio_device: VirtioDriver, qemu: Machine) -> None:
    _vm, net, host = driven(virtio_device, qemu)
    config = net.config()
    assert (config.mtu, config.max_virtqueue_pairs) == (1400, 1)
    assert net.mtu == 1400 and net.has("MQ") and net.ctrl_index == 2
    net.set_queue_pairs(1)
    frame = frame_to(PEER, 1414)
    net.send(frame)
    assert host.receive(timeout=2) == frame
    with pytest.raises(NetError, match="exceeds mtu 1400"):
        net.send(frame_to(PEER, 1415))


@pytest.mark.virtio_device("virtio-net-pci", rings=["split"])
def test_announce(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm, net, _ = driven(virtio_device, qemu)
    assert net.config().announce is False
    vm.qmp.cmd("announce-self", initial=50, max=100, rounds=1, step=100)
    net.wait_config_interrupt(timeout=2)
    assert net.config().announce is True
    net.announce_ack()
    assert net.config().announce is False


@pytest.mark.virtio_device("virtio-net-pci")
def test_frames_wait_for_rx_buffers(virtio_device: VirtioDriver, qemu: Machine) -> None:
    _vm, net, host = driven(virtio_device, qemu, rx_buffers=0)
    frames = [frame_to(net.mac, 200 + i, seed=i) for i in range(3)]
    for f in frames:
        host.send(f)
    time.sleep(0.03)
    assert net.poll_packet() is None
    net.post_rx_buffers(1)
    assert net.receive(timeout=2) == frames[0]  # the buffer is posted again after the read
    assert [net.receive(timeout=2) for _ in frames[1:]] == frames[1:]


@pytest.mark.virtio_device(
    "virtio-net-pci", transports=[modes.TRANSITIONAL_LEGACY, modes.MODERN], rings=["split"], refuse={"CTRL_MAC_ADDR"}
)
def test_legacy_sets_mac_through_config(virtio_device: VirtioDriver, qemu: Machine) -> None:
    vm, net, _ = driven(virtio_device, qemu)
    if net.mode in LEGACY_LAYOUT:
        net.set_mac("02:44:44:44:44:44")
        assert rx_filter(vm, net)["main-mac"] == "02:44:44:44:44:44" == mac_str(net.mac)
    else:
        with pytest.raises(NetError, match="CTRL_MAC_ADDR not negotiated"):
            net.set_mac("02:44:44:44:44:44")


@pytest.mark.virtio_device(
    "virtio-net-pci", transports=[modes.LEGACY], rings=["split"], flags={"any_layout": "off", "mrg_rxbuf": "on"}
)
def test_legacy_framing_without_any_layout(virtio_device: VirtioDriver, qemu: Machine) -> None:
    legacy_framing_without_any_layout(virtio_device, qemu, "on")


@pytest.mark.virtio_device(
    "virtio-net-pci", transports=[modes.LEGACY], rings=["split"], flags={"any_layout": "off", "mrg_rxbuf": "off"}
)
def test_legacy_framing_without_any_layout_or_mrg_rxbuf(virtio_device: VirtioDriver, qemu: Machine) -> None:
    legacy_framing_without_any_layout(virtio_device, qemu, "off")


def legacy_framing_without_any_layout(device: VirtioDriver, qemu: Machine, mrg: str) -> None:
    """Legacy without ANY_LAYOUT: the header in a descriptor of its own, control commands split
    into class+command, data parts and ack (§5.1.6.6)."""
    vm, net, host = driven(device, qemu)
    assert not net.has("ANY_LAYOUT") and net.separate_header
    assert len(next(iter(net.rxq.in_flight.values())).bufs) == (1 if mrg == "on" else 2)
    for size in (14, 600, 1514):
        frame = frame_to(net.mac, size, seed=size)
        host.send(frame)
        assert net.receive(timeout=2) == frame
        net.send(frame)
        assert host.receive(timeout=2) == frame
    net.set_mac_table([OTHER], ["01:00:5e:00:00:01", "01:00:5e:00:00:02"])
    info = rx_filter(vm, net)
    assert info["unicast-table"] == [OTHER] and len(info["multicast-table"]) == 2
    net.set_rx_mode(promisc=False)
    assert rx_filter(vm, net)["promiscuous"] is False


@pytest.mark.virtio_device("virtio-net-pci", transports=[modes.MODERN], rings=["split"])
def test_restart_changes_rx_options(virtio_device: VirtioDriver, qemu: Machine) -> None:
    _vm, net, host = driven(virtio_device, qemu)
    net.restart(rx_buffer_size=64, rx_buffers=48, rx_poison=0x5A)
    frame = frame_to(net.mac, 600)
    host.send(frame)
    pkt = net.receive_packet(timeout=2)
    assert pkt.frame == frame and pkt.buffers == 10
    net.restart(rx_buffer_size=None, rx_buffers=None)
    assert net.rx_buffer_size == 2048
    with pytest.raises(TypeError):
        net.restart(rx_size=5)
    with pytest.raises(ValueError):
        net.restart(rx_poison=256)


# -- bad input from the device ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ack", "message"),
    [(0x07, "ack byte 0x07 is neither VIRTIO_NET_OK nor VIRTIO_NET_ERR"), (ACK_UNWRITTEN, "without acking it")],
)
@pytest.mark.virtio_device("virtio-net-pci", transports=[modes.MODERN], rings=["split"])
def test_bad_ack_byte_is_reported(
    virtio_device: VirtioDriver, qemu: Machine, monkeypatch, ack: int, message: str
) -> None:
    vm, net, _ = driven(virtio_device, qemu)
    vq = net.ctrlq
    real_wait = vq.wait_for

    def device_writes_garbage(token: int, timeout: float = 5.0):
        elem = real_wait(token, timeout)
        vm.memory.write(elem.bufs[-1].addr, bytes([ack]))  # as if the device had written that
        return elem

    monkeypatch.setattr(vq, "wait_for", device_writes_garbage)
    with pytest.raises(
        NetDeviceError, match=rf"{net.dev_id} \(modern\): VirtioNet controlq \(queue 2\): descriptor \d+: .*" + message
    ):
        net.set_rx_mode(promisc=True)


@pytest.mark.virtio_device("virtio-net-pci", transports=[modes.MODERN], rings=["split"])
def test_short_used_length_is_reported(virtio_device: VirtioDriver, qemu: Machine, monkeypatch) -> None:
    _vm, net, host = driven(virtio_device, qemu)
    real_wait = net.rxq.wait_used
    monkeypatch.setattr(net.rxq, "wait_used", lambda t=5.0: dataclasses.replace(real_wait(t), length=5))
    host.send(frame_to(net.mac, 100))
    with pytest.raises(NetDeviceError, match=r"receiveq1 \(queue 0\): descriptor \d+: used length 5 is shorter"):
        net.receive(timeout=2)


@pytest.mark.virtio_device("virtio-net-pci", transports=[modes.MODERN], rings=["split"])
def test_bad_num_buffers_is_reported(virtio_device: VirtioDriver, qemu: Machine, monkeypatch) -> None:
    vm, net, host = driven(virtio_device, qemu)
    real_wait = net.rxq.wait_used

    def zero_num_buffers(timeout: float = 5.0):
        elem = real_wait(timeout)
        vm.memory.write(elem.bufs[0].addr + NET_HDR.num_buffers.offset, b"\x00\x00")
        return elem

    monkeypatch.setattr(net.rxq, "wait_used", zero_num_buffers)
    host.send(frame_to(net.mac, 100))
    with pytest.raises(NetDeviceError, match="num_buffers is 0"):
        net.receive(timeout=2)


@pytest.mark.virtio_device("virtio-net-pci", transports=[modes.MODERN], rings=["split"])
def test_used_length_past_the_buffer_is_reported(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """Play a broken device on the split used ring: an entry longer than the buffer."""
    vm, net, _ = driven(virtio_device, qemu, rx_buffers=1)
    vq = net.rxq
    assert isinstance(vq, SplitVirtqueue)
    (head,) = vq.in_flight
    vm.memory.write(vq.used + SPLIT_USED.size, (head).to_bytes(4, "little") + (99999).to_bytes(4, "little"))
    vm.memory.write16(vq.used + SPLIT_USED.idx.offset, 1)
    assert USED_ELEM.size == 8
    with pytest.raises(VirtqueueError, match=rf"receiveq1 \(queue 0\): descriptor {head}: used length 99999"):
        net.receive(timeout=1)


@pytest.mark.virtio_device("virtio-net-pci", transports=[modes.MODERN], rings=["split"])
def test_missing_frame_times_out(virtio_device: VirtioDriver, qemu: Machine) -> None:
    _vm, net, _ = driven(virtio_device, qemu)
    with pytest.raises(VirtqueueTimeout, match="receiveq1"):
        net.receive(timeout=0.05)
