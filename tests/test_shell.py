"""``qtest-virtio shell`` the way a person uses it: typed into a terminal (pexpect on a pty),
against real QEMU. Also the testable core (``Shell`` on text streams) and the raw-command checks.

The sessions run ``qtest-virtio shell`` once the CLI has the subcommand, else the stand-alone
``python3 -m qtest_virtio.app.shell`` with the same options. TERM=dumb keeps readline's output free
of terminal escapes, so what the test reads is what a person sees.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect  # type: ignore[import-untyped]  # no stubs in the dev environment
import pytest
from conftest import EXE
from procutil import start_time as _starttime
from procutil import state as _state
from pytest_qtest_virtio.plugin import MachineFactory

from qtest_virtio import Machine, MachineSpec, QemuCrashed
from qtest_virtio.app.shell import Shell, ShellError, hexdump, parse_int, parse_raw, raw_table
from qtest_virtio.binary import QemuBinary
from qtest_virtio.qtest import CommandSpec

PROMPT = r"\(qtest[^)]*\) "
UP = "\x1b[A"
START_TIMEOUT = 60  # a loaded 2-core CI machine: python start-up, QEMU start, enumeration
COMMAND_TIMEOUT = 20
BLK = "00:01.0"  # the first -device lands in slot 1 of q35 (with -nodefaults)
RNG = "00:02.0"


def _cli_has_shell() -> bool:
    from qtest_virtio.app.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return "shell" in action.choices
    return False


def shell_command() -> list[str]:
    exe = EXE
    if exe and _cli_has_shell():
        return [exe, "shell"]
    return [sys.executable, "-m", "qtest_virtio.app.shell"]


class Session:
    """One shell in a pseudo-terminal: type a line, get what it printed before the next prompt."""

    def __init__(self, qemu: str, tmp_path: Path, *devices: str, env: dict[str, str] | None = None) -> None:
        args = [*shell_command()[1:], "--qemu", qemu]
        for d in devices:
            args += ["--device", d]
        environ = {**os.environ, "TERM": "dumb", "QTEST_VIRTIO_HISTORY": str(tmp_path / "history")}
        environ.update(env or {})
        self.child = pexpect.spawn(
            shell_command()[0],
            args,
            env=environ,
            encoding="utf-8",
            timeout=COMMAND_TIMEOUT,
            dimensions=(40, 250),
            # Ctrl-C is a SIGINT: a shell's background job inherits it ignored, so default it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.child.expect(PROMPT, timeout=START_TIMEOUT)
        m = re.search(r"QEMU pid (\d+)", self.child.before)
        assert m, self.child.before
        self.pid = int(m.group(1))
        self.starttime = _starttime(self.pid)
        assert self.starttime is not None, f"QEMU pid {self.pid} is not running"

    def run(self, line: str) -> str:
        """Type ``line`` and Enter; what the shell printed, without the echo of the line."""
        self.child.send(line + "\r")
        self.child.expect(PROMPT)
        before: str = self.child.before
        _, _, out = before.partition("\r\n")
        return out.replace("\r\n", "\n")

    def qemu_alive(self) -> bool:
        return _starttime(self.pid) == self.starttime and not _state(self.pid).startswith(("Z", "X"))

    def qemu_gone(self, wait: float = 10.0) -> bool:
        """Gone means reaped: no /proc entry, or the pid belongs to a newer process."""
        deadline = time.monotonic() + wait
        while _starttime(self.pid) == self.starttime:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def finish(self) -> int:
        self.child.expect(pexpect.EOF, timeout=START_TIMEOUT)
        self.child.wait()
        status = self.child.exitstatus
        assert status is not None, f"shell killed by signal {self.child.signalstatus}"
        return int(status)

    def close(self) -> None:
        """Hang up like a closed terminal (the shell then stops QEMU); force it if it lingers."""
        if self.child.isalive():
            self.child.kill(signal.SIGHUP)
            with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                self.child.expect(pexpect.EOF, timeout=START_TIMEOUT)
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def qemu_path(qemu_binary: QemuBinary) -> str:
    return str(qemu_binary.path)


@pytest.fixture
def session(qemu_path: str, tmp_path: Path) -> Iterator[Session]:
    """A shell on q35 with a transitional virtio-blk (00:01.0) and a modern virtio-rng (00:02.0)."""
    s = Session(qemu_path, tmp_path, "virtio-blk-pci,id=blk0", "virtio-rng-pci,disable-legacy=on,id=rng0")
    try:
        yield s
    finally:
        s.close()


# -- typed at the prompt ----------------------------------------------------------------------------


def test_prompt_header_and_devices(session: Session) -> None:
    out = session.run("devices")
    lines = out.splitlines()
    assert any(line.startswith("00:00.0 Host bridge [0600]: Intel Corporation [8086:29c0]") for line in lines), out
    blk = next(line for line in lines if line.startswith(BLK))
    assert "[1af4:1001]" in blk and "virtio block, transitional" in blk and "id=blk0" in blk
    rng = next(line for line in lines if line.startswith(RNG))
    assert "[1af4:1044]" in rng and "virtio entropy, modern" in rng and "id=rng0" in rng


def test_cfg_reads_ids_and_writes(session: Session) -> None:
    assert f"{BLK} cfg 0x00 vendor_id (2 bytes) = 0x1af4 (6900)" in session.run(f"cfg {BLK} 0x00")
    assert "device_id (2 bytes) = 0x1001 (4097)" in session.run(f"cfg {BLK} device_id")
    assert "(4 bytes) = 0x10441af4" in session.run(f"cfg.l {RNG} 0")
    # Width from the register at the offset (command is 2 bytes), bits decoded by name.
    out = session.run(f"cfg {BLK} 0x04")
    assert "command (2 bytes) = 0x0007 (7): io_space memory_space bus_master" in out
    assert "<- 0x5b (91)" in session.run(f"cfg.b {BLK} 0x3c 0x5b")
    assert "interrupt_line (1 byte) = 0x5b (91)" in session.run(f"cfg {BLK} interrupt_line")
    assert "error: value 0x100 does not fit in 1 byte(s)" in session.run(f"cfg.b {BLK} 0x3c 0x100")


def test_select_registers_status_and_features(session: Session) -> None:
    out = session.run("select blk0")
    assert f"{BLK}: virtio block (transitional); registers: common_cfg, legacy, device_cfg, pci" in out
    assert session.child.after == f"(qtest {BLK}) "
    assert "common_cfg.num_queues = 0x0001 (1)" in session.run("common_cfg.num_queues")
    out = session.run("common_cfg.queue_select = 1")
    assert "common_cfg.queue_select <- 0x0001 (1); reads back 0x0001 (1)" in out
    assert "common_cfg.queue_size = 0x0000 (0)" in session.run("common_cfg.queue_size")  # no queue 1
    session.run("common_cfg.queue_select = 0")
    assert re.search(r"legacy\.queue_size = 0x0*([1-9a-f][0-9a-f]*) ", session.run("legacy.queue_size"))

    assert "device_status = 0x00 (0): (reset: 0)" in session.run("status")
    out = session.run("status = ACKNOWLEDGE|DRIVER")
    assert "device_status = 0x03 (3): ACKNOWLEDGE DRIVER  [via common_cfg]" in out
    # The same device state through the other layout, decoded by name there too.
    assert "legacy.device_status = 0x03 (3): ACKNOWLEDGE DRIVER" in session.run("legacy.device_status")
    out = session.run("features")
    modern = next(line for line in out.splitlines() if line.startswith("modern layout, device:"))
    legacy = next(line for line in out.splitlines() if line.startswith("legacy layout, device:"))
    assert "VERSION_1" in modern.split() and "FLUSH" in modern.split() and "BAD_FEATURE" not in modern
    assert "BAD_FEATURE" in legacy.split() and "VERSION_1" not in legacy.split()
    assert "modern layout, driver: 0x0000000000000000  (none)" in out
    # features restored the select registers it moved
    assert "common_cfg.device_feature_select = 0x00000000 (0)" in session.run("common_cfg.device_feature_select")
    assert "legacy.device_features = 0x" in session.run("legacy.device_features")
    assert "(reset: 0)" in session.run("status = 0")
    assert "isr = 0x00 (0): (none)" in session.run("isr")
    caps = session.run("caps")
    assert "MSI-X: Enable- Count=" in caps and "virtio common_cfg: BAR=4" in caps
    assert "device_cfg.capacity = 0x0000000000020000 (131072)" in session.run("device_cfg.capacity")  # 64 MiB

    # A modern-only device has no legacy block; the error says so and the shell goes on.
    assert f"{RNG}: virtio entropy (modern)" in session.run(f"select {RNG}")
    assert "error: 00:02.0 has no legacy I/O BAR0 (modern)" in session.run("legacy.device_features")
    assert "common_cfg.num_queues = 0x0001 (1)" in session.run("common_cfg.num_queues")


def test_tab_completes_register_names(session: Session) -> None:
    session.run(f"select {RNG}")
    session.child.send("common_cfg.num_q\t\r")
    session.child.expect(PROMPT)
    assert "common_cfg.num_queues = 0x0001 (1)" in session.child.before


def test_raw_commands_round_trip_and_decode(session: Session) -> None:
    assert session.run("writel 0x100000 0xcafef00d").strip() == "OK"
    assert session.run("readl 0x100000").strip() == "0xcafef00d (3405705229)"
    assert session.run("write 0x100010 0x2 0xabcd").strip() == "OK"
    dump = session.run("b64read 0x100000 0x20").splitlines()
    assert dump[0] == "00100000  0d f0 fe ca 00 00 00 00  00 00 00 00 00 00 00 00  |................|"
    assert dump[1].startswith("00100010  ab cd 00 00")
    assert session.run("read 0x100010 0x2").strip().startswith("00100010  ab cd ")
    # Port I/O through CF8/CFC by hand, and a register named by the address it falls on.
    assert session.run("outl 0xcf8 0x80000000").strip() == "OK"
    assert session.run("inl 0xcfc").strip() == "0x29c08086 (700481670)"
    bar4 = re.search(r"Region 4: Memory at (0x[0-9a-f]+)", session.run(f"bars {BLK}"))
    assert bar4, "virtio-blk has no BAR4"
    out = session.run(f"readw {int(bar4.group(1), 16) + 0x12:#x}")
    assert out.strip() == f"0x0001 (1)  [{BLK} common_cfg.num_queues]"


def test_repro_replays_the_whole_session_in_qemu(session: Session) -> None:
    """``repro`` is a bug-report reproducer of everything sent since start (BAR assignment
    included, which later MMIO depends on): fed to QEMU's own ``-qtest stdio`` it replays."""
    bar4 = re.search(r"Region 4: Memory at (0x[0-9a-f]+)", session.run(f"bars {RNG}"))
    assert bar4
    num_queues = f"{int(bar4.group(1), 16) + 0x12:#x}"
    assert session.run(f"readw {num_queues}").startswith("0x0001 (1)")
    session.run("writel 0x100000 0x1234")
    session.run("readl 0x100000")
    out = session.run("repro")
    text = out[out.index("cat << EOF | ") : out.rindex("\nEOF") + 4]
    assert text.splitlines()[0].endswith(" -qtest stdio")
    assert f"readw {num_queues}\nwritel 0x100000 0x1234\nreadl 0x100000\nEOF" in text
    commands = text.splitlines()[1:-1]
    replies = replay(text, len(commands))
    assert all(r.startswith("OK") for r in replies), [
        c for c, r in zip(commands, replies, strict=True) if r[:2] != "OK"
    ]
    assert [int(r.split()[1], 16) for r in (replies[-3], replies[-1])] == [1, 0x1234]


def replay(script: str, count: int, timeout: float = 60.0) -> list[str]:
    """Run a ``cat << EOF | qemu ... -qtest stdio`` reproducer; its first ``count`` replies.

    QEMU does not exit when the qtest input ends, so the replay is ended by killing its
    process group (its own session) once the replies are in, or at the deadline.
    """
    proc = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    assert proc.stdout is not None
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while (got := data.count(b"\n")) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                pytest.fail(f"the reproducer gave {got} of {count} replies in {timeout:g} s")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                pytest.fail(f"QEMU ended after {got} of {count} replies: {data[-500:]!r}")
            data += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    return data.decode().splitlines()[:count]


def test_help_and_ctrl_c_at_the_prompt(session: Session) -> None:
    text = session.run("help")
    assert "common_cfg" in text and "cfg[.b|.w|.l]" in text and "quit" in text
    session.run(f"select {BLK}")
    assert "common_cfg.queue_select" in session.run("help common_cfg")
    session.child.send("readl 0x0")  # typed, not entered: Ctrl-C drops the line, like a shell
    session.child.expect_exact("readl 0x0")
    # CPython's readline loop sees a signal only while it waits in select(): let it get there
    # (a SIGINT that lands just before is noticed at the next key, like any line reader's).
    time.sleep(0.3)
    session.child.sendintr()
    session.child.expect(PROMPT)
    assert "^C" in session.child.before
    assert session.run("endianness").strip() == "little"
    assert session.qemu_alive()


def test_errors_print_one_line_and_the_shell_goes_on(session: Session) -> None:
    assert session.run("fooo").strip() == "error: unknown command 'fooo' (help lists the commands)"
    assert session.run("readll 0x0").strip().startswith("error: unknown command 'readll'; did you mean 'readl'?")
    assert "error: readl takes 1 argument(s), got 0; usage: readl ADDR" in session.run("readl")
    assert "error: write: size 0x4 but the data has 0x2 bytes" in session.run("write 0x1000 4 0x0102")
    assert "a leading 0 is ambiguous" in session.run("readl 010")
    assert "error: common_cfg: no device selected" in session.run("common_cfg.num_queues")
    assert "error: refused: set_irq_in can abort QEMU" in session.run("set_irq_in ioapic unnamed-gpio-in 99 1")
    session.run(f"select {BLK}")
    assert "error: common_cfg has no register 'num_queue'; did you mean 'num_queues'?" in session.run(
        "common_cfg.num_queue"
    )
    for line in ("fooo", "readl", "common_cfg.num_queue"):
        assert len(session.run(line).strip().splitlines()) == 1
    assert session.run("endianness").strip() == "little"
    assert session.qemu_alive()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("inb 0x10000", "error: inb: port 0x10000 is outside 0x0..0xffff"),
        ("outb 0x80 0x100", "error: outb: value 0x100 is outside 0x0..0xff"),
        ("readq 0x10000000000000000", "error: readq: addr 0x10000000000000000 is outside"),
        ("read 0x0 0x0", "error: read: size 0x0 is outside 0x1..0x10000"),
    ],
)
def test_arguments_qemu_would_assert_on_are_refused(session: Session, line: str, message: str) -> None:
    assert session.run(line).strip().startswith(message)
    assert session.qemu_alive(), f"QEMU {_state(session.pid)}"
    assert session.run("inb 0xcf9").strip().startswith("0x")  # and it still answers


def test_unchecked_inb_would_abort_qemu(qemu_path: str) -> None:
    """Why the shell checks: sent as is, ``inb 0x10000`` trips QEMU's g_assert (SIGABRT)."""
    vm = Machine(MachineSpec(qemu=qemu_path))
    vm.start()
    try:
        with pytest.raises(QemuCrashed) as crash:
            vm.qtest.command("inb 0x10000")
        assert crash.value.signal == signal.SIGABRT
    finally:
        vm.shutdown(check=False)


def test_quit_exits_0_and_stops_qemu(session: Session) -> None:
    session.child.send("quit\r")
    assert session.finish() == 0
    assert session.qemu_gone(), f"QEMU pid {session.pid} still there ({_state(session.pid)})"


def test_ctrl_d_exits_cleanly(session: Session) -> None:
    session.child.sendeof()
    assert session.finish() == 0
    assert "Traceback" not in session.child.before
    assert session.qemu_gone()


def test_closed_terminal_stops_qemu_and_removes_its_directory(session: Session) -> None:
    info = session.run("info")
    workdir = re.search(r"^workdir (\S+) ", info, re.M)
    assert workdir and os.path.isdir(workdir.group(1)), info
    time.sleep(0.3)  # let readline reach select(), where it sees signals (see the Ctrl-C test)
    session.child.kill(signal.SIGHUP)
    assert session.finish() == 128 + signal.SIGHUP
    assert session.qemu_gone()
    assert not os.path.exists(workdir.group(1))


def test_sigterm_ends_the_session_as_an_interrupt(session: Session) -> None:
    """SIGTERM (kill, a CI job cancelled) leaves the shell, not just the line: 128 as for any
    interrupt of qtest-virtio, QEMU stopped."""
    session.run("info")
    time.sleep(0.3)  # let readline reach select(), where it sees signals (see the Ctrl-C test)
    session.child.kill(signal.SIGTERM)
    assert session.finish() == 128
    assert "qtest-virtio: interrupted, exit 128 (aborts a git bisect run)" in session.child.before
    assert session.qemu_gone()


def test_qemu_crash_prints_the_report_and_exits_1(session: Session) -> None:
    session.run("outl 0xcf8 0x80000000")
    os.kill(session.pid, signal.SIGABRT)
    session.child.send("inl 0xcfc\r")
    assert session.finish() == 1
    out = session.child.before
    assert "QEMU crashed: QEMU died" in out and "(killed by signal 6 (SIGABRT))" in out
    assert "outl 0xcf8 0x80000000" in out  # the last qtest commands
    assert "reproduce with:" in out
    assert session.qemu_gone()


def test_history_up_arrow_and_file(qemu_path: str, tmp_path: Path) -> None:
    first = Session(qemu_path, tmp_path, "virtio-blk-pci")
    try:
        assert first.run("writew 0x2000 0xdead").strip() == "OK"
        assert first.run("readw 0x2000").strip() == "0xdead (57005)"
        assert first.run(UP).strip() == "0xdead (57005)"  # the last line again
        first.run(f"cfg {BLK} device_id")
        first.child.sendeof()
        assert first.finish() == 0
    finally:
        first.close()
    history = (tmp_path / "history").read_text().splitlines()
    assert history[-3:] == ["writew 0x2000 0xdead", "readw 0x2000", f"cfg {BLK} device_id"]
    # A new session starts with that history: up-arrow recalls the previous session's last line.
    second = Session(qemu_path, tmp_path, "virtio-blk-pci")
    try:
        assert "device_id (2 bytes) = 0x1001 (4097)" in second.run(UP)
        second.child.send("quit\r")
        assert second.finish() == 0
    finally:
        second.close()


def test_default_history_file_is_in_home(qemu_path: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "QTEST_VIRTIO_HISTORY": "", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    s = Session(qemu_path, tmp_path, env=env)
    try:
        s.run("endianness")
        s.child.sendeof()
        assert s.finish() == 0
    finally:
        s.close()
    assert (home / ".qtest_virtio_history").read_text().splitlines()[-1] == "endianness"


def test_unknown_device_is_untestable_before_the_prompt(qemu_path: str, tmp_path: Path) -> None:
    cmd = shell_command()
    child = pexpect.spawn(
        cmd[0], [*cmd[1:], "--qemu", qemu_path, "--device", "virtio-blk-pcii"], encoding="utf-8", timeout=60
    )
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 125
    assert "virtio-blk-pcii" in child.before and "did you mean" in child.before


# -- the core on text streams (what an embedding tool would use) -------------------------------


def test_shell_core_on_streams(machine_factory: MachineFactory) -> None:
    spec = MachineSpec(machine="q35")
    spec.add_virtio("virtio-rng-pci", mode="modern", id="rng0")
    vm = machine_factory(spec)
    script = "select rng0\ncommon_cfg.num_queues\nbogus\nstatus = 1\nlast 2\nquit\nendianness\n"
    out = io.StringIO()
    assert Shell(vm, io.StringIO(script), out).run() == 0
    text = out.getvalue()
    assert "(qtest" not in text  # no prompt when the input is not a terminal
    assert "common_cfg.num_queues = 0x0001 (1)" in text
    assert "error: unknown command 'bogus'" in text
    assert "device_status = 0x01 (1): ACKNOWLEDGE" in text
    assert "little" not in text  # nothing after quit ran
    assert vm.alive  # the caller owns the machine


def test_shell_core_end_of_input_is_exit_0(machine_factory: MachineFactory) -> None:
    vm = machine_factory()
    out = io.StringIO()
    assert Shell(vm, io.StringIO("endianness\n"), out, prompt=True).run() == 0
    assert out.getvalue() == "(qtest) little\n(qtest) \n"


# -- pure parts -------------------------------------------------------------------------------------

TABLE: dict[str, CommandSpec] = raw_table(256 << 20)


@pytest.mark.parametrize(
    ("line", "wire"),
    [
        ("outl 0xcf8 2147483648", "outl 0xcf8 0x80000000"),
        ("readq 0x1_0000", "readq 0x10000"),
        ("writeb 16 0xff", "writeb 0x10 0xff"),
        ("write 0x0 2 ABCD", "write 0x0 0x2 0xabcd"),
        ("b64write 0x0 3 AAEC", "b64write 0x0 0x3 AAEC"),
        ("memset 0x0 0x10000000 0x5a", "memset 0x0 0x10000000 0x5a"),
        ("clock_step", "clock_step"),
        ("clock_step 0x10", "clock_step 16"),
        ("irq_intercept_out /machine/ioapic", "irq_intercept_out /machine/ioapic"),
    ],
)
def test_parse_raw_canonical_forms(line: str, wire: str) -> None:
    assert parse_raw(line.split(), TABLE)[1] == wire


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("inl 0x10000", "port 0x10000 is outside"),
        ("outw 0x10 0x10000", "value 0x10000 is outside 0x0..0xffff"),
        ("writel 0x0 -1", "is negative"),
        ("readl 0x0 0x4", "takes 1 argument(s), got 2"),
        ("b64read 0x0 0x10001", "size 0x10001 is outside 0x1..0x10000"),
        ("b64write 0x0 4 AAEC", "size 0x4 but the data has 0x3 bytes"),
        ("b64write 0x0 3 AA!C", "is not base64"),
        ("write 0x0 1 0xzz", "is not hex bytes"),
        ("memset 0x0 0x10000001 0", "size 0x10000001 is outside"),
        ("read 0xffffffffffffffff 0x2", "wraps past the end"),
        ("irq_intercept_out", "takes 1 to 2 argument(s)"),
    ],
)
def test_parse_raw_refuses(line: str, message: str) -> None:
    with pytest.raises(ShellError, match=re.escape(message)):
        parse_raw(line.split(), TABLE)


def test_numbers_and_hexdump() -> None:
    assert parse_int("0x10") == parse_int("16") == parse_int("0b10000") == parse_int("0o20") == 16
    with pytest.raises(ShellError, match="ambiguous"):
        parse_int("020")
    data = bytes(range(16)) + bytes(32) + b"AB"
    assert hexdump(data, 0x1000) == [
        "00001000  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|",
        "00001010  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|",
        "*",
        "00001030  41 42                                             |AB|",
    ]
