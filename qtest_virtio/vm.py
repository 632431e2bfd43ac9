"""The user-facing :class:`Machine`: the QEMU process plus the layers above it, wired lazily.

``machine.py`` knows only the process and its channels; this adapter adds ``.pci`` and
``.memory`` (and, later, virtio drivers) without the lower layer knowing them.
"""

from __future__ import annotations

from typing import TextIO

from .machine import MachineSpec, QemuMachine


class Machine(QemuMachine):
    """A started QEMU with ``.qtest``, ``.qmp``, ``.pci`` and ``.memory``; a context manager."""

    def __init__(self, spec: MachineSpec, *, qtest_log: TextIO | None = None) -> None:
        super().__init__(spec, qtest_log=qtest_log)

    def __enter__(self) -> Machine:
        self.start()
        return self
