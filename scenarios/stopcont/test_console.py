"""virtio-console across QMP ``stop`` / ``cont``: regression scenarios on
hw/char/virtio-serial-bus.c and hw/char/virtio-console.c.

The ports follow the run state through the device's status handler: ``set_status`` (called by
``virtio_vmstate_change`` at every stop and cont) runs each port's ``enable_backend`` with
``vm_running``, and virtio-console's takes its chardev handlers away while the VM is stopped, so
QEMU does not read what the host writes; ``cont`` puts them back. The guest's output has no
run-state check (``handle_output`` flushes the transmitq to the chardev). Port 0 (the console)
is used: it exists with and without MULTIPORT (§5.3.2).
"""

from __future__ import annotations

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import SerialBackend
from qtest_virtio.devices.console.driver import VirtioConsole

from ._support import SHORT, cont, interrupted, quiet, stop

#: The run state is the VM's, not the rings': a refused feature changes nothing checked here.
#: virtio-serial-pci has 2 MSI-X vectors by default; 8 give each of the 6 queues its own.
pytestmark = pytest.mark.virtio_device(
    "virtio-serial-pci", refuse_each=False, interrupts="msix", flags={"vectors": "8"}
)

PORT = 0


def test_host_bytes_written_while_stopped_arrive_after_cont(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """Bytes the host writes to the console while the VM is stopped stay in the chardev (QEMU
    does not read it: no used receive buffer, no interrupt); after ``cont`` they arrive in the
    port's receiveq, in order and whole, each used length the bytes placed (§5.3.6 item 2)."""
    con = virtio_device
    end = qemu.backend(con.dev_id, SerialBackend)["console"]
    rxq = con.rx_queue(PORT)
    interrupted(con, rxq)
    stop(qemu)
    chunks = [b"written while stopped, ", bytes(range(256)), b" and the end\r\n"]
    for chunk in chunks:
        end.write(chunk)
    quiet(qemu)
    assert con.read_available(PORT) == b"", "host bytes reached the guest while the VM was stopped"
    assert not interrupted(con, rxq)
    cont(qemu)
    want = b"".join(chunks)
    assert con.read(len(want), PORT, timeout=SHORT) == want
    assert interrupted(con, rxq), "no receive interrupt after cont"
    quiet(qemu)
    assert con.read_available(PORT) == b""


def test_guest_output_while_stopped_goes_out_at_once(virtio_device: VirtioConsole, qemu: Machine) -> None:
    """The other direction has no run-state check: output the driver places in the port's
    transmitq while the VM is stopped is written to the chardev and its buffers are used at
    once (``handle_output``), with the used-buffer notification, the run state still paused;
    after ``cont`` output flows as before."""
    con = virtio_device
    end = qemu.backend(con.dev_id, SerialBackend)["console"]
    txq = con.tx_queue(PORT)
    interrupted(con, txq)
    stop(qemu)
    out = b"guest output while stopped\r\n"
    con.write(out, PORT, timeout=SHORT)  # returns once the device has used every buffer
    assert end.read(len(out), timeout=SHORT) == out
    assert interrupted(con, txq), "no transmit interrupt for output used while stopped"
    assert qemu.run_state() == "paused"
    cont(qemu)
    more = b"and after cont\r\n"
    con.write(more, PORT, timeout=SHORT)
    assert end.read(len(more), timeout=SHORT) == more
