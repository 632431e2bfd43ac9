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
from .spec import MachineSpec, escape_option_value

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
    for dev in spec.devices:
        share = (shared_images or {}).get(dev.id)
        b = make_backend(dev.driver, dev.id, dev.props, dev.backend, dev.image_size, workdir, share)
        backends += b.args
        repro_backends += b.repro_args
        if dev.hotplug:
            hotplug[dev.id] = [dev.option(b.wiring), *b.devices]
        if dev.hotplug and not dev.plugged:
            pass_fds += b.child_fds
            if b.handle is not None:
                handles[dev.id] = b.handle
            continue
        devices += ["-device", dev.option(b.wiring)]
        repro_devices += ["-device", dev.option(b.wiring)]
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
    return LaunchPlan(argv, repro, pass_fds, handles, hotplug)
