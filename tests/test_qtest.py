# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""The qtest wire client (qtest_virtio/qtest/client.py) against a real QEMU: no fakes.

Every test starts its own QEMU through the plugin's fixtures (~40 ms each) so that a test which
kills, stops or confuses QEMU cannot leak into the next one.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import pid_gone, qmp_object
from pytest_qtest_virtio.plugin import MachineFactory

from qtest_virtio import (
    ClockUnavailable,
    Machine,
    MachineSpec,
    QemuCrashed,
    QtestError,
    QtestTimeout,
    QtestVirtioError,
)
from qtest_virtio.binary import QemuBinary
from qtest_virtio.errors import MalformedCommand
from qtest_virtio.qtest import READ_CHUNK, WRITE_CHUNK, QtestClient

#: Guest RAM well above the legacy VGA/BIOS holes below 1 MiB.
RAM = 0x100000
#: 00:00.0 vendor/device as CF8/CFC reads them: Intel MCH (q35) and i440FX (pc).
HOST_BRIDGE_ID = {"q35": 0x29C08086, "pc": 0x12378086}
#: How long a teardown of a hung QEMU may take. The machine escalates quit (2 s) -> wait 3 s ->
#: SIGTERM, wait 2 s -> SIGKILL, so ~7 s is what the current code needs; 10 s is the bound.
TEARDOWN_BOUND = 10.0

# MC146818 RTC: index/data ports, registers A/B/C, and its ISA IRQ (IOAPIC pin 8).
RTC_INDEX, RTC_DATA, RTC_IRQ = 0x70, 0x71, 8


def run_bounded(fn: Callable[[], Any], limit: float) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread for at most ``limit`` s, so a hang fails the test instead of the run.

    Returns the thread (still alive if ``fn`` hung) and a box with ``result`` or ``error``.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    return thread, box


def cf8(bus: int, dev: int, fn: int, reg: int) -> int:
    return 0x80000000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC)


# -- port I/O and memory --------------------------------------------------------------------


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_cf8_cfc_reads_host_bridge_id(machine_factory: MachineFactory, machine: str) -> None:
    """The PCI config mechanism #1 works over qtest on both machine types."""
    q = machine_factory(machine=machine).qtest
    q.outl(0xCF8, cf8(0, 0, 0, 0))
    assert q.inl(0xCFC) == HOST_BRIDGE_ID[machine]
    # The same register through narrower accesses at 0xCFC + offset.
    assert q.inw(0xCFC) == HOST_BRIDGE_ID[machine] & 0xFFFF
    assert q.inw(0xCFE) == HOST_BRIDGE_ID[machine] >> 16
    assert q.inb(0xCFC) == 0x86
    # Reading CF8 back returns the address latch.
    assert q.inl(0xCF8) == cf8(0, 0, 0, 0)


def test_port_io_types_and_widths(qtest: QtestClient) -> None:
    """in* return ints of their width; out* of each width reach the device (CMOS RAM, CF8 latch)."""
    qtest.outb(RTC_INDEX, 0x40)  # CMOS user RAM byte 0x40
    qtest.outb(RTC_DATA, 0xA5)
    qtest.outb(RTC_INDEX, 0x40)
    value = qtest.inb(RTC_DATA)
    assert type(value) is int and value == 0xA5
    qtest.outl(0xCF8, 0x80001234 & ~3)
    assert qtest.inl(0xCF8) == 0x80001234 & ~3
    qtest.outl(0xCF8, cf8(0, 0, 0, 0x04))
    qtest.outw(0xCFC, 0x0006)  # host bridge command register: memory + bus master
    word = qtest.inw(0xCFC)
    assert type(word) is int and 0 <= word <= 0xFFFF and word & 0x6 == 0x6
    assert type(qtest.inl(0xCFC)) is int


def test_memory_words_round_trip(qtest: QtestClient) -> None:
    """write[bwlq] / read[bwlq] round trip at every width, with full-width values."""
    qtest.writeb(RAM, 0xFE)
    qtest.writew(RAM + 0x10, 0xBEEF)
    qtest.writel(RAM + 0x20, 0xDEADBEEF)
    qtest.writeq(RAM + 0x30, 0xFEDCBA9876543210)
    assert qtest.readb(RAM) == 0xFE
    assert qtest.readw(RAM + 0x10) == 0xBEEF
    assert qtest.readl(RAM + 0x20) == 0xDEADBEEF
    assert qtest.readq(RAM + 0x30) == 0xFEDCBA9876543210
    # Narrow writes do not touch the neighbours.
    assert qtest.readb(RAM + 1) == 0
    assert qtest.readw(RAM + 0x12) == 0


def test_target_endianness_is_little(qtest: QtestClient) -> None:
    """readw/l/q and writew/l/q are target-endian: x86 is little-endian, byte by byte."""
    assert qtest.endianness() == "little"
    qtest.writel(RAM, 0x11223344)
    assert [qtest.readb(RAM + i) for i in range(4)] == [0x44, 0x33, 0x22, 0x11]
    qtest.writeq(RAM + 8, 0x0102030405060708)
    assert qtest.read(RAM + 8, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert qtest.readw(RAM + 9) == 0x0607


def test_hex_and_base64_buffers(qtest: QtestClient) -> None:
    """read/write (hex) and b64read/b64write move raw bytes; each sees the other's writes."""
    data = bytes(range(256)) * 3 + b"\x00\xff"
    qtest.write(RAM + 1, data)
    assert qtest.read(RAM + 1, len(data)) == data
    assert qtest.b64read(RAM + 1, len(data)) == data
    qtest.b64write(RAM + 0x2003, data[::-1])
    assert qtest.b64read(RAM + 0x2003, len(data)) == data[::-1]
    assert qtest.read(RAM + 0x2003, 5) == data[::-1][:5]
    assert qtest.readb(RAM + 0x2002) == 0 and qtest.readb(RAM + 0x2003 + len(data)) == 0
    qtest.write(RAM, b"")  # empty writes are no-ops, not QEMU assertions
    qtest.b64write(RAM, b"")
    assert qtest.readb(RAM) == 0


def test_memset(qtest: QtestClient) -> None:
    """memset fills exactly [addr, addr+size); size 0 is a no-op."""
    qtest.memset(RAM + 3, 13, 0xAB)
    assert qtest.read(RAM + 2, 15) == b"\x00" + b"\xab" * 13 + b"\x00"
    qtest.memset(RAM + 3, 0, 0xCD)
    assert qtest.readb(RAM + 3) == 0xAB
    qtest.memset(RAM + 3, 4)  # default value 0
    assert qtest.read(RAM + 3, 5) == b"\x00" * 4 + b"\xab"


# -- bulk transfers -------------------------------------------------------------------------

BULK_SIZES = [0, 1, 3, WRITE_CHUNK - 1, WRITE_CHUNK, WRITE_CHUNK + 1, READ_CHUNK + 5]


def test_bulk_round_trips_at_chunk_edges(qtest: QtestClient) -> None:
    """memwrite/memread at sizes around the chunk sizes land exactly where asked (no overrun).

    The guard bytes and the single-byte reads check placement independently of memread, so
    an offset bug shared by both bulk paths would still show.
    """
    base = RAM
    for size in BULK_SIZES:
        data = os.urandom(size)
        addr = base + 1  # odd: chunks never align by accident
        qtest.memwrite(addr, data)
        assert qtest.memread(addr, size) == data, f"size {size}"
        if size:
            assert qtest.readb(addr) == data[0]
            assert qtest.readb(addr + size - 1) == data[-1]
            if size > WRITE_CHUNK:
                assert qtest.readb(addr + WRITE_CHUNK) == data[WRITE_CHUNK]
        assert qtest.readb(addr - 1) == 0 and qtest.readb(addr + size) == 0, f"size {size} overran"
        base += (size + 0x1FFF) & ~0xFFF


@pytest.mark.timeout(30)
def test_bulk_4mib_at_odd_address(qtest: QtestClient) -> None:
    """4 MiB of random data through the pipelined bulk paths, checked by spot reads too."""
    addr, data = 0x1000001, os.urandom(4 << 20)
    qtest.memwrite(addr, data)
    assert qtest.memread(addr, len(data)) == data
    for off in (0, WRITE_CHUNK, READ_CHUNK - 1, READ_CHUNK, len(data) - 1):
        assert qtest.readb(addr + off) == data[off]
    assert qtest.readb(addr + len(data)) == 0
    # memread must not depend on memwrite's chunking: read across a memwrite chunk edge.
    assert qtest.memread(addr + WRITE_CHUNK - 7, 14) == data[WRITE_CHUNK - 7 : WRITE_CHUNK + 7]


def test_bulk_chunking_counts_commands(qtest: QtestClient) -> None:
    """Bulk calls are split into WRITE_CHUNK / READ_CHUNK commands, each recorded."""
    before = qtest.commands_sent
    qtest.memwrite(RAM, bytes(3 * WRITE_CHUNK + 1))
    assert qtest.commands_sent - before == 4
    before = qtest.commands_sent
    qtest.memread(RAM, 2 * READ_CHUNK + 1)
    assert qtest.commands_sent - before == 3
    before = qtest.commands_sent
    assert qtest.memread(RAM, 0) == b""
    qtest.memwrite(RAM, b"")
    assert qtest.commands_sent == before


# -- pipelining ------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_pipeline_thousands_of_commands(qtest: QtestClient) -> None:
    """Thousands of tiny commands in one pipeline complete with the right replies in order.

    Regression: send-everything-then-read deadlocks after a few hundred commands, because QEMU
    stops reading while its replies (each ~700 bytes of Unix socket accounting) cannot be sent.
    """
    n = 8000
    qtest.write_many(("writel", RAM + 4 * i, i * 0x10001 & 0xFFFFFFFF) for i in range(n))
    replies = qtest.pipeline([f"readl {RAM + 4 * i:#x}" for i in range(n)])
    assert len(replies) == n
    assert [int(r, 16) for r in replies] == [i * 0x10001 & 0xFFFFFFFF for i in range(n)]
    # Port writes through write_many, and a many-reply pipeline of `in` commands.
    qtest.write_many([("outb", RTC_INDEX, 0x40), ("outb", RTC_DATA, 0x5A)] * 2000)
    ins = qtest.pipeline(["outb 0x70 0x40", "inb 0x71"] * 3000)
    assert ins[1::2] == ["0x005a"] * 3000 and ins[0::2] == [""] * 3000


def test_pipeline_failure_keeps_replies_in_step(qtest: QtestClient) -> None:
    """A FAIL inside a pipeline raises after all replies are read; later commands stay in step."""
    qtest.writel(RAM, 0x1234)
    qtest.writel(RAM + 4, 0x5678)
    with pytest.raises(QtestError) as info:
        qtest.pipeline(["readl 0x100000", "nosuchcmd", "readl 0x100004", "alsobad"])
    assert info.value.command == "nosuchcmd"
    assert "Unknown command" in info.value.message
    assert qtest.readl(RAM + 4) == 0x5678
    assert qtest.pipeline(["readl 0x100000", "readl 0x100004"]) == [
        "0x0000000000001234",
        "0x0000000000005678",
    ]


def test_write_many_validates_everything_first(qemu: Machine) -> None:
    """A bad triple anywhere in write_many sends none of the batch."""
    q = qemu.qtest
    before = q.commands_sent
    with pytest.raises(ValueError, match="readl"):
        q.write_many([("writel", RAM, 1), ("readl", RAM, 0)])
    with pytest.raises(ValueError):
        q.write_many([("writel", RAM, 1), ("outb", 0x10000, 0)])
    with pytest.raises(ValueError):
        q.write_many([("writel", RAM, 1), ("writeb", RAM, 0x100)])
    assert q.commands_sent == before
    assert q.readl(RAM) == 0  # the valid first write was not sent either
    assert qemu.alive


# -- argument validation ---------------------------------------------------------------------

Call = Callable[[QtestClient], object]

BAD_CALLS: list[Any] = [
    pytest.param(lambda q: q.outb(0x10000, 0), "port", id="outb-port>0xffff"),
    pytest.param(lambda q: q.inl(0x10000), "port", id="inl-port>0xffff"),
    pytest.param(lambda q: q.inb(-1), "port", id="inb-negative-port"),
    pytest.param(lambda q: q.readl(-4), "readl: addr -0x4 is outside", id="readl-negative-address"),
    pytest.param(lambda q: q.writeq(-8, 0), "writeq: addr -0x8 is outside", id="writeq-negative-address"),
    pytest.param(lambda q: q.readq(1 << 64), "readq: addr 0x10000000000000000 is outside", id="readq-address>64bit"),
    pytest.param(lambda q: q.outb(0x80, 0x100), "value", id="outb-value-too-wide"),
    pytest.param(lambda q: q.outw(0x80, 0x10000), "value", id="outw-value-too-wide"),
    pytest.param(lambda q: q.outl(0x80, 1 << 32), "value", id="outl-value-too-wide"),
    pytest.param(lambda q: q.writew(RAM, 0x10000), "value", id="writew-value-too-wide"),
    pytest.param(lambda q: q.writeb(RAM, -1), "value", id="writeb-negative-value"),
    pytest.param(lambda q: q.read(RAM, 0), "size", id="read-size-0"),
    pytest.param(lambda q: q.b64read(RAM, 0), "size", id="b64read-size-0"),
    pytest.param(lambda q: q.read((1 << 64) - 1, 2), "wraps", id="read-wraps-address-space"),
    pytest.param(lambda q: q.memset(RAM, 4, 0x100), "value", id="memset-value-too-wide"),
    pytest.param(lambda q: q.outb(0x80, True), "int", id="outb-bool-value"),
    pytest.param(lambda q: q.inb(True), "int", id="inb-bool-port"),
    pytest.param(lambda q: q.readl("0x100000"), "int", id="readl-str-address"),
    pytest.param(lambda q: q.writel(RAM, 1.0), "int", id="writel-float-value"),
    pytest.param(lambda q: q.memread(RAM, "16"), "int", id="memread-str-size"),
    pytest.param(lambda q: q.irq_intercept_in("io apic"), "white space", id="qom-path-with-space"),
    pytest.param(lambda q: q.irq_intercept_in(""), "non-empty", id="qom-path-empty"),
    pytest.param(lambda q: q.set_irq_in("ioapic", "a\tb", 0, 1), "white space", id="gpio-name-with-tab"),
    pytest.param(lambda q: q.set_irq_in("ioapic", None, -1, 1), "line", id="set_irq_in-negative-line"),
    pytest.param(lambda q: q.clock_step(-1), "ns", id="clock_step-negative"),
    pytest.param(lambda q: q.command("readl 0x0\nreadl 0x0"), "one line", id="raw-newline"),
    pytest.param(lambda q: q.command("inb  0x80"), "single spaces", id="raw-double-space"),
    pytest.param(lambda q: q.command(" inb 0x80"), "single spaces", id="raw-leading-space"),
    pytest.param(lambda q: q.command("inb 0x80 "), "single spaces", id="raw-trailing-space"),
    pytest.param(lambda q: q.command(""), "malformed", id="raw-empty"),
    pytest.param(lambda q: q.pipeline(["inb 0x80", "inb 0x80\n"]), "malformed", id="pipeline-newline"),
]


@pytest.mark.parametrize(("call", "what"), BAD_CALLS)
def test_bad_argument_raises_before_sending(qemu: Machine, call: Call, what: str) -> None:
    """Each malformed argument is a ValueError (the grammar's one-line MalformedCommand) raised
    before sending: QEMU would g_assert on it."""
    q = qemu.qtest
    history = len(q.history)
    sent = q.commands_sent
    with pytest.raises(ValueError, match=what) as info:
        call(q)
    assert isinstance(info.value, MalformedCommand) and "\n" not in str(info.value)
    assert q.commands_sent == sent
    assert len(q.history) == history
    assert qemu.alive
    q.outl(0xCF8, cf8(0, 0, 0, 0))  # a valid command afterwards still gets its own reply
    assert q.inl(0xCFC) in HOST_BRIDGE_ID.values()
    assert qemu.alive


# -- FAIL replies ----------------------------------------------------------------------------


def test_unknown_command_raises_qtest_error(qemu: Machine) -> None:
    """FAIL carries the command and QEMU's own message; QEMU survives it."""
    with pytest.raises(QtestError) as info:
        qemu.qtest.command("nosuchcmd")
    assert info.value.command == "nosuchcmd"
    assert "Unknown command" in info.value.message
    assert "nosuchcmd" in str(info.value)
    assert type(info.value) is QtestError
    assert qemu.alive and qemu.qtest.endianness() == "little"
    assert qemu.qtest.history[-1] == ("nosuchcmd", "FAIL Unknown command 'nosuchcmd'")


def test_unknown_device_raises_qtest_error(qemu: Machine) -> None:
    with pytest.raises(QtestError) as info:
        qemu.qtest.irq_intercept_in("/no/such/device")
    assert info.value.command == "irq_intercept_in /no/such/device"
    assert "Unknown device" in info.value.message
    assert qemu.alive
    assert qemu.qtest.readl(RAM) == 0


def test_clock(qemu: Machine, qemu_binary: QemuBinary) -> None:
    """Without the qtest accelerator the virtual clock is missing: a clear ClockUnavailable."""
    q = qemu.qtest
    if qemu_binary.has_qtest_accel:
        now = q.clock_step(1000)
        assert q.clock_set(now + 5000) == now + 5000
        return
    for call, command in ((lambda: q.clock_step(), "clock_step"), (lambda: q.clock_set(10), "clock_set 10")):
        with pytest.raises(ClockUnavailable) as info:
            call()
        assert isinstance(info.value, QtestError)
        assert info.value.command == command
        assert "virtual clock not available" in str(info.value)
        assert qemu.alive
    with pytest.raises(ClockUnavailable):
        q.clock_step(100)
    assert q.readl(RAM) == 0


# -- IRQ lines -------------------------------------------------------------------------------


def test_irq_lines_from_set_irq_in(qtest: QtestClient) -> None:
    """'IRQ raise/lower' lines precede the reply: recorded as IRQ state, never taken as the reply."""
    qtest.irq_intercept_in("ioapic")
    assert qtest.irq_events == []
    qtest.set_irq_in("ioapic", None, 5, 1)
    assert qtest.history[-1] == ("set_irq_in ioapic unnamed-gpio-in 5 1", "OK")
    assert qtest.irq_levels[5] is True
    assert qtest.irq_events == [(5, True)]
    assert qtest.get_irq(5) is True
    assert qtest.get_irq(4) is False
    qtest.wait_irq(5, True, timeout=0.5)  # already raised: returns at once
    # QEMU reports changes only: raising again adds no line.
    qtest.set_irq_in("ioapic", None, 5, 1)
    assert qtest.irq_events == [(5, True)]
    qtest.set_irq_in("ioapic", None, 5, 0)
    assert qtest.history[-1][1] == "OK"
    assert qtest.irq_events == [(5, True), (5, False)]
    assert qtest.get_irq(5) is False
    # A following command's reply is still its own.
    qtest.writel(RAM, 0xCAFE)
    assert qtest.readl(RAM) == 0xCAFE
    assert qtest.poll_irqs(0.0) == []
    with pytest.raises(QtestTimeout):
        qtest.wait_irq(5, True, timeout=0.1)


def test_irq_lines_inside_a_pipeline(qtest: QtestClient) -> None:
    """IRQ lines interleaved with pipelined replies do not shift the replies."""
    qtest.irq_intercept_in("ioapic")
    qtest.writel(RAM, 0x11)
    qtest.writel(RAM + 4, 0x22)
    replies = qtest.pipeline(
        [
            "set_irq_in ioapic unnamed-gpio-in 3 1",
            "readl 0x100000",
            "set_irq_in ioapic unnamed-gpio-in 7 1",
            "set_irq_in ioapic unnamed-gpio-in 3 0",
            "readl 0x100004",
        ]
    )
    assert replies == ["", "0x0000000000000011", "", "", "0x0000000000000022"]
    assert qtest.irq_events == [(3, True), (7, True), (3, False)]
    assert qtest.irq_levels == {3: False, 7: True}


def test_asynchronous_irq_lines(qtest: QtestClient) -> None:
    """IRQ lines that arrive with no command in flight: poll_irqs / wait_irq / get_irq.

    The RTC's periodic interrupt runs on the host clock, so it fires even though the machine is
    stopped (-S); reading register C acknowledges it and lowers IRQ 8.
    """
    qtest.irq_intercept_in("ioapic")
    qtest.outb(RTC_INDEX, 0x0A)
    qtest.outb(RTC_DATA, 0x26)  # 32.768 kHz base, rate 6 = 1024 Hz
    qtest.outb(RTC_INDEX, 0x0B)
    qtest.outb(RTC_DATA, 0x42)  # periodic interrupt enable, 24 h mode
    assert qtest.poll_irqs(2.0) == [(RTC_IRQ, True)]
    assert qtest.get_irq(RTC_IRQ) is True
    qtest.outb(RTC_INDEX, 0x0C)
    assert qtest.inb(RTC_DATA) & 0xC0 == 0xC0  # IRQF | PF; the read lowers the line
    assert qtest.irq_levels[RTC_IRQ] is False
    assert qtest.irq_events[-1] == (RTC_IRQ, False)
    qtest.wait_irq(RTC_IRQ, True, timeout=2.0)  # the next period raises it again
    assert qtest.irq_events[-1] == (RTC_IRQ, True)
    qtest.outb(RTC_INDEX, 0x0B)
    qtest.outb(RTC_DATA, 0x02)  # periodic interrupt off
    qtest.outb(RTC_INDEX, 0x0C)
    qtest.inb(RTC_DATA)
    assert qtest.get_irq(RTC_IRQ) is False
    assert qtest.poll_irqs(0.05) == []


# -- history ---------------------------------------------------------------------------------


def test_history_ring(qtest: QtestClient) -> None:
    """The ring keeps the last commands with replies, oldest first; bulk text is truncated."""
    maxlen = qtest.history.maxlen
    assert maxlen is not None
    for i in range(maxlen + 10):
        qtest.writel(RAM + 4 * i, i)
    assert len(qtest.history) == maxlen
    assert qtest.history[0] == (f"writel {RAM + 40:#x} {10:#x}", "OK")
    qtest.readl(RAM + 8)
    last = qtest.last_commands(3)
    assert last == [
        f"writel {RAM + 4 * (maxlen + 8):#x} {maxlen + 8:#x}  ->  OK",
        f"writel {RAM + 4 * (maxlen + 9):#x} {maxlen + 9:#x}  ->  OK",
        f"readl {RAM + 8:#x}  ->  OK 0x0000000000000002",
    ]
    assert len(qtest.last_commands()) == 20

    payload = os.urandom(3000)
    qtest.b64write(RAM, payload)
    qtest.b64read(RAM, 3000)
    qtest.memwrite(RAM, os.urandom(WRITE_CHUNK + 100))  # exactly two chunks
    cmd_w, reply_w = qtest.history[-4]
    cmd_r, reply_r = qtest.history[-3]
    assert cmd_w.startswith(f"b64write {RAM:#x} 0xbb8 ") and cmd_w.endswith(" chars)") and len(cmd_w) < 300
    assert base64.b64encode(payload).decode() not in cmd_w
    assert cmd_r == f"b64read {RAM:#x} 0xbb8" and reply_r.startswith("OK ") and reply_r.endswith(" chars)")
    assert len(reply_r) < 300
    assert reply_w == "OK"
    assert list(qtest.history)[-2:] == [
        (f"b64write {RAM:#x} {WRITE_CHUNK:#x} <{WRITE_CHUNK} bytes>", "OK"),
        (f"b64write {RAM + WRITE_CHUNK:#x} 0x64 <100 bytes>", "OK"),
    ]
    assert all(len(line) < 400 for line in qtest.last_commands(64))


# -- QEMU dies or hangs ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sigabrt_raises_qemu_crashed(machine_factory: MachineFactory) -> None:
    """A closed socket is reported as QemuCrashed with the signal, the last commands and a repro."""
    vm = machine_factory()
    pid, workdir = vm.pid, vm.workdir
    vm.qtest.writel(RAM, 0xAB)
    vm.qtest.readl(RAM)
    os.kill(pid, signal.SIGABRT)
    with pytest.raises(QemuCrashed) as info:
        vm.qtest.readl(RAM)
    crash = info.value
    assert crash.signal == signal.SIGABRT.value == 6
    assert crash.returncode == -6
    text = str(crash)
    assert "signal 6" in text and "SIGABRT" in text
    assert f"writel {RAM:#x} 0xab" in text and f"readl {RAM:#x}  ->  OK 0x00000000000000ab" in text
    assert "-qtest stdio" in crash.command_line and "qmp" not in crash.command_line
    assert "-qtest stdio" in text
    assert vm.crash is crash
    # Every later command says the same, it does not hang on the dead socket.
    with pytest.raises(QemuCrashed):
        vm.qtest.inb(0x80)
    thread, box = run_bounded(lambda: vm.shutdown(check=True), TEARDOWN_BOUND)
    assert not thread.is_alive(), "teardown of a dead QEMU hung"
    assert isinstance(box.get("error"), QemuCrashed)  # check=True re-raises the crash
    assert pid_gone(pid)
    assert not os.path.exists(workdir)


@pytest.mark.timeout(40)
def test_timeout_on_stopped_qemu_then_teardown_kills_it(machine_factory: MachineFactory) -> None:
    """A SIGSTOPped QEMU gives QtestTimeout (not a hang); teardown still kills it (SIGKILL works on
    a stopped process) and removes the workdir.

    QMP is used before the stop, as a test that queried QMP would have; the never-used-QMP case
    is test_teardown_of_stopped_qemu_without_qmp.
    """
    vm = machine_factory(MachineSpec(command_timeout=0.5))
    pid, workdir = vm.pid, vm.workdir
    # -S (prelaunch) without the qtest accelerator; with it the machine runs from the start.
    assert qmp_object(vm, "query-status")["status"] == ("running" if vm.binary.has_qtest_accel else "prelaunch")
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(QtestTimeout) as info:
        vm.qtest.readl(RAM)
    assert 0.4 < time.monotonic() - t0 < 3.0
    assert info.value.timeout == 0.5
    assert info.value.command == f"readl {RAM:#x}"
    assert "0.5 s" in str(info.value)
    t0 = time.monotonic()
    with pytest.raises(QtestTimeout):
        vm.qtest.pipeline(["readl 0x0", "readl 0x4"])
    assert time.monotonic() - t0 < 3.0
    t0 = time.monotonic()
    thread, box = run_bounded(lambda: vm.shutdown(check=False), TEARDOWN_BOUND)
    hung = thread.is_alive()
    if hung:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
        thread.join(10)
    assert not hung, f"teardown of a stopped QEMU still running after {TEARDOWN_BOUND:g} s"
    assert "error" not in box
    # SIGTERM comes with SIGCONT, so the stopped QEMU ends gracefully and fast (no SIGKILL wait).
    assert vm.returncode in (0, -signal.SIGTERM)
    assert time.monotonic() - t0 < 2.0
    assert pid_gone(pid)
    assert not os.path.exists(workdir)


@pytest.mark.timeout(30)
def test_qtest_timeout_attribute_applies_to_single_commands(qemu: Machine) -> None:
    """Setting ``qtest.timeout`` bounds a single command, as it bounds a pipeline.

    Regression: the single-command fast path used to keep the socket timeout set in __init__
    (spec.command_timeout, 30 s) and ignore the attribute.
    """
    with pytest.raises(ValueError):
        qemu.qtest.timeout = 0
    qemu.qtest.timeout = 0.5
    os.kill(qemu.pid, signal.SIGSTOP)
    thread, box = run_bounded(lambda: qemu.qtest.readl(RAM), 2.0)
    try:
        assert not thread.is_alive(), "readl ignored qtest.timeout = 0.5"
        assert isinstance(box.get("error"), QtestTimeout)
    finally:
        os.kill(qemu.pid, signal.SIGKILL)  # unblocks the reader thread with EOF
        thread.join(10)
        qemu.shutdown(check=False)


@pytest.mark.timeout(40)
def test_teardown_of_stopped_qemu_without_qmp(machine_factory: MachineFactory) -> None:
    """The common case (a test that never touched QMP) must also tear down a hung QEMU.

    Regression: shutdown negotiated QMP through qemu.qmp's connect(), which has no timeout,
    so a stopped QEMU whose QMP was never used blocked teardown forever.
    """
    vm = machine_factory()
    pid, workdir = vm.pid, vm.workdir
    os.kill(pid, signal.SIGSTOP)
    thread, _ = run_bounded(lambda: vm.shutdown(check=False), TEARDOWN_BOUND)
    try:
        assert not thread.is_alive(), f"teardown of a stopped QEMU still running after {TEARDOWN_BOUND:g} s"
        assert pid_gone(pid)
        assert not os.path.exists(workdir)
    finally:
        if thread.is_alive():
            os.kill(pid, signal.SIGKILL)  # EOF on QMP lets the stuck teardown finish
            thread.join(15)


@pytest.mark.timeout(30)
def test_no_stale_reply_after_timeout(machine_factory: MachineFactory) -> None:
    """After a timeout the client must not hand the timed-out command's reply to the next one.

    Regression: the late reply stayed in the socket and was returned for the next command.
    """
    vm = machine_factory(MachineSpec(command_timeout=0.3))
    q = vm.qtest
    q.writel(RAM, 0x1111)
    q.writel(RAM + 4, 0x2222)
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QtestTimeout):
            q.readl(RAM)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    time.sleep(0.05)
    try:
        value = q.readl(RAM + 4)
    except QtestVirtioError:
        return  # refusing to go on after a timeout is also correct
    assert value == 0x2222, f"readl {RAM + 4:#x} returned the stale reply {value:#x} of readl {RAM:#x}"


@pytest.mark.timeout(30)
def test_last_commands_name_the_command_that_got_no_reply(machine_factory: MachineFactory) -> None:
    """A report lists the command still waiting for its reply: while it waits, after its
    QtestTimeout (single command and pipeline), and in the reproducer built from history."""
    vm = machine_factory(MachineSpec(command_timeout=2.0))
    q = vm.qtest
    q.writel(RAM, 0x1111)
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        box: dict[str, BaseException] = {}

        def wait_for_readl() -> None:
            try:
                q.readl(RAM)
            except QtestTimeout as exc:
                box["error"] = exc

        thread = threading.Thread(target=wait_for_readl)
        thread.start()
        time.sleep(0.5)  # the readl is waiting now
        waiting = q.last_commands()
        thread.join(10)
        assert isinstance(box.get("error"), QtestTimeout)
        assert waiting[-2:] == [f"writel {RAM:#x} 0x1111  ->  OK", f"readl {RAM:#x}  ->  (no reply yet)"]
        assert q.last_commands()[-1] == f"readl {RAM:#x}  ->  (no reply within 2 s)"
        with pytest.raises(QtestTimeout):
            q.pipeline([f"readl {RAM:#x}", f"readl {RAM + 4:#x}"])
        assert q.last_commands(2) == [
            f"readl {RAM:#x}  ->  (no reply within 2 s)",
            f"readl {RAM + 4:#x}  ->  (no reply within 2 s)",
        ]
        sent = [f"writel {RAM:#x} 0x1111", f"readl {RAM:#x}", f"readl {RAM:#x}", f"readl {RAM + 4:#x}", "EOF"]
        assert vm.reproducer().splitlines()[-5:] == sent
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    # The late replies are dropped (a note in history); the reproducer lists only commands sent.
    q.poll_irqs(1.0)
    assert q.readl(RAM) == 0x1111
    assert "(reply of a command that timed out)" in [c for c, _ in q.history]
    assert vm.reproducer().splitlines()[-3:] == [f"readl {RAM + 4:#x}", f"readl {RAM:#x}", "EOF"]


@pytest.mark.timeout(30)
def test_crash_report_names_the_command_that_got_no_reply(machine_factory: MachineFactory) -> None:
    """QEMU dying while a command waits: the crash's last commands end with that command."""
    vm = machine_factory()
    q = vm.qtest
    q.writel(RAM, 0xAB)
    os.kill(vm.pid, signal.SIGSTOP)
    thread, box = run_bounded(lambda: q.readl(RAM), 10.0)
    time.sleep(0.2)
    os.kill(vm.pid, signal.SIGKILL)
    thread.join(10)
    crash = box.get("error")
    assert isinstance(crash, QemuCrashed), box
    assert crash.last_commands[-1] == f"readl {RAM:#x}  ->  (no reply: QEMU closed the qtest socket)"
    assert crash.last_commands[-2] == f"writel {RAM:#x} 0xab  ->  OK"
    vm.shutdown(check=False)


def test_poll_irqs_drops_a_reply_owed_to_a_timed_out_command(machine_factory: MachineFactory) -> None:
    """A reply that arrives late, while no command is in flight, belongs to the command that timed
    out: poll_irqs drops it like any other read does, instead of calling it unsolicited."""
    vm = machine_factory(MachineSpec(command_timeout=0.3))
    q = vm.qtest
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QtestTimeout):
            q.readl(RAM)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    q.poll_irqs(1.0)  # the late "OK 0x..." arrives here
    assert not q.timed_out  # the owed reply was consumed
    q.writel(RAM, 0x5A5A)
    assert q.readl(RAM) == 0x5A5A
