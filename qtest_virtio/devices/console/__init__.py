"""virtio-console (virtio 1.2 §5.3), QEMU's virtio-serial-pci: the registration."""

from __future__ import annotations

import time

from ...backends import SerialBackend
from ..base import DriverError
from ..registry import DeviceInfo, FuzzProfile
from .driver import VirtioConsole
from .encoding import CONTROL_TRANSMITQ, ControlEvent, ControlMessage

#: The quiet gap that ends the drain before the check (it was a flat 50 ms, twice per fuzz
#: example: over half of a console example's time).
_QUIET = 0.01


def _check(driver: VirtioConsole, timeout: float) -> None:
    """Bytes written to port 0 reach the chardev behind it."""
    backend = driver.backend
    if not isinstance(backend, SerialBackend):
        raise DriverError(f"virtio-console: the backend is not a chardev the harness holds ({backend!r})")
    end = backend["console"]
    # The abuse's bytes first: a chardev whose peer never reads stays full (1-byte writes fill
    # a socket's buffer after a few hundred), and what the port is given then is not delivered.
    # QEMU writes what it held as soon as the socket has room: read until it is quiet for 10 ms.
    end.read_available(timeout=_QUIET, quiet=_QUIET)
    driver.write(b"qtest-virtio fuzz check\n", 0, timeout=timeout)
    seen = b""
    deadline = time.monotonic() + timeout
    while b"fuzz check" not in seen:
        if time.monotonic() > deadline:
            raise DriverError(f"virtio-console: port 0 bytes never reached the chardev (got {seen[-64:]!r})")
        seen += end.read_available(timeout=0.05, quiet=0)  # back as soon as bytes come


#: VIRTIO_CONSOLE_PORT_READY for port 0 (§5.3.6.2).
_PORT_READY = ControlMessage(0, ControlEvent.PORT_READY, 1).encode()

DEVICE = DeviceInfo(
    name="console",
    model="virtio-serial-pci",
    driver=VirtioConsole,
    # port 0's transmitq (queue 1), then the control transmitq
    fuzz=FuzzProfile(
        queues={VirtioConsole.tx_queue(0): ((8, False, b"fuzzdata"),), CONTROL_TRANSMITQ: ((8, False, _PORT_READY),)},
        check=_check,
    ),
)
