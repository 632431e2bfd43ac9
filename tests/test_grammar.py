"""The qtest command grammar (qtest_virtio/qtest/grammar.py): its table against QEMU's list, the
lines it writes, what it refuses, and the client's wire output through a real QEMU.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import pytest

from qtest_virtio import Machine, QemuCrashed, QtestError, QtestVirtioError
from qtest_virtio.errors import MalformedCommand, UnknownCommand
from qtest_virtio.qtest import (
    COMMANDS,
    GRAMMAR,
    MAX_LINE,
    Command,
    QtestClient,
    Reply,
    Space,
    access,
    check_raw,
)

MachineFactory = Callable[..., Machine]
RAM = 0x100000

#: The commands ``qtest_process_command`` in QEMU 10.0.2's system/qtest.c dispatches, in the
#: order of its ``strcmp(words[0], ...)`` chain (clock_step and clock_set only when the qtest
#: accelerator is on). Copied from the source by hand: a command QEMU adds must be added here
#: and to the grammar.
QEMU_10_0_2_COMMANDS = (
    "irq_intercept_out",
    "irq_intercept_in",
    "set_irq_in",
    "outb",
    "outw",
    "outl",
    "inb",
    "inw",
    "inl",
    "writeb",
    "writew",
    "writel",
    "writeq",
    "readb",
    "readw",
    "readl",
    "readq",
    "read",
    "b64read",
    "write",
    "memset",
    "b64write",
    "endianness",
    "clock_step",
    "module_load",
    "clock_set",
)


def test_the_table_covers_every_command_qemu_dispatches() -> None:
    assert set(GRAMMAR) == set(QEMU_10_0_2_COMMANDS) == COMMANDS
    assert len(QEMU_10_0_2_COMMANDS) == len(set(QEMU_10_0_2_COMMANDS))
    assert {n for n, s in GRAMMAR.items() if s.needs_accel} == {"clock_step", "clock_set"}
    assert {n for n, s in GRAMMAR.items() if s.space is Space.IO} == {"inb", "inw", "inl", "outb", "outw", "outl"}
    assert GRAMMAR["inw"].width == 2 and GRAMMAR["readq"].width == 8 and GRAMMAR["read"].width == 0
    assert GRAMMAR["irq_intercept_out"].usage() == "irq_intercept_out QOM_PATH [GPIO_NAME]"


#: Each command built from typed values, and the line the client wrote for it before the grammar
#: existed (taken from qtest.py at bc842d4).
GOLDEN: list[tuple[tuple[object, ...], str]] = [
    (("outb", 0x80, 0x12), "outb 0x80 0x12"),
    (("outw", 0x80, 0x1234), "outw 0x80 0x1234"),
    (("outl", 0xCF8, 0x80000000), "outl 0xcf8 0x80000000"),
    (("inb", 0x80), "inb 0x80"),
    (("inw", 0), "inw 0x0"),
    (("inl", 0xCFC), "inl 0xcfc"),
    (("writeb", RAM, 0xAB), "writeb 0x100000 0xab"),
    (("writew", RAM + 2, 0xABCD), "writew 0x100002 0xabcd"),
    (("writel", RAM + 4, 0x12345678), "writel 0x100004 0x12345678"),
    (("writeq", RAM + 8, 0x1122334455667788), "writeq 0x100008 0x1122334455667788"),
    (("readb", RAM), "readb 0x100000"),
    (("readw", RAM), "readw 0x100000"),
    (("readl", RAM), "readl 0x100000"),
    (("readq", 0xFFFF_FFFF_FFFF_FFF8), "readq 0xfffffffffffffff8"),
    (("read", RAM, 16), "read 0x100000 0x10"),
    (("write", RAM, 4, b"\x00\x01\xfe\xff"), "write 0x100000 0x4 0x0001feff"),
    (("b64read", RAM, 5), "b64read 0x100000 0x5"),
    (("b64write", RAM, 12, b"hello, qtest"), "b64write 0x100000 0xc aGVsbG8sIHF0ZXN0"),
    (("memset", RAM, 0x40, 0x5A), "memset 0x100000 0x40 0x5a"),
    (("memset", RAM, 0, 0), "memset 0x100000 0x0 0x0"),
    (("endianness",), "endianness"),
    (("clock_step",), "clock_step"),
    (("clock_step", 1000), "clock_step 1000"),
    (("clock_set", 123456789), "clock_set 123456789"),
    (("irq_intercept_in", "ioapic"), "irq_intercept_in ioapic"),
    (("irq_intercept_out", "/machine/ioapic"), "irq_intercept_out /machine/ioapic"),
    (("irq_intercept_out", "ioapic", "unnamed-gpio-out"), "irq_intercept_out ioapic unnamed-gpio-out"),
    (("set_irq_in", "ioapic", "unnamed-gpio-in", 5, 1), "set_irq_in ioapic unnamed-gpio-in 5 1"),
    (("set_irq_in", "ioapic", "unnamed-gpio-in", 23, -7), "set_irq_in ioapic unnamed-gpio-in 23 -7"),
    (("module_load", "block", "curl"), "module_load block curl"),
]


@pytest.mark.parametrize(("call", "line"), GOLDEN, ids=[line.split(" ")[0] for _, line in GOLDEN])
def test_build_encodes_the_golden_line_and_parse_reads_it_back(call: tuple[object, ...], line: str) -> None:
    name, *values = call
    assert isinstance(name, str)
    command = Command.build(name, *values)
    assert command.encode() == str(command) == line
    assert command.wire() == line.encode("ascii") + b"\n"
    assert Command.parse(line) == command
    assert Command.parse(line, strict=False) == command


def test_every_command_has_a_golden_line() -> None:
    assert {str(call[0]) for call, _ in GOLDEN} == set(GRAMMAR)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("outb 0x80 0x100", "outb: value 0x100 is outside 0x0..0xff"),
        ("inb 0x10000", "inb: port 0x10000 is outside 0x0..0xffff"),
        ("outb 0x80 0X10", "outb: value '0X10' is not written '0x10'"),
        ("outb 0x80 16", "outb: value '16' is not written '0x10'"),
        ("clock_step 0x10", "clock_step: ns '0x10' is not written '16'"),
        ("clock_step 0", "clock_step: ns 0x0 is outside 0x1..0x7fffffffffffffff"),
        ("readl 0x100000 0x4", "readl takes 1 argument(s), got 2; usage: readl ADDR"),
        ("irq_intercept_out", "irq_intercept_out takes 1 to 2 argument(s), got 0"),
        ("b64read 0x100000 0x0", "b64read: size 0x0 is outside 0x1..0xffffffffffffffff"),
        ("b64write 0x100000 0x4 AAEC", "b64write: size 0x4 but the data has 0x3 bytes"),
        ("b64write 0x100000 0x3 AA!C", "b64write: data 'AA!C' is not base64"),
        ("b64write 0x100000 0x3 AAEC\n", "'b64write 0x100000 0x3 AAEC\\n' contains a line break"),
        ("write 0x100000 0x1 0xAB", "write: data '0xAB' is not hex bytes"),
        ("read 0xffffffffffffffff 0x2", "read: 0xffffffffffffffff+0x2 wraps past the end of the address space"),
        ("memset 0x100000 0x4 0x100", "memset: value 0x100 is outside 0x0..0xff"),
        ("set_irq_in ioapic unnamed-gpio-in -1 1", "set_irq_in: line -0x1 is outside 0x0..0x7fffffff"),
        ("irq_intercept_in io\tapic", "irq_intercept_in: qom_path 'io\\tapic' contains white space"),
    ],
)
def test_strict_parse_refuses_what_the_client_never_writes(line: str, message: str) -> None:
    with pytest.raises(MalformedCommand) as info:
        Command.parse(line)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "line",
    [
        "outb 0x80 0x1ff",  # QEMU truncates to the access width
        "outb 0X80 255",
        "writeb 0x100000 -1",  # strtou64 wraps a negative number
        "inb 0xffff ",
        "readl 0x100000 extra words",
        "b64read 0x100000 0",
        "memset 0x100000 0 0x1ff",
        "clock_step -5",
        "clock_set -1",
        "write 0x100000 0x4 zz",  # QEMU reads bad digits as zero, it does not assert
        "set_irq_in ioapic unnamed-gpio-in -3 1",
        "irq_intercept_out ioapic unnamed-gpio-out more",
        "endianness please",
        "readq 017",  # octal
    ],
)
def test_lenient_parse_takes_what_qemu_takes(line: str) -> None:
    command = Command.parse(line, strict=False)
    assert command.name == line.split(" ")[0]
    with pytest.raises(MalformedCommand):
        Command.parse(line)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("outl zz", "outl takes 2 argument(s), got 1"),
        ("outl 0xcf8 zz", "outl: value 'zz' is not a number"),
        ("outl  0xcf8 0x1", "outl: port '' is not a number"),
        ("inb 0x10000", "inb: port 0x10000 is outside 0x0..0xffff"),
        ("read 0x100000 0", "read: size 0x0 is outside"),
        ("clock_step soon", "clock_step: ns 'soon' is not a number"),
        ("irq_intercept_in ", "irq_intercept_in: an empty argument (two spaces in a row)"),
        ("set_irq_in ioapic x 0x80000000 1", "set_irq_in: line 0x80000000 is outside -0x80000000..0x7fffffff"),
        ("readl 0x0\nreadl 0x0", "'readl 0x0\\nreadl 0x0' contains a line break"),
        ("b64write 0x0 0x1 " + "A" * MAX_LINE, f"a line of {MAX_LINE + 17} characters"),
    ],
)
def test_lenient_parse_refuses_what_qemu_asserts_on(line: str, message: str) -> None:
    with pytest.raises(MalformedCommand) as info:
        Command.parse(line, strict=False)
    assert str(info.value).startswith(message)


def test_errors_sit_in_the_hierarchy() -> None:
    with pytest.raises(UnknownCommand) as info:
        Command.parse("nosuchcmd 1", strict=False)
    err = info.value
    assert isinstance(err, MalformedCommand) and isinstance(err, QtestError)
    assert isinstance(err, QtestVirtioError) and isinstance(err, ValueError)
    assert str(err) == "unknown qtest command 'nosuchcmd'" and err.command == "nosuchcmd"
    with pytest.raises(UnknownCommand):
        Command.build("outq", 0, 0)
    with pytest.raises(MalformedCommand, match="must be an int, not bool"):
        Command.build("outb", 0x80, True)
    with pytest.raises(MalformedCommand, match="data must be bytes"):
        Command.build("b64write", RAM, 1, "AA==")
    with pytest.raises(MalformedCommand, match="one line, single spaces"):
        check_raw("inb  0x80")
    assert check_raw("anything goes 1") == "anything goes 1"


def test_access_picks_the_command_by_space_and_width() -> None:
    assert [access(Space.IO, w, write=False).name for w in (1, 2, 4, 8)] == ["inb", "inw", "inl", "inl"]
    assert [access(Space.IO, w, write=True).name for w in (1, 2, 3)] == ["outb", "outw", "outl"]
    assert [access(Space.MEM, w, write=True).name for w in (1, 2, 4, 8, 3)] == [
        "writeb",
        "writew",
        "writel",
        "writeq",
        "writeq",
    ]
    assert access(Space.MEM, 4, write=False).reply is Reply.INT


def test_with_limits_narrows_the_client_range_only() -> None:
    spec = GRAMMAR["read"].with_limits(size=(1, 0x10000))
    with pytest.raises(MalformedCommand, match=r"read: size 0x10001 is outside 0x1\.\.0x10000"):
        spec.build(RAM, 0x10001)
    assert spec.build(RAM, 0x10000).encode() == "read 0x100000 0x10000"
    assert spec.arg("size").wire_hi == GRAMMAR["read"].arg("size").wire_hi
    with pytest.raises(ValueError, match="no argument 'len'"):
        GRAMMAR["read"].with_limits(len=(0, 1))


def test_replies_decode_by_kind() -> None:
    assert Command.build("inw", 0x80).reply(b"0x00ff") == 0xFF
    assert Command.build("clock_step").reply(b"1000") == 1000
    assert Command.build("read", RAM, 2).reply(b"0xabcd") == b"\xab\xcd"
    assert Command.build("b64read", RAM, 3).reply(b"AAEC") == b"\x00\x01\x02"
    assert Command.build("endianness").reply(b"little") == "little"
    assert Command.build("outb", 0x80, 0).reply(b"") is None
    with pytest.raises(QtestError, match="reply of 4 chars is not 2 bytes of hex"):
        Command.build("read", RAM, 2).reply_bytes(b"0xab")
    with pytest.raises(QtestError, match="asked for 4 bytes, got 3"):
        Command.build("b64read", RAM, 4).reply_bytes(b"AAEC")
    with pytest.raises(QtestError, match="is not a number"):
        Command.build("readl", RAM).reply_int(b"zz")


# -- the client's wire output through a real QEMU -------------------------------------------------


def _session(q: QtestClient) -> None:
    """Every QtestClient method that sends, once or more (bulk paths over their chunk sizes)."""
    q.outb(0x80, 0x12)
    q.outw(0x80, 0x1234)
    q.outl(0xCF8, 0x80000000)
    q.inb(0x80)
    q.inw(0x80)
    q.inl(0xCFC)
    q.writeb(RAM, 0xAB)
    q.writew(RAM + 2, 0xABCD)
    q.writel(RAM + 4, 0x12345678)
    q.writeq(RAM + 8, 0x1122334455667788)
    assert (q.readb(RAM), q.readw(RAM + 2), q.readl(RAM + 4), q.readq(RAM + 8)) == (
        0xAB,
        0xABCD,
        0x12345678,
        0x1122334455667788,
    )
    assert q.read(RAM, 16)[:4] == b"\xab\x00\xcd\xab"
    q.write(RAM + 0x100, b"\x00\x01\xfe\xff")
    q.write(RAM, b"")
    assert q.b64read(RAM + 0x100, 5) == b"\x00\x01\xfe\xff\x00"
    q.b64write(RAM + 0x200, b"hello, qtest")
    q.b64write(RAM, b"")
    q.memset(RAM + 0x300, 0x40, 0x5A)
    q.memset(RAM, 0)
    q.memset(RAM + 0x400, 3)
    big = bytes(i * 7 & 0xFF for i in range(40 * 1024 + 3))
    q.memwrite(RAM + 0x10000, big)
    q.memwrite(RAM, b"")
    q.memwrite(RAM + 0x1000, b"xyz")
    assert q.memread(RAM + 0x10000, 300 * 1024)[: len(big)] == big
    assert q.memread(RAM, 0) == b""
    q.memread(RAM, 7)
    q.write_many([("writel", RAM, 1), ("outb", 0x80, 2), ("writeq", RAM + 8, 3), ("outw", 0x80, 0xFFFF)])
    b = q.batch()
    b.writeb(RAM, 1)
    b.writew(RAM + 2, 2)
    b.writel(RAM + 4, 3)
    b.writeq(RAM + 8, 4)
    b.memwrite(RAM + 16, b"\x01\x02\x03")
    b.memwrite(RAM, b"")
    b.flush()
    b.flush()
    q.pipeline(["readl 0x100000", "inb 0x80"])
    q.command("readw 0x100002")
    q.send_raw("readb 0x100000")
    q.endianness()
    for call in (
        lambda: q.irq_intercept_out("ioapic"),
        lambda: q.irq_intercept_out("ioapic", "unnamed-gpio-out"),
        lambda: q.irq_intercept_in("ioapic"),
        lambda: q.set_irq_in("ioapic", None, 5, 1),
        lambda: q.set_irq_in("ioapic", "unnamed-gpio-in", 5, 0),
        lambda: q.set_irq_in("ioapic", None, 23, -7),
        lambda: q.set_irq_in("ioapic", None, 23, 0),
        lambda: q.clock_step(),  # without the qtest accelerator these answer Unknown command
        lambda: q.clock_step(1000),
        lambda: q.clock_set(123456789),
        lambda: q.module_load("block", "no-such-module"),
    ):
        with contextlib.suppress(QtestError):
            call()


def _lines(sink: list[bytes]) -> list[str]:
    """The recorded lines; a long one as its start, length and a digest."""
    out = []
    for raw in b"".join(sink).split(b"\n")[:-1]:
        text = raw.decode("ascii")
        if len(text) > 120:
            text = f"{text[:40]}... len={len(text)} sha256={hashlib.sha256(raw).hexdigest()[:16]}"
        out.append(text)
    return out


#: What ``_session`` sent, recorded through QEMU 7.2.22 with the client of bc842d4 (before the
#: grammar): the client's lines must stay byte for byte the same.
SESSION_WIRE = [
    "outb 0x80 0x12",
    "outw 0x80 0x1234",
    "outl 0xcf8 0x80000000",
    "inb 0x80",
    "inw 0x80",
    "inl 0xcfc",
    "writeb 0x100000 0xab",
    "writew 0x100002 0xabcd",
    "writel 0x100004 0x12345678",
    "writeq 0x100008 0x1122334455667788",
    "readb 0x100000",
    "readw 0x100002",
    "readl 0x100004",
    "readq 0x100008",
    "read 0x100000 0x10",
    "write 0x100100 0x4 0x0001feff",
    "b64read 0x100100 0x5",
    "b64write 0x100200 0xc aGVsbG8sIHF0ZXN0",
    "memset 0x100300 0x40 0x5a",
    "memset 0x100400 0x3 0x0",
    "b64write 0x110000 0x8000 AAcOFRwjKjE4P0Z... len=43717 sha256=7cf1d0e5960302ae",
    "b64write 0x118000 0x2003 AAcOFRwjKjE4P0Z... len=10953 sha256=baaa470e20d54a18",
    "b64write 0x101000 0x3 eHl6",
    "b64read 0x110000 0x40000",
    "b64read 0x150000 0xb000",
    "b64read 0x100000 0x7",
    "writel 0x100000 0x1",
    "outb 0x80 0x2",
    "writeq 0x100008 0x3",
    "outw 0x80 0xffff",
    "writeb 0x100000 0x1",
    "writew 0x100002 0x2",
    "writel 0x100004 0x3",
    "writeq 0x100008 0x4",
    "b64write 0x100010 0x3 AQID",
    "readl 0x100000",
    "inb 0x80",
    "readw 0x100002",
    "readb 0x100000",
    "irq_intercept_out ioapic",
    "irq_intercept_out ioapic unnamed-gpio-out",
    "irq_intercept_in ioapic",
    "set_irq_in ioapic unnamed-gpio-in 5 1",
    "set_irq_in ioapic unnamed-gpio-in 5 0",
    "set_irq_in ioapic unnamed-gpio-in 23 -7",
    "set_irq_in ioapic unnamed-gpio-in 23 0",
    "clock_step",
    "clock_step 1000",
    "clock_set 123456789",
    "module_load block no-such-module",
]


def test_the_client_writes_the_same_bytes_as_before(qemu: Machine) -> None:
    q = qemu.qtest
    q.endianness()  # cached from here on, so the session's call sends nothing
    sink = q.record()
    _session(q)
    assert _lines(sink) == SESSION_WIRE
    assert all(Command.parse(line) for line in b"".join(sink).decode("ascii").splitlines())
    assert qemu.alive


#: Lines the lenient grammar takes although the client would never write them: QEMU must
#: answer each (OK, FAIL or ERR) and live.
ODD_BUT_SAFE = [
    "outb 0x80 0x1ff",
    "writeb 0x100000 -1",
    "readl 0x100000 extra words",
    "b64read 0x100000 0",
    "memset 0x100000 0 0x1ff",
    "write 0x100000 0x4 zz",
    "readq 017",
    "endianness please",
    "nosuchcmd 1 2",
]


def test_lines_the_lenient_grammar_takes_do_not_abort_qemu(qemu: Machine) -> None:
    for line in ODD_BUT_SAFE:
        with contextlib.suppress(UnknownCommand):
            Command.parse(line, strict=False)
        reply = qemu.qtest.send_raw(line)
        assert reply.split(" ")[0] in ("OK", "FAIL", "ERR"), (line, reply)
        assert qemu.alive, line


@pytest.mark.parametrize("line", ["inb 0x10000", "outl 0xcf8", "readl zz", "read 0x100000 0"])
def test_a_line_the_lenient_grammar_refuses_aborts_qemu(machine_factory: MachineFactory, line: str) -> None:
    """The other side of the grammar's claim: QEMU really asserts (SIGABRT) on what it refuses."""
    with pytest.raises(MalformedCommand):
        Command.parse(line, strict=False)
    vm = machine_factory()
    with pytest.raises(QemuCrashed) as info:
        vm.qtest.send_raw(line)
    assert info.value.signal == 6
    with pytest.raises(QemuCrashed):
        vm.shutdown(check=True)
