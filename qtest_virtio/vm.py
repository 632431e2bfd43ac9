"""The user-facing :class:`Machine`: the QEMU process plus the layers above it, wired lazily.

``machine.py`` knows only the process and its channels; this adapter adds ``.pci`` and
``.memory`` (and, later, virtio drivers) without the lower layer knowing them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar, overload

from . import modes
from .devices import registry
from .devices.base import DriverError, VirtioDriver
from .errors import MigrationError
from .machine import MachineSpec, QemuMachine
from .memory import GuestMemory
from .pci import PciBus, PciFunction
from .transport.layout import feature_names

D = TypeVar("D", bound=VirtioDriver)


def driver_class(device: str) -> type[VirtioDriver]:
    """The driver class for a device model name (UnknownDevice, a KeyError, if none)."""
    return registry.lookup(device).driver


class Machine(QemuMachine):
    """A started QEMU with ``.qtest``, ``.qmp``, ``.pci`` and ``.memory``; a context manager."""

    def __init__(self, spec: MachineSpec, *, qtest_log: TextIO | None = None) -> None:
        super().__init__(spec, qtest_log=qtest_log)
        self._pci: PciBus | None = None
        self._memory: GuestMemory | None = None
        #: The drivers ``virtio()`` made: a migration re-points their backends.
        self._drivers: list[VirtioDriver] = []

    def __enter__(self) -> Machine:
        if self._proc is None:  # a migration destination comes started
            self.start()
        return self

    @property
    def pci(self) -> PciBus:
        """The PCI hierarchy, enumerated on first use (ECAM on q35, CF8/CFC on pc)."""
        if self._pci is None:
            self._pci = PciBus(self.qtest, self.spec.machine)
        return self._pci

    @property
    def memory(self) -> GuestMemory:
        """The guest RAM allocator, sized from the spec's ``-m``."""
        if self._memory is None:
            self._memory = GuestMemory(self.qtest, self.spec.memory_bytes)
        return self._memory

    def pci_function(self, dev_id: str) -> PciFunction:
        """The PCI function of the ``-device`` with this id (QMP ``query-pci`` knows qdev ids)."""
        self.pci.assign_bars()
        for bus in self.qmp.cmd("query-pci"):  # type: ignore[attr-defined]
            found = _find_qdev(bus.get("devices", []), dev_id)
            if found is not None:
                return self.pci.find(bdf=f"{found['bus']:02x}:{found['slot']:02x}.{found['function']:x}")
        raise KeyError(f"no PCI device with id {dev_id!r}")

    @overload
    def virtio(
        self, dev_id: str, *, refuse: Iterable[str] = (), mode: str | None = None, **kw: Any
    ) -> VirtioDriver: ...

    @overload
    def virtio(
        self, dev_id: str, driver: type[D], *, refuse: Iterable[str] = (), mode: str | None = None, **kw: Any
    ) -> D: ...

    def virtio(
        self,
        dev_id: str,
        driver: type[VirtioDriver] | None = None,
        *,
        refuse: Iterable[str] = (),
        mode: str | None = None,
        **kw: Any,
    ) -> VirtioDriver:
        """The device's driver, constructed and initialised to DRIVER_OK in the mode its spec
        was built for. ``driver`` types the result (``vm.virtio("blk0", VirtioBlk)``), or
        names a subclass of the registered driver to use instead."""
        spec = self.spec.device(dev_id)
        mode = mode or spec.mode or modes.TRANSITIONAL_MODERN
        cls = driver_class(spec.driver)
        if driver is not None:
            if issubclass(driver, cls):
                cls = driver
            elif not issubclass(cls, driver):
                raise DriverError(
                    f"{dev_id} is a {spec.driver}, driven by {cls.__name__}, not {driver.__name__}; "
                    f"pass {cls.__name__} (or a subclass of it)"
                )
        fn = self.pci_function(dev_id)
        self.resume()
        drv = cls(fn, mode, self.memory, refuse=refuse, **kw)
        drv.dev_id = dev_id
        drv.backend = self._plan.handles.get(dev_id) if self._plan else None
        drv.initialize()
        self._drivers.append(drv)
        return drv

    def migrate_to(self, spec: MachineSpec | None = None, *, keep_source: bool = False) -> Machine:
        """Live-migrate to a new QEMU (see :meth:`QemuMachine.migrate_to`), drivers and all: the
        PCI, memory and driver objects carry over, each driver's ``backend`` becomes the
        destination's host end (images are the same file; sockets and FIFOs are new). A
        migration QEMU refuses for a feature the destination does not offer names it."""
        try:
            dest = super().migrate_to(spec, keep_source=keep_source)
        except MigrationError as exc:
            raise explain_migration_error(exc, self._drivers) from None
        dest._pci, dest._memory = self._pci, self._memory
        handles = dest.backend_handles()
        for drv in self._drivers:
            drv.backend = handles.get(drv.dev_id)
        dest._drivers, self._drivers = self._drivers, []
        self._pci = self._memory = None
        return dest


def _find_qdev(devices: list[dict[str, Any]], dev_id: str) -> dict[str, Any] | None:
    for d in devices:
        if d.get("qdev_id") == dev_id:
            return d
        bridge = d.get("pci_bridge")
        if bridge:
            found = _find_qdev(bridge.get("devices", []), dev_id)
            if found is not None:
                return found
    return None


#: virtio_load's refusal (hw/virtio/virtio.c): the features the source negotiated that the
#: destination's device does not offer, and the vmstate section it was loading.
_FEATURES_RE = re.compile(r"Features 0x([0-9a-f]+) unsupported\. Allowed features: 0x([0-9a-f]+)")
_SECTION_RE = re.compile(r"error while loading state for instance \S+ of device '([0-9a-f:.]+)/([^']+)'")


def explain_migration_error(exc: MigrationError, drivers: list[VirtioDriver]) -> MigrationError:
    """``exc`` with its summary naming the features virtio_load refused ("RING_PACKED is not
    migratable to 7.2.22: ..."), when that is why; else ``exc`` as it is."""
    m = _FEATURES_RE.search(exc.destination_stderr)
    if m is None:
        return exc
    features, allowed = int(m.group(1), 16), int(m.group(2), 16)
    section = _SECTION_RE.search(exc.destination_stderr)
    drv = next(
        (d for d in drivers if section is not None and section.group(1).endswith(d.fn.bdf)),
        drivers[0] if len(drivers) == 1 else None,
    )
    bits = drv.device_bits if drv is not None else None
    names = feature_names(features & ~allowed, bits)
    where = f"{drv.dev_id} ({type(drv).__name__})" if drv is not None else (section.group(2) if section else "a device")
    one = len(names) == 1
    summary = (
        f"{', '.join(names)} {'is' if one else 'are'} not migratable to {exc.destination}: {where} negotiated "
        f"{'it' if one else 'them'} and the destination's device does not offer {'it' if one else 'them'} "
        f"({exc.summary})"
    )
    return type(exc)(
        summary,
        error_desc=exc.error_desc,
        source_stderr=exc.source_stderr,
        destination_stderr=exc.destination_stderr,
        command_lines=exc.command_lines,
        destination=exc.destination,
    )
