"""Exit codes, signals and the guarded ``main`` of every console entry point, in one place.

The codes follow ``git bisect run`` (design.md): 0 passed/survived, 1 failed/crashed/hung,
125 cannot be tested here (no binary, QEMU refuses the command line, a flag the binary lacks),
128 usage error, interrupt or harness bug (aborts a bisect instead of marking a commit bad).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import NoReturn

from .. import __name__ as _library
from ..binary import QemuNotFound, UnknownFlag
from ..bisect import BisectError, BisectUsageError
from ..errors import QemuCrashed, QemuStartError, QtestVirtioError, ScenarioError, UsageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNTESTABLE = 125
EXIT_USAGE = 128
#: A closed terminal (SIGHUP) ends a process as a shell reports a death by that signal.
EXIT_HANGUP = 128 + signal.SIGHUP
PROG = "qtest-virtio"
INTERRUPTED = f"{PROG}: interrupted, exit {EXIT_USAGE} (aborts a git bisect run)"


class Interrupted(KeyboardInterrupt):
    """A signal turned into an unwind, like Ctrl-C: every ``finally`` runs, so teardown stops
    QEMU and removes its directory, and pytest ends its session instead of failing a test
    (which would mark a bisect commit bad)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _unwind(signum: int, frame: object) -> NoReturn:
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    """Python only lets the main thread set signal handlers."""
    return threading.current_thread() is threading.main_thread()


def unwind_on(*signums: int) -> None:
    """From now on these signals (SIGTERM: ``kill``, CI cancelling) raise :class:`Interrupted`.
    SIGINT needs nothing: Python's own handler raises KeyboardInterrupt, mapped the same way."""
    if _in_main_thread():
        for signum in signums:
            signal.signal(signum, _unwind)


def unwinds_on_default(signum: int) -> bool:
    """Like :func:`unwind_on` for one signal, unless someone (the console script, a user's
    conftest) already handles it; True when it now unwinds."""
    if not _in_main_thread() or signal.getsignal(signum) not in (signal.SIG_DFL, None, _unwind):
        return False
    signal.signal(signum, _unwind)
    return True


@contextlib.contextmanager
def unwinding(*signums: int) -> Iterator[None]:
    """:func:`unwind_on` for the length of a block, then the handlers before it."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, _unwind) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


#: Exceptions that reach the console entry point, first match wins: (classes, exit, prefix).
EXIT_RULES: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
    ((UsageError, ScenarioError, BisectUsageError), EXIT_USAGE, "error: "),
    ((QemuNotFound, UnknownFlag, QemuStartError), EXIT_UNTESTABLE, "cannot test here: "),
    ((QemuCrashed, BisectError), EXIT_FAILED, ""),
    ((QtestVirtioError,), EXIT_FAILED, "failed: "),
)


def exit_for(exc: BaseException) -> tuple[int, str]:
    """The exit code and the line to print for an exception that ends a command ("" when
    nothing is to be said: a closed terminal has nobody to read it)."""
    if isinstance(exc, Interrupted) and exc.signum == signal.SIGHUP:
        return EXIT_HANGUP, ""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_USAGE, INTERRUPTED
    for classes, code, prefix in EXIT_RULES:
        if isinstance(exc, classes):
            return code, f"{PROG}: {prefix}{exc}"
    return EXIT_USAGE, f"{PROG}: internal error in {_library} (harness bug), exit {EXIT_USAGE}"


def guarded(command: Callable[[], int]) -> int:
    """Run ``command`` with SIGTERM unwinding, and map what escapes it to an exit code: the
    one place an exception becomes 1, 125 or 128. A harness bug prints its traceback."""
    unwind_on(signal.SIGTERM)
    try:
        return int(command())
    except (Exception, KeyboardInterrupt) as exc:
        code, message = exit_for(exc)
        if not isinstance(exc, QtestVirtioError | KeyboardInterrupt):
            traceback.print_exc()
        if message:
            print(message, file=sys.stderr)
        return code
