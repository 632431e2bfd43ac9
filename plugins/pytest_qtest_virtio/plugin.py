"""pytest plugin: options, markers and fixtures over the qtest_virtio library.

Thin by design (design.md): it turns options into MachineSpecs and machine state into reports;
all driver logic lives in the library. Registered through the ``pytest11`` entry point.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qtest_virtio import Machine, MachineSpec, QemuCrashed
from qtest_virtio.binary import DEFAULT_QEMU, QemuBinary, QemuNotFound

MACHINES_KEY = pytest.StashKey[list[Machine]]()
#: Crashes the test's call phase already failed with, so teardown does not report them again.
REPORTED_CRASHES_KEY = pytest.StashKey[list[QemuCrashed]]()

MARKERS = (
    "virtio_device(name, transports=..., flags={...}, **backend): the virtio device a test drives",
    "virtio_requires(*features): skip where the device or binary cannot offer these features",
    "conformance(id, spec=section): ties a scenario to a row of the conformance matrix",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qtest-virtio", "QEMU qtest virtio harness")
    group.addoption(
        "--qemu", default=None, metavar="PATH", help="QEMU binary (also env QEMU; default: qemu-system-x86_64 on PATH)"
    )
    group.addoption("--qemu-machine", default=None, choices=("q35", "pc"), help="machine type (default q35)")
    group.addoption(
        "--qemu-required",
        action="store_true",
        default=None,
        help="error, instead of skip, when no QEMU binary is found",
    )
    parser.addini("qemu", "QEMU binary (overridden by --qemu and $QEMU)", default="")
    parser.addini("qemu_machine", "machine type, q35 or pc", default="q35")
    parser.addini("qemu_required", "error instead of skip when QEMU is missing", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    # SIGTERM (CI cancelling, `kill`) would end Python without running teardown; make it an
    # exception so every machine's finally-block stops its QEMU and removes its directory.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(signal.SIGTERM, _sigterm)


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _qemu_option(config: pytest.Config) -> str | None:
    return config.getoption("--qemu") or os.environ.get("QEMU") or config.getini("qemu") or None


def _machine_option(config: pytest.Config) -> str:
    return str(config.getoption("--qemu-machine") or config.getini("qemu_machine") or "q35")


def _required(config: pytest.Config) -> bool:
    opt = config.getoption("--qemu-required")
    return bool(opt) if opt is not None else bool(config.getini("qemu_required"))


@pytest.fixture(scope="session")
def qemu_binary(pytestconfig: pytest.Config) -> QemuBinary:
    """The QEMU binary under test; skips (or errors with --qemu-required) when there is none."""
    try:
        return QemuBinary.get(_qemu_option(pytestconfig))
    except QemuNotFound as exc:
        looked_for = _qemu_option(pytestconfig) or DEFAULT_QEMU
        if _required(pytestconfig):
            pytest.fail(f"--qemu-required: {exc}", pytrace=False)
        pytest.skip(f"no QEMU binary (looked for {looked_for!r}): {exc}")


MachineFactory = Callable[..., Machine]


@pytest.fixture
def machine_factory(request: pytest.FixtureRequest, qemu_binary: QemuBinary) -> Iterator[MachineFactory]:
    """Start machines: ``machine_factory(spec)`` or ``machine_factory(machine=..., memory=...)``.

    Every machine started is shut down after the test (a crash then fails the test's teardown),
    and its state goes into the failure report's ``qemu`` section.
    """
    started: list[Machine] = []
    request.node.stash[MACHINES_KEY] = started

    def factory(spec: MachineSpec | None = None, **spec_kwargs: Any) -> Machine:
        if spec is None:
            spec_kwargs.setdefault("machine", _machine_option(request.config))
            spec = MachineSpec(qemu=qemu_binary.path, **spec_kwargs)
        elif spec.qemu is None:
            spec.qemu = qemu_binary.path
        vm = Machine(spec)
        started.append(vm)
        vm.start()
        return vm

    yield factory
    errors: list[QemuCrashed] = []
    reported = request.node.stash.get(REPORTED_CRASHES_KEY, [])
    for vm in reversed(started):
        try:
            vm.shutdown(check=True)
        except QemuCrashed as exc:
            if not any(exc is seen for seen in reported):
                errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def qemu(machine_factory: MachineFactory) -> Machine:
    """A started Machine with the default spec (no devices beyond the machine's own)."""
    return machine_factory()


@pytest.fixture
def qtest(qemu: Machine) -> Any:
    """The qtest client of the ``qemu`` fixture's machine."""
    return qemu.qtest


@pytest.fixture
def qmp(qemu: Machine) -> Any:
    """The QMP client (qemu.qmp) of the ``qemu`` fixture's machine."""
    return qemu.qmp


def qemu_report(vm: Machine) -> str:
    """The ``qemu`` report section: command line, exit, stderr tail, last qtest commands."""
    crash = vm.crash
    lines = ["command line (qtest on stdio):", "    " + vm.command_line()]
    from qtest_virtio.errors import describe_exit

    lines.append(f"status: {describe_exit(crash.returncode) if crash else describe_exit(vm.returncode)}")
    tail = crash.stderr_tail if crash else vm.stderr_tail()
    if tail.strip():
        lines += ["QEMU stderr (tail):"] + ["    " + t for t in tail.splitlines()]
    cmds = crash.last_commands if crash else (vm.qtest.last_commands() if vm._qtest else [])
    if cmds:
        lines += ["last qtest commands:"] + ["    " + c for c in cmds]
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and call.excinfo is not None and isinstance(call.excinfo.value, QemuCrashed):
        item.stash.setdefault(REPORTED_CRASHES_KEY, []).append(call.excinfo.value)
    if not report.failed:
        return
    machines = item.stash.get(MACHINES_KEY, [])
    for n, vm in enumerate(machines):
        if not vm.argv:
            continue
        name = "qemu" if len(machines) == 1 else f"qemu {n}"
        report.sections.append((name, qemu_report(vm)))
