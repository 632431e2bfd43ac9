"""The pytest plugin, driven through pytester: options, ini keys, env, markers, fixtures, reports.

Most runs are in-process (``runpytest``/``inline_run``): the inner session shares this process, so
a QEMU its teardown failed to stop would still be our child and visible here. The runs that check
what a fresh interpreter sees (entry-point registration, the skip without a binary) use a
subprocess.
"""

from __future__ import annotations

import os
import shlex
import signal
import textwrap
from pathlib import Path

import pytest

from qtest_virtio.binary import QemuBinary

HOST_BRIDGE_ID = {"pc": 0x12378086, "q35": 0x29C08086}  # i440FX, Q35 MCH: device << 16 | vendor
MISSING = "/nonexistent/qemu-system-x86_64"

# An inner test that reads PCI 00:00.0's ID register through CF8/CFC and records QEMU's pid.
HOST_BRIDGE_TEST = """
    def test_host_bridge(qemu, qtest):
        with open("pids.txt", "a") as f:
            f.write(f"{{qemu.pid}} {{qemu.workdir}}\\n")
        qtest.outl(0xCF8, 0x80000000)
        assert qtest.inl(0xCFC) == {expected:#x}
"""


@pytest.fixture
def qemu_path(qemu_binary: QemuBinary) -> str:
    """The binary this (outer) run tests: inner runs use the same one (skips without QEMU)."""
    return qemu_binary.path


@pytest.fixture(autouse=True)
def _inner_env(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inner runs choose their binary explicitly; an outer $QEMU must not leak into them.
    monkeypatch.delenv("QEMU", raising=False)
    # Hypothesis's plugin imports (and assertion-rewrites) all of hypothesis in every inner run,
    # ~0.5 s each, because pytester restores sys.modules after an in-process run.
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest -p no:benchmark -p no:cacheprovider")


def started_pids(pytester: pytest.Pytester) -> list[tuple[int, str]]:
    path = pytester.path / "pids.txt"
    if not path.exists():
        return []
    return [(int(pid), workdir) for pid, workdir in (line.split(" ", 1) for line in path.read_text().splitlines())]


def assert_gone(pytester: pytest.Pytester, count: int) -> None:
    """Every QEMU the inner run started is reaped (not even a zombie) and its workdir removed."""
    pids = started_pids(pytester)
    assert len(pids) == count
    for pid, workdir in pids:
        assert not _our_qemu(pid), f"QEMU pid {pid} is still there ({_state(pid)})"
        assert not os.path.exists(workdir), f"workdir {workdir} left behind"


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm_end = text.rindex(")")
    return [text[text.index("(") + 1 : comm_end], *text[comm_end + 2 :].split()]


def _state(pid: int) -> str:
    stat = _stat(pid)
    return f"{stat[0]}, state {stat[1]}" if stat else "gone"


def _our_qemu(pid: int) -> bool:
    """Our child QEMU, running or a zombie; a reused pid (another process) does not count."""
    stat = _stat(pid)
    return stat is not None and stat[0].startswith("qemu-system") and int(stat[2]) == os.getpid()


def host_bridge_test(pytester: pytest.Pytester, machine: str) -> None:
    pytester.makepyfile(textwrap.dedent(HOST_BRIDGE_TEST.format(expected=HOST_BRIDGE_ID[machine])))


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_qemu_machine_option_picks_the_host_bridge(pytester: pytest.Pytester, qemu_path: str, machine: str) -> None:
    host_bridge_test(pytester, machine)
    # The separate-word form. (pytest takes the binary's path for a rootdir hint, since it looks
    # for its rootdir before entry-point plugins add their options; harmless with no cache.)
    result = pytester.runpytest("--qemu", qemu_path, "--qemu-machine", machine)
    result.assert_outcomes(passed=1)
    assert_gone(pytester, 1)


def test_default_machine_is_q35_and_default_binary_is_on_path(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, qemu_path: str
) -> None:
    if os.path.basename(qemu_path) != "qemu-system-x86_64":
        pytest.skip("the binary under test is not named qemu-system-x86_64")
    # No --qemu: the plugin finds qemu-system-x86_64 on PATH, so put the tested binary's dir first.
    monkeypatch.setenv("PATH", os.path.dirname(qemu_path) + os.pathsep + os.environ["PATH"])
    host_bridge_test(pytester, "q35")
    pytester.runpytest().assert_outcomes(passed=1)


def test_qemu_machine_rejects_unknown_names(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--qemu-machine", "isapc")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qemu-machine*invalid choice*isapc*"])


def test_ini_options(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makeini(f"[pytest]\nqemu = {qemu_path}\nqemu_machine = pc\nqemu_required = true\n")
    host_bridge_test(pytester, "pc")
    pytester.runpytest().assert_outcomes(passed=1)


def test_command_line_overrides_ini(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makeini(f"[pytest]\nqemu = {MISSING}\nqemu_machine = pc\n")
    host_bridge_test(pytester, "q35")
    pytester.runpytest(f"--qemu={qemu_path}", "--qemu-machine", "q35").assert_outcomes(passed=1)


def test_env_qemu(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, qemu_path: str) -> None:
    monkeypatch.setenv("QEMU", qemu_path)
    pytester.makeini(f"[pytest]\nqemu = {MISSING}\n")  # the environment wins over the ini file
    host_bridge_test(pytester, "q35")
    pytester.runpytest().assert_outcomes(passed=1)


# -- no binary --------------------------------------------------------------------------------

NEEDS_QEMU = "def test_needs_qemu(qemu): pass\ndef test_plain(): pass\n"


@pytest.mark.parametrize("how", ["option", "env", "ini"])
def test_missing_qemu_skips_naming_what_was_looked_for(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    pytester.makepyfile(NEEDS_QEMU)
    args: list[str] = []
    if how == "option":
        args = ["--qemu", MISSING]
    elif how == "env":
        monkeypatch.setenv("QEMU", MISSING)
    else:
        pytester.makeini(f"[pytest]\nqemu = {MISSING}\n")
    result = pytester.runpytest("-rs", *args)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED*no QEMU binary (looked for '{MISSING}')*"])


def test_missing_default_binary_skips_in_a_fresh_process(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(NEEDS_QEMU)
    empty = pytester.mkdir("empty-bin")
    monkeypatch.setenv("PATH", str(empty))
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*no QEMU binary (looked for 'qemu-system-x86_64')*not found on PATH*"])


@pytest.mark.parametrize("how", ["option", "ini"])
def test_qemu_required_errors_instead_of_skipping(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(NEEDS_QEMU)
    if how == "option":
        args = ["--qemu", MISSING, "--qemu-required"]
    else:
        pytester.makeini(f"[pytest]\nqemu = {MISSING}\nqemu_required = true\n")
        args = []
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*--qemu-required*{MISSING}*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


# -- markers ----------------------------------------------------------------------------------


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.virtio_device("virtio-blk-pci", transports=["modern"], flags={"event_idx": "off"})
        @pytest.mark.virtio_requires("EVENT_IDX", "INDIRECT_DESC")
        @pytest.mark.conformance("blk-read", spec="5.2.6")
        def test_marked():
            pass
        """
    )
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)


def test_markers_are_listed_in_a_fresh_process(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines_random(
        [
            "@pytest.mark.virtio_device(name, *",
            "@pytest.mark.virtio_requires(*features)*",
            "@pytest.mark.conformance(id*",
        ]
    )


# -- fixtures ---------------------------------------------------------------------------------


def test_fixtures(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makepyfile(
        """
        from qtest_virtio import Machine, MachineSpec

        def record(vm):
            with open("pids.txt", "a") as f:
                f.write(f"{vm.pid} {vm.workdir}\\n")

        def test_qemu_qtest_qmp(qemu, qtest, qmp):
            record(qemu)
            assert isinstance(qemu, Machine) and qemu.alive
            assert qtest is qemu.qtest and qmp is qemu.qmp
            status = qmp.cmd("query-status")
            assert status["status"] in ("prelaunch", "running")
            qtest.writel(0x100000, 0xDEADBEEF)
            assert qtest.readl(0x100000) == 0xDEADBEEF

        def test_machine_factory(machine_factory):
            spec = MachineSpec(machine="pc", memory="64M")   # qemu left unset: the plugin fills it in
            spec.add_virtio("virtio-rng-pci", mode="modern", id="rng0")
            a = machine_factory(spec)
            b = machine_factory(memory="32M")                 # keywords: default machine from the options
            record(a)
            record(b)
            assert a.pid != b.pid
            assert a.spec.qemu == b.spec.qemu
            assert b.spec.machine == "q35"
            a.qtest.outl(0xCF8, 0x80000000)
            assert a.qtest.inl(0xCFC) == 0x12378086
            peripherals = a.qmp.cmd("qom-list", path="/machine/peripheral")
            assert {"name": "rng0", "type": "child<virtio-rng-pci>"} in peripherals
        """
    )
    result = pytester.runpytest(f"--qemu={qemu_path}")
    result.assert_outcomes(passed=2)
    assert_gone(pytester, 3)


# -- failure reports --------------------------------------------------------------------------


def qemu_section(reprec: pytest.HookRecorder, when: str = "call") -> str:
    reports = [r for r in reprec.getreports("pytest_runtest_logreport") if r.when == when and r.failed]
    assert len(reports) == 1, reports
    sections = dict(reports[0].sections)
    assert "qemu" in sections, list(sections)
    return sections["qemu"]


def test_failure_report_has_a_qemu_section(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makepyfile(
        """
        def test_fails(qemu, qtest):
            with open("pids.txt", "a") as f:
                f.write(f"{qemu.pid} {qemu.workdir}\\n")
            qtest.outl(0xCF8, 0x80000000)
            qtest.inl(0xCFC)
            qtest.writel(0x1000, 0x1234)
            assert False, "on purpose"

        def test_passes(qemu):
            pass
        """
    )
    reprec = pytester.inline_run(f"--qemu={qemu_path}")
    reprec.assertoutcome(passed=1, failed=1)
    section = qemu_section(reprec)
    lines = section.splitlines()
    command = lines[1].strip()
    argv = shlex.split(command)
    assert argv[0] == qemu_path
    assert argv[-2:] == ["-qtest", "stdio"]
    assert "-S" in argv or "qtest" in argv  # Debian: tcg + -S; upstream: -accel qtest
    assert "status: still running" in lines
    commands = section.split("last qtest commands:\n", 1)[1]
    assert "outl 0xcf8 0x80000000" in commands
    assert "inl 0xcfc  ->  OK 0x29c08086" in commands
    assert commands.rstrip().splitlines()[-1].strip().startswith("writel 0x1000 0x1234")
    # The passing test's report carries no section; nothing is left running.
    passed = [r for r in reprec.getreports("pytest_runtest_logreport") if r.passed and r.when == "call"]
    assert all(name != "qemu" for r in passed for name, _ in r.sections)
    assert_gone(pytester, 1)


def test_report_shows_the_section_in_the_terminal(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makepyfile("def test_fails(qtest):\n    qtest.inb(0x80)\n    assert 0\n")
    result = pytester.runpytest(f"--qemu={qemu_path}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*- qemu -*", "command line (qtest on stdio):", "*-qtest stdio", "status: *"])


KILLED = """
    import os, signal

    def record(vm):
        with open("pids.txt", "a") as f:
            f.write(f"{vm.pid} {vm.workdir}\\n")

    def test_killed(qemu, qtest):
        record(qemu)
        qtest.outl(0xCF8, 0x80000000)
        os.kill(qemu.pid, signal.SIGABRT)
        qtest.inl(0xCFC)

    def test_killed_unnoticed(qemu):
        record(qemu)
        os.kill(qemu.pid, signal.SIGKILL)
        os.waitid(os.P_PID, qemu.pid, os.WEXITED | os.WNOWAIT)
"""


def test_qemu_killed_during_the_test(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makepyfile(textwrap.dedent(KILLED))
    reprec = pytester.inline_run(f"--qemu={qemu_path}")
    reports = {(r.nodeid.split("::")[-1], r.when): r for r in reprec.getreports("pytest_runtest_logreport")}

    # The command after the kill fails the test with QemuCrashed; teardown does not repeat it.
    call = reports["test_killed", "call"]
    assert call.failed
    assert "QemuCrashed: QEMU died" in call.longreprtext
    assert "(killed by signal 6 (SIGABRT))" in call.longreprtext
    assert "reproduce with:" in call.longreprtext
    assert reports["test_killed", "teardown"].passed
    section = dict(call.sections)["qemu"]
    assert f"status: killed by signal {int(signal.SIGABRT)} (SIGABRT)" in section
    assert "outl 0xcf8 0x80000000" in section

    # A crash nobody noticed during the test errors its teardown.
    assert reports["test_killed_unnoticed", "call"].passed
    teardown = reports["test_killed_unnoticed", "teardown"]
    assert teardown.failed
    assert "QemuCrashed" in teardown.longreprtext
    assert "status: killed by signal 9 (SIGKILL)" in dict(teardown.sections)["qemu"]
    assert_gone(pytester, 2)
