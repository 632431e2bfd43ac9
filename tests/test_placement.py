# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""Where the harness puts devices and how it finds them without QMP (issue 16: per-test cost).

The launch plan gives root-bus PCI devices their slots (``addr``), so ``vm.pci_function`` finds
a device in config space instead of asking QMP ``query-pci``; a machine without the qtest
accelerator is made RUNNING by one raw QMP exchange. Checked: the placement rules (pure), that
QEMU puts every device where the plan says (query-pci agrees), that a device test never
negotiates QMP through qemu.qmp, and that qemu.qmp still takes the session over afterwards.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from qtest_virtio import MachineSpec
from qtest_virtio.machine import process
from qtest_virtio.machine.launch import PciPlace, parse_pci_addr, place_devices
from qtest_virtio.vm import _find_qdev

pytest_plugins = ["pytester"]
INNER = ["-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:cacheprovider", "-p", "no:xdist"]


# -- pure logic -------------------------------------------------------------------------------


def test_parse_pci_addr_reads_hex_slot_and_function() -> None:
    assert parse_pci_addr("4") == (4, 0)
    assert parse_pci_addr("0x1f") == (0x1F, 0)
    assert parse_pci_addr("1e.3") == (0x1E, 3)
    assert parse_pci_addr("20") is None  # slot 32: no such slot
    assert parse_pci_addr("4.8") is None
    assert parse_pci_addr("slot") is None


def test_root_bus_devices_get_the_lowest_free_slots_in_order() -> None:
    spec = MachineSpec(machine="q35")
    spec.add_virtio("virtio-rng-pci", mode="modern")
    spec.add_virtio("virtio-blk-pci", mode="modern", addr="2")  # the user's slot is kept
    spec.add_virtio("virtio-net-pci", mode="legacy")
    spec.add_device("pcie-root-port", id="rp0", chassis=1, slot=1)
    spec.add_virtio("virtio-blk-pci", mode="modern", bus="rp0")
    spec.add_device("e1000", id="nic0")  # a device the harness does not place: QEMU's next slot (5) is its
    spec.add_virtio("virtio-rng-pci", mode="modern")
    addrs, places = place_devices(spec)
    assert addrs == {"rng0": "0x01", "net0": "0x03", "rp0": "0x04", "rng1": "0x06"}
    assert places == {
        "rng0": PciPlace(None, 1, 0),
        "blk0": PciPlace(None, 2, 0),
        "net0": PciPlace(None, 3, 0),
        "rp0": PciPlace(None, 4, 0),
        "blk1": PciPlace("rp0", 0, 0),  # a root port's link has one slot
        "rng1": PciPlace(None, 6, 0),
    }


def test_machine_types_keep_their_own_slots() -> None:
    pc = MachineSpec(machine="pc")
    pc.add_virtio("virtio-rng-pci", mode="modern")
    assert place_devices(pc)[0] == {"rng0": "0x02"}  # 00.0 host bridge, 01.x PIIX3
    q35 = MachineSpec(machine="pc-q35-7.2")
    for _ in range(31):
        q35.add_virtio("virtio-rng-pci", mode="modern")
    addrs, _ = place_devices(q35)
    assert sorted(int(a, 16) for a in addrs.values()) == list(range(1, 0x1F))  # never 00 or 1f (ICH9)
    assert len(addrs) == 30  # the 31st is left to QEMU, which says the bus is full


def test_what_the_plan_leaves_to_qemu() -> None:
    raw = MachineSpec(raw_args=["-M", "q35"])
    raw.add_virtio("virtio-rng-pci", mode="modern")
    assert place_devices(raw) == ({}, {})
    other = MachineSpec(machine="microvm")
    other.add_virtio("virtio-rng-pci", mode="modern")
    assert place_devices(other) == ({}, {})
    spec = MachineSpec(machine="q35", extra_args=["-device", "virtio-rng-pci,addr=0x1"])
    spec.add_virtio("virtio-blk-pci", mode="modern", hotplug=True)  # plugged later: QEMU places it
    spec.add_device("pci-bridge", id="br0", chassis_nr=1)
    spec.add_virtio("virtio-rng-pci", mode="modern", bus="br0")  # a bridge's slot: QEMU's choice
    addrs, places = place_devices(spec)
    assert addrs == {"hp_port0": "0x02", "br0": "0x03"}  # slot 1 is the raw -device's
    assert set(places) == {"hp_port0", "br0"}  # the hot-plug port is placed, not what it will hold


# -- against QEMU -----------------------------------------------------------------------------


def _query_pci(vm: Any, dev_id: str) -> str | None:
    for bus in vm.qmp.cmd("query-pci"):
        found = _find_qdev(bus.get("devices", []), dev_id)
        if found is not None:
            return f"{found['bus']:02x}:{found['slot']:02x}.{found['function']:x}"
    return None


@pytest.fixture
def qmp_connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every QMP exchange from now on: ``raw:CMD,...`` (the raw negotiation, with its commands)
    and ``client`` (qemu.qmp's client set up)."""
    seen: list[str] = []
    raw, client = process.raw_qmp, process.connect_qmp

    def raw_counted(sock: Any, commands: list[str], timeout: float) -> Any:
        seen.append("raw:" + ",".join(commands))
        return raw(sock, commands, timeout)

    def client_counted(sock: Any, timeout: float, **kw: Any) -> Any:
        seen.append("client")
        return client(sock, timeout, **kw)

    monkeypatch.setattr(process, "raw_qmp", raw_counted)
    monkeypatch.setattr(process, "connect_qmp", client_counted)
    return seen


@pytest.mark.parametrize("machine", ["q35", "pc"])
@pytest.mark.parametrize("name", ["system", "src-newest"])
def test_devices_are_found_where_qemu_put_them_without_qmp(
    machine_factory, provided_qemu, qmp_connects, name: str, machine: str
) -> None:
    binary = provided_qemu(name)
    spec = MachineSpec(qemu=binary.path, machine=machine)
    spec.add_virtio("virtio-rng-pci", mode="modern")
    spec.add_device("pci-testdev", id="other0")  # not placed by the harness: QEMU gives it the next slot
    spec.add_virtio("virtio-blk-pci", mode="legacy", backend="null")
    ids = ["rng0", "blk0"]
    if machine == "q35":
        spec.add_device("pcie-root-port", id="rp0", chassis=1, slot=1)
        spec.add_virtio("virtio-blk-pci", mode="modern", backend="null", bus="rp0")
        ids.append("blk1")
    vm = machine_factory(spec)
    drivers = {dev_id: vm.virtio(dev_id) for dev_id in ids}
    assert len(drivers["rng0"].read(8)) == 8  # the run state is RUNNING: rng serves
    # found, initialised and resumed without qemu.qmp: TCG -S needs one raw cont, qtest nothing
    assert qmp_connects == ([] if binary.has_qtest_accel else ["raw:cont"])
    assert "addr=0x01" in vm.argv[vm.argv.index("-device") + 1] if machine == "q35" else True
    for dev_id, drv in drivers.items():
        assert drv.fn.bdf == _query_pci(vm, dev_id), dev_id
    assert _query_pci(vm, "other0") == ("00:02.0" if machine == "q35" else "00:03.0")
    # qemu.qmp took the monitor over as the raw exchange left it (TCG -S), or after a raw negotiation
    assert qmp_connects == (["raw:", "client"] if binary.has_qtest_accel else ["raw:cont", "client"])
    assert vm.run_state() == "running"
    if not binary.has_qtest_accel:  # the raw cont's RESUME event was kept for wait_event
        assert vm.wait_event("RESUME", timeout=0.1) is not None


def test_a_device_the_plan_did_not_place_is_found_by_qmp(machine_factory, qmp_connects) -> None:
    spec = MachineSpec(machine="q35")
    spec.add_device("pci-bridge", id="br0", chassis_nr=1)
    spec.add_virtio("virtio-rng-pci", mode="modern", bus="br0")
    vm = machine_factory(spec)
    fn = vm.pci_function("rng0")
    assert qmp_connects == ["raw:", "client"] and fn.bdf == _query_pci(vm, "rng0") and fn.device_id == 0x1044
    with pytest.raises(KeyError, match="no PCI device with id 'nope'"):
        vm.pci_function("nope")


def _fake_monitor(*messages: dict[str, Any]) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"".join(json.dumps(m).encode() + b"\r\n" for m in messages))
    return ours, theirs


def test_raw_negotiation_takes_events_that_come_before_the_reply() -> None:
    """QEMU may emit an event (STOP, BLOCK_IO_ERROR of a werror=stop) between switching the
    monitor out of negotiation mode and queueing qmp_capabilities' reply: qemu.qmp's own
    negotiation asserts on it; the raw one keeps the event and goes on. (A fake monitor: the
    race itself cannot be forced on a real QEMU.)"""
    stop = {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}
    ours, theirs = _fake_monitor({"QMP": {"version": {}, "capabilities": []}}, stop, {"return": {}}, {"return": {}})
    with ours, theirs:
        assert process.raw_qmp(ours, ["cont"], 5.0) == [stop]
        sent = theirs.recv(4096).decode().splitlines()
        assert [json.loads(line)["execute"] for line in sent] == ["qmp_capabilities", "cont"]
    refused = {"error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}}
    ours, theirs = _fake_monitor({"QMP": {}}, {"return": {}}, refused)
    with ours, theirs, pytest.raises(process.RawQmpError, match="QMP cont: Resetting the Virtual Machine"):
        process.raw_qmp(ours, ["cont"], 5.0)
    ours, theirs = _fake_monitor({"QMP": {}})
    with ours, theirs, pytest.raises(TimeoutError, match=r"did not answer QMP within 0\.2 s"):
        process.raw_qmp(ours, [], 0.2)


PLUGIN_TEST = """
import pytest
from qtest_virtio.machine import process

@pytest.mark.virtio_device("virtio-blk-pci", backend="null", transports=["modern"])
def test_device_test_without_qmp(virtio_device, qemu):
    assert qemu._qmp is None  # setup found, initialised and resumed the device without qemu.qmp
    assert virtio_device.read(0, 1) == bytes(512)

@pytest.mark.virtio_device("virtio-blk-pci", backend="null", transports=["modern"])
def test_device_test_with_qmp(virtio_device, qmp):
    assert qmp.cmd("query-status")["status"] == "running"
"""


def test_plugin_device_tests_reach_qmp_only_when_they_use_it(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile(test_inner=PLUGIN_TEST)
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "-q")
    res.assert_outcomes(passed=4)  # split and packed rings each
