"""pytest plugin: options, markers and fixtures over the qtest_virtio library.

Thin by design (design.md): it turns options into MachineSpecs and machine state into reports;
all driver logic lives in the library. Registered through the ``pytest11`` entry point.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from _pytest._code.code import TerminalRepr, Traceback, TracebackStyle

import qtest_virtio
from qtest_virtio import Machine, MachineSpec, QemuCrashed, QemuStartError, QtestVirtioError
from qtest_virtio.app.exits import unwinds_on_default
from qtest_virtio.app.options import OptionError, machine_type, parse_flags, parse_refuse, parse_transports
from qtest_virtio.backends import BackendUnavailable
from qtest_virtio.binary import DEFAULT_QEMU, BadFlagValue, QemuBinary, QemuNotFound, UnknownFlag
from qtest_virtio.deviations import TABLE_ENV, Deviation, Status, TableError, table
from qtest_virtio.devices import registry
from qtest_virtio.devices.base import CORE_FEATURES, VirtioDriver
from qtest_virtio.machine import DeviceSpec, QemuMachine, watch_machines
from qtest_virtio.qtest import QtestClient
from qtest_virtio.transport import feature_bit
from qtest_virtio.transport.layout import FEATURE_BITS

from .ahead import AHEAD_KEY, NEXT_ITEM_KEY, Ahead, next_spec
from .migration import destination_qemu, migrate  # noqa: F401  (migrate: a fixture pytest finds here)
from .params import VirtioParam, virtio_params
from .stash import MACHINES_KEY, VIRTIO_MACHINE_KEY

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

PARAM_KEY = pytest.StashKey[VirtioParam]()
#: Every feature name a refusal may use: the reserved ones and each device's own.
KNOWN_FEATURES = frozenset(FEATURE_BITS.values()).union(*(t.values() for t in registry.feature_bits().values()))
#: Crashes the test's call phase already failed with, so teardown does not report them again.
REPORTED_CRASHES_KEY = pytest.StashKey[list[QemuCrashed]]()
#: The deviation table of this run (qtest_virtio.deviations), extra table file included.
DEVIATIONS_KEY = pytest.StashKey[dict[str, Deviation]]()

MARKERS = (
    "virtio_device(name, transports=..., flags={...}, pcie_root_port=False, iothread=False, hotplug=False, "
    "**backend): the virtio device a test drives (pcie_root_port: behind a q35 pcie-root-port; iothread: on an "
    "-object iothread; hotplug: plugged after start, behind a native hot-plug root port on q35, by ACPI on pc)",
    "virtio_requires(*features): skip where the device or binary cannot offer these features",
    "conformance(id, spec=section): ties a scenario to a row of the conformance matrix",
    "regression(id): names a regression scenario (QEMU behaviour, no spec requirement) for the deviation table",
    "virtual_clock: the test steps QEMU's virtual clock (clock_step); skips where the build has no "
    "qtest accelerator, and so no clock",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qtest-virtio", "QEMU qtest virtio harness")
    group.addoption(
        "--qemu", default=None, metavar="PATH", help="QEMU binary (also env QEMU; default: qemu-system-x86_64 on PATH)"
    )
    group.addoption(
        "--qemu-machine",
        default=None,
        type=machine_type,
        help="machine type: q35 (default), pc, or a versioned pc-q35-X.Y / pc-i440fx-X.Y (migration across versions)",
    )
    group.addoption(
        "--migrate-to",
        default=None,
        metavar="PATH",
        help="destination QEMU of the `migrate` fixture (also env QEMU_MIGRATE_TO; default: the --qemu binary)",
    )
    group.addoption(
        "--qemu-required",
        action="store_true",
        default=None,
        help="error, instead of skip, when no QEMU binary is found",
    )
    group.addoption(
        "--virtio-transport",
        default=None,
        metavar="LIST",
        help="transport modes to run: legacy, transitional-legacy, transitional-modern, modern, or all (default)",
    )
    group.addoption(
        "--virtio-flags",
        default=None,
        metavar="K=V,...",
        help="device properties for every virtio device a test starts (e.g. event_idx=off,packed=on)",
    )
    group.addoption(
        "--virtio-refuse",
        default=None,
        metavar="F,...",
        help="features the driver declines even when offered (e.g. EVENT_IDX,INDIRECT_DESC)",
    )
    group.addoption("--qtest-log", default=None, metavar="DIR", help="write each test's qtest command log to DIR")
    group.addoption(
        "--virtio-refuse-each",
        action="store_true",
        default=False,
        help="also run every virtio_device test once per feature its driver implements, with that feature "
        "refused on the driver side (modern layout, split ring)",
    )
    group.addoption(
        "--strict-deviations",
        action="store_true",
        default=None,
        help="make every known QEMU deviation a strict xfail, also on versions it was not verified on "
        "(an XPASS anywhere fails the run)",
    )
    group.addoption(
        "--deviations",
        default=None,
        metavar="FILE",
        help=f"an extra deviation table (JSON; also env {TABLE_ENV}): adds entries, or replaces those of the same id",
    )
    parser.addini("strict_deviations", "every known deviation a strict xfail", type="bool", default=False)
    parser.addini("virtio_transport", "transport modes to run (comma-separated, or all)", default="")
    parser.addini("virtio_flags", "device properties for every virtio device (K=V,...)", default="")
    parser.addini("virtio_refuse", "features the driver declines (F,...)", default="")
    parser.addini("qtest_log", "directory for per-test qtest command logs", default="")
    parser.addini("qemu", "QEMU binary (overridden by --qemu and $QEMU)", default="")
    parser.addini("qemu_machine", "machine type, q35 or pc", default="q35")
    parser.addini("qemu_required", "error instead of skip when QEMU is missing", type="bool", default=False)


_K_EQ_V = re.compile(r"(?<![\w.:-])([\w.-]+)=([\w.-]+)")


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    # pytest's -k grammar has no '=', but ids say "event_idx=off" (design.md): rewrite K=V to
    # K:V, which -k accepts, and give every parametrised item K:V keywords to match.
    _, flags, _ = _virtio_options(config)  # a malformed option is a usage error now, not a collection error
    _check_flag_values(config, flags)
    try:
        config.stash[DEVIATIONS_KEY] = table(config.getoption("--deviations"))
    except TableError as exc:
        raise pytest.UsageError(f"{exc}; fix the file or drop --deviations / ${TABLE_ENV}") from None
    keyword = getattr(config.option, "keyword", "")
    if keyword and "=" in keyword:
        config.option.keyword = _K_EQ_V.sub(r"\1:\2", keyword)
    # SIGTERM (CI cancelling, `kill`) would end Python without running teardown; make it an
    # exception so every machine's finally-block stops its QEMU and removes its directory.
    unwinds_on_default(signal.SIGTERM)
    config.stash[AHEAD_KEY] = Ahead()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Remember the next item (ahead.py launches its QEMU); after the last, drop what is held."""
    item.stash[NEXT_ITEM_KEY] = nextitem
    yield
    if nextitem is None:
        item.config.stash[AHEAD_KEY].drop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """No machine launched ahead outlives the run (an interrupt, -x, a failed worker)."""
    ahead = session.config.stash.get(AHEAD_KEY, None)
    if ahead is not None:
        ahead.drop()


def _virtio_options(config: pytest.Config) -> tuple[tuple[str, ...], dict[str, str], frozenset[str]]:
    """(modes, flags, refusals) from the options, else the ini keys; a bad one is a usage error."""
    try:
        transports = parse_transports(config.getoption("--virtio-transport") or config.getini("virtio_transport"))
        flags = parse_flags(config.getoption("--virtio-flags") or config.getini("virtio_flags"))
        refuse = parse_refuse(config.getoption("--virtio-refuse") or config.getini("virtio_refuse"))
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None
    unknown = sorted(refuse - KNOWN_FEATURES)
    if unknown:
        raise pytest.UsageError(
            f"--virtio-refuse: unknown feature {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_FEATURES))}"
        )
    return transports, flags, refuse


def _check_flag_values(config: pytest.Config, flags: dict[str, str]) -> None:
    """A value its property's type does not take (``event_idx=maybe``) is a usage error, told
    before anything runs; where there is no binary the tests skip anyway."""
    if not flags:
        return
    try:
        binary = QemuBinary.get(_qemu_option(config))
    except QemuStartError:  # no binary, or not QEMU: the tests say so (skip or --qemu-required)
        return
    try:
        binary.check_flag_values(flags, registry.drivers())
    except BadFlagValue as exc:
        raise pytest.UsageError(f"--virtio-flags: {exc}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests using ``virtio_device`` run once per selected transport mode and ring layout."""
    if "virtio_device" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("virtio_device")
    if marker is None or not marker.args:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid} uses the virtio_device fixture without "
            '@pytest.mark.virtio_device("DEVICE") naming the device it drives'
        )
    transports, flags, refuse = _virtio_options(metafunc.config)
    device = str(marker.args[0])
    try:  # the test file is wrong whatever the binary: a collection error, never a skip
        info = registry.lookup(device)
    except registry.UnknownDevice:
        close = difflib.get_close_matches(device, list(registry.drivers()), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise pytest.Collector.CollectError(
            f"{metafunc.definition.nodeid}: @pytest.mark.virtio_device({device!r}) names no device qtest-virtio "
            f"drives; {hint}(devices: {', '.join(registry.drivers())}, also as -transitional/-non-transitional)"
        ) from None
    refuse_each: tuple[str, ...] = ()
    if metafunc.config.getoption("--virtio-refuse-each"):
        cls = info.driver
        refuse_each = tuple(sorted((CORE_FEATURES - {"VERSION_1"}) | set(cls.FEATURES)))
    try:
        params = virtio_params(
            device,
            selected_modes=transports,
            option_flags=flags,
            option_refuse=refuse,
            marker_kwargs=marker.kwargs,
            refuse_each=refuse_each,
        )
    except OptionError as exc:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: {exc}") from None
    metafunc.parametrize(
        "virtio_device",
        [pytest.param(p, id=p.id) for p in params],
        indirect=True,
    )


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


@pytest.fixture(scope="session")
def deviation_table(pytestconfig: pytest.Config) -> dict[str, Deviation]:
    """The deviation table of this run (qtest_virtio.deviations, with --deviations FILE applied)."""
    return pytestconfig.stash[DEVIATIONS_KEY]


MachineFactory = Callable[..., Machine]


@pytest.fixture
def machine_factory(request: pytest.FixtureRequest, qemu_binary: QemuBinary) -> Iterator[MachineFactory]:
    """Start machines: ``machine_factory(spec)`` or ``machine_factory(machine=..., memory=...)``.

    Every machine started is shut down after the test (a crash then fails the test's teardown),
    and its state goes into the failure report's ``qemu`` section.
    """
    if request.node.get_closest_marker("virtual_clock") and not qemu_binary.has_qtest_accel:
        pytest.skip(f"virtual clock not available on this build (no qtest accelerator): {qemu_binary.identity}")
    started: list[QemuMachine] = []
    request.node.stash[MACHINES_KEY] = started

    def factory(spec: MachineSpec | None = None, **spec_kwargs: Any) -> Machine:
        if spec is None:
            spec_kwargs.setdefault("machine", _machine_option(request.config))
            spec = MachineSpec(qemu=qemu_binary.path, **spec_kwargs)
        elif spec.qemu is None:
            spec.qemu = qemu_binary.path
        log_dir = request.config.getoption("--qtest-log") or request.config.getini("qtest_log")
        log = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            name = request.node.nodeid.replace("/", "_").replace("::", "__")
            suffix = f".{len(started)}" if started else ""
            log = open(os.path.join(log_dir, f"{name}{suffix}.qtest.log"), "w")  # noqa: SIM115
            request.addfinalizer(log.close)
        ahead = request.config.stash[AHEAD_KEY]
        use_ahead = not started and log is None  # a log starts with the first command: no launch ahead
        vm = (ahead.take(spec) if use_ahead else None) or Machine(spec, qtest_log=log)
        started.append(vm)
        vm.start()
        if use_ahead:
            _launch_next(request, ahead, qemu_binary)
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


def _launch_next(request: pytest.FixtureRequest, ahead: Ahead, qemu_binary: QemuBinary) -> None:
    """Launch the next test's machine now, while this test runs (ahead.py)."""
    nextitem = request.node.stash.get(NEXT_ITEM_KEY, None)
    config = request.config

    def virtio_spec(item: pytest.Item) -> MachineSpec:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("virtio_device") if callspec is not None else None
        return plan_virtio(param, item.nodeid, config, qemu_binary).spec

    def default_spec() -> MachineSpec:
        return MachineSpec(qemu=qemu_binary.path, machine=_machine_option(config))

    spec = next_spec(nextitem, qemu_binary, virtio_spec=virtio_spec, default_spec=default_spec)
    if spec is not None:
        ahead.launch(spec)


@dataclass
class VirtioPlan:
    """What the ``virtio_device`` fixture starts for one test, decided before QEMU starts."""

    param: VirtioParam
    spec: MachineSpec
    dev: DeviceSpec
    hotplug: bool
    driver_kwargs: dict[str, Any]


def plan_virtio(param: object, nodeid: str, config: pytest.Config, qemu_binary: QemuBinary) -> VirtioPlan:
    """The machine of a ``virtio_device`` test (its parameter), or a skip: the same for the
    test's own setup and for launching its QEMU ahead (ahead.py)."""
    if not isinstance(param, VirtioParam):
        raise pytest.UsageError(f"{nodeid}: virtio_device needs @pytest.mark.virtio_device(...)")
    if param.skip:
        pytest.skip(param.skip)
    flags = param.flag_dict
    extra = dict(param.extra)
    options = registry.lookup(param.device).driver.option_names()  # the rest go to the MachineSpec
    driver_kwargs = {k: extra.pop(k) for k in list(extra) if k in options}
    spec = MachineSpec(qemu=qemu_binary.path, machine=_machine_option(config))
    hotplug = bool(extra.pop("hotplug", False))
    placement = _placement(param.device, spec, extra)
    try:  # decided before QEMU starts: a flag this binary lacks is a skip, not a failure
        qemu_binary.check_properties(param.device, [*flags, *placement])
    except UnknownFlag as exc:
        pytest.skip(f"{qemu_binary.path} cannot run this: {exc}")
    extra.update(placement)
    dev = spec.add_virtio(param.device, flags, mode=param.mode, hotplug=hotplug, **extra)
    return VirtioPlan(param, spec, dev, hotplug, driver_kwargs)


@pytest.fixture
def virtio_device(
    request: pytest.FixtureRequest, machine_factory: MachineFactory, qemu_binary: QemuBinary
) -> VirtioDriver:
    """The driver of the device the ``virtio_device`` marker names, at DRIVER_OK with its
    queues ready, on a fresh machine; parametrised over transport modes and ring layouts."""
    plan = plan_virtio(getattr(request, "param", None), request.node.nodeid, request.config, qemu_binary)
    param, dev = plan.param, plan.dev
    request.node.stash[PARAM_KEY] = param
    try:
        vm = machine_factory(plan.spec)
    except BackendUnavailable as exc:  # this host cannot make the backend (a tap without root)
        pytest.skip(f"cannot run here: {exc}")
    request.node.stash[VIRTIO_MACHINE_KEY] = vm
    if plan.hotplug:  # what a test of unplug needs: qemu.unplug(virtio_device.dev_id), qemu.plug(...)
        vm.plug(dev.id)
    # A refusal names a reserved feature or one device's own: each device gets those it has.
    own = set(FEATURE_BITS.values()) | set(registry.lookup(param.device).feature_bits.values())
    driver = vm.virtio(dev.id, VirtioDriver, refuse=param.refuse & own, **plan.driver_kwargs)
    requires = request.node.get_closest_marker("virtio_requires")
    for feature in requires.args if requires else ():
        bit = feature_bit(feature, driver.device_bits)
        if not driver.negotiated.offered >> bit & 1:
            pytest.skip(f"{param.device} in mode {param.mode} does not offer {feature}")
        if feature in param.refuse:
            pytest.skip(f"{feature} is refused on the driver side in this run")
        if not driver.has(feature):
            pytest.skip(f"{feature} was not negotiated in this run (a feature it depends on is off)")
    return driver


#: Where the virtio_device marker can place the device beyond the machine's root bus.
ROOT_PORT_ID = "rp0"
IOTHREAD_ID = "io0"


def _placement(device: str, spec: MachineSpec, extra: dict[str, Any]) -> dict[str, str]:
    """The marker's ``pcie_root_port=True`` (the device behind a ``pcie-root-port`` of q35: a
    PCI Express endpoint) and ``iothread=True`` (an ``-object iothread`` the device's
    ``iothread`` property names: virtio-blk/-scsi dataplane, virtio-balloon's free page
    hinting) as spec additions; returns the device properties they need (params.py checked
    the values are bools). A device without an ``iothread`` property is a skip, as any flag the
    binary lacks (the caller checks them against ``-device NAME,help``)."""
    props: dict[str, str] = {}
    if extra.pop("pcie_root_port", False):
        if "q35" not in spec.machine:
            pytest.skip(f"pcie_root_port needs the q35 machine (PCI Express), not {spec.machine}")
        spec.add_device("pcie-root-port", id=ROOT_PORT_ID, chassis=1, slot=1)
        props["bus"] = ROOT_PORT_ID
    if extra.pop("iothread", False):
        spec.extra_args += ["-object", f"iothread,id={IOTHREAD_ID}"]
        props["iothread"] = IOTHREAD_ID
    return props


@pytest.fixture
def qemu(request: pytest.FixtureRequest, machine_factory: MachineFactory) -> Machine:
    """A started Machine: the one a ``virtio_device`` test drives, else one with the default
    spec (no devices beyond the machine's own)."""
    if "virtio_device" in request.fixturenames:
        request.getfixturevalue("virtio_device")
        vm: Machine = request.node.stash[VIRTIO_MACHINE_KEY]
        return vm
    return machine_factory()


@pytest.fixture
def qtest(qemu: Machine) -> QtestClient:
    """The qtest client of the ``qemu`` fixture's machine."""
    return qemu.qtest


@pytest.fixture
def qmp(qemu: Machine) -> QEMUMonitorProtocol:
    """The QMP client (qemu.qmp) of the ``qemu`` fixture's machine."""
    return qemu.qmp


def qemu_report(vm: QemuMachine) -> str:
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keywords for -k, properties for JUnit XML and the run summary (set at collection, so a
    test skipped before QEMU starts still says what it would have run), and the xfails of the
    deviation table for the binary under test."""
    version = _binary_version(config)
    for item in items:
        conformance = item.get_closest_marker("conformance")
        if conformance is not None and conformance.args:
            item.user_properties.append(("conformance", str(conformance.args[0])))
            item.user_properties.append(("spec", str(conformance.kwargs.get("spec", ""))))
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("virtio_device") if callspec else None
        if isinstance(param, VirtioParam):
            item.extra_keyword_matches.update(f"{k}:{v}" for k, v in param.id_flags)
            item.extra_keyword_matches.update(("-".join((param.device, param.mode)), param.ring))
            item.user_properties += [
                ("virtio_device", param.device),
                ("virtio_transport", str(param.mode)),
                ("virtio_ring", str(param.ring)),
                ("virtio_flags", ",".join(f"{k}={v}" for k, v in param.flags)),
                ("virtio_id_flags", ",".join(f"{k}={v}" for k, v in param.id_flags)),
                ("virtio_refuse", ",".join(sorted(param.refuse))),
                ("virtio_refuse_each", "1" if param.refuse_each else ""),
            ]
        if version is not None:
            _mark_deviation(config, item, version, param if isinstance(param, VirtioParam) else None)


def _binary_version(config: pytest.Config) -> tuple[int, int, int] | None:
    """The version of the binary under test, or None when there is none (tests skip then)."""
    try:
        return QemuBinary.get(_qemu_option(config)).version
    except QemuNotFound:
        return None


def _destination_version(config: pytest.Config) -> tuple[int, int, int] | None:
    """The version of the ``migrate`` fixture's destination binary (None: the binary under test)."""
    path = destination_qemu(config)
    try:
        return QemuBinary.get(path).version if path else None
    except QemuNotFound:
        return None


def _strict_deviations(config: pytest.Config) -> bool:
    opt = config.getoption("--strict-deviations")
    return bool(opt) if opt is not None else bool(config.getini("strict_deviations"))


def _mark_deviation(
    config: pytest.Config, item: pytest.Item, version: tuple[int, int, int], param: VirtioParam | None
) -> None:
    """A table entry for this test (its conformance or regression id, or a reproducer's file stem) that holds
    for this run: a strict xfail where verified on this version (or with --strict-deviations),
    a non-strict one where unverified; nothing where fixed or not yet there (it must pass)."""
    conformance = item.get_closest_marker("conformance") or item.get_closest_marker("regression")
    key = str(conformance.args[0]) if conformance is not None and conformance.args else None
    if isinstance(item, ReproducerItem):
        key = item.name
    entry = config.stash[DEVIATIONS_KEY].get(key) if key else None
    if entry is None:
        return
    if param is not None and not entry.when.matches(
        transport=param.mode, ring=param.ring, flags=param.flag_dict, refused=param.refuse
    ):
        return
    if entry.side == "destination":  # a migration's load side: the --migrate-to binary's version
        version = _destination_version(config) or version
    status = entry.status(version)
    item.user_properties += [("deviation", entry.id), ("deviation_status", status.value)]
    if status.live:
        strict = status is Status.VERIFIED or _strict_deviations(config)
        item.add_marker(pytest.mark.xfail(strict=strict, reason=entry.describe(version)))


def pytest_collect_file(file_path: Any, parent: pytest.Collector) -> pytest.Collector | None:
    """``*.qtest`` files in a ``reproducers`` directory are tests that pass when QEMU survives."""
    if file_path.suffix == ".qtest" and file_path.parent.name == "reproducers":
        return ReproducerFile.from_parent(parent, path=file_path)
    return None


class ReproducerFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        yield ReproducerItem.from_parent(self, name=self.path.stem)


class ReproducerItem(pytest.Item):
    """Replays one bug-report reproducer (qtest_virtio.reproducer) against the binary under test."""

    def runtest(self) -> None:
        # The replay starts its own machine: the failure report's ``qemu`` section needs it.
        with watch_machines() as started:
            self.stash[MACHINES_KEY] = started
            self._replay()

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        """A reproducer fails with QEMU's story (the message and the ``qemu`` section), not
        pytest's: a pytest-timeout inside the replay would otherwise print every frame from
        pytest's runner through pluggy to the wait it interrupted (~1000 lines). Only an
        error of the harness itself keeps a traceback, from ``runtest`` on."""
        exc = excinfo.value
        if isinstance(exc, pytest.fail.Exception) and not exc.pytrace:
            return super().repr_failure(excinfo, style)  # the verdict runtest wrote
        if isinstance(exc, pytest.fail.Exception | QtestVirtioError):
            where = _harness_frame(excinfo)
            return f"{type(exc).__name__}: {exc}" + (f"\n(interrupted in {where})" if where else "")
        return super().repr_failure(excinfo, style="short")

    def _traceback_filter(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Traceback:
        return excinfo.traceback.cut(path=__file__).filter(excinfo)

    def _replay(self) -> None:
        from qtest_virtio.outcome import Outcome
        from qtest_virtio.reproducer import describe, load, replay

        try:
            binary = QemuBinary.get(_qemu_option(self.config))
        except QemuNotFound as exc:
            if _required(self.config):
                pytest.fail(str(exc), pytrace=False)
            pytest.skip(f"no QEMU binary: {exc}")
        rep = load(str(self.path))
        # "# timeout: S" bounds a reproducer of a hang (the default is replay's 10 s).
        timeouts = [c[len("timeout:") :].strip() for c in rep.comments if c.startswith("timeout:")]
        result = replay(rep, qemu=binary.path, timeout=float(timeouts[0]) if timeouts else 10.0)
        self.user_properties.append(("reproducer_outcome", result.outcome.value))  # a plain str for xdist
        if result.outcome is Outcome.CANNOT_RUN:
            pytest.skip(describe(result, rep))
        # A bug this QEMU still has is an entry of the deviation table (an xfail marker, set at
        # collection): failing here is then the expected outcome, and surviving an XPASS.
        if result.outcome is not Outcome.SURVIVED:
            details = "\n".join([describe(result, rep), *result.notes, result.stderr_tail, result.command_line])
            pytest.fail(details, pytrace=False)

    def reportinfo(self) -> tuple[Any, int, str]:
        return self.path, 0, f"reproducer {self.name}"


_LIBRARY_DIR = os.path.dirname(qtest_virtio.__file__)


def _harness_frame(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    """``function (file:line)`` of the innermost library frame the exception came through:
    for a timeout, what the harness was waiting on."""
    for entry in reversed(excinfo.traceback):
        path = str(entry.path)
        if path.startswith(_LIBRARY_DIR + os.sep):
            return f"{entry.name} ({os.path.relpath(path, os.path.dirname(_LIBRARY_DIR))}:{entry.lineno + 1})"
    return ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
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
