"""``qtest-virtio shell``: an interactive session on a started machine.

What a QEMU developer does by hand with ``-qtest stdio``, made safer and readable: raw qtest
commands (validated first, because QEMU's qtest server ``g_assert``\\ s on a malformed argument
and a typo would abort QEMU), replies decoded (numbers in hex and decimal, buffers as a
hexdump, addresses named when they fall on a known register), and named commands on top of
the library's layers: PCI functions, config space by offset or name, and the virtio register
blocks (``common_cfg``, ``legacy``, ``device_cfg``) by register name.

The qtest channel is the machine's own Unix socket (never a pty: a pty cuts lines at 4095
bytes); only the user's terminal is one. With a terminal, input goes through ``readline``
with a history file (``$QTEST_VIRTIO_HISTORY``, else ``~/.qtest_virtio_history``).

``Shell`` is the testable core (a started :class:`Machine` and two text streams);
``run_shell(args)`` is the ``qtest-virtio shell`` entry point. ``python3 -m qtest_virtio.app.shell``
runs it stand-alone with the same options.

The package, one job a module: ``text`` (numbers in, numbers and hexdumps out, ShellError),
``raw`` (raw mode through the qtest grammar), ``registers`` (the named blocks and how their
bits read), ``addresses`` (naming the register an address falls on), ``commands`` (what each
line does) and ``session`` (reading lines: readline, history, completion); the entry points
are here.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from ...errors import QemuCrashed
from ...vm import Machine
from ..args import Parser, add_machine_arguments, spec_from_args
from ..exits import EXIT_FAILED, EXIT_OK, guarded, unwinding
from .commands import Commands, Transcript
from .raw import parse_raw, raw_table
from .session import Shell, history_path, is_terminal
from .text import ShellError, fmt_int, hexdump, parse_int

__all__ = [
    "DEFAULT_TIMEOUT",
    "Commands",
    "Shell",
    "ShellError",
    "Transcript",
    "add_arguments",
    "fmt_int",
    "hexdump",
    "history_path",
    "main",
    "parse_int",
    "parse_raw",
    "raw_table",
    "run_shell",
]

DEFAULT_TIMEOUT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``shell`` options: probe's machine options, and the qtest reply timeout."""
    add_machine_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for a qtest reply before calling QEMU hung (default {DEFAULT_TIMEOUT:g})",
    )


def run_shell(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``qtest-virtio shell``: start the machine from probe's options, run the session.

    Exit status: 0 after ``quit`` or end of input, 1 when QEMU crashed. Start-up errors
    (unknown device, QEMU refusing the command line) propagate for the CLI to map.
    """
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    spec = spec_from_args(args)
    spec.command_timeout = float(getattr(args, "timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)
    interactive = is_terminal(stdin) and stdin is sys.stdin and is_terminal(stdout)
    transcript = Transcript()
    vm = Machine(spec, qtest_log=transcript)
    # A closed terminal (SIGHUP) unwinds like Ctrl-C would, so QEMU is stopped and its directory
    # removed instead of being left to PDEATHSIG and the next start's sweep.
    with unwinding(signal.SIGHUP):
        vm.start()
        code = EXIT_FAILED
        try:
            accel = "qtest accelerator" if vm.binary.has_qtest_accel else "TCG with -S (no qtest accelerator)"
            shell = Shell(vm, stdin, stdout, readline=interactive, transcript=transcript)
            stdout.write(
                f"# {vm.binary.version_text}\n"
                f"# QEMU pid {vm.pid}: machine {spec.machine}, {spec.memory} RAM, config access "
                f"{vm.pci.config.name}, {accel}\n"
                "# type help for the commands, quit or Ctrl-D to leave\n"
            )
            stdout.flush()
            code = shell.run()
        finally:
            if code == EXIT_OK:
                try:
                    vm.shutdown(check=True)
                except QemuCrashed as exc:
                    stdout.write(f"QEMU crashed: {exc}\n")
                    stdout.flush()
                    code = EXIT_FAILED
            else:
                vm.shutdown(check=False)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m qtest_virtio.app.shell``: the same as ``qtest-virtio shell``."""
    parser = Parser(prog="qtest-virtio shell", description="An interactive qtest session on a started machine.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: run_shell(args))
