"""virtio-console conformance (virtio 1.2 §5.3): the console device's device-side requirements.

The device is a ``virtio-serial-pci`` with a ``virtconsole`` (port 0, name org.qtest.console) and
a ``virtserialport`` (port 1, name org.qtest.port1), each on a socketpair chardev whose host end
the test holds (``qemu.backend(dev_id)["console"]`` / ``["port1"]``). The driver at DRIVER_OK
has completed the multiport handshake and opened both ports; its ``control_log`` holds every
control message the device sent, with the used length and buffer size.
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import SerialBackend
from qtest_virtio.devices.console.driver import VirtioConsole
from qtest_virtio.devices.console.encoding import ControlEvent, ControlMessage
from qtest_virtio.transport import feature_bit

pytestmark = pytest.mark.virtio_device("virtio-serial-pci")

#: The ports the backend plugs in: id -> (host end, name property, console?).
PORTS = {0: ("console", "org.qtest.console", True), 1: ("port1", "org.qtest.port1", False)}


def _restart(con: VirtioConsole, **attrs: object) -> None:
    """Initialize the device again (§3.1.1) with other driver settings; the control log starts
    afresh."""
    for name, value in attrs.items():
        setattr(con, name, value)
    con.initialize()


def _events(con: VirtioConsole, event: ControlEvent) -> list[ControlMessage]:
    return [r.message for r in con.control_log if r.message.event == event]


def _data_ports(con: VirtioConsole) -> list[int]:
    """Port 0 always; port 1 only when MULTIPORT lets it exist (§5.3.2)."""
    return [0, 1] if con.multiport else [0]


@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-device-add-per-port", spec="5.3.6")
def test_device_add_for_each_port_after_device_ready(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """With MULTIPORT, the device announces every active port with DEVICE_ADD (§5.3.6 item 4)
    once the driver has said DEVICE_READY (§5.3.5 step 3), and sends nothing before that.
    Level: device behaviour the spec describes, without a MUST keyword."""
    con: VirtioConsole = virtio_device
    _restart(con, handshake=False)
    assert con.poll_control() == [], "control messages arrived before the driver sent DEVICE_READY"
    con.send_control(ControlMessage(0, ControlEvent.DEVICE_READY, 1))
    adds = [m for m in con.poll_control() if m.event == ControlEvent.DEVICE_ADD]
    assert sorted(m.id for m in adds) == sorted(PORTS)


@pytest.mark.virtio_device("virtio-serial-pci", flags={"max_ports": "2"})
@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-device-add-ids-valid", spec="5.3.6.2.1")
def test_device_add_names_new_ports_below_max_nr_ports(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """The device MUST NOT name a port that already exists in DEVICE_ADD, nor one equal to or
    greater than max_nr_ports (here 2, exactly the two ports plugged in). Level: MUST NOT."""
    con: VirtioConsole = virtio_device
    ids = [m.id for m in _events(con, ControlEvent.DEVICE_ADD)]
    assert con.max_nr_ports == 2
    assert len(ids) == len(set(ids)), f"a port was added twice: {ids}"
    assert all(i < con.max_nr_ports for i in ids), f"DEVICE_ADD ids {ids} vs max_nr_ports 2"


@pytest.mark.virtio_device("virtio-serial-pci", flags={"max_ports": "4"})
@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-max-nr-ports", spec="5.3.4")
def test_max_nr_ports_reports_the_port_capacity(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """With MULTIPORT, max_nr_ports is valid: the device's port capacity (max_ports=4), which
    covers every port it announces, and the queues it implies (2 * max_nr_ports + 2) exist.
    Level: device behaviour the spec describes, without a MUST keyword."""
    con: VirtioConsole = virtio_device
    cfg = con.config()
    assert cfg.max_nr_ports == 4
    assert len(con.port_table) <= cfg.max_nr_ports
    last = 2 * cfg.max_nr_ports + 1
    assert con.transport.queue_max_size(last) > 0, f"queue {last} (transmitq(port{cfg.max_nr_ports - 1})) missing"


@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-console-port-announced", spec="5.3.6.2")
def test_console_port_is_nominated_with_console_port(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """The device nominates the console port with CONSOLE_PORT (value 1) once the driver has
    answered its DEVICE_ADD with PORT_READY; a generic port is not nominated.
    Level: device behaviour the spec describes, without a MUST keyword."""
    con: VirtioConsole = virtio_device
    nominated = _events(con, ControlEvent.CONSOLE_PORT)
    assert [(m.id, m.value) for m in nominated] == [(0, 1)]
    port_ready = con.sent_log.index(ControlMessage(0, ControlEvent.PORT_READY, 1))
    (received,) = [r for r in con.control_log if r.message.event == ControlEvent.CONSOLE_PORT]
    assert received.after_sent > port_ready, "CONSOLE_PORT arrived before the driver's PORT_READY"
    assert con.ports[0].console and not con.ports[1].console


@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-port-name-tag", spec="5.3.6.2")
def test_port_name_carries_the_name_property(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """PORT_NAME gives each named port its tag: the UTF-8 name after the control header is the
    port's ``name`` property. Level: device behaviour the spec describes, without a MUST keyword."""
    con: VirtioConsole = virtio_device
    names = {m.id: m.name for m in _events(con, ControlEvent.PORT_NAME)}
    assert names == {pid: name for pid, (_, name, _) in PORTS.items()}


@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-port-name-no-nul", spec="5.3.6.2")
def test_port_name_has_no_nul_terminator(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """PORT_NAME is 'immediately followed by the UTF-8 name of the port ... (without a NUL
    terminator)': the used length is header + name, nothing more. Level: the message format
    the spec defines (no MUST keyword)."""
    con: VirtioConsole = virtio_device
    for r in con.control_log:
        if r.message.event == ControlEvent.PORT_NAME:
            name = PORTS[r.message.id][1].encode()
            assert r.message.payload == name, f"port {r.message.id}: name bytes {r.message.payload!r}"
            assert r.used_length == 8 + len(name)


@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-port-open-host-state", spec="5.3.6.2")
def test_port_open_reports_the_host_side_state(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """PORT_OPEN from the device says whether the host side is open: value 1 for each
    connected port after PORT_READY, value 0 when the host closes its end.
    Level: device behaviour the spec describes, without a MUST keyword."""
    con: VirtioConsole = virtio_device
    assert {(m.id, m.value) for m in _events(con, ControlEvent.PORT_OPEN)} == {(0, 1), (1, 1)}
    qemu.backend(con.dev_id, SerialBackend)["port1"].close()
    deadline = time.monotonic() + 2
    while con.ports[1].host_open and time.monotonic() < deadline:
        time.sleep(0.001)
    assert con.control_log[-1].message == ControlMessage(1, ControlEvent.PORT_OPEN, 0)


@pytest.mark.conformance("console-tx-data-unmodified", spec="5.3.6")
def test_transmitted_bytes_arrive_unmodified(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """Output placed in a port's transmitq reaches that port's host end byte for byte, in
    order, on every port (§5.3.6 item 1); the device writes nothing into a transmit buffer.
    Level: device behaviour the spec describes, without a MUST keyword."""
    con: VirtioConsole = virtio_device
    backend = qemu.backend(con.dev_id, SerialBackend)
    for port in _data_ports(con):
        end = backend[PORTS[port][0]]
        chunks = [bytes(range(256)), b"\0" * 17, f"port {port}: done\r\n".encode(), bytes(range(255, -1, -1)) * 40]
        for chunk in chunks:
            con.write(chunk, port)
        want = b"".join(chunks)
        assert end.read(len(want), timeout=2) == want
        assert end.read_available(0.01) == b""


@pytest.mark.conformance("console-rx-used-length", spec="5.3.6")
def test_host_bytes_arrive_with_used_length_equal_to_bytes(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """Bytes the host writes to a port arrive in a buffer of that port's receiveq, and the used
    length is exactly the number of bytes placed (§5.3.6 item 2; the used length rule of §2.7.8.2
    is a MUST)."""
    con: VirtioConsole = virtio_device
    backend = qemu.backend(con.dev_id, SerialBackend)
    for port in _data_ports(con):
        sent = f"host to port {port}\0\xff".encode("latin-1")
        backend[PORTS[port][0]].write(sent)
        assert con.read_chunk(port, timeout=2) == sent  # read_chunk returns used-length bytes


@pytest.mark.conformance("console-emerg-wr-unconfigured", spec="5.3.5.1")
def test_emergency_write_on_an_unconfigured_device(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """The device MUST allow a write to emerg_wr even on an unconfigured device, and SHOULD
    output its lower byte: after a reset (status 0), writing 0x...21 prints '!' on the console,
    whether or not the driver acknowledged EMERG_WRITE."""
    con: VirtioConsole = virtio_device
    if not con.negotiated.offered >> feature_bit("EMERG_WRITE", con.device_bits) & 1:
        pytest.skip("the device does not offer EMERG_WRITE")
    con.reset()
    assert con.transport.get_status() == 0
    con.emergency_write(0x7E7E_7E21)
    assert qemu.backend(con.dev_id, SerialBackend)["console"].read(1, timeout=2) == b"!"


@pytest.mark.virtio_device("virtio-serial-pci", refuse={"MULTIPORT"})
@pytest.mark.conformance("console-port0-without-multiport", spec="5.3.2")
def test_port0_queues_work_without_multiport(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """'The port 0 receive and transmit queues always exist': with MULTIPORT not negotiated,
    port 0 moves data both ways over queues 0 and 1 with no control queue.
    Level: device behaviour the spec describes, without a MUST keyword."""
    con: VirtioConsole = virtio_device
    assert not con.multiport and len(con.queues) == 2
    end = qemu.backend(con.dev_id, SerialBackend)["console"]
    out, back = b"guest to host, single port", b"host to guest, single port"
    con.write(out, 0)
    assert end.read(len(out), timeout=2) == out
    end.write(back)
    assert con.read(len(back), 0, timeout=2) == back


@pytest.mark.virtio_requires("MULTIPORT")
@pytest.mark.conformance("console-control-used-length-fits", spec="2.7.8.2")
def test_control_used_length_never_exceeds_the_buffer(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """The device MUST write at least 'used length' bytes into the buffer, so the used length of
    a control message can never exceed the control receive buffer: with 12-byte buffers a
    PORT_NAME (8-byte header + 17-byte name) must not be reported as longer than 12 bytes."""
    con: VirtioConsole = virtio_device
    _restart(con, CONTROL_BUFFER_SIZE=12)  # the ring layer raises on used length > buffer
    for r in con.control_log:
        assert r.used_length <= r.buffer_size, f"{r.message}: used {r.used_length} > buffer {r.buffer_size}"
    assert sorted(con.port_table) == sorted(PORTS)
