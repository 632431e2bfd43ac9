"""Bug-report reproducers: parsing both forms as written, and replay's verdicts against real QEMU
(survived, crashed, hung, cannot run) with git-bisect-run exit codes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import EXE

from qtest_virtio import ScenarioError
from qtest_virtio.binary import QemuBinary
from qtest_virtio.deviations import table
from qtest_virtio.reproducer import load, normalize_args, parse, replay

SUITE = Path(__file__).resolve().parent.parent / "scenarios" / "reproducers"
#: Aborts every provided version (address_space_cache_init: Assertion `len > 0').
ZERO_INDIRECT = SUITE / "virtio-packed-zero-length-indirect-assert.qtest"

SHELL_FORM = """\
Some mail text before the reproducer.
cat << EOF | ./qemu-system-i386 -display none -machine accel=qtest, -m 512M \\
-device virtio-rng-pci -qtest stdio
writel 0x100000 0x12345678
readl 0x100000
EOF
"""

# A fuzzer reproducer wrapped at 72 columns in the middle of a hex token.
WRAPPED = """\
# qemu-args: -machine q35,accel=qtest -nodefaults -display none
write 0x100000 0x10 0x000102030405060708090a0b0c0d0e0f\\
0f0e
b64write 0x100010 0x4 3q2+\\
7w==
"""


def test_shell_form_with_continuations() -> None:
    rep = parse(SHELL_FORM, "bug.qtest")
    assert rep.binary == "./qemu-system-i386"
    assert rep.args == [
        "-display",
        "none",
        "-machine",
        "accel=qtest,",
        "-m",
        "512M",
        "-device",
        "virtio-rng-pci",
        "-qtest",
        "stdio",
    ]
    assert rep.commands == [(4, "writel 0x100000 0x12345678"), (5, "readl 0x100000")]


def test_wrapped_tokens_are_rejoined() -> None:
    rep = parse(WRAPPED, "fuzz.qtest")
    assert rep.commands[0] == (2, "write 0x100000 0x10 0x000102030405060708090a0b0c0d0e0f0f0e")
    assert rep.commands[1] == (4, "b64write 0x100010 0x4 3q2+7w==")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("outl 0xcf8 0x80000000\n", 1, "not a reproducer"),
        ("cat << EOF | qemu-system-x86_64 -qtest stdio\nreadl 0\n", 1, "never ends with 'EOF'"),
        ("# qemu-args: -M q35\n", 1, "no qtest commands"),
        ("cat << END | qemu-system-x86_64 'unbalanced\nreadl 0\nEND\n", 1, "cannot split"),
        ("cat << EOF | qemu-system-x86_64 -qtest stdio\nreadl 0\nEOF\nstray text\n", 4, "after the closing delimiter"),
    ],
)
def test_malformed_reproducers_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as err:
        parse(text, "bad.qtest")
    assert err.value.path == "bad.qtest" and err.value.line == line
    assert str(err.value).startswith(f"bad.qtest:{line}: ")


def test_normalize_drops_the_channel_and_qtest_accel_where_missing(qemu_binary: QemuBinary) -> None:
    """The qtest channel always goes; accel=qtest only where the binary lacks the accelerator
    (tests/test_replay_versions.py checks both kinds of binary by name)."""
    args, notes = normalize_args(
        ["-machine", "q35,accel=qtest", "-accel", "qtest", "-qtest", "stdio", "-qtest-log", "/dev/null", "-m", "1G"],
        qemu_binary,
    )
    if qemu_binary.has_qtest_accel:
        assert args == ["-machine", "q35,accel=qtest", "-accel", "qtest", "-m", "1G", "-display", "none"]
        assert not any("accel" in n for n in notes)
    else:
        assert args == ["-machine", "q35", "-m", "1G", "-display", "none"]
        assert any("no qtest accelerator" in n for n in notes)
        args, _ = normalize_args(["-machine", "accel=qtest,", "-nographic"], qemu_binary)
        assert args == ["-nographic"]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_replay_survives_and_traces(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    lines: list[str] = []
    rep = parse(SHELL_FORM, "bug.qtest")
    result = replay(rep, qemu=qemu_binary.path, trace=True, echo=lines.append)
    assert result.outcome == "survived" and result.exit_code == 0
    assert result.commands_run == 2
    assert lines[1].endswith("->  OK 0x0000000012345678")
    assert any("replaced by" in n for n in result.notes)  # i386 -> the x86_64 under test


def test_replay_wrapped_fuzzer_data_lands(qemu_binary: QemuBinary) -> None:
    rep = parse(WRAPPED + "read 0x100000 0x14\n", "fuzz.qtest")
    lines: list[str] = []
    assert replay(rep, qemu=qemu_binary.path, trace=True, echo=lines.append).outcome == "survived"
    # write's size (0x10) wins over the 18 bytes of data; b64write's 4 bytes follow
    assert lines[-1].endswith("OK 0x000102030405060708090a0b0c0d0e0fdeadbeef")


def test_replay_crash_is_classified_with_the_assertion(qemu_binary: QemuBinary) -> None:
    """A bug every provided version has: a zero-length indirect table on a packed ring aborts
    QEMU in address_space_cache_init (its last command is never answered)."""
    rep = load(str(ZERO_INDIRECT))
    result = replay(rep, qemu=qemu_binary.path)
    assert result.outcome == "crashed" and result.exit_code == 1
    assert result.signal == 6
    assert "address_space_cache_init: Assertion `len > 0' failed" in result.detail
    assert result.commands_run == len(rep.commands) - 1
    assert "-qtest stdio" in result.command_line


def test_a_command_qemu_would_assert_on_is_malformed_not_a_crash(qemu_binary: QemuBinary) -> None:
    """``inb 0x10000`` trips qtest.c's own g_assert (SIGABRT): a broken reproducer (128 with file
    and line), not a QEMU bug. Nothing is started."""
    with pytest.raises(ScenarioError, match=r"malformed qtest command 'inb 0x10000': inb: port 0x10000") as err:
        parse("# qemu-args: -M q35 -nodefaults\nreadl 0x100000\ninb 0x10000\nreadl 0x100000\n", "abort.qtest")
    assert (err.value.path, err.value.line) == ("abort.qtest", 3)


def make_wrapper(tmp_path: Path, qemu: str, action: str) -> str:
    """A stand-in for a buggy QEMU: runs the real binary, then misbehaves on cue."""
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(f'#!/bin/bash\n( sleep 0.5; kill -{action} $$ ) &\nexec {qemu} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_replay_hang_is_classified(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    wrapper = make_wrapper(tmp_path, qemu_binary.path, "STOP")
    commands = "".join("readl 0x100000\n" for _ in range(200))
    rep = parse(f"# qemu-args: -M q35 -nodefaults\n{commands}", "hang.qtest")
    import time

    def slow_echo(_: str) -> None:
        time.sleep(0.005)  # ~1 s of commands: the STOP lands in the middle

    result = replay(rep, qemu=wrapper, timeout=1.0, trace=True, echo=slow_echo)
    assert result.outcome == "hung" and result.exit_code == 1
    assert "no reply within 1 s to line" in result.detail


def test_replay_hang_after_the_last_command_is_classified(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    """Every command answered, then QEMU stops answering: the round trip after the last one hangs."""
    wrapper = make_wrapper(tmp_path, qemu_binary.path, "STOP")
    rep = parse("# qemu-args: -M q35 -nodefaults\nreadl 0x100000\n", "late-hang.qtest")
    import time

    def slow_echo(_: str) -> None:
        time.sleep(1.0)  # the STOP lands after the only command's reply

    result = replay(rep, qemu=wrapper, timeout=1.0, trace=True, echo=slow_echo)
    assert result.outcome == "hung" and result.exit_code == 1 and result.commands_run == 1
    assert result.detail == "no reply within 1 s to the round trip after the last command"


def test_replay_cannot_run(qemu_binary: QemuBinary) -> None:
    rep = parse("# qemu-args: -device no-such-device\nreadl 0\n", "x.qtest")
    result = replay(rep, qemu=qemu_binary.path)
    assert result.outcome == "cannot-run" and result.exit_code == 125
    assert "is not a valid device model name" in result.detail


@pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed")
def test_replay_cli_exit_codes(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    assert EXE

    def run(path: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EXE, "replay", path, "--qemu", qemu_binary.path, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run(write(tmp_path, "ok.qtest", SHELL_FORM), "--trace")
    assert ok.returncode == 0 and "survived" in ok.stdout and "->  OK" in ok.stdout
    crash = run(write(tmp_path, "crash.qtest", ZERO_INDIRECT.read_text()))
    assert crash.returncode == 1 and "crashed (signal 6)" in crash.stdout
    malformed = run(write(tmp_path, "malformed.qtest", "# qemu-args: -M q35\ninb 0x10000\n"))
    assert malformed.returncode == 128 and malformed.stdout == ""
    assert "malformed.qtest:2: malformed qtest command 'inb 0x10000'" in malformed.stderr
    bad = run(write(tmp_path, "bad.qtest", "hello\n"))
    assert bad.returncode == 128 and "bad.qtest:1:" in bad.stderr
    missing = subprocess.run(
        [EXE, "replay", write(tmp_path, "m.qtest", SHELL_FORM), "--qemu", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 125


def test_bundled_reproducers_are_collected_and_pass(pytester: pytest.Pytester, qemu_binary: QemuBinary) -> None:
    """scenarios/reproducers/*.qtest are tests that pass when QEMU survives (design.md)."""
    files = sorted(p.name for p in SUITE.glob("*.qtest"))
    assert len(files) >= 3
    for name in files:
        shutil.copy(SUITE / name, pytester.path / name)
    os.makedirs(pytester.path / "reproducers")
    for name in files:
        shutil.move(str(pytester.path / name), str(pytester.path / "reproducers" / name))
    res = pytester.runpytest(
        "-p", "no:hypothesispytest", "-p", "no:benchmark", f"--qemu={qemu_binary.path}", "reproducers"
    )
    # A reproducer whose deviation-table entry is live on this version is a bug this QEMU still
    # has (found by fuzzing): it must fail, and does.
    live = [n for n in files if (d := table().get(Path(n).stem)) is not None and d.status(qemu_binary.version).live]
    assert len(live) >= 1
    res.assert_outcomes(passed=len(files) - len(live), xfailed=len(live))


def test_table_reproducer_that_survives_fails_strictly(pytester: pytest.Pytester, qemu_binary: QemuBinary) -> None:
    """An entry verified on this version whose reproducer survives is an XPASS(strict): a failure
    that asks for the table to be updated. (An extra table file names the test-only entry.)"""
    (pytester.path / "reproducers").mkdir()
    (pytester.path / "reproducers" / "fixed.qtest").write_text("# qemu-args: -M q35 -nodefaults\nreadl 0x100000\n")
    version = ".".join(map(str, qemu_binary.version))
    extra = pytester.path / "extra.json"
    entry = {"id": "fixed", "does": "pretends to abort", "strength": "SHOULD", "section": "2.1.2"}
    extra.write_text(json.dumps([{**entry, "first_seen": version, "verified_on": [version]}]))
    res = pytester.runpytest(
        "-p", "no:hypothesispytest", "-p", "no:benchmark", f"--qemu={qemu_binary.path}", f"--deviations={extra}",
        "reproducers",
    )  # fmt: skip
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*XPASS(strict)*QEMU does not follow the SHOULD of §2.1.2: pretends to abort*"])
