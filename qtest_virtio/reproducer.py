"""QEMU bug-report reproducers (``.qtest``): parse them as written, replay them on our socket,
classify the outcome (design.md, "Reproducer format").

Two forms are accepted:

- the shell form of bug reports and patch mails::

      cat << EOF | ./qemu-system-i386 -display none -machine accel=qtest, -m 512M \\
      -device virtio-blk-pci,drive=d0 -qtest stdio
      outl 0xcf8 0x80000810
      ...
      EOF

- the plain form: ``# qemu-args: ...`` header lines, then one command per line.

A backslash at the end of a line joins it with the next exactly as the shell does (nothing in
between), which also rejoins fuzzer reproducers wrapped at 72 columns in the middle of a hex or
base64 token. The binary named in the file is replaced by the one under test (x86_64 stands in
for i386); ``-qtest stdio`` by our own socket; ``accel=qtest`` / ``-accel qtest`` are dropped
where the binary lacks the qtest accelerator (then TCG with ``-S``, as the Machine layer does).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from .binary import QemuBinary
from .errors import QemuCrashed, QemuStartError, QtestTimeout, ScenarioError
from .machine import MachineSpec, QemuMachine

_HEREDOC_RE = re.compile(r"^\s*cat\s*<<\s*-?\s*(['\"]?)(\w+)\1\s*\|\s*(.*)$")
_QEMU_ARGS_RE = re.compile(r"^#\s*qemu-args:\s*(.*)$")
#: A comment (``#`` stripped) that makes a fuzzer reproducer end with a recovery check.
FUZZ_CHECK = "fuzz-check:"


@dataclass
class Reproducer:
    """A parsed reproducer: the QEMU arguments as written and the qtest commands with their
    line numbers in the file."""

    path: str
    binary: str
    args: list[str]
    commands: list[tuple[int, str]]
    comments: list[str] = field(default_factory=list)


@dataclass
class ReplayResult:
    """survived | crashed | hung | cannot-run, with what explains it; and for a fuzzer
    reproducer with a ``# fuzz-check:`` header, unrecovered (QEMU lived, but after a device
    reset a valid request failed)."""

    outcome: str
    detail: str = ""
    signal: int | None = None
    returncode: int | None = None
    commands_run: int = 0
    notes: list[str] = field(default_factory=list)
    command_line: str = ""
    stderr_tail: str = ""

    @property
    def exit_code(self) -> int:
        """git bisect run: 0 good, 1 bad, 125 cannot test."""
        return {"survived": 0, "crashed": 1, "hung": 1, "unrecovered": 1, "cannot-run": 125}[self.outcome]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with backslash-newline continuations removed, each with its first line number."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
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


def parse(text: str, path: str = "<reproducer>") -> Reproducer:
    """Parse either form; a malformed file raises ScenarioError naming the file and line."""
    lines = _logical_lines(text)
    # Bug reports wrap the reproducer in prose: with a here-document, what precedes it is text.
    opener = next((i for i, (_, line) in enumerate(lines) if _HEREDOC_RE.match(line)), None)
    if opener is not None:
        lines = lines[opener:]
    header: list[str] = []
    commands: list[tuple[int, str]] = []
    comments: list[str] = []
    heredoc_end: str | None = None
    heredoc_line = 0
    args_text: str | None = None
    done = False
    for n, line in lines:
        stripped = line.strip()
        if heredoc_end is not None:
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
        m = _HEREDOC_RE.match(line)
        if m and args_text is None:
            heredoc_end, heredoc_line = m.group(2), n
            args_text = m.group(3)
            continue
        m = _QEMU_ARGS_RE.match(stripped)
        if m:
            header.append(m.group(1))
            continue
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("# "))
            continue
        if header:
            commands.append((n, stripped))
            continue
        raise ScenarioError(
            "not a reproducer: expected 'cat << EOF | qemu-system-... -qtest stdio' or '# qemu-args: ...' "
            f"before the first command, found {stripped[:60]!r}",
            path=path,
            line=n,
        )
    if heredoc_end is not None:
        raise ScenarioError(
            f"the here-document opened here never ends with {heredoc_end!r}", path=path, line=heredoc_line
        )
    if args_text is None:
        if not header:
            raise ScenarioError("no QEMU command line ('cat << EOF | qemu ...' or '# qemu-args:')", path=path, line=1)
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
    return Reproducer(path, binary, args, commands, comments)


def load(path: str) -> Reproducer:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", path=path) from None
    # Quoted-printable mail residue ("=3D", soft breaks) is not handled on purpose.
    return parse(text, path)


def _strip_accel(opts: str) -> str:
    return ",".join(p for p in opts.split(",") if p and p != "accel=qtest")


def normalize_args(args: list[str], binary: QemuBinary) -> tuple[list[str], list[str]]:
    """The reproducer's arguments for our harness, and notes on what changed.

    Drops ``-qtest X`` and ``-qtest-log X`` (ours replace them), and the qtest accelerator
    where this binary lacks it (the Machine layer then runs TCG with -S).
    """
    out: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a in ("-qtest", "-qtest-log") and nxt is not None:
            i += 2
            continue
        if a in ("-machine", "-M") and nxt is not None and "accel=qtest" in nxt.split(","):
            rest = _strip_accel(nxt)
            notes.append(f"dropped accel=qtest from {a} {nxt}")
            if rest:
                out += [a, rest]
            i += 2
            continue
        if a == "-accel" and nxt is not None and nxt.split(",")[0] == "qtest":
            notes.append("dropped -accel qtest")
            i += 2
            continue
        out.append(a)
        i += 1
    if not any(a in ("-display", "-nographic", "-vnc") for a in out):
        # libqtest adds -display none itself, so reproducers taken from qtest tests omit it.
        out += ["-display", "none"]
        notes.append("added -display none (as libqtest does)")
    if any("accel" in n for n in notes) and not binary.has_qtest_accel:
        notes.append("this QEMU has no qtest accelerator: running TCG with -S (and the halt firmware)")
    elif any("accel" in n for n in notes):
        notes.append("the harness adds -accel qtest itself")
    return out, notes


def replay(
    rep: Reproducer,
    *,
    qemu: str | None = None,
    timeout: float = 10.0,
    trace: bool = False,
    echo: object = None,
) -> ReplayResult:
    """Run the reproducer on our socket and say whether QEMU survived, crashed or hung.

    A fuzzer reproducer that ends in a recovery check (``# fuzz-check:``) is replayed by the
    fuzzer, which rebuilds the machine from the header and runs the check after the commands.
    """
    if any(c.startswith(FUZZ_CHECK) for c in rep.comments):
        from .fuzz import replay_checked

        return replay_checked(rep, qemu=qemu, timeout=timeout, trace=trace, echo=echo)
    binary = QemuBinary.get(qemu)
    args, notes = normalize_args(rep.args, binary)
    if rep.binary and not rep.binary.endswith("x86_64") and "qemu-system" in rep.binary:
        notes.append(f"{rep.binary.rsplit('/', 1)[-1]} is replaced by {binary.path}")
    spec = MachineSpec(qemu=binary.path, raw_args=args, command_timeout=timeout, start_timeout=max(timeout, 15.0))
    vm = QemuMachine(spec)
    try:
        vm.start()
    except QemuStartError as exc:
        return ReplayResult("cannot-run", str(exc).splitlines()[0], notes=notes, command_line=exc.command_line)
    result = ReplayResult("survived", notes=notes, command_line=vm.command_line())
    try:
        vm.resume()  # like the qtest accelerator, a RUNNING machine whose only vCPU halts
        run_commands(vm, rep, result, trace=trace, echo=echo)
    except QemuCrashed as exc:
        result.outcome, result.detail = "crashed", exc.summary
    except QtestTimeout:
        result.outcome = "hung"
        if result.commands_run < len(rep.commands):
            where = f"line {rep.commands[result.commands_run][0]}"
        else:  # every command answered; the round trip after the last one was not
            where = "the round trip after the last command"
        result.detail = f"no reply within {timeout:g} s to {where}"
    finally:
        vm.shutdown(check=False)
    crash = vm.crash
    result.returncode = vm.returncode
    result.stderr_tail = vm.stderr_tail(30)
    if result.outcome != "hung" and crash is not None:
        marker = vm.crash_marker()
        if crash.returncode == 0 and marker is None:
            # A clean exit the guest asked for (e.g. an ACPI power-off through PM1_CNT): QEMU
            # did what a machine does, it did not crash.
            result.outcome = "survived"
            result.detail = f"QEMU shut down cleanly (exit status 0) after {result.commands_run} commands"
            return result
        result.outcome = "crashed"
        result.signal = crash.signal
        result.detail = marker or crash.summary
    return result


def run_commands(vm: QemuMachine, rep: Reproducer, result: ReplayResult, *, trace: bool, echo: object) -> None:
    """Send the reproducer's commands as written (counted in ``result``, each with its reply
    through ``echo`` or print when tracing), then one more round trip: QEMU processed them all."""
    printer = echo if callable(echo) else print
    for n, command in rep.commands:
        reply = vm.qtest.send_raw(command)
        result.commands_run += 1
        if trace:
            printer(f"{rep.path}:{n}: {command[:160]}  ->  {reply[:160]}")
    vm.qtest.send_raw("endianness")


def describe(result: ReplayResult, rep: Reproducer) -> str:
    """The verdict line for a human (and a log)."""
    if result.outcome == "survived":
        return f"survived: {result.detail or f'{result.commands_run} commands replayed, QEMU alive'}"
    if result.outcome == "crashed":
        sig = f"signal {result.signal}" if result.signal else f"exit status {result.returncode}"
        return f"crashed ({sig}) after {result.commands_run} of {len(rep.commands)} commands: {result.detail}"
    if result.outcome == "hung":
        return f"hung: {result.detail}"
    if result.outcome == "unrecovered":
        return f"unrecovered: {result.detail}"
    return f"cannot run here: {result.detail}"
