"""virtio-blk (block device, virtio 1.2 §5.2): the registration."""

from __future__ import annotations

from ..base import DriverError
from ..registry import DeviceInfo, FuzzProfile
from .driver import VirtioBlk
from .encoding import REQ_HEADER, SECTOR_SIZE, STATUS_BYTES, BlkReqType, encode_header


def _check(driver: VirtioBlk, timeout: float) -> None:
    """One sector read back."""
    data = driver.read(0, 1, timeout=timeout)
    if len(data) != SECTOR_SIZE:
        raise DriverError(f"virtio-blk read returned {len(data)} bytes for one sector")


#: VIRTIO_BLK_T_IN of sector 0: header, one sector of data, the status byte (§5.2.6).
_READ = (
    (REQ_HEADER.size, False, encode_header(BlkReqType.IN, 0)),
    (SECTOR_SIZE, True, b""),
    (STATUS_BYTES, True, b""),
)

DEVICE = DeviceInfo(
    name="blk",
    model="virtio-blk-pci",
    driver=VirtioBlk,
    fuzz=FuzzProfile(queues={0: _READ}, check=_check),
)
