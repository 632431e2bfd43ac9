"""virtio-net (network device, virtio 1.2 §5.1): the registration."""

from __future__ import annotations

import time

from ...backends import NetBackend
from ..base import DriverError
from ..registry import DeviceInfo, FuzzProfile
from .driver import TX_QUEUE, VirtioNet
from .encoding import CTRL_COMMANDS, NetHdr, header_size

#: A frame to a locally administered unicast address, ethertype 0x88b5 (local experimental).
_CHECK_FRAME = bytes.fromhex("020000000001020000000002") + b"\x88\xb5" + b"qtest-virtio fuzz check".ljust(46, b".")


def _check(driver: VirtioNet, timeout: float) -> None:
    """A frame transmitted reaches the socket backend (earlier frames of the abuse skipped)."""
    host = driver.backend
    if not isinstance(host, NetBackend):
        raise DriverError(f"virtio-net: the backend is not a socket the harness holds ({host!r})")
    while host.pending():  # the abuse's frames: a peer that never reads stalls the transmit path
        host.receive(timeout=timeout)
    driver.send(_CHECK_FRAME, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.receive(timeout=max(deadline - time.monotonic(), 0.01)) == _CHECK_FRAME:
            return
    raise DriverError("virtio-net: the transmitted check frame never reached the backend")


#: The header as VERSION_1 lays it out (§5.1.6), then the frame.
_HDR_SIZE = header_size({"VERSION_1"})
_TX = ((_HDR_SIZE + len(_CHECK_FRAME), False, NetHdr().encode(_HDR_SIZE) + _CHECK_FRAME),)
#: VIRTIO_NET_CTRL_RX / VIRTIO_NET_CTRL_RX_PROMISC on, then the ack byte (§5.1.6.5).
_PROMISC = CTRL_COMMANDS["RX_PROMISC"]
_CTRL = ((2, False, bytes([_PROMISC.class_code, _PROMISC.code])), (1, False, b"\x01"), (1, True, b""))

DEVICE = DeviceInfo(
    name="net",
    model="virtio-net-pci",
    driver=VirtioNet,
    # transmitq1 first; the controlq is queue 2 with one queue pair (§5.1.2)
    fuzz=FuzzProfile(queues={TX_QUEUE: _TX, 2: _CTRL}, check=_check),
)
