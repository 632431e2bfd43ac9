"""One QEMU process for many fuzz examples (issue 16): a :class:`Session` hands each example a
machine in its post-start state, and after it either resets and proves the reset
(:mod:`.reset`) or restarts the process: after a crash, a hang, an unrecovered device, an error
QEMU printed, a failed reset check, or every ``every`` examples. Each restart is counted by
cause. An example on a reused process records only its own commands (the recording starts at
the example, and the reset makes the next example's enumeration and allocations send the same
commands a fresh machine gets), so its reproducer replays on a fresh QEMU; the campaign checks
that before keeping a find (:func:`replays_fresh`).

A restart does not wait for a QEMU start: while the current process serves examples,
:data:`SPARES` spare processes are started, resumed and enumerated
(:func:`.reset.enumerate_again`) on worker threads (the fuzzer is one process; on two cores the
other one is free), and a restart swaps in the oldest and orders the next. Two, because error
reports come in runs (hypothesis mutates a failing example): with one spare (~40 ms to make),
back-to-back restarts waited for it, 5-6 ms per blk example. Each spare is
started after the process it follows, serves no example before it is swapped in and is used
once; it is checked against the first process's snapshot at its first reset, as a restart's
process is. All are shut down on every exit path (:meth:`Session.close`). The worker threads
live as long as the session: QEMU is spawned with a parent-death signal, which Linux sends when
the spawning *thread* exits.

The examples' thread and the process in use share one core, and the spares start on the others
(:mod:`.cores`): on 2 cores, blk's ratio to fresh examples held within 5-7% over a run's rounds in
two of three runs pinned, against 19-22% unpinned.

Migration and hot-unplug examples replace or rebuild the machine: they run on fresh ones.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Container
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ..errors import QemuCrashed, QtestTimeout, QtestVirtioError
from ..machine import MachineSpec, is_crash_marker
from ..outcome import Judge
from ..pci import PciFunction
from ..vm import Machine
from .cores import Cores, pin_process, pin_thread, thread_affinity
from .engine import FUZZ_SETTLE, ExampleResult, FuzzConfig, machine_for
from .reset import Baseline, ResetFailed, enumerate_again, reset_to_baseline, take_baseline

#: Examples one process serves before a planned restart (``fuzz --restart-every``).
RESTART_EVERY = 200
#: Real seconds a reused example waits after its last action; the virtual clock (where the
#: qtest accelerator owns it) still moves on by FUZZ_SETTLE. Real-time work left behind is a
#: backend's (a thread-pool read): a valid request's whole round, submit to used, took at most
#: 6.4 ms in 1400 checks on blk, rng, net and scsi, and the recovery after the wait runs
#: longer than that, so a crash it sets off still lands on the example. One deferred longer
#: shows in the reset's checks or in the next example, whose find then does not replay fresh.
#: 5 ms was a fifth of a reused blk example.
REUSE_SETTLE = 0.001
#: Spare processes kept started ahead (``fuzz --no-spare``: none).
SPARES = 2


class ReusableMachine(Machine):
    """A Machine whose guest-side objects (allocator, drivers) can be dropped, so the next
    example allocates as on a fresh machine."""

    def __init__(self, spec: MachineSpec, **kw: Any) -> None:
        super().__init__(spec, **kw)
        #: Where each ``-device`` id sits (``query-pci``'s answer, asked once per process: the
        #: harness places every device on the command line, and no guest write moves a slot).
        self._bdfs: dict[str, str] = {}

    def pci_function(self, dev_id: str) -> PciFunction:
        """As Machine's, with the qdev id's address asked of QMP once per process (it sends no
        qtest command either way: the example's wire is the same)."""
        if dev_id not in self._bdfs:
            self._bdfs[dev_id] = super().pci_function(dev_id).bdf
        self.pci.assign_bars()
        return self.pci.find(bdf=self._bdfs[dev_id])

    def forget_guest(self) -> None:
        """Drop the allocator and the drivers; the PCI enumeration stays (the reset assigned
        the BARs again as it had)."""
        self._memory = None
        self._drivers = []


class _KeepJudge(Judge):
    """The engine's judge, except that a machine that survived is not shut down: the session
    resets it for the next example."""

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None and self.vm.alive and self.vm.crash_marker() is None:
            return False
        return super().__exit__(kind, exc, tb)


@dataclass
class ReuseStats:
    """What a session did: processes started, examples served, restarts by cause."""

    processes: int = 0
    examples: int = 0
    resets: int = 0
    restarts: Counter[str] = field(default_factory=Counter)
    #: The first failed reset check's message per kind (the report quotes them).
    reset_failures: Counter[str] = field(default_factory=Counter)
    reset_seconds: float = 0.0
    #: Processes that were a spare started ahead and swapped in at a restart.
    spares_used: int = 0
    #: Seconds the examples waited for a spare that was not ready yet at a restart.
    spare_wait_seconds: float = 0.0
    #: Spares that could not be made ready (the restart then started its own process).
    spares_failed: int = 0

    def merge(self, other: ReuseStats) -> None:
        self.processes += other.processes
        self.spares_used += other.spares_used
        self.spare_wait_seconds += other.spare_wait_seconds
        self.spares_failed += other.spares_failed
        self.examples += other.examples
        self.resets += other.resets
        self.restarts.update(other.restarts)
        self.reset_failures.update(other.reset_failures)
        self.reset_seconds += other.reset_seconds


@dataclass
class _Ready:
    """A started, resumed and enumerated process that has served no example."""

    vm: ReusableMachine
    sink: list[bytes]


class Session:
    """A reused QEMU for the examples of one configuration. ``skip``: reset steps left out
    (:data:`.reset.STEPS`; tests only: the check must catch it). ``spare``: keep :data:`SPARES`
    processes started ahead for the next restarts (``fuzz --no-spare`` turns it off). ``pin``: the
    examples and the process in use on one core, the spares on the others (:mod:`.cores`)."""

    def __init__(
        self,
        config: FuzzConfig,
        *,
        every: int = RESTART_EVERY,
        settle_seconds: float = REUSE_SETTLE,
        skip: Container[str] = (),
        spare: bool = True,
        pin: bool = True,
    ) -> None:
        if config.migrate or config.unplug:
            raise ValueError("migration and hot-unplug examples run on fresh machines")
        self.config = config
        self.every = every
        self.settle_seconds = settle_seconds
        self.skip = skip
        self.stats = ReuseStats()
        self._vm: ReusableMachine | None = None
        self._baseline: Baseline | None = None
        self._served = 0
        #: The reused process's recording (``QtestClient.record``), and what an example's
        #: reproducer starts with (the enumeration the reset re-sent).
        self.sink: list[bytes] = []
        self.prefix = b""
        self.spare = spare
        #: The worker threads that start spares and stop retired processes.
        self._pool: ThreadPoolExecutor | None = None
        #: The spares ordered, oldest first.
        self._spares: deque[Future[_Ready]] = deque()
        #: Every task given to the workers that may not have run yet (close() waits for them).
        self._tasks: list[Future[Any]] = []
        #: The spares the workers are starting (until swapped in): close() makes sure of them.
        self._preparing: list[Machine] = []
        #: Processes restarted away from, not stopped yet (``_stop_retired``).
        self._retired: list[Machine] = []
        #: Examples on one core, spares on the others (cores.py); None: no placement.
        self._cores = Cores.split() if spare and pin else None
        #: The examples' thread's own cores before the session moved it (put back at close).
        self._thread_cores: frozenset[int] | None = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut down the current process and the spare (also one still starting): on every
        exit path (the end, an error, an interrupt). Each is stopped while the worker thread
        that spawned it still lives: its end sends the parent-death signal, SIGKILL, to what
        it spawned, which a wrapper script dies of without passing it on to its QEMU."""
        try:
            if self._vm is not None:
                self._vm.shutdown(check=False)
                self._vm = None
        finally:
            spares, self._spares = list(self._spares), deque()
            tasks, self._tasks = self._tasks, []
            pool, self._pool = self._pool, None
            try:
                for spare in spares:
                    spare.cancel()  # not started yet: never started
                wait_all(tasks)  # what a worker runs ends before its thread does
                for vm in [*self._retired, *self._preparing]:
                    vm.shutdown(check=False)
                if pool is not None:
                    pool.shutdown(wait=True)
            finally:
                for vm in [*self._retired, *self._preparing]:
                    vm.shutdown(check=False)  # idempotent (after an interrupt above)
                self._preparing, self._retired = [], []
                if self._thread_cores is not None:
                    pin_thread(self._thread_cores)
                    self._thread_cores = None

    @property
    def pid(self) -> int | None:
        return self._vm.pid if self._vm is not None else None

    def spares(self) -> list[tuple[Machine, list[bytes]]]:
        """The spares ordered, next first, once each is started and enumerated (waited for),
        with what each was sent since its start-up round trip; a failed one is left out."""
        ready = [_result(f) for f in self._spares]
        return [(r.vm, r.sink) for r in ready if r is not None]

    def machine(self) -> ReusableMachine:
        """The machine for the next example, in its post-start state (started when there is
        none: the first process is snapshot (:func:`.reset.take_baseline`), later ones are
        checked against that snapshot at their first reset)."""
        if self._cores is not None and self._thread_cores is None:
            self._thread_cores = thread_affinity()
            pin_thread(self._cores.examples)  # the first process, spawned here, goes there too
        if self._vm is None:
            self._start()
        assert self._vm is not None
        self.stats.examples += 1
        self._served += 1
        return self._vm

    def _start(self) -> None:
        if self._baseline is not None and self.spare:
            ready = self._take_spare()
            if ready is not None:
                self._use(ready.vm, ready.sink, self._baseline)
                self.stats.spares_used += 1
                self._order_spare()
                self._stop_retired()  # after the next spare's start: that one is what a restart waits for
                return
        vm = machine_for(self.config, ReusableMachine)
        assert isinstance(vm, ReusableMachine)
        vm.start()  # QemuStartError: the caller's (cannot run here)
        self.stats.processes += 1
        try:
            sink = vm.qtest.record()  # one recording per process; each example empties it
            if self._baseline is None:
                baseline = take_baseline(vm, self.config.mode, sink)
            else:  # the same command line: the first process's snapshot, and its enumeration
                baseline = self._baseline
                enumerate_again(vm, baseline, sink)
        except ResetFailed:
            vm.shutdown(check=False)
            self.stats.restarts["new process differs"] += 1
            if self._baseline is None:
                raise
            self._baseline = None  # snapshot anew, on another process
            self._start()
            return
        except BaseException:
            vm.shutdown(check=False)
            raise
        self._use(vm, sink, baseline)
        self._order_spare()
        self._stop_retired()

    def _use(self, vm: ReusableMachine, sink: list[bytes], baseline: Baseline) -> None:
        if self._cores is not None:
            pin_process(vm.pid, self._cores.examples)  # a spare, started on the other cores
        vm.forget_guest()
        self._served = 0
        self.sink = sink
        self._vm, self._baseline = vm, baseline
        self.prefix = "".join(f"{line}\n" for line in baseline.enumeration).encode("latin-1")

    def _order_spare(self) -> None:
        """Start spares on the workers (after the process just put in use) up to SPARES."""
        if not self.spare or self._baseline is None:
            return
        if self._pool is None:
            cores = self._cores
            self._pool = ThreadPoolExecutor(
                max_workers=SPARES,
                thread_name_prefix="qtest-virtio-spare",
                initializer=None if cores is None else lambda: pin_thread(cores.others),
            )
        while len(self._spares) < SPARES:
            self._spares.append(self._submit(self._prepare, self._baseline))

    def _submit(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Future[Any]:
        assert self._pool is not None
        self._tasks = [t for t in self._tasks if not t.done()]
        task = self._pool.submit(fn, *args, **kw)
        self._tasks.append(task)
        return task

    def _prepare(self, baseline: Baseline) -> _Ready:
        """On the worker: a process taken to where a restart's is before its first example."""
        vm = machine_for(self.config, ReusableMachine)
        assert isinstance(vm, ReusableMachine)
        self._preparing.append(vm)
        try:
            vm.start()
            sink = vm.qtest.record()
            enumerate_again(vm, baseline, sink)
        except BaseException:
            vm.shutdown(check=False)
            self._preparing.remove(vm)
            raise
        vm.forget_guest()
        return _Ready(vm, sink)

    def _take_spare(self) -> _Ready | None:
        """The spare, waited for; None when it could not be made ready (counted; a start
        failure or an enumeration that differs then shows again on the caller's own start)."""
        if not self._spares:
            return None
        started = time.monotonic()
        ready = _result(self._spares.popleft())
        self.stats.spare_wait_seconds += time.monotonic() - started
        if ready is None:  # the worker shut it down
            self.stats.spares_failed += 1
            return None
        self._preparing.remove(ready.vm)  # swapped in here
        self.stats.processes += 1
        return ready

    def _retire(self, vm: Machine) -> None:
        """A process to stop: on the worker once the next spare is ordered, or here now."""
        if self._pool is None:
            vm.shutdown(check=False)
        else:
            self._retired.append(vm)

    def _stop_retired(self) -> None:
        retired, self._retired = self._retired, []
        for vm in retired:
            if self._pool is None:
                vm.shutdown(check=False)
            else:
                vm.close_qmp()  # here, where the examples used it (Machine.close_qmp)
                if self._cores is not None and vm.alive:
                    pin_process(vm.pid, self._cores.others)  # its exit's work off the examples' core
                self._submit(vm.shutdown, check=False)

    def judge(self, vm: Machine, hung: Callable[[QtestTimeout], str]) -> Judge:
        return _KeepJudge(vm, hung=hung)

    def settle(self, vm: Machine) -> None:
        """After the last action: the virtual clock on by FUZZ_SETTLE (qtest accelerator), a
        short real wait, then a round trip (QemuCrashed, QtestTimeout)."""
        if vm.binary.has_qtest_accel:
            vm.qtest.send_raw(f"clock_step {int(FUZZ_SETTLE * 1e9)}")
        time.sleep(self.settle_seconds)
        vm.qtest.send_raw("endianness")

    def done(self, vm: Machine, driver: Any, result: ExampleResult, *, stderr_from: int) -> None:
        """After an example: reset and check the machine, or restart it (counted by cause)."""
        cause = self._restart_cause(vm, driver, result, stderr_from)
        if cause is None:
            started = time.monotonic()
            try:
                assert self._baseline is not None and isinstance(vm, ReusableMachine)
                reset_to_baseline(vm, driver, self._baseline, skip=self.skip)
                vm.forget_guest()
                self.stats.resets += 1
            except ResetFailed as exc:
                cause = "reset check failed"
                self.stats.reset_failures[str(exc).split(":")[0]] += 1
            except (QemuCrashed, QtestTimeout):
                cause = "crash or hang during the reset"
            except QtestVirtioError as exc:
                cause = "reset check failed"
                self.stats.reset_failures[f"{type(exc).__name__}"] += 1
            self.stats.reset_seconds += time.monotonic() - started
        if cause is not None:
            self.stats.restarts[cause] += 1
            self._vm = None
            self._retire(vm)

    def discard(self, vm: Machine, cause: str) -> None:
        """The example ended in an exception (a harness error, an interrupt): restart."""
        self.stats.restarts[cause] += 1
        vm.shutdown(check=False)
        if self._vm is not None:
            self._vm.shutdown(check=False)
        self._vm = None

    def _restart_cause(self, vm: Machine, driver: Any, result: ExampleResult, stderr_from: int) -> str | None:
        if vm is not self._vm:
            return "machine replaced"
        if result.failed or not vm.alive:
            return str(result.outcome)
        if driver is None:
            return "no driver"
        new = [line for line in vm.stderr_text().splitlines()[stderr_from:] if line.strip()]
        if any(is_crash_marker(line) for line in new):
            return "crash marker"
        if new:
            return "error report"
        if self._served >= self.every:
            return f"every {self.every} examples"
        return None


def _result(future: Future[_Ready]) -> _Ready | None:
    """A spare's outcome: the ready process, or None when making it failed (its machine is
    shut down by then)."""
    try:
        return future.result()
    except Exception:
        return None
