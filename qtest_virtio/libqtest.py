"""The libqtest C form of a reproducer: QEMU's own regression tests (tests/qtest/fuzz-*-test.c)
write a fuzzer find as C calls, and a bug report often pastes one::

    s = qtest_init("-M q35 -m 512M "
                   "-device virtio-scsi,num_queues=8,addr=03.0 ");
    qtest_outl(s, 0xcf8, 0x80001811);
    qtest_bufwrite(s, 0x0, "\\x01", 0x1);
    qtest_quit(s);

``qtest_init("...")`` (or ``qtest_initf`` with constant arguments) is the command line; each call
becomes the qtest line libqtest (tests/qtest/libqtest.c) sends for it, written by the grammar
(``Command.unchecked``: the reproducer's validation judges it with the file's other lines);
``qtest_quit`` ends the test. A file with several tests replays its first one. Only constant
arguments can be replayed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from .errors import ScenarioError
from .qtest import Command

_INIT_RE = re.compile(r"\bqtest_(init|initf)\s*\(")
_CALL_RE = re.compile(r"\bqtest_(\w+)\s*\(")
_FUNC_RE = re.compile(r"\b(?:static\s+)?void\s+(\w+)\s*\(\s*void\s*\)")
_C_INT_RE = re.compile(r"\b(0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]*\b")
_CAST_RE = re.compile(
    r"\(\s*(?:unsigned\s+|signed\s+)?(?:u?int(?:8|16|32|64)_t|char|short|int|long|size_t|hwaddr)\s*\)"
)
_SIMPLE_ESCAPES = {"n": 10, "t": 9, "r": 13, "a": 7, "b": 8, "f": 12, "v": 11, "\\": 92, "'": 39, '"': 34, "?": 63}
#: Calls that ask libqtest something and send nothing that changes the machine.
_QUERIES = frozenset({"get_arch", "has_machine", "has_device", "has_accel", "probe_child", "big_endian"})


@dataclass
class CTest:
    """The first test of a libqtest C file: its command line and its qtest lines."""

    args_text: str
    init_line: int
    commands: list[tuple[int, str]]
    notes: list[str] = field(default_factory=list)


def looks_like_c(text: str) -> bool:
    return _INIT_RE.search(text) is not None


def _blank_comments(text: str) -> str:
    """``text`` with C comments replaced by spaces (newlines kept, so line numbers hold)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _call_args(text: str, start: int, path: str, line: int) -> tuple[list[str], int]:
    """The top-level arguments of the call whose ``(`` is at ``start``, and the index after its ``)``."""
    depth, i, args, cur = 0, start, [], []
    n = len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            cur.append(text[i : j + 1])
            i = j + 1
            continue
        if c == "(":
            depth += 1
            if depth == 1:
                i += 1
                continue
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append("".join(cur).strip())
                return [a for a in args if a] if args != [""] else [], i + 1
        elif c == "," and depth == 1:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    raise ScenarioError("a call that never closes its parenthesis", path=path, line=line)


def _string(arg: str, path: str, line: int) -> bytes:
    """A C string literal, or adjacent ones (concatenated as C does), as bytes."""
    pieces = re.findall(r'"((?:[^"\\]|\\.)*)"', arg, re.S)
    if not pieces or re.sub(r'"(?:[^"\\]|\\.)*"', "", arg, flags=re.S).strip():
        raise ScenarioError(
            f"{arg[:60]!r} is not a string literal (only constants can be replayed)", path=path, line=line
        )
    out = bytearray()
    for body in pieces:
        i = 0
        while i < len(body):
            c = body[i]
            if c != "\\":
                out += c.encode("latin-1", errors="replace")
                i += 1
                continue
            e = body[i + 1]
            if e == "x":
                m = re.match(r"[0-9a-fA-F]+", body[i + 2 :])
                if not m or int(m.group(0), 16) > 0xFF:
                    raise ScenarioError(f"bad \\x escape in {arg[:60]!r}", path=path, line=line)
                out.append(int(m.group(0), 16))
                i += 2 + len(m.group(0))
            elif e in "01234567":
                m = re.match(r"[0-7]{1,3}", body[i + 1 :])
                assert m is not None
                out.append(int(m.group(0), 8) & 0xFF)
                i += 1 + len(m.group(0))
            elif e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                i += 2
            else:
                raise ScenarioError(f"unknown escape \\{e} in {arg[:60]!r}", path=path, line=line)
    return bytes(out)


_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.operator, ast.unaryop)


def _literal(text: str) -> int:
    """A C integer literal without its suffix: 0x.. hex, 0.. octal, else decimal."""
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16)
    return int(text, 8 if text.startswith("0") else 10)


def _int(arg: str, path: str, line: int) -> int:
    """A constant integer expression (literals with U/L suffixes, casts, + - * << >> | & ~)."""
    expr = _CAST_RE.sub("", arg)
    expr = _C_INT_RE.sub(lambda m: str(_literal(m.group(1))), expr)
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        tree = None
    if tree is None or not all(isinstance(node, _ALLOWED) for node in ast.walk(tree)):
        raise ScenarioError(
            f"{arg[:60]!r} is not a constant integer (only constants can be replayed)", path=path, line=line
        )
    value = eval(compile(tree, "<c>", "eval"), {"__builtins__": {}})  # the tree holds literals and operators only
    if not isinstance(value, int):
        raise ScenarioError(f"{arg[:60]!r} is not an integer", path=path, line=line)
    return value & 0xFFFF_FFFF_FFFF_FFFF


def _printf(fmt: str, values: list[str], path: str, line: int) -> str:
    """``qtest_initf``'s format with constant arguments (%s %d %i %u %x %%)."""
    rest = list(values)

    def sub(m: re.Match[str]) -> str:
        conv = m.group(1)
        if conv == "%":
            return "%"
        if not rest:
            raise ScenarioError(f"qtest_initf: too few arguments for {fmt[:60]!r}", path=path, line=line)
        arg = rest.pop(0)
        if conv == "s":
            return _string(arg, path, line).decode("latin-1")
        value = _int(arg, path, line)
        return f"{value:x}" if conv == "x" else str(value)

    return re.sub(r"%(?:l|ll|z)?([sdiux%])", sub, fmt)


def _command(name: str, a: list[str], path: str, line: int) -> str | None:
    """The qtest line libqtest sends for ``qtest_<name>(s, ...)`` (``a`` without ``s``)."""

    def want(k: int) -> None:
        if len(a) != k:
            raise ScenarioError(f"qtest_{name} takes {k + 1} arguments, got {len(a) + 1}", path=path, line=line)

    def num(i: int) -> int:
        return _int(a[i], path, line)

    def text(i: int) -> str:
        return _string(a[i], path, line).decode("latin-1")

    if re.fullmatch(r"out[bwl]|write[bwlq]", name):
        want(2)
        return Command.unchecked(name, num(0), num(1)).encode()
    if re.fullmatch(r"in[bwl]|read[bwlq]", name):
        want(1)
        return Command.unchecked(name, num(0)).encode()
    if name in ("bufwrite", "memwrite"):
        want(3)
        addr, data, size = num(0), _string(a[1], path, line), num(2)
        if size > len(data) + 1:  # the literal's NUL is the one byte past it C may read
            raise ScenarioError(
                f"qtest_{name}: size {size} is more than the {len(data)} bytes given", path=path, line=line
            )
        data = (data + b"\0")[:size]
        return Command.unchecked("write" if name == "memwrite" else "b64write", addr, size, data).encode()
    if name in ("bufread", "memread"):
        want(3)
        return Command.unchecked("b64read" if name == "bufread" else "read", num(0), num(2)).encode()
    if name == "memset":
        want(3)
        return Command.unchecked("memset", num(0), num(2), num(1)).encode()
    if name == "clock_step_next":
        want(0)
        return Command.unchecked("clock_step").encode()
    if name in ("clock_step", "clock_set"):
        want(1)
        return Command.unchecked(name, num(0)).encode()
    if name in ("irq_intercept_in", "irq_intercept_out"):
        want(1)
        return Command.unchecked(name, text(0)).encode()
    if name == "set_irq_in":
        want(4)
        gpio = "unnamed-gpio-in" if a[1] == "NULL" else text(1)
        return Command.unchecked("set_irq_in", text(0), gpio, num(2), num(3)).encode()
    if name in _QUERIES:
        return None
    raise ScenarioError(
        f"qtest_{name}() has no qtest command to replay (the C form takes qtest_init/initf, the port, memory, "
        "buffer, clock and IRQ calls, and qtest_quit)",
        path=path,
        line=line,
    )


def parse_c(text: str, path: str) -> CTest:
    """The first ``qtest_init``/``qtest_initf`` of ``text`` through its ``qtest_quit``."""
    code = _blank_comments(text)
    m = _INIT_RE.search(code)
    if m is None:
        raise ScenarioError("no qtest_init(...) call", path=path, line=1)

    def line_of(pos: int) -> int:
        return code.count("\n", 0, pos) + 1

    init_line = line_of(m.start())
    args, pos = _call_args(code, m.end() - 1, path, init_line)
    if not args:
        raise ScenarioError(f"qtest_{m.group(1)}() without a command line", path=path, line=init_line)
    if m.group(1) == "init":
        args_text = _string(args[0], path, init_line).decode("latin-1")
    else:
        args_text = _printf(_string(args[0], path, init_line).decode("latin-1"), args[1:], path, init_line)
    notes: list[str] = []
    funcs = [f for f in _FUNC_RE.finditer(code, 0, m.start())]
    if funcs:
        notes.append(f"libqtest C form: replaying {funcs[-1].group(1)}()")
    commands: list[tuple[int, str]] = []
    quit_at: int | None = None
    for call in _CALL_RE.finditer(code, pos):
        if call.start() < pos:
            continue  # a call nested in the arguments of one already taken
        line = line_of(call.start())
        name = call.group(1)
        if name == "quit":
            quit_at = call.start()
            break
        if name in ("init", "initf"):
            raise ScenarioError(f"a second qtest_{name} before qtest_quit", path=path, line=line)
        call_args, pos = _call_args(code, call.end() - 1, path, line)
        command = _command(name, call_args[1:], path, line)
        if command is not None:
            commands.append((line, command))
    if quit_at is None:
        raise ScenarioError("the test opened here never calls qtest_quit", path=path, line=init_line)
    if _INIT_RE.search(code, quit_at):
        notes.append("the file has more tests after the first; replay runs the first only")
    return CTest(args_text, init_line, commands, notes)
