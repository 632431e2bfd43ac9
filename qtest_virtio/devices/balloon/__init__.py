"""virtio-balloon (traditional memory balloon, virtio 1.2 §5.5): the registration."""

from __future__ import annotations

from ..registry import DeviceInfo, FuzzProfile
from .driver import VirtioBalloon
from .encoding import INFLATEQ, STATSQ, StatTag, encode_stats


def _check(driver: VirtioBalloon, timeout: float) -> None:
    """One page in and out of the balloon."""
    driver.inflate(1, timeout=timeout)
    driver.deflate(1, timeout=timeout)


#: PFN 0 on the inflateq (le32, §5.5.6), and one statistic on the statsq (§5.5.6.3).
_PFN0 = bytes(4)
_STAT = encode_stats([(StatTag.SWAP_IN, 0)])

DEVICE = DeviceInfo(
    name="balloon",
    model="virtio-balloon-pci",
    driver=VirtioBalloon,
    fuzz=FuzzProfile(
        queues={INFLATEQ: ((len(_PFN0), False, _PFN0),), STATSQ: ((len(_STAT), False, _STAT),)}, check=_check
    ),
)
