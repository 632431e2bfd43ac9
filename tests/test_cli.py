# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""`qtest-virtio` as a user runs it: the installed console script, real QEMU, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import EXE
from procutil import state

from qtest_virtio.app.args import split_device_option
from qtest_virtio.app.exits import INTERRUPTED, Interrupted, exit_for
from qtest_virtio.app.options import OptionError
from qtest_virtio.app.shell import ShellError
from qtest_virtio.binary import QemuNotFound, UnknownFlag
from qtest_virtio.bisect import BisectError, BisectUsageError
from qtest_virtio.errors import QemuCrashed, QemuStartError, QtestError, QtestVirtioError, ScenarioError, UsageError

pytestmark = pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed (pip install -e .)")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert EXE
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def test_split_device_option() -> None:
    assert split_device_option("virtio-blk-pci") == ("virtio-blk-pci", {})
    assert split_device_option("virtio-blk-pci,serial=a,,b,event_idx=off") == (
        "virtio-blk-pci",
        {"serial": "a,b", "event_idx": "off"},
    )
    with pytest.raises(UsageError, match="PROP=VALUE"):
        split_device_option("virtio-blk-pci,event_idx")
    with pytest.raises(UsageError):
        split_device_option(",x=1")


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (UsageError("bad"), 128, "qtest-virtio: error: bad"),
        (OptionError("bad option"), 128, "qtest-virtio: error: bad option"),
        (ShellError("bad command"), 128, "qtest-virtio: error: bad command"),
        (ScenarioError("no EOF", path="r.qtest", line=3), 128, "qtest-virtio: error: r.qtest:3: no EOF"),
        (BisectUsageError("--good x: unknown"), 128, "qtest-virtio: error: --good x: unknown"),
        (QemuNotFound("no qemu"), 125, "qtest-virtio: cannot test here: no qemu"),
        (UnknownFlag("no such flag"), 125, "qtest-virtio: cannot test here: no such flag"),
        (QemuStartError("refused"), 125, "qtest-virtio: cannot test here: refused"),
        (QemuCrashed("QEMU died", returncode=-6), 1, "qtest-virtio: QEMU died (killed by signal 6 (SIGABRT))"),
        (BisectError("build failed"), 1, "qtest-virtio: build failed"),
        (QtestError("inb 0x10", "FAIL"), 1, "qtest-virtio: failed: qtest command 'inb 0x10' failed: FAIL"),
        (KeyboardInterrupt(), 128, INTERRUPTED),
        (Interrupted(signal.SIGTERM), 128, INTERRUPTED),
        (Interrupted(signal.SIGHUP), 128 + signal.SIGHUP, ""),
        (RuntimeError("a bug"), 128, "qtest-virtio: internal error in qtest_virtio (harness bug), exit 128"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_one_mapping_from_exceptions_to_exit_codes(exc: BaseException, code: int, line: str) -> None:
    """The contract's codes (design.md): 128 usage/interrupt/harness bug, 125 cannot test here,
    1 failed; a closed terminal ends as a death by SIGHUP does, with nobody left to tell."""
    assert exit_for(exc) == (code, line)


def test_every_error_of_the_application_layer_is_a_library_error() -> None:
    for cls in (UsageError, OptionError, ShellError):
        assert issubclass(cls, QtestVirtioError), cls
    assert issubclass(OptionError, ValueError)  # callers of parse_flags catch ValueError
    assert issubclass(Interrupted, KeyboardInterrupt)  # every `except KeyboardInterrupt` still unwinds


def test_probe_prints_functions_bars_and_virtio_caps(qemu_binary) -> None:
    res = run(
        "probe",
        "--qemu",
        qemu_binary.path,
        "--device",
        "virtio-blk-pci",
        "--device",
        "virtio-rng-pci,disable-legacy=on",
        "--device",
        "virtio-net-pci,disable-modern=on",
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "00:00.0 Host bridge [0600]: Intel Corporation [8086:29c0]" in out
    assert "[1af4:1001]" in out and "[1af4:1044]" in out and "[1af4:1000]" in out
    assert "Region 0: I/O ports at 0xc000" in out
    for name in ("common_cfg", "notify_cfg", "isr_cfg", "device_cfg", "pci_cfg"):
        assert f"virtio {name}: BAR=" in out
    assert "multiplier=4" in out
    assert "block device (type 2), transitional" in out
    assert "entropy device (type 4), modern-only" in out
    assert "net device (type 1), legacy-only" in out
    assert "VERSION_1" in out and "MRG_RXBUF" in out


def test_probe_json_on_pc(qemu_binary) -> None:
    res = run(
        "probe", "--qemu", qemu_binary.path, "--machine", "pc", "--json", "--device", "virtio-blk-pci,event_idx=off"
    )
    assert res.returncode == 0, res.stderr
    functions = json.loads(res.stdout)
    assert functions[0]["vendor_id"] == 0x8086 and functions[0]["device_id"] == 0x1237
    blk = next(f for f in functions if f["vendor_id"] == 0x1AF4)
    assert blk["virtio"]["kind"] == "transitional"
    assert "EVENT_IDX" not in blk["virtio"]["offered_features"]["modern"]
    assert all(b["address"] is not None for b in blk["bars"])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["probe", "--device", "virtio-blkk"], 125, "did you mean virtio-blk-pci"),
        (["probe", "--device", "virtio-blk-pci,foo=1"], 125, "valid: "),
        (["probe", "--qemu", "/nonexistent/qemu"], 125, "apt-get install -y qemu-system-x86"),
        (["probe", "--bogus"], 128, "unrecognized arguments"),
        (["probe", "--device", "virtio-blk-pci,event_idx"], 128, "is not PROP=VALUE"),
        ([], 128, "usage"),
    ],
)
def test_bad_input_exit_codes(qemu_binary, args, code, message) -> None:
    res = run(*args)
    assert res.returncode == code, res.stderr
    assert message in res.stderr
    assert res.stderr.count("\n") <= 3  # one clear line (plus usage), never a traceback
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("run", "event_idx=maybe", "--flags: flag event_idx=maybe: event_idx is a bool property, it takes on or off"),
        ("run", "write-cache=sometimes", "write-cache is a OnOffAuto property, it takes on, off or auto"),
        ("run", "serial=a,id=evil", "--flags: id=evil cannot be set: the harness names every device"),
        ("run", "drive=d0", "--flags: drive=d0 cannot be set: the harness makes the block backend"),
        ("run", "disable-modern=on", "disable-modern=on cannot be set: the transport mode chooses it"),
        ("bisect-flags", "event_idx=maybe", "--flags: flag event_idx=maybe: event_idx is a bool property"),
        ("bisect-flags", "serial=a,bus=pcie.0", "--flags: bus=pcie.0 cannot be set"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(qemu_binary, tmp_path, command: str, flags: str, message: str) -> None:
    """A value the property's type does not take, or a property the harness owns: 128 before
    any QEMU starts, one line naming the values it takes or whose the property is."""
    target = tmp_path / "test_t.py"
    target.write_text("def test_t():\n    pass\n")
    res = run(command, str(target), "--qemu", qemu_binary.path, f"--flags={flags}")
    assert res.returncode == 128, res.stdout + res.stderr
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "disable-modern" not in message or "select modes with --transport" in res.stderr
    assert "probe 1" not in res.stdout


def test_missing_qemu_on_path() -> None:
    env = {**os.environ, "PATH": "/nonexistent", "QEMU": ""}
    res = run("probe", env=env)
    assert res.returncode == 125
    assert "not found on PATH" in res.stderr


def test_flags_lists_properties_with_defaults(qemu_binary) -> None:
    res = run("flags", "--qemu", qemu_binary.path, "--device", "virtio-rng-pci")
    assert res.returncode == 0, res.stderr
    assert "event_idx=<bool> (default: on)" in res.stdout
    assert "packed=<bool> (default: off)" in res.stdout


def _program(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (r"printf '\377\376 garbage\n'", "is not a QEMU binary: --version printed"),
        ("exit 1", "did not answer --version (exit 1): not a QEMU binary"),
        ("echo 'echo (GNU coreutils) 9.1'", "is not a QEMU binary: --version printed 'echo (GNU coreutils) 9.1'"),
    ],
    ids=["non-utf8", "false", "not-qemu"],
)
def test_qemu_that_is_not_qemu_is_untestable(tmp_path, body: str, message: str) -> None:
    """--qemu naming some other program: one line, 125, before any device question is asked."""
    qemu = _program(tmp_path, "qemu-system-x86_64", body + "\n")
    res = run("run", "scenarios/rng", "--qemu", qemu)
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qtest-virtio: cannot test here: {qemu} ")
    assert message in lines[0]


def test_qemu_that_hangs_is_stopped_with_its_children(tmp_path) -> None:
    """A program that never answers --version: 125 after a bounded probe, and its whole process
    group is gone (a child it started too)."""
    pidfile = tmp_path / "child.pid"
    qemu = _program(tmp_path, "qemu-system-x86_64", f"sleep 300 & echo $! > {pidfile}\nwait\n")
    res = run("run", "scenarios/rng", "--qemu", qemu)
    assert res.returncode == 125
    assert f"{qemu} did not answer `--version` within 10 s" in res.stderr
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _ended(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(child), "the hanging program's child survived"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_exits_128_and_leaves_no_qemu(qemu_binary, sig: signal.Signals) -> None:
    """An interrupt of `run` (Ctrl-C, or SIGTERM from a CI cancelling) is 128, which aborts a
    `git bisect run` instead of marking the commit bad, and every QEMU it started is gone."""
    assert EXE
    proc = subprocess.Popen(
        [EXE, "run", "scenarios/blk", "--qemu", qemu_binary.path, "-n", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored, and Python then keeps it so: default it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 30
    while not (started := _qemu_children(proc.pid)) and time.monotonic() < deadline:  # interrupt it mid-test
        time.sleep(0.02)
    assert started, "no QEMU started within 30 s"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128, err[-2000:]
    assert err.strip().splitlines()[-1] == "qtest-virtio: interrupted, exit 128 (aborts a git bisect run)"
    assert all(_ended(pid) for pid in started)


def _ended(pid: int) -> bool:
    """Gone, or a zombie waiting for its reaper: either way it runs no more."""
    now = state(pid)
    return now == "gone" or now.startswith("Z")


def _qemu_children(pid: int) -> list[int]:
    """QEMU processes below ``pid`` (setpriv execs QEMU, so they are its children)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    found = []
    for child in map(int, out.split()):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"qemu-system" in f.read():
                    found.append(child)
        except OSError:
            pass
    return found
