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
from .machine.qdev import HotplugError
from .memory import GuestMemory
from .pci import Bdf, Msix, PciBus, PciFunction
from .pci.hotplug import AcpiPciHotplug, PcieSlot
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
        #: The guest's side of hot-plug, set up on first use: root port slots by BDF, ACPI.
        self._hotplug_slots: dict[str, PcieSlot] = {}
        self._acpi_hotplug: AcpiPciHotplug | None = None

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
        """The PCI function of the ``-device`` with this id. Where the command line fixed its
        address (the harness gives root-bus devices their slots) it is found there, without
        QMP; else QMP ``query-pci``, which knows qdev ids, says where it is."""
        self.pci.assign_bars()
        fn = self._placed_function(dev_id)
        if fn is not None:
            return fn
        for bus in self.qmp.cmd("query-pci"):  # type: ignore[attr-defined]
            found = _find_qdev(bus.get("devices", []), dev_id)
            if found is not None:
                return self.pci.find(bdf=f"{found['bus']:02x}:{found['slot']:02x}.{found['function']:x}")
        raise KeyError(f"no PCI device with id {dev_id!r}")

    def _placed_function(self, dev_id: str) -> PciFunction | None:
        """The function at the address the launch plan gave ``dev_id`` (behind its bridge's
        secondary bus), or None when it has none or nothing answers there (not plugged, gone)."""
        place = self._plan.places.get(dev_id) if self._plan is not None else None
        if place is None:
            return None
        bus = 0
        if place.parent is not None:
            bridge = self._placed_function(place.parent)
            if bridge is None or bridge.secondary_bus is None:
                return None
            bus = bridge.secondary_bus
        want = Bdf(bus, place.slot, place.function)
        return next((fn for fn in self.pci.devices() if fn.bdf_addr == want), None)

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
        with self.qtest.posting():  # enumeration to DRIVER_OK waits only for what it reads
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
        destination's host end (images are the same file; sockets and FIFOs are new). A device
        hot-plugged here is on the destination's command line, in the same slot. A migration
        QEMU refuses for a feature the destination does not offer names it."""
        for drv in self._drivers:  # the guest's ring stores reach its RAM before the state moves
            for vq in drv.queues:
                vq.flush()
        spec = spec if spec is not None else self.spec.clone()
        for dev in spec.devices:
            address = self.pci_address(dev.id) if dev.hotplug else None
            if address is not None:  # plugged here: on the destination's command line, same slot
                dev.plugged = True
                dev.props["addr"] = f"{address[1]:#x}.{address[2]}"
        try:
            dest = super().migrate_to(spec, keep_source=keep_source)
        except MigrationError as exc:
            raise explain_migration_error(exc, self._drivers) from None
        dest._pci, dest._memory = self._pci, self._memory
        dest._hotplug_slots, dest._acpi_hotplug = self._hotplug_slots, self._acpi_hotplug
        self._hotplug_slots, self._acpi_hotplug = {}, None
        handles = dest.backend_handles()
        for drv in self._drivers:
            drv.backend = handles.get(drv.dev_id)
        dest._drivers, self._drivers = self._drivers, []
        self._pci = self._memory = None
        return dest

    # -- hot(un)plug: QMP (machine layer) around the guest's part (pci/hotplug.py) -------------

    def plug(self, dev_id: str) -> PciFunction:
        """Hot-plug a device the spec declared with ``hotplug=True``: ``device_add`` (with its
        backend wiring, then the devices on its bus), then what the guest does: on q35 the root
        port's slot event is taken and the slot powered on, on pc the ACPI event is taken; the
        bus is rescanned and the new function gets BARs. Returns its PCI function."""
        options = self.hotplug_options(dev_id)
        if self.pci_address(dev_id) is not None:
            raise HotplugError(f"device {dev_id!r} is already plugged; unplug it first (vm.unplug)")
        self.pci.assign_bars()
        port = self.spec.device(dev_id).hotplug_port
        slot = self._slot(self.pci_function(port)) if port is not None else None
        acpi = self._acpi() if slot is None else None
        self.device_add(options[0])
        for extra in options[1:]:
            self.device_add(extra)
        address = self.pci_address(dev_id)
        if address is None:
            raise HotplugError(f"device_add {dev_id} returned, but query-pci does not list it")
        if slot is not None:
            slot.handle_plug()
        elif acpi is not None:
            acpi.plugged(address[1])
        self.pci.rescan(address[0])
        return self.pci_function(dev_id)

    def unplug(self, dev_id: str, *, timeout: float = 5.0) -> None:
        """Hot-unplug a device: ``device_del``, the guest's part (power the q35 slot off, or
        eject the ACPI slot on pc), then wait for ``DEVICE_DELETED`` (a HotplugError naming the
        device when it does not come within ``timeout`` seconds)."""
        self.request_unplug(dev_id)
        self.finish_unplug(dev_id, timeout=timeout)

    def request_unplug(self, dev_id: str) -> None:
        """The first half of :meth:`unplug`: ``device_del`` alone (the guest has not answered)."""
        if self.pci_address(dev_id) is None:
            raise HotplugError(f"device {dev_id!r} is not plugged (query-pci does not list it); plug it first")
        self.pci.assign_bars()
        self.device_del(dev_id)

    def finish_unplug(self, dev_id: str, *, timeout: float = 5.0) -> None:
        """The second half of :meth:`unplug`: the guest's answer to the unplug request, then
        ``DEVICE_DELETED``, then the bus is rescanned without the device."""
        fn = self.pci_function(dev_id)
        bridge = self.pci.bridge_of(fn)
        if bridge is not None and bridge.reserved is not None:
            slot = self._slot(bridge)
            slot.handle_unplug_request()
            slot.handle_removal()
        elif bridge is None and self.pci.machine_type == "pc":
            self._acpi().unplug_requested(fn.bdf_addr.device)
        self.wait_device_deleted(dev_id, timeout)
        self.pci.rescan(fn.bdf_addr.bus)

    def _slot(self, port: PciFunction) -> PcieSlot:
        """The native hot-plug slot of a root port, set up once as pciehp does at probe:
        its MSI-X routed to RAM, notifications and the hot-plug interrupt on."""
        slots = self._hotplug_slots
        if port.bdf not in slots:
            msix = Msix(port)
            slot = PcieSlot(port, msix)
            msix.route_to_ram(self.memory, slot.vector + 1)
            slot.enable_notifications()
            slots[port.bdf] = slot
        return slots[port.bdf]

    def _acpi(self) -> AcpiPciHotplug:
        if self._acpi_hotplug is None:
            self._acpi_hotplug = AcpiPciHotplug(self.qtest)
            self._acpi_hotplug.enable()
        return self._acpi_hotplug

    def pci_address(self, dev_id: str) -> tuple[int, int, int] | None:
        """(bus, slot, function) of the device with this qdev id as QEMU's query-pci has it, None
        when there is none (query-pci sees behind bridges once they have bus numbers: the
        enumeration gives them)."""
        self.pci.devices()
        for bus in self.qmp.cmd("query-pci"):  # type: ignore[attr-defined]
            found = _find_qdev(bus.get("devices", []), dev_id)
            if found is not None:
                return int(found["bus"]), int(found["slot"]), int(found["function"])
        return None


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
