# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""virtio-console driver: control message encoding (no QEMU), and the multiport handshake and
data both ways on real QEMU (virtio-serial-pci with a virtconsole and a virtserialport on
socketpair chardevs), in every transport mode, split and packed."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import redriven, ring_of

from qtest_virtio import Machine, modes
from qtest_virtio.backends import SerialBackend
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.console.driver import VirtioConsole
from qtest_virtio.devices.console.encoding import (
    CONSOLE_CONFIG,
    CONSOLE_CONTROL,
    CONTROL_RECEIVEQ,
    ConsoleConfig,
    ConsoleError,
    ConsoleTimeout,
    ControlEvent,
    ControlMessage,
)
from qtest_virtio.introspect import device_view
from qtest_virtio.virtqueue import PackedVirtqueue, SplitVirtqueue, VirtqueueError

LEGACY_LAYOUT = {modes.LEGACY, modes.TRANSITIONAL_LEGACY}
CONSOLE_NAME = "org.qtest.console"
PORT1_NAME = "org.qtest.port1"
NUL = b"\0"  # QEMU 7.2 terminates PORT_NAME's name (the spec says it does not)

# -- encoding (no QEMU) ----------------------------------------------------------------------


def test_control_message_wire_format() -> None:
    """struct virtio_console_control: le32 id, le16 event, le16 value (§5.3.6.2)."""
    msg = ControlMessage(0x01020304, ControlEvent.PORT_OPEN, 1)
    assert msg.encode() == bytes([4, 3, 2, 1, 6, 0, 1, 0])
    assert CONSOLE_CONTROL.size == 8
    assert ControlMessage.decode(msg.encode()) == msg
    assert str(msg) == "PORT_OPEN(id=16909060, value=1)"


def test_control_message_payloads() -> None:
    """PORT_NAME's name follows the header (a NUL terminator is tolerated); RESIZE carries
    le16 cols, le16 rows."""
    name = ControlMessage.decode(bytes([1, 0, 0, 0, 7, 0, 1, 0]) + b"org.x\0")
    assert (name.id, name.event_name, name.name, name.payload) == (1, "PORT_NAME", "org.x", b"org.x\0")
    assert ControlMessage(1, ControlEvent.PORT_NAME, 1, "pört".encode()).name == "pört"
    resize = ControlMessage.decode(bytes([0, 0, 0, 0, 5, 0, 0, 0, 80, 0, 25, 0]))
    assert resize.event_name == "RESIZE" and resize.resize == (80, 25)
    assert ControlMessage(0, 99).event_name == "unknown event 99"


def test_control_message_too_short() -> None:
    with pytest.raises(ConsoleError, match=r"ser0 queue 2: 6 bytes is shorter than the 8-byte"):
        ControlMessage.decode(bytes(6), "ser0 queue 2")


def test_config_layout() -> None:
    """struct virtio_console_config: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr."""
    assert [(f.name, f.offset, f.width) for f in CONSOLE_CONFIG] == [
        ("cols", 0, 2),
        ("rows", 2, 2),
        ("max_nr_ports", 4, 4),
        ("emerg_wr", 8, 4),
    ]
    cfg = ConsoleConfig.decode(bytes([80, 0, 25, 0, 31, 0, 0, 0, 0x41, 0, 0, 0]))
    assert cfg == ConsoleConfig(cols=80, rows=25, max_nr_ports=31, emerg_wr=0x41)


def test_queue_numbering() -> None:
    """§5.3.2: port 0 on 0/1, control on 2/3, port N on 2N+2 / 2N+3."""
    assert [(VirtioConsole.rx_queue(p), VirtioConsole.tx_queue(p)) for p in range(4)] == [
        (0, 1),
        (4, 5),
        (6, 7),
        (8, 9),
    ]
    roles = [VirtioConsole.queue_role(i) for i in range(7)]
    assert roles == [
        "receiveq(port0)",
        "transmitq(port0)",
        "control receiveq",
        "control transmitq",
        "receiveq(port1)",
        "transmitq(port1)",
        "receiveq(port2)",
    ]


# -- real QEMU -------------------------------------------------------------------------------


def driven(device: VirtioDriver, vm: Machine, **options: Any) -> VirtioConsole:
    return redriven(device, vm, VirtioConsole, **options)


#: The marker's runs where packed=on meets a legacy register layout (split rings, all the same).
PACKED_ON_LEGACY_LAYOUT = pytest.mark.virtio_device(
    "virtio-serial-pci", transports=sorted(LEGACY_LAYOUT), rings=["split"], flags={"packed": "on"}
)


def ports_of(con: VirtioConsole) -> SerialBackend:
    """The host ends of the console's ports (``Machine.virtio`` sets the driver's backend)."""
    assert isinstance(con.backend, SerialBackend)
    return con.backend


def check_ring(con: VirtioConsole, mode: str, ring: str) -> None:
    packed = ring == "packed" and mode not in LEGACY_LAYOUT
    assert ("RING_PACKED" in con.negotiated) == packed
    assert all(isinstance(vq, PackedVirtqueue if packed else SplitVirtqueue) for vq in con.queues)


@pytest.mark.virtio_device("virtio-serial-pci")
def test_multiport_handshake_and_data(virtio_device: VirtioDriver, qemu: Machine, request) -> None:
    multiport_handshake_and_data(driven(virtio_device, qemu), qemu, ring_of(request))


@PACKED_ON_LEGACY_LAYOUT
def test_multiport_handshake_and_data_packed_flag_on_legacy_layout(virtio_device: VirtioDriver, qemu: Machine) -> None:
    multiport_handshake_and_data(driven(virtio_device, qemu), qemu, "packed")


def multiport_handshake_and_data(con: VirtioConsole, vm: Machine, ring: str) -> None:
    mode = con.mode
    check_ring(con, mode, ring)
    assert {"MULTIPORT", "EMERG_WRITE"} <= con.negotiated
    assert {"MULTIPORT", "EMERG_WRITE"} <= device_view(vm, con.dev_id).guest_features
    assert con.initial_config.max_nr_ports == con.max_nr_ports == 31  # QEMU's max_ports default
    assert len(con.queues) == 2 * 31 + 2

    # The handshake: DEVICE_ADD for both ports answer DEVICE_READY; after each PORT_READY the
    # device says which port is a console, names it and reports the host side open.
    log = [r.message for r in con.control_log]
    assert [(m.event, m.id) for m in log[:2]] == [(ControlEvent.DEVICE_ADD, 0), (ControlEvent.DEVICE_ADD, 1)]
    assert con.sent_log == [
        ControlMessage(0, ControlEvent.DEVICE_READY, 1),
        ControlMessage(0, ControlEvent.PORT_READY, 1),
        ControlMessage(1, ControlEvent.PORT_READY, 1),
        ControlMessage(0, ControlEvent.PORT_OPEN, 1),  # the answer CONSOLE_PORT calls for
        ControlMessage(1, ControlEvent.PORT_OPEN, 1),  # open_ports=True opens the rest
    ]
    assert [str(m) for m in log[2:]] == [
        "CONSOLE_PORT(id=0, value=1)",
        f"PORT_NAME(id=0, value=1 payload={CONSOLE_NAME.encode() + NUL!r})",
        "PORT_OPEN(id=0, value=1)",
        f"PORT_NAME(id=1, value=1 payload={PORT1_NAME.encode() + NUL!r})",
        "PORT_OPEN(id=1, value=1)",
    ]
    ports = con.ports
    assert sorted(ports) == [0, 1]
    assert (ports[0].name, ports[0].console, ports[0].host_open, ports[0].guest_open) == (
        CONSOLE_NAME,
        True,
        True,
        True,
    )
    assert (ports[1].name, ports[1].console, ports[1].host_open, ports[1].guest_open) == (
        PORT1_NAME,
        False,
        True,
        True,
    )

    # Data both ways on both ports, byte for byte.
    be = ports_of(con)
    for port, end in ((0, be["console"]), (1, be["port1"])):
        out = bytes(range(256)) + f"port {port} in {mode}".encode()
        con.write(out, port)
        assert end.read(len(out), 2) == out
        end.write(b"host to port %d" % port)
        assert con.read_chunk(port) == b"host to port %d" % port
    assert be["console"].read_available(0.01) == b""  # nothing crossed over to the other port
    con.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-serial-pci", refuse={"MULTIPORT"})
def test_single_port_without_multiport(virtio_device: VirtioDriver, qemu: Machine, request) -> None:
    single_port_without_multiport(driven(virtio_device, qemu), qemu, ring_of(request))


@pytest.mark.virtio_device(
    "virtio-serial-pci", transports=sorted(LEGACY_LAYOUT), rings=["split"], flags={"packed": "on"}, refuse={"MULTIPORT"}
)
def test_single_port_without_multiport_packed_flag_on_legacy_layout(virtio_device: VirtioDriver, qemu: Machine) -> None:
    single_port_without_multiport(driven(virtio_device, qemu), qemu, "packed")


def single_port_without_multiport(con: VirtioConsole, vm: Machine, ring: str) -> None:
    """Refusing MULTIPORT: port 0 only, its two queues, no control queue (§5.3.2)."""
    check_ring(con, con.mode, ring)
    assert "MULTIPORT" not in con.negotiated and len(con.queues) == 2
    assert sorted(con.ports) == [0] and con.control_log == []
    con.write(b"single port out", 0)
    assert ports_of(con)["console"].read(15, 2) == b"single port out"
    ports_of(con)["console"].write(b"single port in")
    assert con.read(14) == b"single port in"
    with pytest.raises(ConsoleError, match="port 1 was not announced"):
        con.write(b"x", 1)
    with pytest.raises(ConsoleError, match="no control queue without MULTIPORT"):
        con.send_control(ControlMessage(0, ControlEvent.DEVICE_READY, 1))
    con.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.TRANSITIONAL_LEGACY, modes.MODERN], rings=["split"])
def test_bulk_both_ways(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """More than one transmit buffer (TX_CHUNK) and more than the posted receive buffers: the
    driver re-posts receive buffers as the device fills them."""
    con = driven(virtio_device, qemu, nr_ports=2)
    end = ports_of(con)["port1"]
    out = bytes(i * 7 & 0xFF for i in range(150_000))
    con.write(out, 1)
    assert end.read(len(out), 5) == out
    back = bytes(i * 13 & 0xFF for i in range(5 * con.RX_BUFFERS * con.RX_BUFFER_SIZE))
    end.write(back)
    assert con.read(len(back), 1) == back
    assert con.read_available(1) == b""


@pytest.mark.virtio_device("virtio-serial-pci", rings=["split"], flags={"max_ports": "4"})
def test_nr_ports_and_max_ports(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """max_ports=4: config says 4 and the driver sets up 2*4+2 queues; nr_ports=2 limits the
    driver to the first two ports' queues."""
    vm, con = qemu, driven(virtio_device, qemu)
    mode = con.mode
    assert con.config().max_nr_ports == 4 and len(con.queues) == 10
    assert sorted(con.ports) == [0, 1]
    con.close()
    con2 = VirtioConsole(con.fn, mode, vm.memory, nr_ports=2)
    assert not con2.initialized and not con2.queues  # construction does no I/O
    con2.initialize()
    assert len(con2.queues) == 6 and sorted(con2.ports) == [0, 1]
    con2.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.MODERN], rings=["split"])
def test_open_and_close_a_port(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """open_ports=False opens only the console port (which the driver must open); host data
    for a closed port waits until the driver sends PORT_OPEN."""
    con = driven(virtio_device, qemu, open_ports=False, nr_ports=2)
    assert con.ports[0].guest_open and not con.ports[1].guest_open
    ports_of(con)["port1"].write(b"early")
    with pytest.raises(ConsoleError, match="port 1 is not open on the guest side"):
        con.read(5, 1, timeout=0.05)
    con.open_port(1)
    assert con.ports[1].guest_open
    assert con.read(5, 1) == b"early"
    assert con.sent_log[-1] == ControlMessage(1, ControlEvent.PORT_OPEN, 1)
    con.open_port(1, False)
    assert not con.ports[1].guest_open and con.sent_log[-1] == ControlMessage(1, ControlEvent.PORT_OPEN, 0)
    with pytest.raises(ConsoleError, match="port 5 was not announced"):
        con.open_port(5)


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.LEGACY, modes.MODERN], rings=["split"])
def test_host_disconnect_is_announced(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """Closing the host end of port 1's chardev: the device sends PORT_OPEN value 0."""
    con = driven(virtio_device, qemu, nr_ports=2)
    assert con.ports[1].host_open
    ports_of(con)["port1"].close()
    deadline = time.monotonic() + 2
    while con.ports[1].host_open and time.monotonic() < deadline:
        time.sleep(0.001)
    assert con.control_log[-1].message == ControlMessage(1, ControlEvent.PORT_OPEN, 0)
    assert con.ports[0].host_open


@pytest.mark.virtio_device("virtio-serial-pci", rings=["split"])
def test_emergency_write_on_reset_device(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """EMERG_WRITE: writing emerg_wr outputs its low byte on the console, even after a reset."""
    con = driven(virtio_device, qemu, nr_ports=2)
    con.emergency_write(ord("!"))
    assert ports_of(con)["console"].read(1, 2) == b"!"
    con.reset()
    assert con.transport.get_status() == 0
    con.emergency_write(0x1234_5641)  # only the low byte counts
    assert ports_of(con)["console"].read(1, 2) == b"A"


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.TRANSITIONAL_MODERN], rings=["split"])
def test_intx_interrupts(virtio_device: VirtioDriver, qemu: Machine) -> None:
    con = driven(virtio_device, qemu, interrupts="intx", nr_ports=2)
    assert con.msix is None and con.intx is not None
    ports_of(con)["console"].write(b"irq")
    assert con.read(3) == b"irq"
    con.wait_queue_interrupt(0, timeout=1)


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.MODERN], rings=["split"])
def test_read_timeout_says_what_arrived(virtio_device: VirtioDriver, qemu: Machine) -> None:
    con = driven(virtio_device, qemu, nr_ports=2)
    ports_of(con)["port1"].write(b"abc")
    with pytest.raises(ConsoleTimeout, match=r"port 1: 3 of 10 bytes within 0.05 s \(so far b'abc'\)"):
        con.read(10, 1, timeout=0.05)


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.MODERN], rings=["split"])
def test_bad_control_message_names_device_queue_descriptor(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """An unknown control event from the device is an error naming the device, the control
    receiveq and the descriptor (the device's message is corrupted in guest memory here)."""
    vm, con = qemu, driven(virtio_device, qemu, handshake=False, nr_ports=2)
    assert con.control_log == [] and con.port_table == {}
    con.send_control(ControlMessage(0, ControlEvent.DEVICE_READY, 1))
    pool = con._pools[CONTROL_RECEIVEQ]
    for addr in pool.addrs:  # wherever the device wrote its DEVICE_ADDs: event 0x77
        vm.memory.write(addr + CONSOLE_CONTROL.event.offset, bytes([0x77, 0]))
    with pytest.raises(ConsoleError, match=r"control receiveq \(queue 2\) descriptor \d+: unknown event 119"):
        con.poll_control()


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.MODERN], rings=["split"])
def test_device_event_sent_by_driver_side_is_rejected(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """A driver-to-device event (PORT_READY) arriving on the control receiveq is an error."""
    vm, con = qemu, driven(virtio_device, qemu, handshake=False, nr_ports=2)
    con.send_control(ControlMessage(0, ControlEvent.DEVICE_READY, 1))
    for addr in con._pools[CONTROL_RECEIVEQ].addrs:
        vm.memory.write(addr + CONSOLE_CONTROL.event.offset, bytes([ControlEvent.PORT_READY, 0]))
    with pytest.raises(ConsoleError, match=r"PORT_READY\(id=0, value=1\) is not a device-to-driver control event"):
        con.poll_control()


@pytest.mark.virtio_device("virtio-serial-pci", transports=[modes.MODERN], rings=["split"])
def test_short_control_buffer_used_length(virtio_device: VirtioDriver, qemu: Machine) -> None:
    """QEMU 7.2 reports the whole PORT_NAME message length as the used length even when the
    control receive buffer is shorter: the ring layer names queue and descriptor."""
    con = driven(virtio_device, qemu, handshake=False, nr_ports=2)
    con.CONTROL_BUFFER_SIZE = 12
    con.handshake = True
    with pytest.raises(VirtqueueError, match=r"control receiveq \(queue 2\): descriptor \d+: used length 26 is longer"):
        con.initialize()


def test_read_available_ends_after_its_quiet_gap() -> None:
    """The host end reads what came, then on until ``quiet`` seconds pass with nothing more;
    ``quiet=0`` returns with what is there once the first bytes arrive (the fuzz check)."""
    import socket
    import threading

    from qtest_virtio.backends import ChardevEnd

    ours, theirs = socket.socketpair()
    end = ChardevEnd(ours, "console")
    try:
        for quiet, want in ((0, b"a"), (1.0, b"ab")):
            theirs.sendall(b"a")
            later = threading.Timer(0.2, theirs.sendall, (b"b",))
            later.start()
            try:
                assert end.read_available(timeout=1.0, quiet=quiet) == want
            finally:
                later.join()
            if quiet == 0:
                assert end.read_available(timeout=1.0, quiet=0) == b"b"  # it came later
    finally:
        ours.close()
        theirs.close()
