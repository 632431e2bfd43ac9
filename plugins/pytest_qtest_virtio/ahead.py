"""The next test's QEMU, launched while this test runs.

A QEMU takes tens of milliseconds to start, most of it before its first qtest reply, and a
scenario's own work after that is shorter still. So when a test's machine is up, the plugin
spawns the machine the next test will ask for (``Machine.launch``: no wait), and the next test's
first ``machine_factory`` call takes it when it asks for the same spec (``MachineSpec.same_as``).
Every test still gets a QEMU started for it alone, from its own command line, never one another
test touched: only the start moves earlier. A spec that cannot be known from the next item (a
test building its own) is not guessed beyond the defaults; a wrong guess is shut down unused, and
so is a machine launched while the environment differed (a test's monkeypatched variables).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable

import pytest

from qtest_virtio import Machine, MachineSpec, QtestVirtioError
from qtest_virtio.binary import QemuBinary

#: The next item (pytest_runtest_protocol's ``nextitem``) of the item running now.
NEXT_ITEM_KEY = pytest.StashKey["pytest.Item | None"]()
#: The run's (one per process: each xdist worker has its own).
AHEAD_KEY = pytest.StashKey["Ahead"]()


class Ahead:
    """At most one machine launched for the next test, with the spec it was launched for."""

    def __init__(self) -> None:
        self._vm: Machine | None = None
        self._spec: MachineSpec | None = None
        #: The environment it was launched in (a test's monkeypatched variables are not the next's).
        self._env: dict[str, str] = {}
        #: Machines launched, taken by their test, and shut down unused.
        self.launched = self.taken = self.wasted = 0

    def take(self, spec: MachineSpec) -> Machine | None:
        """The machine launched for ``spec`` (to be ``start()``-ed), or None; a machine launched
        for another spec is shut down."""
        vm, launched_for = self._vm, self._spec
        if vm is None or launched_for is None:
            return None
        if not (launched_for.same_as(spec) and self._env == _environment()):
            self.drop()
            return None
        self._vm = self._spec = None
        self.taken += 1
        return vm

    def launch(self, spec: MachineSpec) -> None:
        """Spawn the machine for ``spec`` (the one held before is shut down). A failure here
        (a backend this host cannot make) is left for the test's own start to report."""
        self.drop()
        planned = copy.deepcopy(spec)  # what the next test must ask for, whatever ``spec`` becomes
        vm = Machine(spec)
        try:
            vm.launch()
        except (OSError, QtestVirtioError):
            return
        self._vm, self._spec, self._env = vm, planned, _environment()
        self.launched += 1

    def drop(self) -> None:
        """Shut down the machine held (the run ends, or no test will take it)."""
        vm, self._vm, self._spec = self._vm, None, None
        if vm is not None:
            self.wasted += 1
            vm.shutdown(check=False)


def _environment() -> dict[str, str]:
    """The variables a launch sees, without the one pytest changes for every test itself."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


def will_run(item: pytest.Item) -> bool:
    """Whether the item's setup gets as far as its machine, as far as its marks tell (a
    ``skip`` mark or an ``xfail(run=False)`` never does; ``skipif`` is left to the guess)."""
    if item.get_closest_marker("skip") is not None:
        return False
    return all(m.kwargs.get("run", True) for m in item.iter_markers("xfail"))


def next_spec(
    item: pytest.Item | None,
    binary: QemuBinary,
    *,
    virtio_spec: Callable[[pytest.Item], MachineSpec],
    default_spec: Callable[[], MachineSpec],
) -> MachineSpec | None:
    """The spec the item's first machine will have, when its fixtures decide it: a
    ``virtio_device`` test's (``virtio_spec``; a skip there is no machine), or the default one
    of a test that takes ``qemu`` (or ``qtest``/``qmp``) and nothing that builds its own."""
    if item is None or not will_run(item):
        return None
    if item.get_closest_marker("virtual_clock") is not None and not binary.has_qtest_accel:
        return None
    names = set(getattr(item, "fixturenames", ()))
    try:
        if "virtio_device" in names:
            return virtio_spec(item)
        if names & {"qemu", "qtest", "qmp"} and "machine_factory" not in _requested(item):
            return default_spec()
    except (pytest.skip.Exception, pytest.UsageError, QtestVirtioError, ValueError, KeyError):
        return None
    return None


def _requested(item: pytest.Item) -> set[str]:
    """The fixtures the test function names itself (not those its fixtures pull in)."""
    function = getattr(item, "function", None)
    if function is None:
        return {"machine_factory"}  # not a test function: nothing to go by
    return set(inspect.signature(function).parameters)
