"""What to start: a machine spec and its devices, and QEMU's ``key=value,...`` option syntax.

Nothing here runs QEMU or touches a file; launch.py turns a spec into argv. Property values are
escaped for QEMU's option syntax (a comma is doubled), so a value cannot inject another option.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import modes

PropValue = str | int | bool

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MEM_RE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)
#: The q35 global that gives root ports native PCIe hot-plug back (ACPI hot-plug is the 6.1+ default).
ACPI_BRIDGE_HOTPLUG_OFF = "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"
#: Chassis numbers of the root ports hot-plug adds (apart from those a test adds itself).
HOTPLUG_CHASSIS_BASE = 0x40
_MEM_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def escape_option_value(value: str) -> str:
    """Escape a value for QEMU's ``key=value,key=value`` syntax: a comma is written twice."""
    if "\0" in value:
        raise ValueError(f"option value {value!r} contains a NUL byte")
    return value.replace(",", ",,")


def split_option_list(text: str) -> list[str]:
    """Split QEMU's ``a=1,b=2`` syntax at single commas; ``,,`` is a literal comma (the
    inverse of :func:`escape_option_value`)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def option_props(option: str) -> dict[str, str]:
    """The ``key=value`` properties of a ``-device``-style option (``driver,key=value,...``),
    by key; the leading driver name and bare flags left out."""
    return dict(p.partition("=")[::2] for p in split_option_list(option)[1:] if "=" in p)


def format_value(value: PropValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def parse_memory(memory: str | int) -> int:
    """Bytes in a ``-m`` size ('256M', '1G', or a number of MiB as QEMU takes it)."""
    if isinstance(memory, int):
        return memory << 20
    m = _MEM_RE.match(memory.strip())
    if not m:
        raise ValueError(f"memory size {memory!r} is not like '256M' or '1G'")
    return int(m.group(1)) * _MEM_UNITS[m.group(2).upper()]


@dataclass
class DeviceSpec:
    """One ``-device``: driver, properties in order, and what the harness adds for it."""

    driver: str
    props: dict[str, str] = field(default_factory=dict)
    #: Transport mode for virtio devices (``None`` for a plain device).
    mode: str | None = None
    #: Backend kind the machine creates when the device needs one ('image', 'null', or a path).
    backend: str | None = None
    image_size: int = 64 << 20
    #: Not on the command line: plugged later (``device_add``); its backend exists from the start.
    hotplug: bool = False
    #: The id of the ``pcie-root-port`` a hot-plugged device goes behind on q35 (None on pc).
    hotplug_port: str | None = None
    #: A hot-plug device that is plugged already at start (a migration destination's, whose
    #: source had plugged it): on the command line, and still unpluggable and re-pluggable.
    plugged: bool = False

    @property
    def id(self) -> str:
        return self.props["id"]

    def option(self, extra: Mapping[str, str] | None = None) -> str:
        """The ``-device`` argument, every value escaped (``extra``: harness-made wiring)."""
        props = {**self.props, **(extra or {})}
        parts = [self.driver] + [f"{k}={escape_option_value(v)}" for k, v in props.items()]
        return ",".join(parts)


def _short_name(driver: str) -> str:
    name = driver.removeprefix("virtio-").removesuffix("-pci").replace("-", "_")
    return name or "dev"


class MachineSpec:
    """What to start: binary, machine type, RAM, devices. Turns into an argv list.

    ``add_device("virtio-blk-pci", event_idx="off")`` takes properties as keywords; names that
    are not Python identifiers (``page-per-vq``) go in the positional mapping.
    """

    def __init__(
        self,
        qemu: str | None = None,
        machine: str = "q35",
        memory: str | int = "256M",
        *,
        extra_args: list[str] | None = None,
        start_timeout: float = 15.0,
        command_timeout: float = 30.0,
        raw_args: list[str] | None = None,
    ) -> None:
        self.qemu = qemu
        self.machine = machine
        self.memory = memory
        self.memory_bytes = parse_memory(memory)
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.devices: list[DeviceSpec] = []
        #: A command line taken as written (a bug reproducer's): replaces the harness's own
        #: -nodefaults/-machine/-m part; qtest and QMP are still the harness's, and so is the
        #: accelerator unless these arguments name the qtest accelerator themselves.
        self.raw_args = list(raw_args) if raw_args is not None else None
        if not _NAME_RE.match(machine.split(",")[0]):
            raise ValueError(f"machine type {machine!r} is not a valid name")

    def _props(self, props: Mapping[str, PropValue] | None, kwargs: Mapping[str, PropValue]) -> dict[str, str]:
        merged: dict[str, str] = {}
        for key, value in {**(props or {}), **kwargs}.items():
            if not _NAME_RE.match(key):
                raise ValueError(f"property name {key!r} is not valid (letters, digits, '_', '-', '.')")
            merged[key] = format_value(value)
        return merged

    def _new_id(self, driver: str) -> str:
        base = _short_name(driver)
        used = {d.props.get("id") for d in self.devices}
        n = 0
        while f"{base}{n}" in used:
            n += 1
        return f"{base}{n}"

    def add_device(
        self,
        driver: str,
        props: Mapping[str, PropValue] | None = None,
        /,
        *,
        backend: str | None = None,
        image_size: int = 64 << 20,
        **properties: PropValue,
    ) -> DeviceSpec:
        """Add a ``-device``; returns its spec (its ``id`` is made up when not given)."""
        if not _NAME_RE.match(driver):
            raise ValueError(f"device name {driver!r} is not valid")
        merged = self._props(props, properties)
        if "id" in merged and any(d.props.get("id") == merged["id"] for d in self.devices):
            raise ValueError(f"device id {merged['id']!r} is used twice")
        merged.setdefault("id", self._new_id(driver))
        merged = {"id": merged.pop("id"), **merged}
        dev = DeviceSpec(driver, merged, backend=backend, image_size=image_size)
        self.devices.append(dev)
        return dev

    def add_virtio(
        self,
        driver: str,
        props: Mapping[str, PropValue] | None = None,
        /,
        *,
        mode: str = modes.TRANSITIONAL_MODERN,
        backend: str | None = None,
        image_size: int = 64 << 20,
        hotplug: bool = False,
        **properties: PropValue,
    ) -> DeviceSpec:
        """Add a virtio-pci device built for transport ``mode`` (sets disable-legacy/-modern).

        ``hotplug=True`` leaves it off the command line, to be plugged by ``Machine.plug``: see
        :meth:`add_hotplug_slot` for where it goes."""
        mode = modes.check_mode(mode)
        merged = self._props(props, properties)
        for key, value in modes.MODE_PROPERTIES[mode].items():
            if key in merged and merged[key] != value:
                raise ValueError(f"mode {mode!r} needs {key}={value}, but {key}={merged[key]} was given")
            merged[key] = value
        port = self.add_hotplug_slot(merged) if hotplug else None
        dev = self.add_device(driver, merged, backend=backend, image_size=image_size)
        dev.mode = mode
        dev.hotplug = hotplug
        dev.hotplug_port = port
        return dev

    def same_as(self, other: MachineSpec) -> bool:
        """Whether ``other`` asks for the same machine: binary, options and devices alike, so
        the same command line (a machine launched ahead for it can serve it)."""
        return vars(self) == vars(other)

    def device(self, dev_id: str) -> DeviceSpec:
        for d in self.devices:
            if d.props.get("id") == dev_id:
                return d
        raise KeyError(f"no device with id {dev_id!r}; ids: {', '.join(d.id for d in self.devices)}")

    def clone(self, *, qemu: str | None = None, machine: str | None = None) -> MachineSpec:
        """The same devices (ids, modes, properties, backend kinds) and options, for another
        binary or machine type: the spec of a migration destination."""
        other = copy.deepcopy(self)
        if qemu is not None:
            other.qemu = qemu
        if machine is not None:
            if not _NAME_RE.match(machine.split(",")[0]):
                raise ValueError(f"machine type {machine!r} is not a valid name")
            other.machine = machine
        return other

    # -- hot-plug -----------------------------------------------------------------------------

    def add_hotplug_slot(self, props: dict[str, str]) -> str | None:
        """Where a device plugged later goes, as a guest's firmware would have it: on q35 an
        empty ``pcie-root-port`` with native PCIe hot-plug and resources reserved for the
        device (QEMU docs/pcie.txt), the one ``props['bus']`` names or a new one (``bus`` is
        set); on pc the root bus, hot-plugged through ACPI (PIIX4). Returns the port's id.

        QEMU 6.1+ makes q35's root ports ACPI hot-plug slots; ``acpi-pci-hotplug-with-bridge-
        support=off`` gives them back to native hot-plug (hw/acpi/ich9.c)."""
        machine = self.machine.split(",")[0]
        if "q35" in machine:
            if ACPI_BRIDGE_HOTPLUG_OFF not in self.extra_args:
                self.extra_args += ["-global", ACPI_BRIDGE_HOTPLUG_OFF]
            if "bus" in props:
                return props["bus"]
            ports = [d for d in self.devices if d.driver == "pcie-root-port"]
            n = len(ports) + 1
            port = self._new_id("hp-port")
            while any(d.props.get("chassis") == str(HOTPLUG_CHASSIS_BASE + n) for d in ports):
                n += 1
            self.add_device(
                "pcie-root-port",
                {"io-reserve": "4K", "mem-reserve": "2M"},
                id=port,
                chassis=HOTPLUG_CHASSIS_BASE + n,
                slot=n,
            )
            props["bus"] = port
            return port
        if machine == "pc" or machine.startswith("pc-i440fx"):
            return None
        raise ValueError(
            f"hotplug=True needs a machine with PCI hot-plug: q35 (native, behind a pcie-root-port) "
            f"or pc (ACPI), not {machine!r}"
        )
