"""What the fuzzer aims at: a profile per device (its queues, each with a valid request, and the
check that the device serves one) and the :class:`~.actions.Target` of a started driver (its
register windows, rings, config address and MSI-X table).

Derived from the device registry: a registered device is a fuzz target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..devices import registry
from ..errors import QtestVirtioError
from ..pci.config import Cf8Access
from ..transport import Access, LegacyTransport, ModernTransport, VirtioPciMap
from ..transport import Window as MapWindow
from ..virtqueue import PackedVirtqueue, SplitVirtqueue
from ..vm import Machine
from .actions import Request, Target, Window

#: The id of the device under fuzz in the example's machine.
DEVICE_ID = "fuzz0"


@dataclass(frozen=True)
class DeviceProfile:
    """A device the fuzzer knows: how to check it serves a valid request, and the queues it
    aims at, each with a valid request's buffers (length, device-writable, contents) that
    ResetInFlight, IdReuse and MisshapenRequest build on."""

    name: str
    check: Callable[[Machine, Any, float], None]
    queues: dict[int, Request]
    props: tuple[tuple[str, str], ...] = ()

    @property
    def default_queue(self) -> int:
        return next(iter(self.queues))


def _profile(model: str, info: registry.DeviceInfo[Any]) -> DeviceProfile:
    check = info.fuzz.check
    return DeviceProfile(model, lambda vm, driver, timeout: check(driver, timeout), dict(info.fuzz.queues))


#: Every registered device's profile (devices/<name>/__init__.py holds its queues, valid requests
#: and check); the first queue is the default.
DEVICES: dict[str, DeviceProfile] = {model: _profile(model, info) for model, info in registry.devices().items()}


def make_target(vm: Machine, driver: Any, device: DeviceProfile, queue: int) -> Target:
    """The target of the driver's device: windows from its transport, the queue's rings, the
    function's config address, pci_cfg capability and MSI-X table, and a zeroed scratch area
    from the guest allocator."""
    tr = driver.transport
    fn = driver.fn
    vmap = VirtioPciMap.of(fn)
    regions: list[MapWindow[Any] | None] = [vmap.legacy]
    mult = 4
    if isinstance(tr, ModernTransport):
        regions = [vmap.common, tr.notify_window, vmap.isr, vmap.device, vmap.legacy]
        mult = tr.notify_off_multiplier
    windows = [
        Window(w.name, w.access == Access.IO, start, max(w.length, 1))
        for w in regions
        if w is not None and (start := vmap.address(w)) is not None
    ]
    if queue >= len(driver.queues):
        raise QtestVirtioError(f"{device.name}: queue {queue} is not set up (the driver has {len(driver.queues)})")
    vq = driver.queues[queue]
    if isinstance(vq, PackedVirtqueue):
        desc, avail, used = vq.ring, vq.driver_event, vq.device_event
    else:
        assert isinstance(vq, SplitVirtqueue)
        desc, avail, used = vq.desc, vq.avail, vq.used
    msix = driver.msix
    scratch_size = 0x10000
    scratch = vm.memory.alloc(scratch_size, 4096, tag="fuzz scratch", zero=True)
    return Target(
        device=device.name,
        mode=driver.mode,
        legacy=isinstance(tr, LegacyTransport),
        windows=tuple(windows),
        num_queues=len(driver.queues),
        msix_table=driver.msix.table_size if driver.msix is not None else 0,
        packed=isinstance(vq, PackedVirtqueue),
        queue_size=vq.size,
        desc=desc,
        avail=avail,
        used=used,
        ram_start=vm.memory.start,
        ram_end=vm.memory.end,
        scratch=scratch,
        scratch_size=scratch_size,
        notify_multiplier=mult,
        queue=queue,
        avail_idx=vq.next_avail if isinstance(vq, PackedVirtqueue) else 0,
        wrap=vq.avail_wrap if isinstance(vq, PackedVirtqueue) else 1,
        request=device.queues[queue],
        config_address=Cf8Access.address(fn.bdf_addr, 0),
        pci_cfg_cap=vmap.pci_cfg.offset if isinstance(tr, ModernTransport) and vmap.pci_cfg else 0,
        msix_table_addr=(vmap.address(vmap.msix_table) or 0) if msix and vmap.msix_table else 0,
        msix_pba_addr=(vmap.address(vmap.msix_pba) or 0) if msix and vmap.msix_pba else 0,
    )
