"""The tap backend (issue 14): an interface we create and hand to QEMU, with a virtio-net header,
seen from the host through a packet socket; one fd per queue pair for multiqueue."""

from __future__ import annotations

import os

import pytest

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.backends import VNET_HDR, BackendError, TapBackend, _tap_queues
from qtest_virtio.devices.net.driver import RSC_FEATURES, VirtioNet
from qtest_virtio.devices.net.encoding import ethernet_frame

PEER = "02:00:00:00:00:01"


def _frame(dst: bytes | str, src: bytes | str, size: int, seed: int) -> bytes:
    return ethernet_frame(dst, src, 0x88B5, bytes((seed + 3 * i) & 0xFF for i in range(size - 14)))


@pytest.mark.parametrize("queues", [1, 2])
def test_frames_cross_the_tap_both_ways(qemu_binary, queues: int) -> None:  # type: ignore[no-untyped-def]
    spec = MachineSpec(qemu=qemu_binary.path)
    props = {"mq": "on"} if queues > 1 else {}
    spec.add_virtio("virtio-net-pci", props, mode="modern", id="n0", backend=f"tap,queues={queues}")
    with Machine(spec) as vm:
        net = vm.virtio("n0", VirtioNet)
        host = vm.backend("n0", TapBackend)
        name = host.name
        assert os.path.exists(f"/sys/class/net/{name}"), "the interface exists while QEMU runs"
        assert host.queues == queues
        assert ("MQ" in net.negotiated) == (queues > 1), "MQ is offered exactly when the peer has queues"
        sent = [_frame(PEER, net.mac, 60 + 40 * i, i) for i in range(3)]
        for frame in sent:
            net.send(frame)
        for frame in sent:
            header, got = host.receive_with_header()
            assert got == frame
            assert header == bytes(VNET_HDR.size), "no offload was asked for"
        injected = _frame(net.mac, PEER, 90, 7)
        host.send(injected)
        assert net.receive(timeout=5) == injected
        assert not host.pending(0.2), "the kernel sent nothing of its own on the interface"
    assert not os.path.exists(f"/sys/class/net/{name}"), "the interface outlived QEMU"


def test_tap_kind_is_checked() -> None:
    assert _tap_queues("tap") == 1
    assert _tap_queues("tap,queues=4") == 4
    for bad in ("tap,queues=0", "tap,queues=x", "tap,foo=1", "tap,queues=17"):
        with pytest.raises(BackendError, match="write tap or tap,queues=N"):
            _tap_queues(bad)


def test_a_closed_backend_gives_its_interface_back() -> None:
    tap = TapBackend(2)
    name = tap.name
    assert os.path.exists(f"/sys/class/net/{name}")
    tap.close()
    assert not os.path.exists(f"/sys/class/net/{name}")


def test_optional_features_have_one_opt_in(qemu_binary) -> None:  # type: ignore[no-untyped-def]
    """accept= decides the optional bits; rsc=True is accept=RSC_FEATURES, set_rsc() adds or
    takes them out of the same set and reinitializes. On a tap QEMU offers the offloads."""
    spec = MachineSpec(qemu=qemu_binary.path)
    spec.add_virtio("virtio-net-pci", {"guest_rsc_ext": "on"}, mode="modern", id="n0", backend="tap")
    with Machine(spec) as vm:
        with pytest.raises(ValueError, match="GUEST_USO4 is not an optional feature"):
            vm.virtio("n0", VirtioNet, accept=["GUEST_USO4"])
        net = vm.virtio("n0", VirtioNet)
        assert not net.rsc and not {"RSC_EXT", "GUEST_CSUM", "CSUM", "HASH_REPORT"} & net.negotiated
        net = vm.virtio("n0", VirtioNet, rsc=True, accept=["CTRL_GUEST_OFFLOADS"])
        assert net.rsc and net.accepted == RSC_FEATURES | {"CTRL_GUEST_OFFLOADS"}
        assert RSC_FEATURES | {"CTRL_GUEST_OFFLOADS"} <= set(net.negotiated)
        net.set_rsc(False)
        assert not net.rsc and net.accepted == {"CTRL_GUEST_OFFLOADS"}
        assert "CTRL_GUEST_OFFLOADS" in net.negotiated and not RSC_FEATURES & net.negotiated
        net.set_rsc()
        assert set(net.negotiated) >= RSC_FEATURES
