"""QEMU command lines of reproducers: what replay changes in them for our harness (the qtest
channel, the qtest accelerator where the binary lacks it, the display), the machine type they
name, and shell quoting for the upstream form (:func:`.reproducer.upstream_command`)."""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Sequence

from .binary import QemuBinary


def _strip_accel(opts: str) -> str:
    return ",".join(p for p in opts.split(",") if p and p != "accel=qtest")


def without_qtest_channel(args: list[str]) -> list[str]:
    """``args`` less ``-qtest X`` and ``-qtest-log X`` (the harness's socket, or stdio, replaces them)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ("-qtest", "-qtest-log") and i + 1 < len(args):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def has_display(args: list[str]) -> bool:
    return any(a in ("-display", "-nographic", "-vnc") for a in args)


def normalize_args(args: list[str], binary: QemuBinary) -> tuple[list[str], list[str]]:
    """The reproducer's arguments for our harness, and notes on what changed.

    Drops ``-qtest X`` and ``-qtest-log X`` (ours replace them). ``accel=qtest`` / ``-accel qtest``
    are kept where this binary has the qtest accelerator (the harness then adds none), and dropped
    where it lacks it (the Machine layer then runs TCG with -S).
    """
    out: list[str] = []
    notes: list[str] = []
    rest = without_qtest_channel(args)
    keep_accel = binary.has_qtest_accel
    i = 0
    while i < len(rest):
        a = rest[i]
        nxt = rest[i + 1] if i + 1 < len(rest) else None
        if not keep_accel and a in ("-machine", "-M") and nxt is not None and "accel=qtest" in nxt.split(","):
            stripped = _strip_accel(nxt)
            notes.append(f"dropped accel=qtest from {a} {nxt}")
            if stripped:
                out += [a, stripped]
            i += 2
            continue
        if not keep_accel and a == "-accel" and nxt is not None and nxt.split(",")[0] == "qtest":
            notes.append("dropped -accel qtest")
            i += 2
            continue
        out.append(a)
        i += 1
    if not has_display(out):
        # libqtest adds -display none itself, so reproducers taken from qtest tests omit it.
        out += ["-display", "none"]
        notes.append("added -display none (as libqtest does)")
    if any("accel" in n for n in notes):
        notes.append("this QEMU has no qtest accelerator: running TCG with -S (and the halt firmware)")
    return out, notes


def shell_words(words: Sequence[str], prefix: str = "", width: int = 100) -> str:
    """``words`` quoted for a POSIX shell, wrapped before ``width`` with ``\\`` continuations
    (an option stays on the line of its value)."""
    units: list[str] = []
    for w in map(shlex.quote, words):
        if units and units[-1].startswith("-") and " " not in units[-1] and not w.startswith("-"):
            units[-1] += " " + w
        else:
            units.append(w)
    lines: list[str] = []
    cur = prefix.rstrip()
    for u in units:
        if cur and len(cur) + 1 + len(u) > width - 2:
            lines.append(cur + " \\")
            cur = u
        else:
            cur = f"{cur} {u}" if cur else u
    return "\n".join([*lines, cur])


def machine_type(args: Sequence[str]) -> str | None:
    """The machine type ``args`` name (``-M pc-q35-5.0``, ``-machine q35,accel=qtest``,
    ``-machine type=pc``), the last one winning as in QEMU; None if they name none."""
    found: str | None = None
    for opt, value in itertools.pairwise(args):
        if opt in ("-M", "-machine"):
            for part in value.split(","):
                if part and "=" not in part:
                    found = part
                elif part.startswith("type="):
                    found = part[len("type=") :]
    return found


def missing_machine(args: Sequence[str], binary: QemuBinary) -> str | None:
    """'machine type X is not in this binary (it has: ...)', or None when it is there (or the
    arguments name none, or ask for QEMU's help)."""
    wanted = machine_type(args)
    if wanted is None or wanted in ("help", "?") or wanted in binary.machines:
        return None
    return f"machine type {wanted} is not in this binary (it has: {', '.join(binary.machines)})"
