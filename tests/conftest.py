"""Shared test configuration.

Tests that compare QEMU versions use ``provided_qemu(NAME)``: a binary that ``scripts/qemu.sh``
provides (``system``, ``debian-10.0``, ``src-10.0.2``, ``src-newest``). It is taken from the cache
only; a missing one fails the test with the command that provides it (CI provides them first), it
never skips.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qtest_virtio.binary import QemuBinary, QemuNotFound, cached_qemu
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.machine import QemuMachine
from qtest_virtio.vm import Machine

pytest_plugins = ["pytester"]

#: The console script of the interpreter running the tests (this checkout's venv), not another
#: ``qtest-virtio`` on PATH that may import another checkout.
_VENV_EXE = Path(sys.executable).with_name("qtest-virtio")
EXE = str(_VENV_EXE) if _VENV_EXE.exists() else shutil.which("qtest-virtio")
#: The environment as the run began: pytester moves HOME, and with it the default cache.
_ENV = dict(os.environ)


@pytest.fixture(scope="session")
def provided_qemu() -> Callable[[str], QemuBinary]:
    """``provided_qemu("debian-10.0")`` -> that QemuBinary, from scripts/qemu.sh's cache."""

    def get(name: str) -> QemuBinary:
        try:
            return QemuBinary.get(cached_qemu(name, env=_ENV))
        except QemuNotFound as exc:
            pytest.fail(str(exc), pytrace=False)

    return get


def qmp_object(vm: QemuMachine, command: str, **args: object) -> dict[str, Any]:
    """QMP ``command``'s result where it is a JSON object (qemu.qmp types every result ``object``)."""
    result = vm.qmp.cmd(command, **args)
    assert isinstance(result, dict), f"QMP {command} returned {result!r}, not an object"
    return result


D = TypeVar("D", bound=VirtioDriver)


def ring_of(request: pytest.FixtureRequest) -> str:
    """The ring layout the plugin's ``virtio_device`` marker parametrised this run with."""
    return str(request.node.callspec.params["virtio_device"].ring)


def redriven(device: VirtioDriver, vm: Machine, driver: type[D], **options: Any) -> D:
    """The marker's driver as the ``driver`` class it is. With driver options the marker does not
    pass (``nr_ports=``, ``rx_buffers=``, ``interrupts=``...), it is closed and the device driven
    again with them."""
    if options:
        device.close()
        return vm.virtio(device.dev_id, driver, **options)
    assert isinstance(device, driver)
    return device


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs: no such process, or a zombie nobody has reaped yet.

    Our own children are reaped by Popen.wait; a grandchild orphaned by a SIGKILLed parent
    becomes a zombie until the container's init reaps it, which is dead enough.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")
