"""The shell's words: the error it prints and goes on after, numbers as typed, numbers and
buffers as shown."""

from __future__ import annotations

import re

from ...errors import UsageError


class ShellError(UsageError):
    """A command the shell refuses (bad syntax, unknown name): printed, and the shell goes on."""


def parse_int(text: str, what: str = "number") -> int:
    """``0x10``, ``16``, ``0b10000``, ``0o20`` (not C's ``020``, which QEMU would read as octal)."""
    try:
        value = int(text, 0)
    except ValueError:
        hint = " (a leading 0 is ambiguous: write 0x.. or 0o..)" if re.fullmatch(r"0\d+", text) else ""
        raise ShellError(f"{what} {text!r} is not a number{hint}") from None
    if value < 0:
        raise ShellError(f"{what} {text} is negative")
    return value


def fmt_int(value: int, width: int | None = None) -> str:
    """``0x0007 (7)``: hex padded to the access width, and decimal."""
    digits = 2 * width if width else 1
    return f"{value:#0{digits + 2}x} ({value})"


def hexdump(data: bytes, base: int = 0) -> list[str]:
    """``hexdump -C`` style lines, guest addresses on the left; repeated lines become ``*``."""
    lines: list[str] = []
    addr_width = max(8, len(f"{base + max(len(data) - 1, 0):x}"))
    prev: bytes | None = None
    starred = False
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        if chunk == prev and off + 16 < len(data):
            if not starred:
                lines.append("*")
                starred = True
            continue
        prev, starred = chunk, False
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + off:0{addr_width}x}  {left:<23}  {right:<23}  |{text}|")
    return lines


def first_line(exc: BaseException) -> str:
    """An error as the shell prints it: its first line (or its type when it has no text)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
