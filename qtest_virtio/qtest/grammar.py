"""The qtest command grammar: every command QEMU's qtest server dispatches, as data.

QEMU's ``qtest_process_command`` (system/qtest.c) splits a line on single spaces, looks the
first word up and ``g_assert``\\ s that each required argument is present and parses as a C
number (``qemu_strtoul``/``strtou64``/``strtoi``/``strtoi64``, base 0); a failed assertion kills
QEMU with SIGABRT. Extra words are ignored; an unknown command is answered ``FAIL``.

Each argument therefore carries two ranges:

- ``wire_lo..wire_hi``: what QEMU's parser takes without asserting (a reproducer replayed as
  written must stay inside these: ``Command.parse(line, strict=False)``);
- ``lo..hi``: what the client sends (an ``outb`` value fits a byte, ``clock_step`` advances at
  least 1 ns): ``Command.build`` and ``Command.parse(line)`` check these, and a strictly parsed
  line is exactly the line the client writes (``parse(line).encode() == line``).

The table was read from QEMU 10.0.2's system/qtest.c; 10.2.2's dispatches the same commands.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..errors import MalformedCommand, QtestError, UnknownCommand

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

#: The longest line :meth:`Command.parse` accepts. QEMU's line reader rescans its whole buffer
#: for every 1 KiB it reads, so a line of megabytes costs minutes; ``QtestClient.memwrite``
#: sends 32 KiB chunks instead.
MAX_LINE = 1 << 20
_C_INT_RE = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_HEX_DATA_RE = re.compile(r"0x(?:[0-9a-f][0-9a-f])+")


class ArgKind(enum.StrEnum):
    """How an argument is written on the wire."""

    INT = "int"  # a C number (hex as the client writes it, or decimal: ``Arg.decimal``)
    WORD = "word"  # free text without spaces (a QOM path, a GPIO name)
    HEX = "hex"  # ``0x`` and two hex digits a byte (``write``)
    B64 = "b64"  # base64 bytes (``b64write``)


_INT = ArgKind.INT


class Reply(enum.StrEnum):
    """What follows ``OK`` in QEMU's answer."""

    OK = "ok"  # nothing
    INT = "int"  # a hex number (``OK 0x00ff``)
    HEX = "hex"  # ``0x`` and the bytes in hex (``read``)
    B64 = "b64"  # base64 bytes (``b64read``)
    TEXT = "text"  # a word (``endianness``)
    NS = "ns"  # a decimal count of nanoseconds (the virtual clock)


class Space(enum.StrEnum):
    """The address space of an access command's first argument."""

    IO = "io"
    MEM = "mem"


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument: its name (QEMU's and libqtest's), kind, and its two ranges (module
    docstring). Numbers are written in hex unless ``decimal`` (a time, a pin, a level)."""

    name: str
    kind: ArgKind
    lo: int = 0
    hi: int = 0
    wire_lo: int = 0
    wire_hi: int = 0
    decimal: bool = False

    def value(self, op: str, value: object) -> int | str:
        """A typed value checked against the client's range; data bytes become wire text."""
        kind = self.kind
        if kind is _INT:
            if type(value) is int and self.lo <= value <= self.hi:  # the hot path: one register access
                return value
            return check_int(op, self.name, value, self.lo, self.hi)
        if kind is ArgKind.WORD:
            if not isinstance(value, str) or not value:
                raise MalformedCommand(op, f"{op}: {self.name} must be a non-empty string")
            if any(c.isspace() for c in value):
                raise MalformedCommand(op, f"{op}: {self.name} {value!r} contains white space")
            return value
        if not isinstance(value, bytes | bytearray | memoryview):
            raise MalformedCommand(op, f"{op}: {self.name} must be bytes, not {type(value).__name__}")
        if kind is ArgKind.HEX:
            return "0x" + bytes(value).hex()
        return base64.b64encode(value).decode("ascii")

    def read(self, op: str, word: str, strict: bool) -> int | str:
        """A wire word read as QEMU reads it; ``strict`` also wants the client's range and form."""
        if self.kind is ArgKind.INT:
            lo, hi = (self.lo, self.hi) if strict else (self.wire_lo, self.wire_hi)
            value = _c_int(op, self.name, word, lo, hi, unsigned=self.wire_lo == 0)
            if strict and word != self.text(value):
                raise MalformedCommand(op, f"{op}: {self.name} {word!r} is not written {self.text(value)!r}")
            return value
        if not word:
            raise MalformedCommand(op, f"{op}: an empty argument (two spaces in a row)")
        if strict and self.kind is ArgKind.WORD:
            self.value(op, word)
        elif strict and self.kind is ArgKind.HEX and not _HEX_DATA_RE.fullmatch(word):
            raise MalformedCommand(op, f"{op}: {self.name} {word[:60]!r} is not hex bytes (like 0xdeadbeef)")
        elif strict and self.kind is ArgKind.B64 and _b64(word) is None:
            raise MalformedCommand(op, f"{op}: {self.name} {word[:60]!r} is not base64")
        return word

    def text(self, value: int | str) -> str:
        """``value`` as the client writes it."""
        return self.format % value

    @property
    def format(self) -> str:
        """The %-format of the value on the wire."""
        if self.kind is not ArgKind.INT:
            return "%s"
        return "%d" if self.decimal else "%#x"


def check_int(op: str, what: str, value: object, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool) in ``lo..hi``; else MalformedCommand naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedCommand(op, f"{op}: {what} must be an int, not {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise MalformedCommand(op, f"{op}: {what} {value:#x} is outside {lo:#x}..{hi:#x}")
    return value


def check_span(op: str, addr: object, size: object, min_size: int = 1) -> tuple[int, int]:
    """An address and a size that stay inside the 64-bit address space."""
    a = check_int(op, "addr", addr, 0, U64)
    n = check_int(op, "size", size, min_size, U64)
    if a + max(n, 1) - 1 > U64:
        raise MalformedCommand(op, f"{op}: {a:#x}+{n:#x} wraps past the end of the address space")
    return a, n


def _c_int(op: str, what: str, word: str, lo: int, hi: int, *, unsigned: bool) -> int:
    """``word`` read as QEMU's qemu_strtoul/strtou64/strtoi64 read it (C syntax, base 0: 0x..,
    decimal, 0.. octal; an unsigned conversion wraps a negative number), then range-checked."""
    if not _C_INT_RE.fullmatch(word):
        raise MalformedCommand(op, f"{op}: {what} {word!r} is not a number (0x.., decimal or 0.. octal)")
    digits = word.lstrip("+-")
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    else:
        value = int(digits, 8 if digits.startswith("0") else 10)
    if word.startswith("-"):
        value = -value
        if unsigned and value >= -U64:
            value &= U64  # strtoul reads "-1" as ULONG_MAX
    return check_int(op, what, value, lo, hi)


def _b64(word: str) -> bytes | None:
    """The bytes of canonical base64 ``word`` (as the client writes it), else None."""
    try:
        data = binascii.a2b_base64(word.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    return data if base64.b64encode(data).decode("ascii") == word else None


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One qtest command: its arguments (the last ``optional`` may be left out), its reply, the
    access width in bytes and address space of a port or memory access, and whether it needs
    the qtest accelerator (the virtual clock; without it QEMU answers ``Unknown command``)."""

    name: str
    args: tuple[Arg, ...]
    reply: Reply
    optional: int = 0
    width: int = 0
    space: Space | None = None
    needs_accel: bool = False
    #: An address and a size (and maybe data) that a typed call checks together.
    span: bool = False
    #: The line's %-format with all arguments given (encoding is on the client's hot path).
    line_format: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "line_format", " ".join([self.name.replace("%", "%%"), *(a.format for a in self.args)])
        )

    def usage(self) -> str:
        names = [a.name.upper() for a in self.args]
        if self.optional:
            names[-self.optional :] = [f"[{n}]" for n in names[-self.optional :]]
        return " ".join([self.name, *names])

    def arg(self, name: str) -> Arg:
        return next(a for a in self.args if a.name == name)

    def with_limits(self, **ranges: tuple[int, int]) -> CommandSpec:
        """This command with other client ranges for the named arguments (a front end's own
        policy, e.g. the shell's largest hexdump); the wire ranges stay QEMU's."""
        unknown = set(ranges) - {a.name for a in self.args}
        if unknown:
            raise ValueError(f"{self.name} has no argument {sorted(unknown)[0]!r}")
        args = tuple(
            replace(a, lo=ranges[a.name][0], hi=ranges[a.name][1]) if a.name in ranges else a for a in self.args
        )
        return replace(self, args=args)

    def check_count(self, given: int, strict: bool = True) -> None:
        """Enough arguments (QEMU asserts on a missing one); ``strict``: no extra ones either."""
        need, most = len(self.args) - self.optional, len(self.args)
        if given < need or (strict and given > most):
            count = f"{need}" if not self.optional else f"{need} to {most}"
            raise MalformedCommand(
                self.name, f"{self.name} takes {count} argument(s), got {given}; usage: {self.usage()}"
            )

    def build(self, *values: object) -> Command:
        """The command with typed ``values`` (ints, words, data bytes), checked against the
        client's ranges; sizes must match their data and spans not wrap."""
        if len(values) != len(self.args):
            self.check_count(len(values))
        op = self.name
        command = Command(self, tuple([a.value(op, v) for a, v in zip(self.args, values, strict=False)]))
        if self.span:
            command.check_span()
        return command


@dataclass(frozen=True, slots=True)
class Command:
    """One qtest command line: its spec and its arguments as written (numbers as ints, words and
    data as wire text). The constructor checks nothing: make one with :meth:`build` or
    :meth:`parse` (or :meth:`unchecked`, for a line that is validated later)."""

    spec: CommandSpec
    args: tuple[int | str, ...]

    @classmethod
    def build(cls, name: str, *values: object) -> Command:
        """``Command.build("outb", 0x80, 1)``: see :meth:`CommandSpec.build`."""
        spec = GRAMMAR.get(name)
        if spec is None:
            raise UnknownCommand(name, f"unknown qtest command {name!r}")
        return spec.build(*values)

    @classmethod
    def unchecked(cls, name: str, *values: int | str | bytes) -> Command:
        """The command as given, out-of-range values included (a libqtest C call translated as
        written, to be judged by ``parse(..., strict=False)`` with the rest of its file)."""
        spec = GRAMMAR[name]
        args = tuple(a.value(name, v) if isinstance(v, bytes) else v for a, v in zip(spec.args, values, strict=False))
        return cls(spec, args)

    @classmethod
    def parse(cls, line: str, *, strict: bool = True) -> Command:
        """The command on ``line``, or MalformedCommand naming the argument and the limit.

        ``strict`` (the default) accepts what the client writes, in the client's form and
        ranges. ``strict=False`` accepts what QEMU's server takes without asserting (extra words
        ignored, any C number in QEMU's range): a bug reproducer's line as written. An unknown
        first word raises UnknownCommand (QEMU answers it FAIL: a replay may still send it).
        """
        if len(line) > MAX_LINE:
            raise MalformedCommand(
                line[:60],
                f"a line of {len(line)} characters (at most {MAX_LINE} here: QEMU rescans a long line for "
                "every 1 KiB it reads); split the write into several commands",
            )
        if "\n" in line or "\r" in line:
            raise MalformedCommand(line[:60], f"{line[:60]!r} contains a line break")
        op, *given = line.split(" ")
        spec = GRAMMAR.get(op)
        if spec is None:
            raise UnknownCommand(op, f"unknown qtest command {op!r}")
        spec.check_count(len(given), strict)
        command = cls(spec, tuple(a.read(op, w, strict) for a, w in zip(spec.args, given, strict=False)))
        if strict:
            command.check_span()
        return command

    @property
    def name(self) -> str:
        return self.spec.name

    def __getitem__(self, name: str) -> int | str:
        """An argument by name (``cmd["addr"]``)."""
        for arg, value in zip(self.spec.args, self.args, strict=False):
            if arg.name == name:
                return value
        raise KeyError(f"{self.name} has no argument {name!r} given")

    def get_int(self, name: str) -> int:
        value = self[name]
        assert isinstance(value, int), f"{self.name}: {name} is not a number"
        return value

    @property
    def data(self) -> bytes:
        """The bytes a ``write``/``b64write`` carries."""
        word = self["data"]
        assert isinstance(word, str)
        return bytes.fromhex(word[2:]) if self.spec.arg("data").kind is ArgKind.HEX else base64.b64decode(word)

    def check_span(self) -> None:
        """A size that matches its data, and an address span that does not wrap (typed calls)."""
        if not self.spec.span:
            return
        op, addr, size = self.name, self.get_int("addr"), self.get_int("size")
        if len(self.args) > 2 and self.spec.args[2].name == "data" and len(self.data) != size:
            raise MalformedCommand(op, f"{op}: size {size:#x} but the data has {len(self.data):#x} bytes")
        check_span(op, addr, size, min_size=0)

    def encode(self) -> str:
        """The wire line, without its newline."""
        spec = self.spec
        if len(self.args) == len(spec.args):
            return spec.line_format % self.args
        return " ".join([spec.name, *(a.text(v) for a, v in zip(spec.args, self.args, strict=False))])

    def wire(self) -> bytes:
        """The wire line as sent: ASCII with its newline."""
        return self.encode().encode("ascii") + b"\n"

    def __str__(self) -> str:
        return self.encode()

    # -- replies --------------------------------------------------------------------------

    def reply_int(self, payload: bytes) -> int:
        """An ``int`` (hex) or ``ns`` (decimal) reply's number."""
        try:
            return int(payload, 10 if self.spec.reply is Reply.NS else 16)
        except ValueError:
            raise QtestError(self.encode(), f"reply {payload[:60]!r} is not a number") from None

    def reply_bytes(self, payload: bytes) -> bytes:
        """A ``read`` (hex) or ``b64read`` reply's bytes, exactly the size asked for."""
        size, command = self.get_int("size"), self.encode()
        if self.spec.reply is Reply.HEX:
            if not payload.startswith(b"0x") or len(payload) != 2 + 2 * size:
                raise QtestError(command, f"reply of {len(payload)} chars is not {size} bytes of hex")
            try:
                return bytes.fromhex(payload[2:].decode("ascii"))
            except ValueError as exc:
                raise QtestError(command, f"reply is not hex: {exc}") from None
        try:
            data = binascii.a2b_base64(payload)
        except binascii.Error as exc:
            raise QtestError(command, f"reply is not base64: {exc}") from None
        if len(data) != size:
            raise QtestError(command, f"asked for {size} bytes, got {len(data)}")
        return data

    def reply(self, payload: bytes) -> int | bytes | str | None:
        """The reply decoded as its kind says: None, a number, bytes or text."""
        kind = self.spec.reply
        if kind in (Reply.INT, Reply.NS):
            return self.reply_int(payload)
        if kind in (Reply.HEX, Reply.B64):
            return self.reply_bytes(payload)
        if kind is Reply.TEXT:
            return payload.decode("ascii", errors="replace")
        return None


def check_raw(line: str) -> str:
    """``line`` if it is one line of single-spaced words (what a raw command must be to reach
    QEMU as one command with the words meant); its arguments are the sender's business."""
    if "\n" in line or not line or "  " in line or line != line.strip(" "):
        raise MalformedCommand(line[:60], f"malformed qtest command {line!r}: one line, single spaces")
    return line


def access(space: Space, width: int, *, write: bool) -> CommandSpec:
    """The port or memory access command for ``width`` bytes (the widest there is when that
    width has none: x86 ports stop at 4 bytes)."""
    found = [s for s in GRAMMAR.values() if s.space is space and (s.reply is Reply.OK) is write]
    return next((s for s in found if s.width == width), max(found, key=lambda s: s.width))


def _table() -> dict[str, CommandSpec]:
    def num(name: str, lo: int, hi: int, wire: tuple[int, int] | None = None, decimal: bool = False) -> Arg:
        wire_lo, wire_hi = wire or (lo, hi)
        return Arg(name, ArgKind.INT, lo, hi, wire_lo, wire_hi, decimal)

    def word(name: str) -> Arg:
        return Arg(name, ArgKind.WORD)

    port, addr = num("port", 0, U16), num("addr", 0, U64)
    widths = {"b": 1, "w": 2, "l": 4, "q": 8}
    specs: list[CommandSpec] = []
    for s, w in widths.items():
        value = num("value", 0, (1 << 8 * w) - 1, (0, U64))  # QEMU parses 64 bits and truncates
        if s != "q":
            specs.append(CommandSpec(f"out{s}", (port, value), Reply.OK, width=w, space=Space.IO))
            specs.append(CommandSpec(f"in{s}", (port,), Reply.INT, width=w, space=Space.IO))
        specs.append(CommandSpec(f"write{s}", (addr, value), Reply.OK, width=w, space=Space.MEM))
        specs.append(CommandSpec(f"read{s}", (addr,), Reply.INT, width=w, space=Space.MEM))
    size = num("size", 1, U64, (0, U64))  # the client never sends an empty transfer
    specs += [
        CommandSpec("read", (addr, num("size", 1, U64)), Reply.HEX, span=True),  # QEMU asserts len != 0
        CommandSpec("b64read", (addr, size), Reply.B64, span=True),
        CommandSpec("write", (addr, size, Arg("data", ArgKind.HEX)), Reply.OK, span=True),
        CommandSpec("b64write", (addr, size, Arg("data", ArgKind.B64)), Reply.OK, span=True),
        CommandSpec("memset", (addr, num("size", 0, U64), num("value", 0, U8, (0, U64))), Reply.OK, span=True),
        CommandSpec("endianness", (), Reply.TEXT),
        # clock_step 0 is answered "FAIL could not advance time"; no step: to the next deadline.
        CommandSpec(
            "clock_step", (num("ns", 1, INT64_MAX, (INT64_MIN, INT64_MAX), True),), Reply.NS, 1, needs_accel=True
        ),
        CommandSpec("clock_set", (num("ns", 0, INT64_MAX, (INT64_MIN, INT64_MAX), True),), Reply.NS, needs_accel=True),
        CommandSpec("irq_intercept_in", (word("qom_path"),), Reply.OK),
        CommandSpec("irq_intercept_out", (word("qom_path"), word("gpio_name")), Reply.OK, 1),
        CommandSpec(
            "set_irq_in",
            (
                word("qom_path"),
                word("gpio_name"),
                num("line", 0, INT32_MAX, (INT32_MIN, INT32_MAX), True),
                num("level", INT32_MIN, INT32_MAX, decimal=True),
            ),
            Reply.OK,
        ),
        CommandSpec("module_load", (word("prefix"), word("name")), Reply.OK),
    ]
    return {s.name: s for s in specs}


#: Every command QEMU's qtest server dispatches, by name.
GRAMMAR: Mapping[str, CommandSpec] = _table()
COMMANDS = frozenset(GRAMMAR)
