"""QEMU bug-report reproducers (``.qtest``): parse them as written, replay them on our socket,
classify the outcome (design.md, "Reproducer format").

The forms accepted (README, "Does this bug report still crash?", has an example of each):

- shell: ``cat << EOF | ./qemu-system-i386 ... -qtest stdio``, the commands, ``EOF`` (a ``$``
  prompt before it, indented commands and delimiter, ``> `` continuation prompts), or the
  here-document on QEMU itself (``qemu-system-x86_64 ... -qtest stdio << EOF``);
- stdio: a command line with ``-qtest stdio`` followed directly by the commands; lines that do not
  start with a qtest command (prose, fences, pasted replies) are skipped;
- libqtest: the C form of QEMU's tests/qtest/fuzz-*-test.c (:mod:`.libqtest`);
- plain: ``# qemu-args: ...`` header lines, then one command per line.

Directives (plain form only): a line ``# qtest-virtio: NAME`` between the commands is not a
comment but a step replay takes there. ``# qtest-virtio: migrate`` live-migrates the machine to a
fresh QEMU of the same binary and command line (``-incoming defer``, QMP ``migrate`` over a
private Unix socket: ``QemuMachine.migrate_to``) and the commands after it go to the destination.
A refused migration (the destination exits after "load of migration failed") leaves the source
running on, as QEMU does, and the replay goes on there; a crash of either side is crashed; a
migration QMP does not answer in time is hung. Interceptions (``irq_intercept_in``) are not
carried over: the fuzzer writes them again after the directive, as QEMU got them. Hot(un)plug
is QMP around the guest's own qtest commands (slot power, ACPI eject), so its directives are the
QMP steps: ``# qtest-virtio: device_del ID``, ``# qtest-virtio: deleted ID`` (wait for
``DEVICE_DELETED``) and ``# qtest-virtio: device_add OPTION`` (a ``-device`` option); one QEMU
refuses or never completes is a note, and the replay goes on. Any other name, a missing or an
extra argument is a malformed file (file and line).

Send groups (plain form only, :mod:`.groups`): the commands between ``# qtest-virtio: group``
and ``# qtest-virtio: end`` went to QEMU in one write, and replay sends them in one write, then
reads their replies; every command outside a group is sent on its own and waits for its reply,
as before. QEMU's qtest server takes up to 1 KiB of input per main-loop pass, so commands of one
write run without a device's bottom halves in between: the fuzzer records its sends' boundaries
for that (a group where one send carried more than one line). Groups do not nest, hold at least
one command and no directive, and an unclosed one is malformed. For the upstream forms
(:func:`upstream_command`, ``-qtest stdio``) a group is just its lines in order.

A backslash at the end of a line joins it with the next exactly as the shell does (nothing in
between), which also rejoins fuzzer reproducers wrapped at 72 columns in the middle of a hex or
base64 token. The binary named in the file is replaced by the one under test (x86_64 stands in
for i386); ``-qtest stdio`` by our own socket; ``accel=qtest`` / ``-accel qtest`` are dropped
where the binary lacks the qtest accelerator (then TCG with ``-S``, as the Machine layer does).
Each command is checked against QEMU's own argument assertions (``Command.parse(line,
strict=False)``, :mod:`.qtest.grammar`): one QEMU would abort on makes the file malformed, not
QEMU crashed. After the last command QEMU runs a settle period (:func:`~qtest_virtio.outcome.settle`)
before the verdict, and the run is judged by the classifier the fuzzer uses too
(:class:`~qtest_virtio.outcome.Judge`).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .binary import QemuBinary
from .errors import MalformedCommand, QemuCrashed, QemuStartError, QtestTimeout, ScenarioError, UnknownCommand
from .fuzz.corpus import RecoveryCheck, recovery_check
from .fuzz.engine import M, migrate
from .groups import CLOSE, OPEN
from .libqtest import looks_like_c, parse_c
from .machine import MachineSpec, QemuMachine
from .machine.qdev import HotplugError
from .machine.spec import option_props
from .outcome import DEFAULT_SETTLE, EXIT_PRECEDENCE, Judge, Outcome, check_recovery, settle
from .qemu_args import has_display, missing_machine, without_qtest_channel
from .qemu_args import normalize_args as normalize_args  # re-exported: moved there, still named from here
from .qemu_args import shell_words as shell_words
from .qtest import COMMANDS, Command

#: A shell prompt pasted before a command: ``$ ``, ``user@host:~/qemu$ ``.
_PROMPT = r"(?:\S*\$\s+)?"
_HEREDOC_RE = re.compile(rf"^\s*{_PROMPT}cat\s*<<\s*-?\s*(['\"]?)(\w+)\1\s*\|\s*(.*)$")
#: ``qemu-system-x86_64 ... -qtest stdio << EOF`` (the here-document on QEMU itself).
_REDIRECT_RE = re.compile(rf"^\s*{_PROMPT}(\S*qemu\S*\s.*?)\s*<<\s*-?\s*(['\"]?)(\w+)\2\s*(.*)$")
#: A command line that takes the commands on stdin with no here-document.
_STDIO_RE = re.compile(rf"^\s*{_PROMPT}(\S*qemu\S*(?:\s.*)?\s-qtest\s+stdio(?:\s.*)?)$")
_QEMU_ARGS_RE = re.compile(r"^#\s*qemu-args:\s*(.*)$")
#: A continuation prompt (PS2) pasted before the lines of a here-document typed at a terminal.
_PS2_RE = re.compile(r"^>\s?")
#: A directive line (module docstring): ``# qtest-virtio: migrate``.
_DIRECTIVE_RE = re.compile(r"^#\s*qtest-virtio:\s*(.*)$")
#: The directives replay honours, with what each does (for the error naming them) and whether
#: it takes one argument (the rest of the line: a device id, a ``-device`` option).
DIRECTIVES = {
    "migrate": ("a live migration to a fresh QEMU of the same binary and command line", False),
    "device_del": ("QMP device_del of the device id that follows", True),
    "deleted": ("wait for QMP's DEVICE_DELETED of the device id that follows", True),
    "device_add": ("QMP device_add of the -device option that follows", True),
}
#: A comment that bounds the replay of a hang, in seconds (default :data:`DEFAULT_TIMEOUT`).
TIMEOUT_HEADER = "timeout:"
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Directive:
    """A ``# qtest-virtio: NAME`` line of the plain form: replay takes the step before the
    command at index ``at`` of ``Reproducer.commands`` (after the last one when ``at`` is
    their number)."""

    line: int
    at: int
    name: str
    #: The device id or ``-device`` option of device_del, deleted and device_add.
    arg: str = ""


@dataclass(frozen=True)
class Group:
    """``Reproducer.commands[start:stop]`` went to QEMU in one write (``# qtest-virtio: group``
    at ``line`` opened it): replay sends them in one write, then reads their replies."""

    line: int
    start: int
    stop: int


@dataclass
class Reproducer:
    """A parsed reproducer: the QEMU arguments as written and the qtest commands with their
    line numbers in the file, and the directives between them."""

    path: str
    binary: str
    args: list[str]
    commands: list[tuple[int, str]]
    comments: list[str] = field(default_factory=list)
    #: ``# timeout: S``: how long a reply may take before the replay counts as hung.
    timeout: float | None = None
    #: shell (a here-document), stdio (commands after the command line), libqtest (C), plain.
    form: str = "plain"
    #: What parsing changed or skipped, for the replay's notes.
    notes: list[str] = field(default_factory=list)
    #: ``# qtest-virtio:`` steps between the commands (plain form), in file order.
    directives: list[Directive] = field(default_factory=list)
    #: Commands sent in one write (plain form), in file order.
    groups: list[Group] = field(default_factory=list)


@dataclass
class ReplayResult:
    """survived | crashed | hung | cannot-run, with what explains it; and for a fuzzer
    reproducer with a ``# fuzz-check:`` header, unrecovered (QEMU lived, but after a device
    reset a valid request failed)."""

    outcome: Outcome
    detail: str = ""
    signal: int | None = None
    returncode: int | None = None
    commands_run: int = 0
    notes: list[str] = field(default_factory=list)
    command_line: str = ""
    stderr_tail: str = ""
    #: ``# qtest-virtio: migrate`` directives that moved the machine (a refused one is a note).
    migrations: int = 0
    #: The ``-device`` options device_add directives plugged and no device_del took away since:
    #: a migration destination starts with them on its command line, as the source has them.
    plugged: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.outcome)  # the printed word ("survived") names it too

    @property
    def exit_code(self) -> int:
        """git bisect run: 0 good, 1 bad, 125 cannot test."""
        return self.outcome.exit_code


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with backslash-newline continuations removed, each with its first line number.
    Trailing white space (a paste's, a CRLF file's CR) is dropped first, so a backslash followed
    by spaces still continues the line."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        raw = raw.rstrip()
        if not buf:
            start = n
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            buf += raw[:-1]
            continue
        out.append((start, buf + raw))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def _opener(line: str) -> tuple[str, str, str | None] | None:
    """``(form, QEMU command line, here-document delimiter)`` if ``line`` starts a reproducer."""
    m = _HEREDOC_RE.match(line)
    if m:
        return "shell", m.group(3), m.group(2)
    m = _REDIRECT_RE.match(line)
    if m:
        return "shell", f"{m.group(1)} {m.group(4)}".strip(), m.group(3)
    m = _STDIO_RE.match(line)
    if m:
        return "stdio", m.group(1), None
    return None


def _is_command(line: str) -> bool:
    return line.split(" ", 1)[0] in COMMANDS


def parse(text: str, path: str = "<reproducer>") -> Reproducer:
    """Parse any accepted form (module docstring); a malformed file raises ScenarioError naming
    the file and line, also for a qtest command QEMU's server would assert on."""
    c_form = looks_like_c(text)
    if c_form and "qtest_quit" in text:  # a C test, even one quoting a shell reproducer in a comment
        return _checked(_from_c(text, path))
    lines = _logical_lines(text)
    # Bug reports wrap the reproducer in prose: what precedes the command line is text.
    opened = next(((i, o) for i, (_, line) in enumerate(lines) if (o := _opener(line)) is not None), None)
    if opened is not None:
        lines = lines[opened[0] :]
    elif c_form:
        return _checked(_from_c(text, path))
    header: list[str] = []
    commands: list[tuple[int, str]] = []
    comments: list[str] = []
    directives: list[Directive] = []
    groups: list[Group] = []
    opened_group: tuple[int, int] | None = None  # (line, first command) of the group not closed yet
    heredoc_end: str | None = None
    timeout: float | None = None
    heredoc_line = 0
    args_text: str | None = None
    form = "plain"
    skipped = 0
    done = False
    for n, line in lines:
        stripped = line.strip()
        if heredoc_end is not None:
            stripped = _PS2_RE.sub("", stripped) if stripped.startswith(">") else stripped
            if stripped == heredoc_end:
                heredoc_end, done = None, True
                continue
            if stripped:
                commands.append((n, stripped))
            continue
        if done:
            if stripped and not stripped.startswith("#"):
                raise ScenarioError(f"text after the closing delimiter: {stripped[:60]!r}", path=path, line=n)
            continue
        if not stripped:
            continue
        if args_text is None and header == [] and (o := _opener(line)) is not None:
            form, args_text, heredoc_end = o
            heredoc_line = n
            continue
        m = _QEMU_ARGS_RE.match(stripped)
        if m and form == "plain":
            header.append(m.group(1))
            continue
        d = _DIRECTIVE_RE.match(stripped)
        if d and d.group(1).split(None, 1)[:1] in ([OPEN], [CLOSE]):
            opened_group = _group_mark(d.group(1), form, opened_group, len(commands), groups, path, n)
            continue
        if d:
            if opened_group is not None:
                raise ScenarioError(
                    f"directive '# qtest-virtio: {d.group(1).strip()}' inside the group opened at line "
                    f"{opened_group[0]}: a group is one write of qtest commands (close it with "
                    f"'# qtest-virtio: {CLOSE}' first)",
                    path=path,
                    line=n,
                )
            directives.append(_directive(d.group(1), form, len(commands), path, n))
            continue
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("# "))
            if comments[-1].startswith(TIMEOUT_HEADER):
                timeout = _parse_timeout(comments[-1][len(TIMEOUT_HEADER) :], path, n)
            continue
        if form == "stdio":
            # Commands typed at QEMU's stdin; prose, replies pasted with them (OK, FAIL) and
            # Markdown fences are not commands.
            stripped = _PS2_RE.sub("", stripped) if stripped.startswith(">") else stripped
            if _is_command(stripped):
                commands.append((n, stripped))
            else:
                skipped += 1
            continue
        if header:
            commands.append((n, stripped))
            continue
        raise ScenarioError(
            "not a reproducer: expected a QEMU command line ('cat << EOF | qemu-system-... -qtest stdio', "
            "'qemu ... -qtest stdio' then the commands, qtest_init(\"...\") in C) or '# qemu-args: ...' "
            f"before the first command, found {stripped[:60]!r}",
            path=path,
            line=n,
        )
    if heredoc_end is not None:
        raise ScenarioError(
            f"the here-document opened here never ends with {heredoc_end!r}", path=path, line=heredoc_line
        )
    if opened_group is not None:
        raise ScenarioError(
            f"the group opened here never ends with '# qtest-virtio: {CLOSE}'", path=path, line=opened_group[0]
        )
    if args_text is None:
        if not header:
            raise ScenarioError(
                "no QEMU command line ('cat << EOF | qemu ...', 'qemu ... -qtest stdio' or '# qemu-args:')",
                path=path,
                line=1,
            )
        args_text = " ".join(header)
    try:
        words = shlex.split(args_text)
    except ValueError as exc:
        raise ScenarioError(f"cannot split the QEMU command line: {exc}", path=path, line=heredoc_line or 1) from None
    if not words:
        raise ScenarioError("empty QEMU command line", path=path, line=heredoc_line or 1)
    binary, args = (words[0], words[1:]) if "qemu" in words[0].rsplit("/", 1)[-1] else ("", words)
    if not commands:
        raise ScenarioError("no qtest commands", path=path, line=heredoc_line or 1)
    notes = [f"{skipped} line(s) between the commands that are not qtest commands were skipped"] if skipped else []
    return _checked(
        Reproducer(
            path,
            binary,
            args,
            commands,
            comments,
            timeout,
            form=form,
            notes=notes,
            directives=directives,
            groups=groups,
        )
    )


def _group_mark(
    text: str, form: str, opened: tuple[int, int] | None, at: int, groups: list[Group], path: str, line: int
) -> tuple[int, int] | None:
    """``# qtest-virtio: group`` (opens a group before command ``at``) or ``end`` (closes it,
    into ``groups``): the group left open. ScenarioError (file and line) for an argument, a
    form other than plain, a nested or an empty group, an ``end`` with no group open."""
    word = text.strip()
    if form != "plain":
        raise ScenarioError(
            f"'# qtest-virtio: {word}' in a {form} reproducer: groups are honoured in the plain form "
            "('# qemu-args:' then the commands) only",
            path=path,
            line=line,
        )
    if word not in (OPEN, CLOSE):
        name = word.split(None, 1)[0]
        raise ScenarioError(
            f"directive '# qtest-virtio: {word}': {name} takes no arguments (write '# qtest-virtio: {name}')",
            path=path,
            line=line,
        )
    if word == OPEN:
        if opened is not None:
            raise ScenarioError(
                f"a group inside the group opened at line {opened[0]}: groups do not nest (close that one with "
                f"'# qtest-virtio: {CLOSE}' first)",
                path=path,
                line=line,
            )
        return line, at
    if opened is None:
        raise ScenarioError(
            f"'# qtest-virtio: {CLOSE}' with no group open (a group starts with '# qtest-virtio: {OPEN}')",
            path=path,
            line=line,
        )
    if opened[1] == at:
        raise ScenarioError(
            f"the group opened at line {opened[0]} holds no command (drop both lines)", path=path, line=line
        )
    groups.append(Group(opened[0], opened[1], at))
    return None


def _directive(text: str, form: str, at: int, path: str, line: int) -> Directive:
    """The directive ``# qtest-virtio: TEXT`` before command ``at``; ScenarioError (file and
    line) for a name replay does not know, arguments, or a form other than plain."""
    words = text.split(None, 1)
    known = "; ".join(f"'# qtest-virtio: {k}{' ARG' if arg else ''}' ({what})" for k, (what, arg) in DIRECTIVES.items())
    known += f"; '# qtest-virtio: {OPEN}' ... '# qtest-virtio: {CLOSE}' (the commands between go in one write)"
    if form != "plain":
        raise ScenarioError(
            f"directive '# qtest-virtio: {text}' in a {form} reproducer: directives are honoured in the plain form "
            "('# qemu-args:' then the commands) only",
            path=path,
            line=line,
        )
    if not words or words[0] not in DIRECTIVES:
        raise ScenarioError(f"unknown directive '# qtest-virtio: {text}': replay knows {known}", path=path, line=line)
    name, takes = words[0], DIRECTIVES[words[0]][1]
    if len(words) > 1 and not takes:
        raise ScenarioError(
            f"directive '# qtest-virtio: {text}': {name} takes no arguments (write '# qtest-virtio: {name}')",
            path=path,
            line=line,
        )
    if len(words) < 2 and takes:
        raise ScenarioError(
            f"directive '# qtest-virtio: {text}': {name} needs an argument ({DIRECTIVES[name][0]})",
            path=path,
            line=line,
        )
    return Directive(line, at, name, words[1].strip() if takes else "")


def _from_c(text: str, path: str) -> Reproducer:
    test = parse_c(text, path)
    try:
        args = shlex.split(test.args_text)
    except ValueError as exc:
        raise ScenarioError(f"cannot split the QEMU command line: {exc}", path=path, line=test.init_line) from None
    if not test.commands:
        raise ScenarioError("no qtest commands between qtest_init and qtest_quit", path=path, line=test.init_line)
    return Reproducer(path, "", args, test.commands, form="libqtest", notes=test.notes)


def _checked(rep: Reproducer) -> Reproducer:
    """``rep``, once each command passed the grammar's check of QEMU's own assertions: a
    command QEMU would abort on makes the file malformed (exit 128), not a QEMU crash. An
    unknown command passes: QEMU answers it FAIL."""
    for n, command in rep.commands:
        try:
            Command.parse(command, strict=False)
        except UnknownCommand:
            pass
        except MalformedCommand as exc:
            raise ScenarioError(
                f"malformed qtest command {command[:60]!r}: {exc} (QEMU's qtest server would abort on it: "
                "a broken reproducer, not a QEMU bug)",
                path=rep.path,
                line=n,
            ) from None
    return rep


def _parse_timeout(text: str, path: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ScenarioError(f"'# {TIMEOUT_HEADER} {text.strip()}' is not a number of seconds > 0", path=path, line=line)
    return value


def load(path: str) -> Reproducer:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", path=path) from None
    # Quoted-printable mail residue ("=3D", soft breaks) is not handled on purpose.
    return parse(text, path)


def upstream_args(rep: Reproducer) -> list[str]:
    """The reproducer's command line for an upstream build with the qtest accelerator, as QEMU's
    bug reports write it: ``qemu-system-x86_64 ... -qtest stdio``.

    The arguments are the file's, less its qtest channel; ``-accel qtest`` is added where the
    file names no accelerator and ``-display none`` where it names no display (as libqtest does).
    """
    args = without_qtest_channel(rep.args)
    if not any(a == "-accel" or "accel=" in a for a in args):
        args += ["-accel", "qtest"]
    if not has_display(args):
        args += ["-display", "none"]
    return ["qemu-system-x86_64", *args, "-qtest", "stdio"]


def upstream_command(rep: Reproducer, width: int = 100) -> str:
    """The whole reproducer in the bug-report form: ``cat << EOF | qemu-system-x86_64 ...
    -qtest stdio``, the commands, ``EOF`` (see :func:`upstream_args`). A reproducer with a
    directive has no such form (one QEMU on stdin cannot migrate): ScenarioError naming its line."""
    if rep.directives:
        d = rep.directives[0]
        raise ScenarioError(
            f"'# qtest-virtio: {d.name}' here has no 'qemu ... -qtest stdio' form (a QEMU reading qtest commands on "
            f"stdin cannot {'migrate' if d.name == 'migrate' else 'take QMP ' + d.name}): attach the file and "
            f"'qtest-virtio replay {os.path.basename(rep.path)}' instead",
            path=rep.path,
            line=d.line,
        )
    return "\n".join([shell_words(upstream_args(rep), "cat << EOF |", width), *(c for _, c in rep.commands), "EOF"])


def replay(
    rep: Reproducer,
    *,
    qemu: str | None = None,
    timeout: float | None = None,
    settle_s: float = DEFAULT_SETTLE,
    trace: bool = False,
    echo: object = None,
) -> ReplayResult:
    """Run the reproducer on our socket and say whether QEMU survived, crashed or hung; a reply
    that takes longer than ``timeout`` (default: the file's ``# timeout:``, else
    :data:`DEFAULT_TIMEOUT`) is a hang. After the last command QEMU runs ``settle_s`` more
    seconds (:func:`~qtest_virtio.outcome.settle`) before the verdict.

    A fuzzer reproducer that ends in a recovery check (``# fuzz-check:``) is replayed on the
    machine its header names, and the check runs after the commands (:func:`_replay_checked`).
    """
    timeout = timeout if timeout is not None else rep.timeout or DEFAULT_TIMEOUT
    binary = QemuBinary.get(qemu)
    check = recovery_check(rep.comments, qemu=binary.path, timeout=timeout, path=rep.path)
    if check is not None:
        return _replay_checked(rep, check, timeout=timeout, settle_s=settle_s, trace=trace, echo=echo)
    args, notes = normalize_args(rep.args, binary)
    notes = [*rep.notes, *notes]
    if rep.binary and not rep.binary.endswith("x86_64"):
        notes.append(f"{rep.binary.rsplit('/', 1)[-1]} is replaced by {binary.path}")
    missing = missing_machine(args, binary)
    if missing is not None:
        return ReplayResult(Outcome.CANNOT_RUN, missing, notes=notes)
    spec = MachineSpec(qemu=binary.path, raw_args=args, command_timeout=timeout, start_timeout=max(timeout, 15.0))
    vm = QemuMachine(spec)
    try:
        vm.start()
    except QemuStartError as exc:
        return ReplayResult(Outcome.CANNOT_RUN, str(exc).splitlines()[0], notes=notes, command_line=exc.command_line)
    result = ReplayResult(Outcome.SURVIVED, notes=notes, command_line=vm.command_line())
    where = "the round trip after the last command"
    died_after: float | None = None

    def hung(exc: QtestTimeout) -> str:
        if exc.command.startswith(_MIGRATION_AT):
            return f"no reply within {timeout:g} s during {exc.command}"
        at = f"line {rep.commands[result.commands_run][0]}" if result.commands_run < len(rep.commands) else where
        group = next((g for g in rep.groups if g.start == result.commands_run), None)
        if group is not None:
            at = f"the group of {group.stop - group.start} commands at line {group.line} (one write)"
        return f"no reply within {timeout:g} s to {at}"

    judge = Judge(vm, hung=hung, clean_exit_survives=True)
    with judge as verdict:
        vm.resume()  # like the qtest accelerator, a RUNNING machine whose only vCPU halts
        vm = run_commands(judge, vm, rep, result, trace=trace, echo=echo)
        answered_at = time.monotonic()
        where = f"the {settle_s:g} s settle period after the last command"
        try:
            settle(vm, settle_s)
        except QemuCrashed:
            died_after = time.monotonic() - answered_at
            raise
    vm = judge.vm
    result.returncode = vm.returncode
    result.stderr_tail = vm.stderr_tail(30)
    result.outcome, result.detail, result.signal = verdict.outcome, verdict.detail, verdict.signal
    if verdict.clean_exit and verdict.outcome is Outcome.SURVIVED:
        # A clean exit the guest asked for (e.g. an ACPI power-off through PM1_CNT): QEMU did
        # what a machine does, it did not crash.
        result.detail = f"QEMU shut down cleanly (exit status 0) after {result.commands_run} commands"
    elif verdict.crashed_after_run:
        result.notes.append("QEMU answered everything, then died while it quit (QMP quit at the end)")
    elif died_after is not None and verdict.outcome is Outcome.CRASHED:
        result.notes.append(
            f"QEMU died {died_after:.2f} s after its last command was answered (settle period: {settle_s:g} s)"
        )
    return result


def _replay_checked(
    rep: Reproducer, check: RecoveryCheck, *, timeout: float, settle_s: float, trace: bool, echo: object
) -> ReplayResult:
    """Replay a fuzzer reproducer whose ``# fuzz-check:`` header asks for the recovery check:
    the machine the header names, the commands, the settle period, then a fresh driver (device
    reset, initialization) and the device's valid request. survived, crashed, hung or unrecovered."""
    vm = check.machine()
    try:
        vm.start()
    except QemuStartError as exc:
        return ReplayResult(Outcome.CANNOT_RUN, str(exc).splitlines()[0], command_line=exc.command_line)
    result = ReplayResult(Outcome.SURVIVED, command_line=vm.command_line())
    where = "the commands"
    judge = Judge(vm, hung=lambda exc: f"no reply within {timeout:g} s during {where}: {exc}")
    with judge as verdict:
        vm.resume()  # as in the example: the driver's first step resumed the machine (QMP cont)
        vm = run_commands(judge, vm, rep, result, trace=trace, echo=echo)
        where = "the settle period"
        settle(vm, settle_s)
        where = "the recovery"
        verdict.detail = f"{result.commands_run} commands, then a device reset and a valid request: served"
        check_recovery(verdict, lambda: check.run(vm))
    result.returncode = judge.vm.returncode  # the machine the run ended on (after a migration)
    result.stderr_tail = judge.vm.stderr_tail(30)
    result.outcome, result.detail, result.signal = verdict.outcome, verdict.detail, verdict.signal
    return result


#: How a migration directive names itself in a hang (``QtestTimeout.command``).
_MIGRATION_AT = "the migration at line"


def run_commands(judge: Judge, vm: M, rep: Reproducer, result: ReplayResult, *, trace: bool, echo: object) -> M:
    """Send the reproducer's commands as written (counted in ``result``, each with its reply
    through ``echo`` or print when tracing), taking its directives where they stand, then one
    more round trip: QEMU processed them all. Returns the machine they ended on (a migration
    moves them; ``judge`` follows it)."""
    printer = echo if callable(echo) else print
    steps = sorted(rep.directives, key=lambda d: d.at)
    groups = {g.start: g for g in rep.groups}
    i = 0
    while True:
        while steps and steps[0].at == i:
            vm = _take(steps.pop(0), judge, vm, rep, result, printer if trace else None)
        if i == len(rep.commands):
            break
        group = groups.get(i)
        sent = rep.commands[i : group.stop if group else i + 1]
        # A group goes in one write, as the fuzzer sent it (module docstring); the rest one at a time.
        replies = vm.qtest.send_raw_many([c for _, c in sent]) if group else [vm.qtest.send_raw(sent[0][1])]
        result.commands_run += len(sent)
        i += len(sent)
        if trace:
            for (n, command), reply in zip(sent, replies, strict=True):
                printer(f"{rep.path}:{n}: {command[:160]}  ->  {reply[:160]}")
    vm.qtest.send_raw("endianness")
    return vm


def _take(step: Directive, judge: Judge, vm: M, rep: Reproducer, result: ReplayResult, printer: Any) -> M:
    """One directive: the machine the commands go on with. A hot(un)plug step QEMU refuses or
    never completes is a note, as it was an observation for the fuzzer, and the replay goes on."""
    moved, note = vm, ""
    if step.name == "migrate":
        spec = vm.spec.clone()
        if spec.raw_args is not None:
            spec.raw_args += [w for option in result.plugged for w in ("-device", option)]
        moved, refused = migrate(judge, vm, what=f"{_MIGRATION_AT} {step.line}", spec=spec)
        if refused is None:
            result.migrations += 1
            note = f"migrated to a fresh QEMU (pid {moved.pid}), the commands went on there"
        else:
            note = f"migration refused, the source ran on: {refused}"
    else:
        try:
            if step.name == "device_del":
                vm.device_del(step.arg)
                result.plugged = [o for o in result.plugged if not _on_device(o, step.arg)]
            elif step.name == "deleted":
                vm.wait_device_deleted(step.arg, timeout=vm.spec.command_timeout)
            else:
                vm.device_add(step.arg)
                result.plugged.append(step.arg)
            note = f"{step.name} {step.arg}: done"
        except HotplugError as exc:
            note = f"{step.name} {step.arg}: {str(exc).splitlines()[0]}"
    if printer is not None:
        printer(f"{rep.path}:{step.line}: # qtest-virtio: {step.name}  ->  {note}")
    if step.name == "migrate" or not note.endswith(": done"):
        result.notes.append(f"line {step.line}: {note}")
    return moved


def _on_device(option: str, dev_id: str) -> bool:
    """Whether a ``-device`` option is the device ``dev_id`` or one on its bus (a scsi-hd on
    ``fuzz0.0``): what ``device_del`` of ``dev_id`` takes away."""
    props = option_props(option)
    return props.get("id") == dev_id or props.get("bus", "").startswith(f"{dev_id}.")


def describe(result: ReplayResult, rep: Reproducer) -> str:
    """The verdict line for a human (and a log)."""
    if result.outcome is Outcome.SURVIVED:
        moved = f" across {result.migrations} live migration(s)" if result.migrations else ""
        return f"survived: {result.detail or f'{result.commands_run} commands replayed{moved}, QEMU alive'}"
    if result.outcome is Outcome.CRASHED:
        sig = f"signal {result.signal}" if result.signal else f"exit status {result.returncode}"
        return f"crashed ({sig}) after {result.commands_run} of {len(rep.commands)} commands: {result.detail}"
    if result.outcome in (Outcome.HUNG, Outcome.UNRECOVERED):
        return f"{result.outcome}: {result.detail}"
    return f"cannot run here: {result.detail}"


def collect(target: str) -> list[str]:
    """``target`` as reproducer paths: the file itself, or a folder's ``*.qtest`` files by name."""
    if os.path.isdir(target):
        paths = sorted(os.path.join(target, n) for n in os.listdir(target) if n.endswith(".qtest"))
        if not paths:
            raise ScenarioError(
                "no .qtest reproducers in this folder: give a .qtest file or a folder of them", path=target
            )
        return paths
    if not os.path.exists(target):
        raise ScenarioError("no such file or folder: give a .qtest file or a folder of them", path=target)
    return [target]


def version_label(binary: QemuBinary) -> str:
    """The version and the vendor's tag ``--version`` prints, e.g. '7.2.22 (Debian 1:7.2+dfsg-7)';
    an upstream build prints no tag ('10.2.2')."""
    tag = re.search(r"version \S+ \((.+)\)\s*$", binary.version_text)
    return f"{binary.version_string} ({tag.group(1)})" if tag else binary.version_string


def version_labels(binaries: Sequence[QemuBinary]) -> list[str]:
    """:func:`version_label` of each, with the path added where two would read the same."""
    labels = [version_label(b) for b in binaries]
    return [f"{lab} [{b.path}]" if labels.count(lab) > 1 else lab for lab, b in zip(labels, binaries, strict=True)]


@dataclass
class ReplayRow:
    """One reproducer replayed on one binary."""

    rep: Reproducer
    binary: QemuBinary
    label: str
    result: ReplayResult

    @property
    def verdict(self) -> str:
        return describe(self.result, self.rep)


def combined_exit_code(results: Iterable[ReplayResult]) -> int:
    """The exit code of a multi-row replay: 1 if any row crashed, hung or was unrecovered, else
    125 if any could not run, else 0."""
    codes = {r.exit_code for r in results}
    return next((c for c in EXIT_PRECEDENCE if c in codes), 0)


def replay_rows(
    reps: Sequence[Reproducer],
    binaries: Sequence[QemuBinary],
    *,
    timeout: float | None = None,
    settle_s: float = DEFAULT_SETTLE,
) -> Iterator[ReplayRow]:
    """Each reproducer on each binary, in that order; ``timeout`` overrides each file's own
    ``# timeout:``."""
    labels = version_labels(binaries)
    for rep in reps:
        for binary, label in zip(binaries, labels, strict=True):
            result = replay(rep, qemu=binary.path, timeout=timeout, settle_s=settle_s)
            yield ReplayRow(rep, binary, label, result)


def tally(results: Iterable[ReplayResult]) -> str:
    """'8 survived, 3 crashed': how many rows had each verdict, in :class:`Outcome` order."""
    outcomes = [r.outcome for r in results]
    return ", ".join(f"{outcomes.count(o)} {o}" for o in Outcome if o in outcomes)
