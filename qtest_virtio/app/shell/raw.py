"""Raw qtest commands typed at the shell, through the library's qtest grammar.

QEMU's qtest server ``g_assert``\\ s on a malformed argument, so a typo would abort QEMU: every
raw line is read the shell's way (numbers as :func:`~.text.parse_int` reads them, data as hex
or base64), then built and checked by :data:`qtest_virtio.qtest.GRAMMAR` with the shell's own
limits on top of QEMU's, and only its canonical wire form is sent. Replies are decoded by the
kind the grammar gives them.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence

from ...errors import MalformedCommand
from ...qtest import GRAMMAR, INT64_MAX, ArgKind, Command, CommandSpec, Reply
from .text import ShellError, fmt_int, hexdump, parse_int

#: Largest ``read``/``b64read`` the shell shows (a hexdump of more helps nobody).
MAX_DUMP = 64 * 1024
#: Largest ``write``/``b64write`` (QEMU g_malloc()s the declared size: a typo must not abort it).
MAX_WRITE = 1 << 20

#: Commands QEMU accepts that the shell will not send: QEMU asserts on arguments nobody can
#: check from outside.
REFUSED_RAW = {
    "set_irq_in": "set_irq_in can abort QEMU: qdev asserts when the pin or GPIO name does not exist, "
    "which cannot be checked from outside",
}


def raw_table(max_memset: int) -> dict[str, CommandSpec]:
    """The grammar's commands the shell sends, with the shell's own limits on top of QEMU's."""
    dump, put = (1, MAX_DUMP), (1, MAX_WRITE)
    limits: dict[str, dict[str, tuple[int, int]]] = {
        "read": {"size": dump},
        "b64read": {"size": dump},
        "write": {"size": put},
        "b64write": {"size": put},
        "memset": {"size": (0, max_memset)},
        "clock_step": {"ns": (0, INT64_MAX)},  # a step of 0 is QEMU's to refuse (FAIL)
    }
    return {n: spec.with_limits(**limits.get(n, {})) for n, spec in GRAMMAR.items() if n not in REFUSED_RAW}


def parse_raw(words: Sequence[str], table: dict[str, CommandSpec]) -> tuple[Command, str, bytes | None]:
    """Check a raw qtest command; return it, its canonical wire form, and the data it writes.

    Numbers are read the shell's way (:func:`parse_int`), data as hex or base64; the grammar
    then checks them against ``table``'s limits. Raises ShellError with a message naming the
    argument: nothing malformed reaches QEMU.
    """
    op = words[0]
    cmd = table[op]
    given = list(words[1:])
    values: list[int | str | bytes] = []
    data: bytes | None = None
    try:
        cmd.check_count(len(given))
        for arg, text in zip(cmd.args, given, strict=False):
            if arg.kind is ArgKind.INT:
                values.append(parse_int(text, f"{op}: {arg.name}"))
            elif arg.kind is ArgKind.WORD:
                values.append(text)
            else:
                data = _raw_data(op, arg.kind, text)
                values.append(data)
        command = cmd.build(*values)
    except MalformedCommand as exc:
        raise ShellError(str(exc)) from None
    return command, command.encode(), data


def _raw_data(op: str, kind: ArgKind, text: str) -> bytes:
    """Data typed at the shell: hex bytes (``0x`` optional, any case) or base64."""
    if kind is ArgKind.HEX:
        digits = text[2:] if text.lower().startswith("0x") else text
        if not re.fullmatch(r"[0-9a-fA-F]*", digits) or len(digits) % 2:
            raise ShellError(f"{op}: data {text!r} is not hex bytes (like 0xdeadbeef)")
        return bytes.fromhex(digits)
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ShellError(f"{op}: data {text!r} is not base64") from None


def reply_lines(command: Command, reply: str, where: str = "") -> list[str]:
    """QEMU's reply to ``command`` as the shell shows it: a number in hex and decimal, a buffer
    as a hexdump at its guest address, a word, or OK; ``where`` names the register accessed."""
    spec = command.spec
    if spec.reply is Reply.INT:
        return [f"{fmt_int(command.reply_int(reply.encode('ascii')), spec.width)}{where}"]
    if spec.reply is Reply.NS:
        return [f"{command.reply_int(reply.encode('ascii'))} ns"]
    if spec.reply in (Reply.HEX, Reply.B64):
        return hexdump(command.reply_bytes(reply.encode("ascii")), command.get_int("addr"))
    if spec.reply is Reply.TEXT:
        return [reply]
    return [f"OK{where}"]
