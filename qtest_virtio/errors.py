"""One error hierarchy for the whole library (the stable names are in design.md).

Every error a user can meet derives from :class:`QtestVirtioError`, so a caller can catch the
library's failures without also catching its own bugs.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence


class QtestVirtioError(Exception):
    """Base of every error raised on purpose by qtest-virtio."""


class QtestError(QtestVirtioError):
    """QEMU answered a qtest command with ``FAIL`` or ``ERR``."""

    def __init__(self, command: str, message: str) -> None:
        self.command = command
        self.message = message
        super().__init__(f"qtest command {command!r} failed: {message}")


class QtestTimeout(QtestError):
    """No reply to a qtest command within the timeout: QEMU is alive but hung (or very slow)."""

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__(command, f"no reply within {timeout:g} s (QEMU hung?)")
        self.timeout = timeout


class ClockUnavailable(QtestError):
    """The virtual clock commands need the qtest accelerator, which Debian's builds do not ship."""

    def __init__(self, command: str) -> None:
        super().__init__(
            command,
            "virtual clock not available on this build (QEMU without the qtest accelerator "
            "answers clock_step/clock_set with 'Unknown command')",
        )


class MalformedCommand(QtestError, ValueError):
    """A qtest command refused before it is sent: QEMU's qtest server would ``g_assert`` on it
    (SIGABRT), or a typed call's argument is out of its range. ``str()`` is one line naming the
    command, the argument and the limit (``outb: value 0x100 is outside 0x0..0xff``). Also a
    ValueError: a bad argument is a caller's mistake, as for any Python call."""

    def __init__(self, command: str, message: str) -> None:
        self.command = command
        self.message = message
        Exception.__init__(self, message)


class UnknownCommand(MalformedCommand):
    """A line whose first word is no command QEMU's qtest server dispatches (it answers such a
    line ``FAIL Unknown command``, so a replay may still send it)."""


class QemuStartError(QtestVirtioError):
    """QEMU refused the command line or never became ready; carries QEMU's own message."""

    def __init__(self, message: str, *, command_line: str = "", stderr: str = "") -> None:
        self.command_line = command_line
        self.stderr = stderr
        super().__init__(message)


def describe_exit(returncode: int | None) -> str:
    """'killed by signal 6 (SIGABRT)' or 'exit status 1', as a report wants it."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exit status {returncode}"


class QemuCrashed(QtestVirtioError):
    """QEMU died under us (signal, non-zero exit, or an assertion/sanitizer report on stderr).

    The first line of ``str()`` is the one-line summary; the rest is the report a developer
    needs to reproduce it: the exit, the tail of QEMU's stderr, the last qtest commands and a
    command line to paste.
    """

    def __init__(
        self,
        summary: str,
        *,
        returncode: int | None = None,
        stderr_tail: str = "",
        last_commands: Sequence[str] = (),
        command_line: str = "",
    ) -> None:
        self.summary = summary
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.last_commands = list(last_commands)
        self.command_line = command_line
        super().__init__(self.report())

    @property
    def signal(self) -> int | None:
        """The signal number QEMU died by, or None when it exited."""
        if self.returncode is not None and self.returncode < 0:
            return -self.returncode
        return None

    def report(self) -> str:
        parts = [f"{self.summary} ({describe_exit(self.returncode)})"]
        if self.stderr_tail:
            parts.append("QEMU stderr (tail):\n" + _indent(self.stderr_tail))
        if self.last_commands:
            parts.append("last qtest commands:\n" + _indent("\n".join(self.last_commands)))
        if self.command_line:
            parts.append("reproduce with:\n" + _indent(self.command_line))
        return "\n".join(parts)


class MigrationError(QtestVirtioError):
    """A live migration failed or never finished. The first line says why: QMP's
    ``error-desc`` on the source and the destination's own complaint; the rest quotes both
    sides' stderr tails, since a refused vmstate is reported only by the side that loads it."""

    def __init__(
        self,
        summary: str,
        *,
        error_desc: str = "",
        source_stderr: str = "",
        destination_stderr: str = "",
        command_lines: Sequence[str] = (),
        destination: str = "",
    ) -> None:
        self.summary = summary
        #: "QEMU 7.2.22 (pc-q35-7.2)": where the state was going.
        self.destination = destination
        self.error_desc = error_desc
        self.source_stderr = source_stderr
        self.destination_stderr = destination_stderr
        self.command_lines = list(command_lines)
        #: ``dev.prop: a -> b`` for device properties that read differently on the two sides.
        self.differences: list[str] = []
        super().__init__(self.render())

    def render(self) -> str:
        parts = [self.summary]
        for side, tail in (("source", self.source_stderr), ("destination", self.destination_stderr)):
            if tail.strip():
                parts.append(f"{side} QEMU stderr (tail):\n" + _indent(tail))
        for line in self.command_lines:
            parts.append("command line:\n" + _indent(line))
        return "\n".join(parts)


class MigrationUnsupported(MigrationError):
    """The migration cannot be attempted as asked: the destination lacks a device, a property
    or a device flag the source uses. Decided before any state moves; the message names it."""


class UsageError(QtestVirtioError):
    """Bad input from the user (a command line, an option, a shell command): the message names
    the problem and the fix, and the console script exits 128 so that a typo aborts a bisect."""


class ScenarioError(QtestVirtioError):
    """A scenario or reproducer file is malformed; names the file and line."""

    def __init__(self, message: str, *, path: str = "", line: int = 0) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(where + message)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
