"""The session: lines read from a terminal (with readline, a history file and completion) or
from any text stream, run by :class:`~.commands.Commands` until ``quit`` or end of input.

With a terminal, input goes through ``readline`` with a history file (``$QTEST_VIRTIO_HISTORY``,
else ``~/.qtest_virtio_history``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import TextIO

from ...errors import QemuCrashed
from ...vm import Machine
from ..exits import EXIT_FAILED, EXIT_OK, Interrupted
from .commands import NAMED_COMMANDS, Commands, Transcript
from .registers import BLOCKS
from .text import ShellError

HISTORY_ENV = "QTEST_VIRTIO_HISTORY"
DEFAULT_HISTORY = "~/.qtest_virtio_history"
HISTORY_LENGTH = 1000
#: Ctrl-C while QEMU was answering: the shell leaves as a process killed by SIGINT would.
EXIT_INTERRUPTED = 128 + signal.SIGINT


class Shell(Commands):
    """The interactive core: reads lines from ``stdin``, writes replies to ``stdout``.

    ``readline=True`` reads through ``input()`` (line editing, history file, completion):
    only for a real terminal on the process's own stdin/stdout. Errors print one line and the
    session goes on; QEMU dying ends it with exit status 1.
    """

    def __init__(
        self,
        vm: Machine,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        *,
        readline: bool = False,
        prompt: bool | None = None,
        history_file: str | None = None,
        transcript: Transcript | None = None,
    ) -> None:
        self.stdin = stdin if stdin is not None else sys.stdin
        self.use_readline = readline
        self.show_prompt = prompt if prompt is not None else (readline or is_terminal(self.stdin))
        self.history_file = history_file if history_file is not None else history_path()
        super().__init__(vm, stdout if stdout is not None else sys.stdout, transcript)

    @property
    def prompt(self) -> str:
        return f"(qtest {self.target.fn.bdf}) " if self.target else "(qtest) "

    def _read_line(self) -> str:
        if self.use_readline:
            return input(self.prompt)
        if self.show_prompt:
            self.stdout.write(self.prompt)
            self.stdout.flush()
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Until ``quit`` or end of input: 0; QEMU died: its report, and 1."""
        if self.use_readline:
            self._setup_readline()
        try:
            while True:
                try:
                    line = self._read_line()
                except EOFError:
                    if self.show_prompt:
                        self.say()
                    return EXIT_OK
                except Interrupted:  # SIGTERM or a closed terminal: leave, not just a new prompt
                    raise
                except KeyboardInterrupt:
                    self.say("^C")
                    continue
                try:
                    if not self.execute(line):
                        return EXIT_OK
                except QemuCrashed as exc:
                    self.say(f"QEMU crashed: {exc}")
                    return EXIT_FAILED
                except Interrupted:
                    raise
                except KeyboardInterrupt:
                    # The reply of the command in flight would be taken for the next one's.
                    self.say("interrupted while QEMU was answering: the qtest stream is out of step; leaving")
                    return EXIT_INTERRUPTED
        finally:
            if self.use_readline:
                self._save_history()

    # -- readline -------------------------------------------------------------------------

    def _setup_readline(self) -> None:
        import readline

        with contextlib.suppress(OSError):
            readline.read_history_file(self.history_file)
        readline.set_history_length(HISTORY_LENGTH)
        readline.set_completer_delims(" \t")
        readline.set_completer(self._complete)
        readline.parse_and_bind("tab: complete")

    def _save_history(self) -> None:
        import readline

        with contextlib.suppress(OSError):
            readline.write_history_file(self.history_file)

    def _complete(self, text: str, state: int) -> str | None:
        try:
            options = [w for w in self._completions() if w.startswith(text)]
        except Exception:
            return None
        return options[state] if state < len(options) else None

    def _completions(self) -> list[str]:
        words = [*NAMED_COMMANDS, *self.raw]
        if self.target is not None:
            for name in BLOCKS:
                with contextlib.suppress(ShellError):
                    words += [name] + [f"{name}.{f.name}" for f in self._block(name).layout]
        words += [fn.bdf for fn in self.vm.pci.devices()]
        return sorted(set(words))


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for a closed or file-less one)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def history_path() -> str:
    """Where readline keeps the history: ``$QTEST_VIRTIO_HISTORY``, else ``~/.qtest_virtio_history``."""
    return os.environ.get(HISTORY_ENV) or os.path.expanduser(DEFAULT_HISTORY)
