#!/usr/bin/env python3
"""Where one device test's wall time goes, phase by phase (issue 16, item 3).

Runs pytest in this process, serially (no workers), on a selection (default: the rng
scenarios' first module), with a plugin that times pytest's phases (collection, setup, call,
teardown) and, inside setup and teardown, the machine's start path by wrapping its steps:

    spec      setup's first line to the workdir (fixture and spec work)
    workdir   make_workdir
    argv      build_argv (backends, sockets' paths)
    exec      process.spawn (Popen: fork and exec of QEMU)
    connect   process.accept (QEMU's start until it has connected to both sockets)
    ready     the first qtest reply (QEMU's main loop runs)
    find      vm.pci_function (enumeration, BAR assignment, finding the device's BDF)
    resume    Machine.resume (QMP ``cont`` on builds without the qtest accelerator)
    init      the driver's initialize() to DRIVER_OK
    rest      what setup spends outside those (virtio_requires checks, fixture bookkeeping)

and teardown's ``shutdown`` (posted writes answered, SIGTERM, pidfd wait, directory removed).
It also counts QMP negotiations per test. Medians per test over the selection are printed, and
the bare start (bench_qtest.Bare) measured alongside, one per test run, for comparison.
Timing on a shared machine is indicative: the load is printed with it.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rounds
from bench_qtest import Bare
from bench_suite import bare_specs

from qtest_virtio import vm as vm_module
from qtest_virtio.binary import QemuBinary
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.machine import machine as machine_module
from qtest_virtio.machine import process
from qtest_virtio.pci import PciBus

#: Steps timed inside another (printed under it): enumeration and BARs, QMP's negotiation, the signal.
NESTED = {"find": ("bars", "qmp-connect"), "shutdown": ("terminate",)}
SETUP_STEPS = ("spec", "workdir", "argv", "exec", "connect", "ready", "find", "resume", "init", "rest")


class Profiler:
    """A pytest plugin object: per-test phase times and start-path step times."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.current: str | None = None
        self.setup_start = 0.0
        self.first_step: float | None = None
        self.collect_start = 0.0
        self.collection = 0.0
        self.qmp_connects: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def add(self, step: str, seconds: float) -> None:
        if self.current is not None:
            self.tests[self.current][step] += seconds

    def wrap(self, owner: Any, name: str, step: str) -> None:
        original = getattr(owner, name)
        prof = self

        def timed(*args: Any, **kw: Any) -> Any:
            if prof.first_step is None:
                prof.first_step = time.perf_counter()
            t = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                prof.add(step, time.perf_counter() - t)

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def install(self) -> None:
        self.wrap(machine_module, "make_workdir", "workdir")
        self.wrap(machine_module, "build_argv", "argv")
        self.wrap(process, "spawn", "exec")
        self.wrap(process, "accept", "connect")
        self.wrap(machine_module.QtestClient, "endianness", "ready")
        self.wrap(vm_module.Machine, "pci_function", "find")
        self.wrap(machine_module.QemuMachine, "resume", "resume")
        self.wrap(VirtioDriver, "initialize", "init")
        self.wrap(machine_module.QemuMachine, "shutdown", "shutdown")
        self.wrap(PciBus, "assign_bars", "bars")
        self.wrap(machine_module.QemuMachine, "_connect_qmp", "qmp-connect")
        self.wrap(process, "terminate", "terminate")
        original = machine_module.QemuMachine._connect_qmp
        prof = self

        def counted(machine: Any, timeout: float) -> Any:
            if prof.current is not None:
                prof.qmp_connects[prof.current] += 1
            return original(machine, timeout)

        machine_module.QemuMachine._connect_qmp = counted  # type: ignore[method-assign]
        self._undo.append(lambda: setattr(machine_module.QemuMachine, "_connect_qmp", original))

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self) -> None:
        self.collect_start = time.perf_counter()

    def pytest_collection_finish(self) -> None:
        self.collection = time.perf_counter() - self.collect_start

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        self.current = item.nodeid
        self.first_step = None
        t = time.perf_counter()
        yield
        total = time.perf_counter() - t
        rec = self.tests[item.nodeid]
        rec["setup"] = total
        if self.first_step is not None:
            rec["spec"] = self.first_step - t
        inner = sum(rec[s] for s in SETUP_STEPS if s != "rest")
        rec["rest"] = total - inner

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.tests[item.nodeid]["call"] = time.perf_counter() - t

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.tests[item.nodeid]["teardown"] = time.perf_counter() - t

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        t = time.perf_counter()
        own, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        yield
        rec = self.tests[item.nodeid]
        rec["protocol"] = time.perf_counter() - t
        # QEMU's CPU time counts once it is reaped, in the test's teardown
        rec["cpu-python"] = _cpu(resource.RUSAGE_SELF) - own
        rec["cpu-qemu"] = _cpu(resource.RUSAGE_CHILDREN) - children
        self.current = None


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", default=None, help="QEMU binary (default: qemu-system-x86_64 on PATH)")
    ap.add_argument(
        "--select",
        action="append",
        metavar="TARGET",
        help="test files or node ids (repeatable; default scenarios/rng/test_rng.py)",
    )
    ap.add_argument("--bare", type=int, default=20, help="bare QEMU starts to compare with (default 20)")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args()
    binary = QemuBinary.get(args.qemu)
    load = rounds.Load()
    prof = Profiler()
    prof.install()
    wall = time.perf_counter()
    try:
        select = args.select or ["scenarios/rng/test_rng.py"]
        code = pytest.main(
            [*select, f"--qemu={binary.path}", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args.pytest_args],
            plugins=[prof],
        )
    finally:
        prof.uninstall()
    wall = time.perf_counter() - wall
    ran = {k: v for k, v in prof.tests.items() if v.get("exec")}
    if not ran:
        print("profile_test: no test started a QEMU", file=sys.stderr)
        return rounds.EXIT_USAGE
    specs = bare_specs(binary.path)
    bare, bare_cpu = [], []
    for i in range(args.bare):
        t, c = time.perf_counter(), _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
        Bare(specs[i % len(specs)]).close()
        bare.append(time.perf_counter() - t)
        bare_cpu.append(_cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - c)
    load.finish()

    def med(step: str) -> float:
        return statistics.median(v.get(step, 0.0) for v in ran.values()) * 1e3

    print(f"\n{binary.identity}")
    print(load.line())
    print(f"pytest exit {int(code)}; {len(ran)} tests started a QEMU; session wall {wall:.2f} s")
    print(f"collection {prof.collection * 1e3:.0f} ms")
    print(
        f"bare start (median of {args.bare}): {statistics.median(bare) * 1e3:.1f} ms wall, "
        f"{statistics.median(bare_cpu) * 1e3:.1f} ms CPU (QEMU and Python)"
    )
    print("per test, median ms:")
    for step in ("setup", *SETUP_STEPS, "call", "teardown", "shutdown", "protocol"):
        indent = "    " if step in SETUP_STEPS or step == "shutdown" else "  "
        print(f"{indent}{step:9} {med(step):7.2f}")
        for sub in NESTED.get(step, ()):
            print(f"      {sub:11} {med(sub):7.2f}")
    print(f"  CPU: Python {med('cpu-python'):.2f} ms, QEMU {med('cpu-qemu'):.2f} ms per test")
    per_test = statistics.median(prof.qmp_connects.get(k, 0) for k in ran)
    print(f"QMP negotiations per test (median): {per_test:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
