"""The fuzzing engine: hypothesis strategies over the actions, the runner (one example on a fresh
machine: initialize, abuse, check, reset, check a valid request), the failure signature and the
shrinker that keeps the smallest failing example.

The runner checks that QEMU

- is alive and printed no assertion or sanitizer text (``machine.CRASH_MARKERS``),
- answers a qtest round trip within a bound (else: hung),
- after a device reset (``driver.initialize()``), serves a valid request (else: unrecovered),

with the classifier replay uses (:class:`~qtest_virtio.outcome.Judge`). Where the spec says what
a device must do but QEMU does otherwise (an error reported without DEVICE_NEEDS_RESET, virtio
1.2 §2.1.2), the runner records an :class:`Observation` and does not fail.

A :class:`~.actions.Migrate` action (``FuzzConfig.migrate``) live-migrates the machine to a fresh
QEMU mid-sequence (:func:`migrate`, shared with replay): the source saves the state the hostile
driver left, the destination loads it, and the judge follows the machine that runs on. The
recording follows it too: the reproducer gets a ``# qtest-virtio: migrate`` line there.

hypothesis is imported inside functions only, so ``import qtest_virtio`` stays light.
"""

from __future__ import annotations

import re
import shlex
import time
from collections import Counter
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .. import modes
from ..errors import MigrationError, QemuCrashed, QtestTimeout, QtestVirtioError, describe_exit
from ..groups import Span, spans_of_sends
from ..machine import MachineSpec, QemuMachine, watch_machines
from ..machine.qdev import HotplugError
from ..outcome import Judge, Outcome, check_recovery, settle
from ..pci.regs import CONFIG_SPACE_SIZE
from ..qtest import QtestClient
from ..transport import VirtioPciMap
from ..transport.layout import STATUS
from ..virtqueue.layout import SPLIT_AVAIL
from ..vm import Machine
from . import actions as act
from .actions import U16, U32, Action, Target, Valid
from .observe import Observation
from .observe import normal as _normal
from .observe import observe_errors as _observe_errors
from .targets import DEVICE_ID, DEVICES, make_target

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

#: The ring layouts a campaign covers: all of them (modes.RINGS).
RINGS = modes.RINGS


def actions_strategy(
    max_actions: int = 8, *, migrate: bool = False, unplug: bool = False
) -> SearchStrategy[list[Action]]:
    """Lists of hostile actions. Values are abstract (indices taken modulo the target's
    windows and queue size), so one strategy serves every device, mode and ring. With
    ``migrate``, a live migration (:class:`~.actions.Migrate`) is one more action; with
    ``unplug``, a hot-unplug (:class:`~.actions.Unplug`)."""
    from hypothesis import strategies as st

    def boundary(bits: int) -> SearchStrategy[int]:
        top = (1 << bits) - 1
        return st.one_of(st.sampled_from([0, 1, 2, 3, top, top - 1, 1 << (bits - 1)]), st.integers(0, top))

    addr = st.builds(act.Addr, st.sampled_from(act.ADDR_KINDS), st.integers(0, 0xFFFF))
    desc_flags = st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0x80, 0x81, 0x8000, 0x8080, 0x8082]), st.integers(0, U16)
    )
    length = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 48, 512, U32, U32 - 15, 1 << 31]), st.integers(0, U32))
    desc = st.builds(
        act.Desc,
        slot=st.integers(0, 1024),
        addr=addr,
        length=length,
        flags=desc_flags,
        next=st.one_of(st.integers(0, 1024), boundary(16)),
    )
    queue = st.one_of(st.integers(0, 4), boundary(16))
    queue_size = st.one_of(st.sampled_from([0, 1, 3, 5, 255, 256, 257, 1024, 0x8000, 0xFFFF]), boundary(16))
    status = st.one_of(st.sampled_from([0, 1, 3, 0xB, 0xF, 0x40, 0x80, 0xFF, 4, 8]), st.integers(0, 0xFF))
    actions: SearchStrategy[Action] = st.one_of(
        st.builds(
            act.RegAccess,
            window=st.integers(0, 7),
            offset=st.integers(0, 0x1100),
            width=st.sampled_from([1, 2, 4, 8]),
            write=st.booleans(),
            value=boundary(64),
        ),
        st.builds(act.StatusWrites, st.lists(status, min_size=1, max_size=4).map(tuple)),
        st.builds(
            act.QueueConfig,
            queue=queue,
            size=queue_size,
            addrs=st.none() | st.tuples(addr, addr, addr),
            enable=st.booleans(),
        ),
        st.builds(act.MsixVector, queue=st.none() | queue, vector=boundary(16)),
        st.builds(act.Features, low=boundary(32), high=boundary(32), select=boundary(32), reset_first=st.booleans()),
        st.builds(act.ResetInFlight, queue_reset=st.booleans(), slot=st.integers(0, 1024)),
        st.builds(
            act.DescChain,
            descs=st.lists(desc, min_size=1, max_size=6).map(tuple),
            table=st.lists(desc, max_size=4).map(tuple),
            head=st.none() | boundary(16),
            jump=st.one_of(st.sampled_from([1, 2, 0, 256, 257, 0x8000, U16]), st.integers(0, U16)),
            notify=st.just(True) | st.booleans(),
        ),
        st.builds(act.EventWrite, st.sampled_from(act.EVENT_FIELDS), boundary(16), st.booleans()),
        st.builds(act.Notify, queue),
        st.just(act.Valid()),
        st.builds(act.IdReuse, st.integers(2, 3), st.integers(0, 1024)),
        st.builds(act.LongChain, st.booleans(), st.sampled_from([1, 2, 64]), st.sampled_from([0, 1, 16, 512])),
        st.builds(act.MisshapenRequest, st.sampled_from(act.REQUEST_SHAPES)),
        st.builds(
            act.PciConfig,
            offset=st.one_of(st.integers(0, 0x3F), st.integers(0, CONFIG_SPACE_SIZE - 1)),
            width=st.sampled_from([1, 2, 4]),
            write=st.booleans(),
            value=boundary(32),
        ),
        st.builds(
            act.PciCfgWindow,
            bar=st.one_of(st.integers(0, 6), boundary(8)),
            offset=boundary(32),
            length=st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8]), boundary(32)),
            width=st.sampled_from([1, 2, 4]),
            write=st.booleans(),
            value=boundary(32),
        ),
        st.builds(
            act.MsixAccess,
            pba=st.booleans(),
            offset=st.integers(0, 0x1000),
            width=st.sampled_from([1, 2, 4, 8]),
            write=st.booleans(),
            value=boundary(64),
        ),
    )
    if migrate:
        actions = st.one_of(actions, st.just(act.Migrate()))
    if unplug:
        actions = st.one_of(actions, st.just(act.Unplug()))
    return st.lists(actions, min_size=1, max_size=max_actions)


#: Seconds an example's QEMU runs after the last hostile action before the check (replay's
#: default is 1 s). Shorter on purpose: each example pays it, and a second per example would
#: halve the examples a budget buys. Deferred work that kills QEMU later still shows: the
#: recovery that follows (device reset, initialization, a valid request) keeps QEMU running,
#: and a find is verified by replaying its reproducer with replay's full settle period.
FUZZ_SETTLE = 0.1


@dataclass(frozen=True)
class FuzzConfig:
    device: str
    mode: str
    ring: str = "split"
    qemu: str | None = None
    #: The queue the actions aim at; None: the profile's first.
    queue: int | None = None
    #: Seconds without a qtest reply that count as a hang.
    hang_timeout: float = 3.0
    #: Timeout of the driver's valid requests interleaved with the abuse (failures are observations).
    valid_timeout: float = 0.3
    #: The same, for a device that shows it will not serve: DEVICE_NEEDS_RESET set (modern
    #: layout), an error QEMU reported since the last check (legacy, which has no such bit), or
    #: a status without DRIVER_OK.
    broken_valid_timeout: float = 0.02
    #: Live migration (:class:`~.actions.Migrate`) is among the actions (``fuzz --migrate``).
    migrate: bool = False
    #: Hot-unplug (:class:`~.actions.Unplug`) is among the actions (``fuzz --unplug``): the device
    #: sits in a hot-plug slot (behind a pcie-root-port on q35).
    unplug: bool = False

    @property
    def queue_index(self) -> int:
        return DEVICES[self.device].default_queue if self.queue is None else self.queue

    @property
    def name(self) -> str:
        """``device-mode-ring``, with ``-qN`` when the queue is not the profile's first."""
        default = DEVICES[self.device].default_queue
        return f"{self.device}-{self.mode}-{self.ring}" + ("" if self.queue_index == default else f"-q{self.queue}")


@dataclass
class ExampleResult:
    config: FuzzConfig
    actions: list[Action]
    outcome: Outcome = Outcome.SURVIVED
    detail: str = ""
    signal: int | None = None
    commands: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    stderr_tail: str = ""
    returncode: int | None = None
    #: Index in ``commands`` of the first command of the recovery (reset and valid request).
    recovery_from: int | None = None
    #: Live migrations that completed (a refused one is an observation, and the source runs on).
    migrations: int = 0
    #: Hot-unplugs that completed (DEVICE_DELETED came).
    unplugs: int = 0
    #: ``[start, stop)`` in ``commands`` of the lines one send carried, where it carried more
    #: than one: the reproducer's send groups (:mod:`..groups`).
    groups: list[Span] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.outcome)  # the printed word ("crashed") names it too

    @property
    def failed(self) -> bool:
        return self.outcome.failed

    def summary(self) -> str:
        return f"{self.config.name}: {self.outcome}: {self.detail}"


class HarnessBug(Exception):
    """QEMU answered FAIL/ERR to a command the fuzzer rendered: the rendering is wrong."""


Hook = Callable[[Machine, Action], None]


def replay_args(command_line: str) -> list[str]:
    """A machine's command line (``Machine.command_line()``) as ``# qemu-args:`` for replay:
    without the binary, the accelerator, -S, the halt firmware and -qtest, which replay adds."""
    words = shlex.split(command_line)[1:]
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-accel", "-bios", "-qtest", "-qtest-log"):
            i += 2
            continue
        if w != "-S":
            out.append(w)
        i += 1
    return out


def _will_not_serve(driver: Any, target: Target, live: _Live, action: Action, out: list[Observation]) -> str | None:
    """Why the device will serve no request now, or None: QEMU's virtio_error marks it broken
    and sets DEVICE_NEEDS_RESET (§2.1.2) in the modern layout; the legacy layout has no such
    bit, so there an error QEMU reported since the last action that may have reset the device
    stands for it. A status without DRIVER_OK (the abuse reset it or wrote another status, or
    moved the registers away, where reads give 0) means the device must not consume buffers
    (§2.1.2). Its valid request is still sent, and waited for briefly: waiting the full timeout
    for a request a broken device ignores was a third of a reused blk campaign's time, and for
    one sent without DRIVER_OK every 300 ms wait left in a 60-example blk run."""
    status = driver.transport.get_status()  # a round trip either way: QEMU ran what the last action set off
    if not target.legacy:
        broken = bool(status & STATUS.DEVICE_NEEDS_RESET.mask)
    else:
        _observe(live, driver, target, action, out)
        broken = live.errored
    if broken:
        return "device broken"
    return None if status & STATUS.DRIVER_OK.mask else "no DRIVER_OK"


def _observe(live: _Live, driver: Any, target: Target, action: Action, out: list[Observation]) -> None:
    """``_observe_errors`` after an action, keeping ``live.errored`` up to date."""
    if action.may_write_status():
        live.errored = False
    before = len(out)
    live.seen = _observe_errors(live.vm, driver, target, action, live.seen, out)
    live.errored = live.errored or len(out) > before


def machine_for(config: FuzzConfig, cls: type[Machine] = Machine) -> Machine:
    """The machine an example runs on (and a checked replay rebuilds): the device alone.
    ``cls``: a Machine subclass (the reused process's, :mod:`.reuse`)."""
    device = DEVICES[config.device]
    spec = MachineSpec(qemu=config.qemu, command_timeout=config.hang_timeout)
    spec.add_virtio(
        device.name,
        dict(device.props),
        mode=config.mode,
        id=DEVICE_ID,
        packed="on" if config.ring == "packed" else "off",
        hotplug=config.unplug,  # then the example plugs it first, as the guest's slot expects
    )
    return cls(spec)


class ExampleHost(Protocol):
    """What an example needs of a reused QEMU process (:class:`.reuse.Session` is one): the
    machine in its post-start state, a judge that leaves a survivor running, the settle after
    the last action, and the decision after the example (reset and check, or restart)."""

    #: The process's recording (``QtestClient.record``), emptied by each example.
    sink: list[bytes]
    #: What a fresh machine got before the example's own commands (the enumeration).
    prefix: bytes

    def machine(self) -> Machine: ...
    def judge(self, vm: Machine, hung: Callable[[QtestTimeout], str]) -> Judge: ...
    def settle(self, vm: Machine) -> None: ...
    def done(self, vm: Machine, driver: Any, result: ExampleResult, *, stderr_from: int) -> None: ...
    def discard(self, vm: Machine, cause: str) -> None: ...


@dataclass
class _Progress:
    """Where an example is, for the hang's detail."""

    phase: str = "initialization"
    step: int = 0

    @property
    def where(self) -> str:
        return f"action {self.step}" if self.step else self.phase


class _Recording:
    """Every byte an example sent to QEMU, across migrations, one item per send (its
    boundaries are the reproducer's send groups, :meth:`groups`): what the machine's recorded
    socket got (``QtestClient.record``), then at a migration the directive line, and when the
    machine moved, the interceptions ``QtestClient.take_over`` made again on the destination
    (QEMU got them; a replay sends them as written) and what the destination's recorded socket got."""

    def __init__(self, client: QtestClient, *, sink: list[bytes] | None = None, prefix: bytes = b"") -> None:
        """``sink``: a reused process's recording, emptied here (one per process, not one more
        per example); ``prefix``: what a fresh machine got before (the enumeration a reused
        machine's reset re-sent), a line per send (config-space setup: no group needed)."""
        self._done: list[bytes] = prefix.splitlines(keepends=True)
        self._intercepts: list[bytes] = []
        if sink is not None:
            sink.clear()
        self._sink = sink if sink is not None else client.record()

    def directive(self, line: str) -> None:
        """A step replay takes here (recorded before it starts: a crash while it runs is
        replayed there too): what was sent so far, then the directive line."""
        sends = list(self._sink)
        self._sink.clear()  # the socket goes on recording into it (a refused migration, a hot-unplug)
        lines = b"".join(sends).splitlines(keepends=True)
        self._intercepts += [line for line in lines if line.startswith(b"irq_intercept_")]
        self._done += [*sends, f"{line}\n".encode()]

    def moved(self, client: QtestClient) -> None:
        """The migration completed: ``client`` (the same object) now talks to the destination."""
        self._done += self._intercepts
        self._sink = client.record()

    def sent(self) -> bytes:
        return b"".join([*self._done, *self._sink])

    def groups(self) -> list[Span]:
        """The lines of :meth:`sent` that one send carried, where it carried more than one."""
        return spans_of_sends([*self._done, *self._sink])


@dataclass
class _Live:
    """What an example runs on now: a migration replaces the machine (and what judges it)."""

    vm: Machine
    judge: Judge
    recording: _Recording
    #: Lines of the machine's stderr already looked at for errors (``_observe_errors``).
    seen: int = 0
    #: An Unplug action took the device away; the recovery plugs it again.
    unplugged: bool = False
    #: QEMU reported an error since the last action that may have reset the device: in the
    #: legacy layout, which has no DEVICE_NEEDS_RESET, what says the device is broken.
    errored: bool = False
    #: The example's configuration (what the recovery's fresh driver is made for).
    config: FuzzConfig | None = None


#: A machine type that ``migrate`` keeps (the engine's Machine, replay's QemuMachine).
M = TypeVar("M", bound=QemuMachine)


def migrate(
    judge: Judge, vm: M, *, what: str = "the migration", spec: MachineSpec | None = None
) -> tuple[M, str | None]:
    """Live-migrate ``vm`` to a fresh QEMU of its binary and spec (``migrate_to``; ``spec``:
    another one, e.g. with the devices hot-plugged since on its command line) and point
    ``judge`` at the machine that goes on. Returns (destination, None), or (``vm``, why) when
    the migration was refused cleanly: a hostile driver's state may be refused (virtio_load
    checks it), and the source then runs on, as QEMU leaves it. A crash on either side raises
    QemuCrashed, with the judge on that side: the source while it saved (an assertion, a
    signal), the destination while it loaded (an assertion or a signal; an exit with status 1
    after "load of migration failed" is a refusal). A QMP command without a reply within the
    machine's timeout is a hang (QtestTimeout naming ``what``)."""
    with watch_machines() as started:
        try:
            dest = vm.migrate_to(spec)
        except Exception as exc:
            others = [m for m in started if m is not vm]
            for m in others:
                m.shutdown(check=False)
            if not vm.alive or vm.crash_marker() is not None:
                vm.shutdown(check=False)  # the source died while it saved
                if vm.crash is not None:
                    raise vm.crash from None
                raise
            crashed = next((m for m in others if _died_badly(m)), None)
            if crashed is not None and crashed.crash is not None:
                vm.shutdown(check=False)
                judge.vm = crashed
                raise crashed.crash from None
            if isinstance(exc, TimeoutError):
                raise QtestTimeout(f"{what} (QMP)", vm.spec.command_timeout) from None
            if isinstance(exc, MigrationError):
                return vm, _refusal(exc)
            raise
    judge.vm = dest
    return dest, None


#: What QEMU's migration code prints after a device's own complaint when a load fails.
_LOAD_FAILED = ("Failed to load ", "error while loading state", "load of migration failed")


def _refusal(exc: MigrationError) -> str:
    """Why the destination refused the state: its first complaint, the one before QEMU's
    "Failed to load ..." (virtio_load's or the device's, e.g. "VQ 0 address 0x0 inconsistent
    with Host index 0x1"), which does not depend on whether the source noticed first (as
    "Unable to write to socket") or the destination; else the error's own summary."""
    lines = [line.split(": ", 1)[-1] for line in exc.destination_stderr.splitlines() if line.strip()]
    failed = next((i for i, line in enumerate(lines) if line.startswith(_LOAD_FAILED)), None)
    if failed is not None:
        return lines[max(failed - 1, 0)]
    return exc.summary.split(" failed: ", 1)[-1]


def _died_badly(vm: QemuMachine) -> bool:
    """A signal or an assertion: what a refused migration's destination (exit status 1) is not."""
    return vm.crash_marker() is not None or (vm.returncode is not None and vm.returncode < 0)


def run_example(
    config: FuzzConfig, actions: Sequence[Action], *, hook: Hook | None = None, session: ExampleHost | None = None
) -> ExampleResult:
    """One example: initialize, abuse, check, reset, check a valid request. On a fresh machine,
    or with ``session`` on its reused process (in its post-start state; the session resets it
    afterwards, or restarts it)."""
    device = DEVICES[config.device]
    result = ExampleResult(config, list(actions))
    vm = session.machine() if session is not None else machine_for(config)
    if session is None:
        vm.start()  # QemuStartError: the caller's problem (cannot run here)
    recording = (
        _Recording(vm.qtest) if session is None else _Recording(vm.qtest, sink=session.sink, prefix=session.prefix)
    )
    recovery_at: int | None = None
    result.args = replay_args(vm.command_line())
    progress = _Progress()
    hung = lambda exc: f"no qtest reply within {config.hang_timeout:g} s during {progress.where}: {exc}"  # noqa: E731
    judge = Judge(vm, hung=hung) if session is None else session.judge(vm, hung)
    stderr_from = len(vm.stderr_text().splitlines())  # a reused process printed its start-up lines before
    live = _Live(vm, judge, recording, config=config, seen=stderr_from)
    driver: Any = None
    try:
        with judge as verdict:
            if config.unplug:
                _plug(live)
            driver = driver_for(vm, config)
            target = make_target(vm, driver, device, config.queue_index)
            progress.phase = "abuse"
            if _abuse(live, driver, target, actions, result, progress, hook):
                progress.phase, progress.step = "check", 0
                # deferred work may kill QEMU after the last action
                settle(live.vm, FUZZ_SETTLE) if session is None else session.settle(live.vm)
                progress.phase = "recovery"
                recovery_at = len(recording.sent())
                if live.unplugged:  # plugged again: a fresh driver on the new function
                    check_recovery(verdict, lambda: device.check(live.vm, _replug(live), 5.0))
                else:
                    driver.fn.restore()  # BARs, decoding, bus master: what config-space abuse may have moved
                    driver.initialize()
                    check_recovery(verdict, lambda: device.check(live.vm, driver, 5.0))
    except BaseException:
        if session is not None:
            session.discard(live.vm, "error in the harness")
        raise
    finally:
        for other in {vm, live.vm} - {judge.vm}:
            other.shutdown(check=False)  # a migration's other side, when the judge took one
        sent = recording.sent()
        result.commands = sent.decode("latin-1").splitlines()
        result.groups = recording.groups()
        if recovery_at is not None:
            result.recovery_from = sent[:recovery_at].count(b"\n")
        result.stderr_tail = judge.vm.stderr_tail(30)
        result.returncode = judge.vm.returncode
    result.outcome, result.detail, result.signal = verdict.outcome, verdict.detail, verdict.signal
    if session is not None:
        session.done(live.vm, driver, result, stderr_from=stderr_from)
    return result


def _abuse(
    live: _Live,
    driver: Any,
    target: Target,
    actions: Sequence[Action],
    result: ExampleResult,
    progress: _Progress,
    hook: Hook | None,
) -> bool:
    """Send the actions' commands (a ``Valid`` one runs the device's check through the driver);
    False when the driver's own read-back refused what it saw (an observation: the abuse ends)."""
    config = result.config
    device = DEVICES[config.device]
    try:
        for i, action in enumerate(actions, 1):
            progress.step = i
            vm = live.vm
            if hook is not None:
                hook(vm, action)
            if live.unplugged and isinstance(action, (Valid, act.Migrate, act.Unplug)):
                continue  # no device to serve, migrate with or unplug: the rest pokes where it was
            if isinstance(action, act.Unplug):
                _unplug(live, result, f"the unplug of action {i}")
                continue
            if isinstance(action, Valid):
                why = _will_not_serve(driver, target, live, action, result.observations)
                try:
                    device.check(vm, driver, config.broken_valid_timeout if why else config.valid_timeout)
                except (QemuCrashed, QtestTimeout):
                    raise
                except QtestVirtioError as exc:
                    kind = "valid request during abuse failed"
                    result.observations.append(Observation(kind + (f" ({why})" if why else ""), _normal(exc)))
                _observe(live, driver, target, action, result.observations)
                continue
            if isinstance(action, act.Migrate):
                live.recording.directive(act.Migrate.directive)
                live.vm, refused = migrate(live.judge, vm, what=f"the migration of action {i}")
                if refused is None:
                    live.recording.moved(live.vm.qtest)
                    result.migrations += 1
                    live.seen, live.errored = 0, False
                else:
                    result.observations.append(Observation("migration refused (the source runs on)", _normal(refused)))
                _observe(live, driver, target, action, result.observations)
                continue
            if target.packed:
                vq = driver.queues[target.queue]
                target = replace(target, avail_idx=vq.next_avail, wrap=vq.avail_wrap)
            else:
                target = replace(target, avail_idx=vm.qtest.readw(target.avail + SPLIT_AVAIL.idx.offset))
            for cmd in action.render(target):
                reply = vm.qtest.send_raw(cmd)
                if not reply.startswith("OK"):
                    raise HarnessBug(f"{cmd!r} -> {reply!r} (action {action!r})")
            _observe(live, driver, target, action, result.observations)
    except (QemuCrashed, QtestTimeout):
        raise
    except QtestVirtioError as exc:
        # The driver's own read-back (e.g. of ring state) refused what it saw: not QEMU's crash.
        result.observations.append(Observation("driver error during abuse", _normal(exc)))
        return False
    return True


def _unplug(live: _Live, result: ExampleResult, what: str) -> None:
    """Hot-unplug the device (QMP ``device_del``, the guest's part, ``DEVICE_DELETED``), with the
    QMP steps recorded as directives. QEMU refusing or never deleting it is an observation."""
    vm = live.vm
    live.recording.directive(f"{act.DEVICE_DEL} {DEVICE_ID}")
    try:
        vm.device_del(DEVICE_ID)
        vm.finish_unplug(DEVICE_ID, timeout=result.config.hang_timeout)
    except HotplugError as exc:
        if isinstance(exc.__cause__, TimeoutError):
            raise QtestTimeout(f"{what} (QMP)", vm.spec.command_timeout) from None
        result.observations.append(Observation("unplug did not complete", _normal(exc)))
        return
    except TimeoutError:
        raise QtestTimeout(f"{what} (QMP)", vm.spec.command_timeout) from None
    live.recording.directive(f"{act.DELETED} {DEVICE_ID}")
    live.unplugged = True
    result.unplugs += 1


def driver_for(vm: Machine, config: FuzzConfig | None) -> Any:
    """The device's driver, initialized to DRIVER_OK. Behind a hot-plug slot's root port INTx
    is not routed (pci/intx.py: no pin swizzling), so there a function without MSI-X
    (virtio-balloon-pci) is driven by polling its ISR."""
    if config is not None and config.unplug and VirtioPciMap.of(vm.pci_function(DEVICE_ID)).msix is None:
        return vm.virtio(DEVICE_ID, interrupts="isr")
    return vm.virtio(DEVICE_ID)


def _plug(live: _Live) -> None:
    """Hot-plug the device (``FuzzConfig.unplug``: it starts unplugged, so its slot is set up
    as a guest's pciehp or ACPI would before anything is plugged), its ``device_add`` options
    recorded as directives."""
    vm = live.vm
    for option in vm.hotplug_options(DEVICE_ID):
        live.recording.directive(f"{act.DEVICE_ADD} {option}")
    vm.plug(DEVICE_ID)


def _replug(live: _Live) -> Any:
    """Plug the device again and return a driver initialized on the new function."""
    _plug(live)
    return driver_for(live.vm, live.config)


@dataclass
class FuzzReport:
    config: FuzzConfig
    seed: int
    examples: int = 0
    seconds: float = 0.0
    failure: ExampleResult | None = None
    observations: Counter[str] = field(default_factory=Counter)
    #: Shrinking ended at the run's deadline: ``failure`` is the smallest found by then.
    shrink_cut: bool = False
    #: QEMU runs after the first failure (hypothesis's replays and shrinking, then ours): what
    #: shrinking cost; 0 for a known failure, which is not shrunk again.
    shrink_runs: int = 0
    #: Live migrations the examples completed (``FuzzConfig.migrate``).
    migrations: int = 0
    #: Hot-unplugs the examples completed (``FuzzConfig.unplug``).
    unplugs: int = 0


class _Failed(Exception):
    pass


class FuzzInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`fuzz_target`; ``report`` holds what was found by then
    (``failure``: the smallest failing example so far, unshrunk or half shrunk)."""

    def __init__(self, report: FuzzReport) -> None:
        super().__init__("interrupted")
        self.report = report


_ASSERTION_RE = re.compile(r"([A-Za-z_]\w*): Assertion `(.*)' failed")


def signature(result: ExampleResult) -> str:
    """What makes two failures the same bug, for a campaign's de-duplication: a crash by its
    assertion (on any device: the assertions are in QEMU's shared virtio code) or by device and
    signal or exit status (not by the client's view of the dead socket, "Broken pipe" or
    "Connection reset", which is timing, nor by what the device printed before, which varies
    with the example), a hang by device and ring, the rest by outcome and message."""
    c = result.config
    if result.outcome is Outcome.HUNG:
        return f"{c.device} {c.ring}: hung"
    if result.outcome is Outcome.CRASHED:
        assertion = _ASSERTION_RE.search(result.detail)
        if assertion:  # file and line numbers change with the build; function and condition do not
            return f"crashed: {assertion.group(1)}: Assertion `{assertion.group(2)}' failed"
        return f"{c.device}: crashed: {describe_exit(result.returncode)}"
    return f"{c.device} {c.ring}: {result.outcome}: {_normal(result.detail)}"


def _size(actions: Sequence[Action]) -> tuple[int, int]:
    return len(actions), len(repr(actions))


def fuzz_target(
    config: FuzzConfig,
    *,
    max_examples: int = 20,
    seed: int = 0,
    shrink_seconds: float = 120.0,
    max_actions: int = 8,
    hook: Hook | None = None,
    known: Container[str] = (),
    deadline: float | None = None,
    session: ExampleHost | None = None,
) -> FuzzReport:
    """Run hypothesis on one (device, mode, ring); on failure, shrink and keep the smallest.

    A failure whose :func:`signature` is in ``known`` (found earlier in the campaign) is not
    shrunk. Shrinking stops costing QEMU starts after ``shrink_seconds``, or at ``deadline``
    (``time.monotonic()``; the run's whole budget): from then on only the smallest failing case
    found so far runs for real, so hypothesis ends with it. No new example starts QEMU after
    ``deadline``. An interrupt raises :class:`FuzzInterrupted` with what was found by then.
    With ``session`` (:class:`~.reuse.Session`), the examples share its QEMU process.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    report = FuzzReport(config, seed)
    failures: list[ExampleResult] = []
    first_failure: list[float] = []
    started = time.monotonic()

    @hypothesis_seed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # hypothesis ignores it in a seeded run; the kept record is the .qtest files
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        print_blob=False,
    )
    @given(actions_strategy(max_actions, migrate=config.migrate, unplug=config.unplug))
    def prop(actions: list[Action]) -> None:
        if failures and signature(failures[0]) in known:
            return  # a known bug: hypothesis's own replays and shrinking would only cost QEMU starts
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if not failures and out_of_time:
            return  # the budget is spent: the remaining examples cost nothing
        if failures and (out_of_time or time.monotonic() - first_failure[0] > shrink_seconds):
            report.shrink_cut = report.shrink_cut or out_of_time
            best = min(failures, key=lambda r: _size(r.actions))
            if actions != best.actions:
                return
        report.shrink_runs += bool(failures)
        result = run_example(config, actions, hook=hook, session=session)
        report.examples += 1
        report.migrations += result.migrations
        report.unplugs += result.unplugs
        report.observations.update(str(o) for o in result.observations)
        if result.failed:
            if not first_failure:
                first_failure.append(time.monotonic())
            failures.append(result)
            raise _Failed(result.summary())

    try:
        try:
            prop()
        except Exception:
            if not failures:
                raise
            # hypothesis replays the smallest case last; take the smallest in any case.
            best = min(reversed(failures), key=lambda r: _size(r.actions))
            report.failure = best
            end = time.monotonic() + (0.0 if signature(best) in known else shrink_seconds)
            report.failure = _delete_actions(
                best, hook, end if deadline is None else min(end, deadline), keep=report, session=session
            )
            if deadline is not None and time.monotonic() >= deadline and len(report.failure.actions) > 1:
                report.shrink_cut = True
    except KeyboardInterrupt:
        if failures and report.failure is None:
            report.failure = min(reversed(failures), key=lambda r: _size(r.actions))
        report.seconds = time.monotonic() - started
        raise FuzzInterrupted(report) from None
    report.seconds = time.monotonic() - started
    return report


def _delete_actions(
    best: ExampleResult,
    hook: Hook | None,
    deadline: float,
    *,
    keep: FuzzReport | None = None,
    session: ExampleHost | None = None,
) -> ExampleResult:
    """Drop actions one at a time while the failure stays the same kind: hypothesis's shrinker
    often keeps harmless actions in front of the one that matters. Each smaller failure is
    kept in ``keep.failure`` as soon as it is found, so an interrupt keeps the smallest."""
    changed = True
    while changed and len(best.actions) > 1 and time.monotonic() < deadline:
        changed = False
        for i in range(len(best.actions)):
            if time.monotonic() >= deadline:
                break
            candidate = best.actions[:i] + best.actions[i + 1 :]
            if keep is not None:
                keep.shrink_runs += 1
            result = run_example(best.config, candidate, hook=hook, session=session)
            if result.outcome == best.outcome:
                best, changed = result, True
                if keep is not None:
                    keep.failure = best
                break
    return best
