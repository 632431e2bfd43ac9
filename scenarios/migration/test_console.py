"""virtio-console (virtio-serial) across a live migration: ports the guest opened stay open, and
data flows both ways over the destination's new chardev sockets (virtio 1.2 §5.3; QEMU's
docs/devel/migration: device state and guest RAM move, the guest does not re-initialise).

The device is a ``virtio-serial-pci`` with a ``virtconsole`` (port 0) and a ``virtserialport``
(port 1), each on a socketpair chardev whose host end the test holds; the destination's ends
are new sockets (``virtio_device.backend`` after the migration), as on a new host. QEMU moves
each port's guest_connected and host_connected state (hw/char/virtio-serial-bus.c
``virtio_serial_save_device`` / ``virtio_serial_load_device``). Each scenario ends with data
both ways and QEMU's own view of the device against the driver's (``assert_view_matches``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio import Machine
from qtest_virtio.backends import ChardevEnd, SerialBackend
from qtest_virtio.devices.console.driver import VirtioConsole
from qtest_virtio.devices.console.encoding import ControlEvent
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.virtqueue import Virtqueue

from ._notify import (
    let_virtual_time_pass,
    masked_vector_survives_across,
    notified,
    quiet,
    suppression_holds_across,
    wait_notified,
    wait_used_idx_moves,
)
from ._support import assert_view_matches

pytestmark = pytest.mark.virtio_device("virtio-serial-pci", refuse_each=False)

#: The host end of each port's chardev (scenarios/console: port 0 console, port 1 generic).
ENDS = {0: "console", 1: "port1"}


def end(vm: Machine, con: VirtioConsole, port: int) -> ChardevEnd:
    """The host end of ``port``'s chardev on ``vm``."""
    return vm.backend(con.dev_id, SerialBackend)[ENDS[port]]


def ports(con: VirtioConsole) -> list[int]:
    """Port 0 always; port 1 only when MULTIPORT lets it exist (§5.3.2)."""
    return [0, 1] if con.multiport else [0]


def both_ways(vm: Machine, con: VirtioConsole, port: int, tag: bytes) -> None:
    """Bytes from the guest reach the port's host end on ``vm``, and bytes from there the guest."""
    out = b"guest->host " + tag
    con.write(out, port)
    assert end(vm, con, port).read(len(out), timeout=2) == out
    back = b"host->guest " + tag
    end(vm, con, port).write(back)
    assert con.read(len(back), port, timeout=2) == back


def _rx(con: VirtioConsole, port: int) -> Virtqueue:
    return con.queues[con.rx_queue(port)]


def _tx(con: VirtioConsole, port: int) -> Virtqueue:
    return con.queues[con.tx_queue(port)]


# -- ports and data ------------------------------------------------------------------------


def test_idle_device_migrates(virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate) -> None:
    """At DRIVER_OK with every port open and receive buffers posted: on the destination the
    buffers posted on the source take the host's bytes from the new sockets, the guest's bytes
    reach them, on every port, and QEMU's view is the driver's."""
    con = virtio_device
    for port in ports(con):
        both_ways(qemu, con, port, b"before")
    dest = migrate()
    assert con.backend is dest.backend(con.dev_id), "the driver's backend is not the destination's"
    assert_view_matches(dest, con)
    for port in ports(con):
        both_ways(dest, con, port, b"after")


@pytest.mark.virtio_requires("MULTIPORT")
def test_opened_ports_stay_open_and_closed_ones_closed(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """Regression (virtio_serial_save_device / _load_device move each port's guest_connected):
    the console port the guest opened (VIRTIO_CONSOLE_PORT_OPEN 1, §5.3.6.2.2) is open on the
    destination, data flows both ways there with no new handshake; port 1, which the guest closed
    (PORT_OPEN 0), stays closed, so the host's bytes wait for it (virtio_serial_guest_ready), and
    arrive once the guest opens it on the destination. No control message says a port went away
    or its host side closed."""
    con = virtio_device
    con.open_port(1, False)
    dest = migrate()
    let_virtual_time_pass(dest, 1_000_000)  # virtio_serial_post_load_timer_cb runs
    assert_view_matches(dest, con)
    assert con.ports[0].guest_open and con.ports[0].host_open
    waiting = b"for port 1 while closed"
    end(dest, con, 1).write(waiting)
    both_ways(dest, con, 0, b"console")
    quiet(dest, 0.05)
    assert con.read_available(1) == b"", "bytes reached a port the guest had closed"
    con.open_port(1)
    assert con.read(len(waiting), 1, timeout=2) == waiting
    both_ways(dest, con, 1, b"port1 reopened")
    since = [r.message for r in con.control_log]
    assert not [m for m in since if m.event == ControlEvent.DEVICE_REMOVE], since
    assert all(m.value == 1 for m in since if m.event == ControlEvent.PORT_OPEN), since


def test_available_output_is_written_on_the_destination(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """Output made available on a port's transmitq (published, not notified) before the
    migration is the destination's to write: after a notification there it reaches the new host
    end, and the buffer is used with length 0 (nothing device-writable, §2.7.8.2)."""
    con = virtio_device
    port = ports(con)[-1]
    vq = _tx(con, port)
    data = b"made available before the migration"
    pending = vq.submit([data], [], kick=False)
    vq.flush()
    assert end(qemu, con, port).read_available(0.01) == b"", "the source wrote output it was not notified of"
    dest = migrate()
    assert_view_matches(dest, con, in_flight=1)
    vq.kick(force=True)
    assert end(dest, con, port).read(len(data), timeout=2) == data
    assert vq.complete(pending, timeout=2)[0] == 0
    both_ways(dest, con, port, b"next")


def test_used_buffers_not_yet_consumed_are_read_on_the_destination(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """Bytes the host wrote on the source, placed in a receive buffer the driver has not taken
    yet: on the destination the driver finds the used entry in guest RAM, with used length the
    number of bytes placed (§5.3.6) and the bytes; the next bytes both ways work."""
    con = virtio_device
    port = ports(con)[-1]
    index = con.rx_queue(port)
    before = queue_view(qemu, con.dev_id, index).used_idx
    data = b"written by the source's host"
    end(qemu, con, port).write(data)
    wait_used_idx_moves(qemu, con.dev_id, index, before)
    dest = migrate()
    assert_view_matches(dest, con)
    assert con.read_chunk(port, timeout=2) == data
    both_ways(dest, con, port, b"next")


#: How long a migration may take in the held-element scenario: a destination that cannot load
#: the stream (deviation mig-console-held-element) is otherwise waited for command_timeout (30 s).
HELD_MIGRATION_TIMEOUT = 10.0


@pytest.mark.conformance("mig-console-held-element", spec="5.3.6")
def test_output_held_by_a_throttled_port_is_finished_on_the_destination(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """Regression (hw/char/virtio-serial-bus.c: a port whose chardev cannot take more keeps the
    popped element and its offset; ``virtio_serial_save_device`` puts both in the stream and the
    destination unthrottles the port): output larger than the source's socket buffer, with the
    host not reading, is held half-written across the migration; on the destination the rest of
    it, from where the source stopped, reaches the new host end, then the buffer is used with
    length 0. Level: the output path §5.3.6 describes (no MUST keyword), across a migration
    QEMU's docs say must work."""
    con = virtio_device
    port = ports(con)[-1]
    vq = _tx(con, port)
    data = bytes((i * 7 + i // 251) & 0xFF for i in range(1 << 20))  # more than a socketpair holds (~220 KB here)
    pending = vq.submit([data], [])
    index = con.tx_queue(port)
    deadline = time.monotonic() + 2
    while (q := queue_view(qemu, con.dev_id, index)).last_avail_idx == q.used_idx:
        assert time.monotonic() < deadline, "the device never took the output"
        time.sleep(0.002)
    quiet(qemu)
    q = queue_view(qemu, con.dev_id, index)
    assert q.last_avail_idx - q.used_idx == 1, "the source finished output its host never read"
    qemu.spec.command_timeout = HELD_MIGRATION_TIMEOUT
    dest = migrate()
    assert_view_matches(dest, con, in_flight=1)
    host = end(dest, con, port)
    got = bytearray()
    deadline = time.monotonic() + 5
    while len(got) < len(data) and (chunk := host.read_available(0.2)):
        got += chunk
        assert time.monotonic() < deadline, f"{len(got)} bytes on the destination's host end after 5 s"
    assert 0 < len(got) < len(data), f"{len(got)} of {len(data)} bytes on the destination's host end"
    assert bytes(got) == data[len(data) - len(got) :], "the destination did not continue where the source stopped"
    assert vq.complete(pending, timeout=2)[0] == 0
    both_ways(dest, con, port, b"next")


# -- features ------------------------------------------------------------------------------


def test_renegotiated_features_are_the_destinations(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """After a reset and a new negotiation (with the port handshake again) without EVENT_IDX
    (and INDIRECT_DESC), the destination's guest features are the new set, and it behaves by it:
    port 0's receiveq is not notified while the driver suppresses notifications the way it does
    without EVENT_IDX (NO_INTERRUPT, §2.7.7.2; packed: driver event flags, §2.8.10), and is
    once they are on again."""
    con = virtio_device
    if "EVENT_IDX" not in con.negotiated:
        pytest.skip("EVENT_IDX not negotiated in this run")
    dropped = {"EVENT_IDX"} | ({"INDIRECT_DESC"} & set(con.negotiated))
    con.refused_names |= dropped
    con.initialize()
    assert not dropped & set(con.negotiated)
    both_ways(qemu, con, 0, b"renegotiated")
    dest = migrate()
    view = device_view(dest, con.dev_id)
    assert not dropped & view.guest_features, f"the destination still holds {sorted(dropped & view.guest_features)}"
    assert_view_matches(dest, con)
    rxq = _rx(con, 0)
    rxq.set_interrupts(False)
    notified(con, rxq.index)
    _receiver(con)(dest)
    quiet(dest)
    assert not notified(con, rxq.index), "a notification despite suppression, after renegotiation"
    rxq.set_interrupts(True)
    _receiver(con)(dest)
    assert wait_notified(con, rxq.index), "no notification once suppression was lifted"
    both_ways(dest, con, 0, b"after")


# -- notification suppression and MSI-X ----------------------------------------------------


def _receiver(con: VirtioConsole) -> Callable[[Machine], None]:
    """``produce`` for the suppression checks: bytes from ``vm``'s host end of port 0, read."""
    seeds = itertools.count()

    def produce(vm: Machine) -> None:
        data = f"chunk {next(seeds)}".encode()
        end(vm, con, 0).write(data)
        assert con.read_chunk(0, timeout=2) == data

    return produce


@pytest.mark.conformance("mig-used-event-not-reached-quiet", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-serial-pci", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
def test_used_event_suppression_holds_on_the_destination(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """With EVENT_IDX, used_event kept one behind the used index of port 0's receiveq: used
    entries before the index used_event names SHOULD NOT be notified, on the destination as on
    the source (the device has notified before; used_event is in the migrated RAM). Then
    used_event reached MUST notify."""
    con = virtio_device
    rxq = _rx(con, 0)
    suppression_holds_across(qemu, con, rxq, migrate, _receiver(con))


@pytest.mark.conformance("mig-console-packed-event-disable", spec="2.8.10")
@pytest.mark.virtio_device("virtio-serial-pci", refuse_each=False, rings=("packed",))
def test_packed_event_disable_holds_on_the_destination(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """Packed ring, port 0's receiveq with driver event flags RING_EVENT_FLAGS_DISABLE: no
    notification on the destination as on the source; ENABLE again: one. Level: the meaning
    of the event suppression structure (§2.8.10, no MUST keyword)."""
    con = virtio_device
    rxq = _rx(con, 0)
    suppression_holds_across(qemu, con, rxq, migrate, _receiver(con))


def test_msix_vectors_and_a_masked_pending_vector_carry_over(
    virtio_device: VirtioConsole, qemu: Machine, migrate: Migrate
) -> None:
    """The config and queue vectors read back the same on the destination (§4.1.4.3); port 0's
    receiveq vector masked with an interrupt pending on the source (PCI 3.0 §6.8.2.10) stays
    masked and pending there, and unmasking sends one message and clears the bit."""
    con = virtio_device
    dest = masked_vector_survives_across(qemu, con, _rx(con, 0), migrate, _receiver(con))
    assert_view_matches(dest, con)
    both_ways(dest, con, 0, b"after")
