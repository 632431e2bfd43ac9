"""What running commands on QEMU came to: one vocabulary (:class:`Outcome`), its exit codes, and
one classifier (:class:`Judge`) that replay and the fuzzer both use.

A run is judged the same way wherever it happens:

- QEMU died (the qtest socket closed, or an assertion or sanitizer line on its stderr): crashed,
  with the assertion text when QEMU printed one, and the signal;
- a qtest reply did not come within the timeout: hung;
- QEMU lived, but after a device reset a valid request failed: unrecovered (the fuzzer's check);
- otherwise: survived.

Before the verdict QEMU runs a settle period (:func:`settle`): deferred work may still kill it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

from .errors import QemuCrashed, QtestTimeout, QtestVirtioError
from .machine import QemuMachine

#: Seconds QEMU runs after the last command before the verdict (``replay --settle S``).
DEFAULT_SETTLE = 1.0
#: The settle period's slices: each one a ``clock_step`` of as much virtual time where the build
#: has the qtest accelerator, and a check that QEMU is alive.
SETTLE_SLICE = 0.05


class Outcome(StrEnum):
    """The verdict of one run, printed as the CLI prints it (``survived``, ``cannot-run``, ...);
    the member order is the order a tally lists them."""

    SURVIVED = "survived"
    CRASHED = "crashed"
    HUNG = "hung"
    #: QEMU lived, but after a device reset a valid request failed (a fuzzer reproducer's check).
    UNRECOVERED = "unrecovered"
    #: QEMU refused the command line (a machine type, device or option the binary lacks).
    CANNOT_RUN = "cannot-run"

    @property
    def exit_code(self) -> int:
        """``git bisect run``'s reading (design.md, "CLI"): 0 good, 1 bad, 125 cannot test."""
        return _EXIT_CODES[self]

    @property
    def failed(self) -> bool:
        """A bug shown: crashed, hung or unrecovered."""
        return self.exit_code == 1


_EXIT_CODES = {
    Outcome.SURVIVED: 0,
    Outcome.CRASHED: 1,
    Outcome.HUNG: 1,
    Outcome.UNRECOVERED: 1,
    Outcome.CANNOT_RUN: 125,
}

#: Exit codes of several runs, the one that wins first: a reproduced bug is the answer even where
#: another binary could not run the file; "cannot test" beats "survived" (not all were tested).
EXIT_PRECEDENCE = (1, 125, 0)

#: The detail of an unrecovered verdict starts so (the fuzzer's check and replay's say the same).
UNRECOVERED_DETAIL = "after a device reset a valid request failed"


@dataclass
class Verdict:
    """The classifier's answer: the outcome, what explains it, and the signal QEMU died by."""

    outcome: Outcome = Outcome.SURVIVED
    detail: str = ""
    signal: int | None = None
    #: QEMU ended with exit status 0 and printed no crash marker (a power-off the guest asked for);
    #: only a judge with ``clean_exit_survives`` leaves the outcome survived then.
    clean_exit: bool = False
    #: The crash showed only once the run had ended (every command answered, then QEMU died).
    crashed_after_run: bool = False


class Judge:
    """Classifies one run on a started machine: use as ``with Judge(vm, ...) as verdict:`` around
    the commands. A QemuCrashed or QtestTimeout from the body ends it (crashed, hung; the
    ``hung`` callback words the detail from the caller's progress); the machine is shut down
    either way; then a crash QEMU left behind (an exit, a marker on stderr) makes the verdict
    crashed unless it is already hung. Any other exception propagates after the shutdown."""

    def __init__(
        self, vm: QemuMachine, *, hung: Callable[[QtestTimeout], str], clean_exit_survives: bool = False
    ) -> None:
        self.vm = vm
        self.verdict = Verdict()
        self._hung = hung
        self._clean_exit_survives = clean_exit_survives

    def __enter__(self) -> Verdict:
        return self.verdict

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        v = self.verdict
        try:
            if isinstance(exc, QemuCrashed):
                v.outcome, v.detail = Outcome.CRASHED, exc.summary
            elif isinstance(exc, QtestTimeout):
                v.outcome, v.detail = Outcome.HUNG, self._hung(exc)
        finally:
            self.vm.shutdown(check=False)
        handled = exc is None or isinstance(exc, (QemuCrashed, QtestTimeout))
        if handled:
            self._judge_exit()
        return handled and exc is not None

    def _judge_exit(self) -> None:
        v, crash = self.verdict, self.vm.crash
        if crash is None or v.outcome is Outcome.HUNG:
            return
        marker = self.vm.crash_marker()
        if crash.returncode == 0 and marker is None:
            v.clean_exit = True
            if self._clean_exit_survives:
                v.outcome = Outcome.SURVIVED
                return
        raised = v.outcome is Outcome.CRASHED
        v.crashed_after_run = v.outcome is Outcome.SURVIVED
        v.outcome, v.signal = Outcome.CRASHED, crash.signal
        # The assertion text says more than "socket closed"; else the first report of the crash.
        v.detail = marker or (v.detail if raised else crash.summary)


def check_recovery(verdict: Verdict, check: Callable[[], None]) -> None:
    """Run a recovery check (a device reset and a valid request): a library error other than
    a crash or a hang makes the verdict unrecovered; a crash or hang is the judge's."""
    try:
        check()
    except (QemuCrashed, QtestTimeout):
        raise
    except QtestVirtioError as exc:
        verdict.outcome = Outcome.UNRECOVERED
        verdict.detail = f"{UNRECOVERED_DETAIL}: {str(exc)[:200]}"


def settle(vm: QemuMachine, seconds: float) -> None:
    """Let QEMU run ``seconds`` after the last command before judging it: deferred work (bottom
    halves, timers, I/O completions) may still kill it. Where the qtest accelerator owns the
    virtual clock, ``clock_step`` moves it on by as much, so virtual-time timers fire too. Then a
    final round trip: QEMU still answers. QemuCrashed or QtestTimeout from that round trip."""
    clock = vm.binary.has_qtest_accel
    deadline = time.monotonic() + seconds
    while vm.alive and (left := deadline - time.monotonic()) > 0:
        step = min(SETTLE_SLICE, left)
        if clock:
            vm.qtest.send_raw(f"clock_step {max(int(step * 1e9), 1)}")  # FAIL (no timer): still a round trip
        time.sleep(step)
    vm.qtest.send_raw("endianness")
