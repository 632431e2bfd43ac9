"""The user-facing :class:`Machine`: the QEMU process plus the layers above it, wired lazily.

``machine.py`` knows only the process and its channels; this adapter adds ``.pci`` and
``.memory`` (and, later, virtio drivers) without the lower layer knowing them.
"""

from __future__ import annotations

from typing import TextIO

from .machine import MachineSpec, QemuMachine
from .memory import GuestMemory
from .pci import PciBus


class Machine(QemuMachine):
    """A started QEMU with ``.qtest``, ``.qmp``, ``.pci`` and ``.memory``; a context manager."""

    def __init__(self, spec: MachineSpec, *, qtest_log: TextIO | None = None) -> None:
        super().__init__(spec, qtest_log=qtest_log)
        self._pci: PciBus | None = None
        self._memory: GuestMemory | None = None

    def __enter__(self) -> Machine:
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
