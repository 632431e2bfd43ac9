"""virtio-rng (entropy device, virtio 1.2 §5.4): the registration."""

from __future__ import annotations

from ..base import DriverError
from ..registry import DeviceInfo, FuzzProfile
from .driver import VirtioRng


def _check(driver: VirtioRng, timeout: float) -> None:
    """Sixteen bytes of entropy in one request."""
    data = driver.read(16, timeout=timeout)
    if len(data) != 16:
        raise DriverError(f"virtio-rng returned {len(data)} bytes for 16")


DEVICE = DeviceInfo(
    name="rng",
    model="virtio-rng-pci",
    driver=VirtioRng,
    fuzz=FuzzProfile(queues={0: ((64, True, b""),)}, check=_check),
)
