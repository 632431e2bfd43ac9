"""An upstream-ready bug report for a reproducer: Markdown in the shape of QEMU's GitLab issue
template (``.gitlab/issue_templates/bug.md``): host environment, the versions it reproduces on
and those it does not, the ``cat << EOF | qemu-system-x86_64 ... -qtest stdio`` form, and the
assertion or hang point with the source location QEMU printed.

The binaries are the ones given, else every binary ``scripts/qemu.sh`` has provided and cached.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .binary import QEMU_SH, QemuNotFound, cached_qemu
from .fuzz.corpus import FUZZ_CHECK, SIGNATURE_HEADER
from .outcome import Outcome
from .reproducer import (
    TIMEOUT_HEADER,
    ReplayResult,
    ReplayRow,
    Reproducer,
    shell_words,
    upstream_args,
    upstream_command,
)

#: The names ``scripts/qemu.sh`` provides that a report replays on by default (not the gcov build).
PROVIDED = ("system", "debian-10.0", "src-10.0.2", "src-newest")
#: ``file.c:123`` in what QEMU printed: an assertion's ``../system/physmem.c:3848: func:`` or a
#: sanitizer frame's ``in func ../hw/virtio/virtio.c:1234:5``.
_LOCATION_RE = re.compile(r"(?P<file>[^\s:()'`]+\.(?:c|h|inc|cc|cpp|rs)):(?P<line>\d+)(?::\s*(?P<func>\w+):)?")
_SIGNALS = {6: "SIGABRT", 11: "SIGSEGV", 7: "SIGBUS", 8: "SIGFPE", 4: "SIGILL", 9: "SIGKILL"}


def provided_binaries(names: Sequence[str] = PROVIDED) -> list[str]:
    """Paths of the binaries ``scripts/qemu.sh path --cached NAME`` finds, one per real file.

    Raises QemuNotFound (125) when the script is not beside this source tree or none is cached."""
    if not QEMU_SH.is_file():
        raise QemuNotFound(
            f"no --qemu given and {QEMU_SH} is not there (not a source checkout): name binaries with --qemu"
        )
    paths: list[str] = []
    for name in names:
        try:
            path = cached_qemu(name)
        except QemuNotFound:
            continue
        if all(os.path.realpath(p) != os.path.realpath(path) for p in paths):
            paths.append(path)
    if not paths:
        raise QemuNotFound(
            f"no --qemu given and none of {', '.join(names)} is cached: run `bash {QEMU_SH} provide NAME`"
            " or name binaries with --qemu"
        )
    return paths


@dataclass(frozen=True)
class SourceLocation:
    """Where QEMU said it failed: ``../system/physmem.c:3848`` and the function, if printed."""

    file: str
    line: int
    function: str | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" + (f" (in {self.function})" if self.function else "")


def source_location(text: str) -> SourceLocation | None:
    """The first ``file.c:LINE`` in ``text`` (a crash marker, else QEMU's stderr)."""
    m = _LOCATION_RE.search(text)
    return SourceLocation(m.group("file"), int(m.group("line")), m.group("func")) if m else None


def hang_point(rep: Reproducer, result: ReplayResult) -> str:
    """The command a hung replay got no reply to, as its number, file line and text."""
    total = len(rep.commands)
    if result.commands_run < total:
        n, command = rep.commands[result.commands_run]
        where = f"command {result.commands_run + 1} of {total} (file line {n}): `{command[:120]}`"
        if result.commands_run:
            where += f", right after `{rep.commands[result.commands_run - 1][1][:120]}` was answered"
        return where
    return f"the round trip after the last command (all {total} answered)"


def failure_point(rep: Reproducer, result: ReplayResult) -> str:
    """What failed, in words: the assertion text, or the command that got no reply."""
    if result.outcome is Outcome.CRASHED:
        sig = _SIGNALS.get(result.signal, f"signal {result.signal}") if result.signal else None
        how = f"killed by {sig}" if sig else f"exit status {result.returncode}"
        return f"QEMU {how} after command {result.commands_run} of {len(rep.commands)}: {result.detail}"
    if result.outcome is Outcome.HUNG:
        return f"QEMU stops answering qtest at {hang_point(rep, result)} ({result.detail})"
    if result.outcome is Outcome.UNRECOVERED:
        return f"QEMU stays alive but the device does not recover: {result.detail}"
    return result.detail


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return fields.get("PRETTY_NAME", "").strip('"') or platform.system()
    except OSError:
        return platform.system()


def _uname() -> str:
    u = platform.uname()
    return f"{u.system} {u.node} {u.release} {u.version} {u.machine}"


def _fence(text: str) -> list[str]:
    return ["```", *text.splitlines(), "```"]


def _indent(lines: list[str], by: str = "   ") -> list[str]:
    return [by + line if line else line for line in lines]


def _prose(rep: Reproducer) -> list[str]:
    """The reproducer's leading comment lines: what its author wrote, before the headers."""
    signature = SIGNATURE_HEADER.lstrip("# ")
    headers = ("xfail:", TIMEOUT_HEADER, FUZZ_CHECK, "qtest-virtio fuzz:", "outcome:", signature, "hostile")
    out: list[str] = []
    for c in rep.comments:
        if c.startswith(headers):
            break
        out.append(c)
    return out


def _title(rep: Reproducer, hits: list[ReplayRow]) -> str:
    first = hits[0].result
    if first.outcome is Outcome.CRASHED:
        loc = source_location(first.detail)
        if loc and loc.function:  # "prog: file:line: func: Assertion ..." -> "func: Assertion ..."
            return f"{loc.function}: {first.detail.split(loc.function + ': ', 1)[-1][:120]} (qtest reproducer)"
        return f"{first.detail[:120]} (qtest reproducer)"
    if first.outcome is Outcome.HUNG:
        return f"qtest reproducer {os.path.basename(rep.path)}: QEMU stops answering (hang)"
    return f"qtest reproducer {os.path.basename(rep.path)}: device does not recover after a reset"


def render(rep: Reproducer, rows: Sequence[ReplayRow]) -> str:
    """The report for ``rep`` from its replays (one row per binary)."""
    hits = [r for r in rows if r.result.outcome.failed]
    misses = [r for r in rows if r.result.outcome is Outcome.SURVIVED]
    untested = [r for r in rows if r.result.outcome is Outcome.CANNOT_RUN]
    versions = [f"{r.label}: `{r.binary.version_text}`" for r in rows]
    cmdline = shell_words(upstream_args(rep))
    out: list[str] = []
    if hits:
        out += [f"<!-- Suggested title: {_title(rep, hits)} -->", ""]
    out += [
        "## Host environment",
        f" - Operating system: {_os_name()}",
        f" - OS/kernel version: {_uname()}",
        f" - Architecture: {platform.machine()}",
        " - QEMU flavor: qemu-system-x86_64",
        " - QEMU version:",
        *_indent([f"- {v}" for v in versions]),
        " - QEMU command line:",
        *_indent(_fence(cmdline)),
        "",
        "## Emulated/Virtualized environment",
        " - Operating system: n/a (qtest: no guest runs; the commands below play the guest's driver)",
        " - OS/kernel version: n/a",
        f" - Architecture: {platform.machine()}",
        "",
        "## Description of problem",
    ]
    if hits:
        kinds = sorted({r.result.outcome for r in hits})
        out.append(f"A qtest command sequence (no guest) makes QEMU {' / '.join(_KIND_WORDS[k] for k in kinds)}.")
    else:
        out.append("The reproducer below did not reproduce on any of the versions tried.")
    out += ["", "Reproduces on:", *_items(hits), "", "Does not reproduce on:", *_items(misses)]
    if untested:
        out += ["", "Could not be tried on (QEMU refused the command line):", *_items(untested)]
    prose = _prose(rep)
    if prose:
        out += ["", f"Notes from the reproducer ({os.path.basename(rep.path)}):", "", *(f"> {p}" for p in prose)]
    out += [
        "",
        "## Steps to reproduce",
        "1. Run this on a build with the qtest accelerator (an upstream build; Debian's builds lack it, and there "
        "step 3 runs the same commands with TCG stopped by -S):",
        *_indent(_fence(upstream_command(rep))),
        f"2. {_expected(rep, hits[0].result) if hits else 'QEMU answers every command and stays alive.'}",
        f"3. The same with qtest-virtio: `qtest-virtio replay {rep.path} --qemu PATH`.",
        "",
        "## Additional information",
    ]
    for r in hits or rows:
        loc = source_location(r.result.detail) or source_location(r.result.stderr_tail)
        out += [
            "",
            f"QEMU {r.label}, accelerator: {r.binary.accelerator}:",
            f"- {failure_point(rep, r.result)}",
            f"- Source location QEMU printed: `{loc}`" if loc else "- Source location QEMU printed: none",
            f"- Command line as run (qtest on stdio): `{r.result.command_line}`",
        ]
        if r.result.stderr_tail.strip():
            out += ["- QEMU's stderr (last lines):", *_indent(_fence(r.result.stderr_tail), "  ")]
    out += ["", "Found and replayed with qtest-virtio (`qtest-virtio report`).", "", '/label ~"kind::Bug"', ""]
    return "\n".join(out)


_KIND_WORDS = {
    Outcome.CRASHED: "abort (assertion or signal)",
    Outcome.HUNG: "stop answering (no qtest reply: hang or livelock)",
    Outcome.UNRECOVERED: "leave the device unusable after a reset",
}


def _items(rows: Sequence[ReplayRow]) -> list[str]:
    return [f"- QEMU {r.label}: {r.verdict}" for r in rows] or ["- none of the versions tried"]


def _expected(rep: Reproducer, result: ReplayResult) -> str:
    if result.outcome is Outcome.CRASHED:
        return f"QEMU aborts: `{result.detail}`"
    if result.outcome is Outcome.HUNG:
        return f"QEMU stops answering at {hang_point(rep, result)}."
    return f"A device reset and a valid request then fail: {result.detail}"
