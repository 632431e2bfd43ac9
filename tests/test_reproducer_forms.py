"""Reproducers as bug reports write them (issue 12): a ``$`` prompt and indented here-documents,
``qemu ... -qtest stdio`` followed by the commands, the libqtest C form of QEMU's
tests/qtest/fuzz-*-test.c, prose, CRLF; machine types and command lines a binary refuses (125);
the settle period after the last command (a crash in deferred work); malformed commands (128).
Parsing is checked directly, replay through the real console script on real QEMU."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import EXE

from qtest_virtio import ScenarioError
from qtest_virtio.binary import QemuBinary
from qtest_virtio.fuzz import DEVICES, Addr, Desc, DescChain, FuzzConfig, Valid, run_example
from qtest_virtio.reproducer import load, parse, replay

pytestmark = pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed (pip install -e .)")
ProvidedQemu = Callable[[str], QemuBinary]
DATA = Path(__file__).resolve().parent / "data"
#: Dies ~200 ms after its last command (a rate-limit timer on the virtual clock), on every
#: provided version: survived when judged at once, crashed after the settle period.
LATE_CRASH = DATA / "virtio-rng-packed-zero-length-indirect-on-timer.qtest"
#: QEMU's own libqtest regression tests (the C form), from the 10.2.2 source tree.
QEMU_QTESTS = Path("/root/.cache/qtest-virtio/src-10.2.2/tests/qtest")

PROMPT_INDENTED = """\
Steps to reproduce:

$ cat << EOF | ./qemu-system-i386 -display none -machine accel=qtest, -m 512M \\
  -device virtio-rng-pci -qtest stdio
  writel 0x100000 0x12345678
  readl 0x100000
  EOF
"""

PS2_PROMPTS = """\
user@host:~/qemu/build$ cat <<EOF | qemu-system-x86_64 -M q35 -qtest stdio
> writel 0x100000 0xcafe
> readl 0x100000
> EOF
"""

NO_HEREDOC = """\
Run QEMU like this:

$ qemu -M pc -device virtio-rng-pci \\
    -display none \\
    -qtest stdio

and type these commands (QEMU's replies shown):

```
writel 0x100000 0x12345678
OK
readl 0x100000
OK 0x0000000000000000
```

The second read should not return what was written.
"""

REDIRECTED = """\
$ ./qemu-system-x86_64 -M q35 -nodefaults -qtest stdio << 'EOF'
writeq 0x100000 0x1122334455667788
readq 0x100000
EOF
"""

C_FORM = r"""
/*
 * A fuzzer find as QEMU's tests/qtest/fuzz-*-test.c write it, from the report's
cat << EOF | qemu-system-x86_64 -M q35 -device virtio-rng-pci -qtest stdio
outl 0xcf8 0x80002010
EOF
 */
static void test_rng_pokes(void)
{
    QTestState *s = qtest_initf("-M %s -nodefaults "
                                "-device %s,addr=04.0", "q35", "virtio-rng-pci");
    qtest_outl(s, 0xcf8, 0x80002010);   /* BAR 4 */
    qtest_outl(s, 0xcfc, 0xe0000000U);
    qtest_writeq(s, 0x100000, 0x1122334455667788ULL);
    qtest_bufwrite(s, 0x100010, "\x01\x02" "\x03", 0x3);
    qtest_memset(s, 0x100020, 0xab, 4);
    g_assert_cmphex(qtest_readl(s, 0x100020), ==, 0xabababab);
    qtest_quit(s);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    qtest_add_func("fuzz/test_rng_pokes", test_rng_pokes);
    return g_test_run();
}
"""


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert EXE
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def write(directory: Path, name: str, text: str, *, newline: str | None = None) -> str:
    path = directory / name
    with open(path, "w", newline=newline) as f:
        f.write(text)
    return str(path)


# -- parsing the forms -----------------------------------------------------------------------------


def test_prompt_and_indented_heredoc() -> None:
    rep = parse(PROMPT_INDENTED, "bug.qtest")
    assert (rep.form, rep.binary) == ("shell", "./qemu-system-i386")
    assert rep.args[-2:] == ["-qtest", "stdio"] and "virtio-rng-pci" in rep.args
    assert rep.commands == [(5, "writel 0x100000 0x12345678"), (6, "readl 0x100000")]
    rep = parse(PS2_PROMPTS, "ps2.qtest")
    assert rep.commands == [(2, "writel 0x100000 0xcafe"), (3, "readl 0x100000")]


def test_command_line_then_commands_without_heredoc() -> None:
    rep = parse(NO_HEREDOC, "stdio.qtest")
    assert (rep.form, rep.binary) == ("stdio", "qemu")
    assert rep.args == ["-M", "pc", "-device", "virtio-rng-pci", "-display", "none", "-qtest", "stdio"]
    # prose, Markdown fences and the pasted replies are not commands
    assert rep.commands == [(10, "writel 0x100000 0x12345678"), (12, "readl 0x100000")]
    assert any("not qtest commands were skipped" in n for n in rep.notes)
    rep = parse("./qemu-system-i386 -M q35 -qtest stdio\nreadl 0x0\n", "i386.qtest")
    assert rep.binary == "./qemu-system-i386" and rep.commands == [(2, "readl 0x0")]


def test_heredoc_on_qemu_itself() -> None:
    rep = parse(REDIRECTED, "redirect.qtest")
    assert rep.binary == "./qemu-system-x86_64"
    assert rep.args == ["-M", "q35", "-nodefaults", "-qtest", "stdio"]
    assert [c for _, c in rep.commands] == ["writeq 0x100000 0x1122334455667788", "readq 0x100000"]


def test_crlf_and_trailing_white_space() -> None:
    text = "cat << EOF | qemu-system-x86_64 -M q35 \\   \r\n  -qtest stdio\t\r\nreadl 0x0   \r\nEOF  \r\n"
    rep = parse(text, "crlf.qtest")
    assert rep.args == ["-M", "q35", "-qtest", "stdio"]
    assert rep.commands == [(3, "readl 0x0")]


def test_libqtest_c_form_maps_each_call() -> None:
    rep = parse(C_FORM, "fuzz-rng-test.c")
    assert rep.form == "libqtest" and rep.binary == ""
    assert rep.args == ["-M", "q35", "-nodefaults", "-device", "virtio-rng-pci,addr=04.0"]
    assert [c for _, c in rep.commands] == [
        "outl 0xcf8 0x80002010",
        "outl 0xcfc 0xe0000000",
        "writeq 0x100000 0x1122334455667788",
        "b64write 0x100010 0x3 AQID",  # libqtest's qtest_bufwrite sends base64
        "memset 0x100020 0x4 0xab",
        "readl 0x100020",
    ]
    assert rep.commands[0][0] == 12  # the call's own line (the quoted shell form is a comment)
    assert any("test_rng_pokes()" in n for n in rep.notes)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('s = qtest_init("-M q35");\nqtest_outl(s, 0xcf8, 1);\n', 1, "never calls qtest_quit"),
        ('s = qtest_init("-M q35");\nqtest_outl(s, port, 1);\nqtest_quit(s);\n', 2, "'port' is not a constant"),
        ('s = qtest_init("-M q35");\nqtest_qmp(s, "{}");\nqtest_quit(s);\n', 2, "qtest_qmp.. has no qtest command"),
        ('s = qtest_init("-M q35");\nqtest_inb(s, 0x10000);\nqtest_quit(s);\n', 2, "port 0x10000 is outside"),
    ],
)
def test_libqtest_c_form_refuses_what_it_cannot_replay(text: str, line: int, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as err:
        parse(text, "t.c")
    assert err.value.line == line


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("outl zz", "outl takes 2 argument"),
        ("outl 0xcf8 zz", "outl: value 'zz' is not a number"),
        ("inb 0x10000", "inb: port 0x10000 is outside 0x0..0xffff"),
        ("outl  0xcf8 0x1", "outl: port '' is not a number"),
        ("read 0x100000 0", "read: size 0x0 is outside"),
        ("clock_step soon", "clock_step: ns 'soon' is not a number"),
        ("b64write 0x100000 0x8 <10 MiB of base64>", "a line of 10485782 characters"),
    ],
)
def test_commands_qemu_would_assert_on_are_malformed(command: str, message: str) -> None:
    """QEMU's qtest server g_asserts on these (SIGABRT): a broken reproducer, not a QEMU crash;
    a line of megabytes would cost QEMU minutes of rescanning."""
    command = command.replace("<10 MiB of base64>", "A" * (10 << 20))
    for text, line in (
        (f"# qemu-args: -M q35\nreadl 0x0\n{command}\n", 3),
        (f"$ cat << EOF | qemu-system-x86_64 -M q35 -qtest stdio\n  readl 0x0\n  {command}\n  EOF\n", 3),
    ):
        with pytest.raises(ScenarioError, match=re.escape(message)) as err:
            parse(text, "bad.qtest")
        assert (err.value.path, err.value.line) == ("bad.qtest", line)
        assert "malformed qtest command" in str(err.value) and "not a QEMU bug" in str(err.value)


# -- replaying them on real QEMU ------------------------------------------------------------------


def test_each_form_replays_through_the_cli(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    for name, text, reply in (
        ("prompt.qtest", PROMPT_INDENTED, "readl 0x100000  ->  OK 0x0000000012345678"),
        ("ps2.qtest", PS2_PROMPTS, "readl 0x100000  ->  OK 0x000000000000cafe"),
        ("stdio.qtest", NO_HEREDOC, "readl 0x100000  ->  OK 0x0000000012345678"),
        ("redirect.qtest", REDIRECTED, "readq 0x100000  ->  OK 0x1122334455667788"),
        ("fuzz-rng-test.c", C_FORM, "readl 0x100020  ->  OK 0x00000000abababab"),
    ):
        res = run("replay", write(tmp_path, name, text), "--qemu", qemu_binary.path, "--trace", "--settle", "0")
        assert res.returncode == 0, res.stdout + res.stderr
        assert reply in res.stdout and f"{name}: survived:" in res.stdout
    crlf = write(tmp_path, "crlf.qtest", PROMPT_INDENTED.replace("\n", "  \r\n"), newline="")
    res = run("replay", crlf, "--qemu", qemu_binary.path, "--trace", "--settle", "0")
    assert res.returncode == 0 and "OK 0x0000000012345678" in res.stdout
    assert "qemu is replaced by" in run("replay", str(tmp_path / "stdio.qtest"), "--qemu", qemu_binary.path).stdout


def test_qemus_own_fuzz_regression_tests_replay(qemu_binary: QemuBinary) -> None:
    """The first test of some of QEMU's tests/qtest/fuzz-*-test.c, as QEMU's tree has them: bugs
    fixed long before 7.2 (survived), and one for an Arm machine this binary lacks (125)."""
    assert QEMU_QTESTS.is_dir(), "the 10.2.2 source tree scripts/qemu.sh unpacks"
    for name in ("fuzz-megasas-test.c", "fuzz-virtio-scsi-test.c", "fuzz-sdcard-test.c", "fuzz-e1000e-test.c"):
        res = run("replay", str(QEMU_QTESTS / name), "--qemu", qemu_binary.path, "--settle", "0.2")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "survived:" in res.stdout and "note: libqtest C form: replaying " in res.stdout
    res = run("replay", str(QEMU_QTESTS / "fuzz-xlnx-dp-test.c"), "--qemu", qemu_binary.path)
    assert res.returncode == 125
    assert "cannot run here: machine type xlnx-zcu102 is not in this binary (it has: " in res.stdout


def test_machine_type_the_binary_lacks_is_125(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    """pc-q35-4.2 is in 7.2 and gone from 10.2: one row each, and the combined verdict is 125."""
    path = write(tmp_path, "old-machine.qtest", "# qemu-args: -M pc-q35-4.2,accel=qtest -nodefaults\nreadl 0x0\n")
    newest, system = provided_qemu("src-newest"), provided_qemu("system")
    res = run("replay", path, "--qemu", newest.path)
    assert res.returncode == 125
    line = next(line for line in res.stdout.splitlines() if "cannot run here" in line)
    assert line.endswith(f"machine type pc-q35-4.2 is not in this binary (it has: {', '.join(newest.machines)})")
    assert run("replay", path, "--qemu", system.path).returncode == 0
    both = run("replay", path, "--qemu", system.path, "--qemu", newest.path)
    assert both.returncode == 125 and "1 survived, 1 cannot-run; exit 125" in both.stdout


def test_a_command_line_qemu_refuses_is_125_with_qemus_line(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    path = write(tmp_path, "refused.qtest", "$ qemu-system-x86_64 -M q35 -device virtio-rng-pci,bogus=1 -qtest stdio\n"
                 "readl 0x0\n")  # fmt: skip
    res = run("replay", path, "--qemu", qemu_binary.path)
    assert res.returncode == 125
    verdict = next(line for line in res.stdout.splitlines() if line.startswith(f"{path}: "))
    assert "cannot run here: QEMU refused to start (exit status 1): qemu-system-x86_64: -device " in verdict
    assert "Property 'virtio-rng-pci.bogus' not found" in verdict


def test_unknown_command_survives_only_as_qemus_fail(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    text = "cat << EOF | qemu-system-x86_64 -M q35 -qtest stdio\nfrobnicate 0x1 0x2\nreadl 0x0\nEOF\n"
    res = run("replay", write(tmp_path, "unknown.qtest", text), "--qemu", qemu_binary.path, "--trace")
    assert res.returncode == 0
    assert "frobnicate 0x1 0x2  ->  FAIL Unknown command 'frobnicate'" in res.stdout


def test_malformed_commands_are_128_with_file_and_line(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    for command in ("outl zz", "outl 0xcf8 zz", "inb 0x10000", "write 0x100000 0x8 0x" + "00" * (6 << 20)):
        path = write(tmp_path, "bad.qtest", f"# qemu-args: -M q35\nreadl 0x0\n{command}\n")
        res = run("replay", path, "--qemu", qemu_binary.path)
        assert res.returncode == 128, res.stdout + res.stderr
        assert res.stderr.startswith(f"qtest-virtio: error: {path}:3: malformed qtest command ")
        assert len(res.stderr.splitlines()) == 1 and "crashed" not in res.stdout


# -- the settle period ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["system", "src-newest"])
def test_a_crash_after_the_last_command_needs_the_settle(name: str, provided_qemu: ProvidedQemu) -> None:
    """Every command is answered; ~200 ms later a virtual-clock timer makes virtio-rng look at its
    ring and QEMU aborts. 7.2 (TCG: the virtual clock follows the host's) dies in wall time; 10.2.2
    (qtest accelerator: only clock_step moves it) only because the settle period steps the clock."""
    qemu = provided_qemu(name)
    at_once = run("replay", str(LATE_CRASH), "--qemu", qemu.path, "--settle", "0")
    assert at_once.returncode == 0 and "survived: 407 commands replayed, QEMU alive" in at_once.stdout
    settled = run("replay", str(LATE_CRASH), "--qemu", qemu.path)
    assert settled.returncode == 1, settled.stdout
    assert "crashed (signal 6) after 407 of 407 commands:" in settled.stdout
    assert "address_space_cache_init: Assertion `len > 0' failed." in settled.stdout
    assert re.search(r"note: QEMU died 0\.\d\d s after its last command was answered", settled.stdout)
    assert replay(load(str(LATE_CRASH)), qemu=qemu.path, settle_s=0.5).outcome == "crashed"


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_settle_must_be_seconds(tmp_path: Path, value: str) -> None:
    res = run("replay", str(LATE_CRASH), "--settle", value)
    assert res.returncode == 128 and f"argument --settle: {value!r} is not a number of seconds >= 0" in res.stderr


def test_the_fuzzers_check_settles_too(provided_qemu: ProvidedQemu, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same deferred crash found by a fuzz example: on 10.2.2 the rate-limit timer fires only
    when the check's settle period steps the virtual clock, before the recovery resets the queue."""
    qemu = provided_qemu("src-newest")
    rng = DEVICES["virtio-rng-pci"]
    limited = replace(rng, props=(*rng.props, ("max-bytes", "64"), ("period", "50")))
    monkeypatch.setitem(DEVICES, "virtio-rng-pci", limited)
    config = FuzzConfig("virtio-rng-pci", "transitional-modern", "packed", qemu.path)
    hostile = DescChain((Desc(1, Addr("scratch", 0), 0, 0xF4, 0),), (), None, 1, notify=False)
    result = run_example(config, [Valid(), hostile])
    assert result.outcome == "crashed", (result.outcome, result.detail)
    assert "address_space_cache_init: Assertion `len > 0' failed" in result.detail
