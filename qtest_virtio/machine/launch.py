"""argv from a spec: the accelerator (qtest, or TCG with ``-S`` and the halt firmware), the
devices with their backends, and qtest and QMP on Unix sockets in the machine's directory.

Nothing goes through a shell: the plan is a list for ``Popen`` plus a copy-pasteable form of it
(qtest on stdio) for reports and reproducers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..backends import Handle, make_backend
from ..binary import QemuBinary, user_cache_dir
from ..errors import QemuStartError
from .spec import MachineSpec, escape_option_value, option_props

#: The first QEMU with ``-netdev dgram`` (its 7.2 changelog), which reproducers' stand-in for
#: the socket netdev needs (backends.held_transmit_netdev).
DGRAM = (7, 2, 0)
#: Reset-vector code of the halt firmware: cli; hlt; jmp short back to the hlt.
_HALT_VECTOR = bytes([0xFA, 0xF4, 0xEB, 0xFD])
_HALT_ROM_SIZE = 64 * 1024


def halt_firmware() -> str:
    """Path of a 64 KiB firmware whose reset vector halts the CPU for good (interrupts off).

    Debian's QEMU has no qtest accelerator, so the machine is TCG started with ``-S``. Some
    devices act only while the run state is RUNNING (virtio-rng's chr_read, virtio-net's
    receive path), but letting SeaBIOS run would assign BARs and write RAM behind our back.
    With this firmware ``cont`` gives a running machine whose only vCPU instruction is hlt.
    Kept in the user's cache directory so a reproducer command line stays valid.
    """
    rom = bytearray(b"\xf4" * _HALT_ROM_SIZE)
    rom[-16 : -16 + len(_HALT_VECTOR)] = _HALT_VECTOR
    for directory in (
        user_cache_dir(),
        os.path.join(tempfile.gettempdir(), f"qtest-virtio-{os.getuid()}"),
    ):
        path = os.path.join(directory, "halt-firmware-v1.rom")
        try:
            with open(path, "rb") as f:
                if f.read() == rom:
                    return path
        except OSError:
            pass
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(rom)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    raise QemuStartError("cannot write the halt firmware to the cache or temp directory")


@dataclass(frozen=True)
class PciPlace:
    """A device's PCI address as the command line fixes it: slot and function on the root bus
    (``parent`` None) or on the secondary bus of the bridge device ``parent`` (a spec id)."""

    parent: str | None
    slot: int
    function: int


#: Root-bus slots a machine type fills itself: q35's MCH (00.0) and ICH9 (1f.x: LPC, SATA,
#: SMBus), i440FX's host bridge (00.0) and PIIX3 (01.x: ISA, IDE, ACPI).
_BUILTIN_SLOTS = {"q35": frozenset({0x00, 0x1F}), "pc": frozenset({0x00, 0x01})}
#: Drivers placed on the root bus by slot (``addr``); any other device is left to QEMU.
_PCI_DRIVER_SUFFIXES = ("-pci", "-pci-transitional", "-pci-non-transitional")
_PCI_BRIDGES = frozenset({"pcie-root-port", "pci-bridge", "pcie-pci-bridge"})
#: Single-slot buses: a device behind one sits in slot 0 (a PCIe link has one device).
_ONE_SLOT_BUSES = frozenset({"pcie-root-port"})


def _machine_family(machine: str) -> str | None:
    name = machine.split(",")[0]
    if "q35" in name:
        return "q35"
    if name == "pc" or name.startswith("pc-i440fx"):
        return "pc"
    return None


def parse_pci_addr(text: str) -> tuple[int, int] | None:
    """(slot, function) of a ``-device ...,addr=SS[.F]`` value (hex, as QEMU parses it); None
    when it is not one."""
    slot_text, _, fn_text = text.strip().partition(".")
    try:
        slot = int(slot_text, 16)
        fn = int(fn_text, 16) if fn_text else 0
    except ValueError:
        return None
    return (slot, fn) if 0 <= slot < 32 and 0 <= fn < 8 else None


def place_devices(spec: MachineSpec) -> tuple[dict[str, str], dict[str, PciPlace]]:
    """Slots for the spec's PCI devices on the root bus, the lowest free ones in spec order (as
    QEMU would choose them), so the harness knows each device's address without QMP. Returns
    the ``addr`` values to add (by id) and every device's known place (by id). Devices with a
    ``bus`` are placed by QEMU; behind a ``pcie-root-port`` their slot is 0 all the same.
    Hot-plug devices, raw command lines and other machine types are left to QEMU."""
    family = _machine_family(spec.machine)
    if spec.raw_args is not None or family is None:
        return {}, {}
    used = set(_BUILTIN_SLOTS[family])
    drivers = {d.id: d.driver for d in spec.devices}
    places: dict[str, PciPlace] = {}
    for opt, value in itertools.pairwise(spec.extra_args):  # -device options given raw: keep their slots
        props = option_props(value) if opt == "-device" else {}
        where = parse_pci_addr(props["addr"]) if "addr" in props and "bus" not in props else None
        if where is not None:
            used.add(where[0])
    for dev in spec.devices:
        where = parse_pci_addr(dev.props["addr"]) if "addr" in dev.props else None
        bus = dev.props.get("bus")
        if bus is None and where is not None:
            used.add(where[0])
            places[dev.id] = PciPlace(None, *where)
        elif bus is not None and drivers.get(bus) in _PCI_BRIDGES and not (dev.hotplug and not dev.plugged):
            if where is not None:
                places[dev.id] = PciPlace(bus, *where)
            elif drivers[bus] in _ONE_SLOT_BUSES:
                places[dev.id] = PciPlace(bus, 0, 0)
    addrs: dict[str, str] = {}
    free = (slot for slot in range(32) if slot not in used)
    for dev in spec.devices:
        if "addr" in dev.props or "bus" in dev.props or (dev.hotplug and not dev.plugged):
            continue
        slot = next(free, None)
        if slot is None:
            break  # the bus is full: QEMU says so
        if dev.driver.endswith(_PCI_DRIVER_SUFFIXES) or dev.driver in _PCI_BRIDGES:
            addrs[dev.id] = f"{slot:#04x}"
            places[dev.id] = PciPlace(None, slot, 0)
        # else a device the harness does not place: if it is a PCI one, QEMU gives it the lowest
        # free slot when it comes to it, which is this one; kept free for it either way
    return addrs, places


@dataclass
class LaunchPlan:
    """The argv QEMU runs with, the copy-pasteable form of it for reports, the fds QEMU
    inherits and the backends' host ends, by device id."""

    argv: list[str]
    repro_argv: list[str]
    pass_fds: list[int] = field(default_factory=list)
    handles: dict[str, Handle] = field(default_factory=dict)
    #: The ``-device`` options of each hot-plug device (its own first, then those on its bus),
    #: by id: left off the command line, for ``device_add`` (their backends are on it).
    hotplug: dict[str, list[str]] = field(default_factory=dict)
    #: Where each device the harness placed (or whose ``addr`` was given) sits, by id: the PCI
    #: function is then found without asking QEMU (QMP ``query-pci``).
    places: dict[str, PciPlace] = field(default_factory=dict)

    def close_child_fds(self) -> None:
        """Our copies of what QEMU inherited: closed, so QEMU's exit shows as EOF on our ends."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = []

    def close(self) -> None:
        self.close_child_fds()
        for h in self.handles.values():
            with contextlib.suppress(Exception):
                h.close()


def names_qtest_accel(args: list[str]) -> bool:
    """Whether a command line asks for the qtest accelerator (``-machine ...,accel=qtest`` or
    ``-accel qtest``), as published reproducers do."""
    for opt, value in itertools.pairwise(args):
        if opt in ("-machine", "-M") and "accel=qtest" in value.split(","):
            return True
        if opt == "-accel" and value.split(",")[0] == "qtest":
            return True
    return False


def build_argv(
    spec: MachineSpec,
    binary: QemuBinary,
    workdir: str,
    *,
    incoming: bool = False,
    shared_images: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """argv for ``spec``: qtest and QMP on sockets in ``workdir``, accel per the binary. A
    migration destination (``incoming``) waits with ``-incoming defer`` for QMP
    ``migrate-incoming``, its images hard links to the source's (``shared_images``, by id)."""
    if spec.raw_args is not None:
        common = [binary.path, *spec.raw_args]
    else:
        common = [
            binary.path,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            spec.machine,
            "-m",
            str(spec.memory) if isinstance(spec.memory, str) else f"{spec.memory}M",
        ]
    # Debian builds lack the qtest accelerator: TCG with -S keeps firmware and vCPUs from
    # running, so RAM stays zero and BARs unassigned (virtio-facts.md); the halt firmware lets
    # resume() make the run state RUNNING without any guest code beyond hlt.
    if binary.has_qtest_accel:
        # A reproducer's own ``-machine accel=qtest`` / ``-accel qtest`` is kept as written, and
        # QEMU refuses "-machine accel=" beside "-accel": then the harness adds none.
        accel = [] if spec.raw_args is not None and names_qtest_accel(spec.raw_args) else ["-accel", "qtest"]
    else:
        accel = ["-accel", "tcg", "-S", "-bios", halt_firmware()]
    backends: list[str] = []
    repro_backends: list[str] = []
    devices: list[str] = []
    repro_devices: list[str] = []
    pass_fds: list[int] = []
    handles: dict[str, Handle] = {}
    hotplug: dict[str, list[str]] = {}
    addrs, places = place_devices(spec)
    for dev in spec.devices:
        share = (shared_images or {}).get(dev.id)
        b = make_backend(
            dev.driver, dev.id, dev.props, dev.backend, dev.image_size, workdir, share, dgram=binary.version >= DGRAM
        )
        backends += b.args
        repro_backends += b.repro_args
        if dev.hotplug:
            hotplug[dev.id] = [dev.option(b.wiring), *b.devices]
        if dev.hotplug and not dev.plugged:
            pass_fds += b.child_fds
            if b.handle is not None:
                handles[dev.id] = b.handle
            continue
        wiring = {**b.wiring, "addr": addrs[dev.id]} if dev.id in addrs else b.wiring
        devices += ["-device", dev.option(wiring)]
        repro_devices += ["-device", dev.option(wiring)]
        for extra in b.devices:
            devices += ["-device", extra]
        for extra in b.repro_devices:
            repro_devices += ["-device", extra]
        pass_fds += b.child_fds
        if b.handle is not None:
            handles[dev.id] = b.handle
    qtest = os.path.join(workdir, "qtest.sock")
    qmp = os.path.join(workdir, "qmp.sock")
    # On 7.2 `-qtest chardev:NAME` only works when the chardev id is literally "qtest".
    channels = [
        "-chardev",
        f"socket,id=qtest,path={escape_option_value(qtest)}",
        "-qtest",
        "chardev:qtest",
        "-qtest-log",
        "none",
        "-chardev",
        f"socket,id=qmp,path={escape_option_value(qmp)}",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    incoming_args = ["-incoming", "defer"] if incoming else []
    argv = common + accel + backends + devices + spec.extra_args + incoming_args + channels
    repro = common + accel + repro_backends + repro_devices + spec.extra_args + ["-qtest", "stdio"]
    return LaunchPlan(argv, repro, pass_fds, handles, hotplug, places)
