# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""The plugin where runs go wrong or go wide, with real QEMU, through pytester: pytest-xdist
workers side by side, a hung QEMU under pytest-timeout (signal and thread methods), a QEMU that
crashes mid-test, and what a run leaves for CI (per-test qtest logs, JUnit properties).

"Gone" means reaped: a QEMU that is only a zombie still counts as left behind. Each inner test
records its QEMU's pid with the process start time, so that a pid reused by another process
on a busy machine is not mistaken for ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import stat
import threading
import time
import xml.etree.ElementTree as ET

import pytest
from procutil import start_time as _start_time
from procutil import state as _state

from qtest_virtio import Machine, MachineSpec, QtestVirtioError
from qtest_virtio.workdirs import sweep_stale_workdirs

#: Waits are generous (a loaded 2-core machine) but bounded.
GONE_WAIT = 15.0

# Shared by the inner test files: where a test's QEMU runs, written where the outer test finds it.
RECORD = """
import json, os, time
from pathlib import Path


def record(vm, name):
    text = Path(f"/proc/{vm.pid}/stat").read_text()
    start = int(text[text.rindex(")") + 2 :].split()[19])
    Path("records").mkdir(exist_ok=True)
    Path("records", name + ".json").write_text(json.dumps({
        "pid": vm.pid, "start": start, "workdir": vm.workdir, "argv": vm.argv,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "harness": os.getpid(),
    }))
"""


@pytest.fixture
def qemu_path(qemu_binary) -> str:
    return str(qemu_binary.path)


@pytest.fixture(autouse=True)
def _inner_env(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # After pytester's own set-up, which clears PYTEST_ADDOPTS.
    monkeypatch.delenv("QEMU", raising=False)
    # Keep inner runs lean: hypothesis and benchmark load slowly and matter nothing here.
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest -p no:benchmark -p no:cacheprovider")


def records(pytester: pytest.Pytester) -> dict[str, dict[str, object]]:
    folder = pytester.path / "records"
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def wait_gone(rec: dict[str, object], wait: float = GONE_WAIT) -> None:
    """The recorded QEMU is reaped (no /proc entry, or its pid now names a newer process)."""
    pid, start = int(str(rec["pid"])), int(str(rec["start"]))
    deadline = time.monotonic() + wait
    while _start_time(pid) == start:
        if time.monotonic() > deadline:
            pytest.fail(f"QEMU pid {pid} still there after {wait:g} s ({_state(pid)})")
        time.sleep(0.05)


# -- (a) pytest-xdist ---------------------------------------------------------------------------

XDIST_TESTS = (
    RECORD
    + '''
import pytest

def wait_for_both_workers():
    """Hold this machine until the other worker has one too: they must coexist."""
    deadline = time.monotonic() + 60
    while len({json.loads(p.read_text())["worker"] for p in Path("records").glob("*.json")}) < 2:
        assert time.monotonic() < deadline, "the other worker never started a machine"
        time.sleep(0.02)


@pytest.mark.parametrize("n", range(4))
def test_qemu(qemu, qtest, n):
    record(qemu, f"qemu{n}")
    qtest.writel(0x100000, 0x1000 + n)
    wait_for_both_workers()
    assert qtest.readl(0x100000) == 0x1000 + n


def test_factory(machine_factory):
    a = machine_factory()
    b = machine_factory(machine="pc", memory="64M")
    record(a, "factory_a")
    record(b, "factory_b")
    wait_for_both_workers()
    a.qtest.outl(0xCF8, 0x80000000)
    b.qtest.outl(0xCF8, 0x80000000)
    assert (a.qtest.inl(0xCFC), b.qtest.inl(0xCFC)) == (0x29C08086, 0x12378086)
'''
)


def _socket_paths(argv: list[str]) -> list[str]:
    return [m.group(1) for arg in argv for m in [re.search(r"(?:^|,)path=([^,]+)", arg)] if m]


def test_xdist_workers_get_private_machines(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makepyfile(test_wide=XDIST_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", f"--qemu={qemu_path}", "--qtest-log=logs")
    result.assert_outcomes(passed=5)
    recs = records(pytester)
    assert len(recs) == 6, sorted(recs)
    assert {r["worker"] for r in recs.values()} == {"gw0", "gw1"}
    # Every machine its own process, directory and sockets; the workers' directories differ
    # by the harness pid in their names.
    assert len({(r["pid"], r["start"]) for r in recs.values()}) == 6
    workdirs = [str(r["workdir"]) for r in recs.values()]
    assert len(set(workdirs)) == 6
    sockets: list[str] = []
    for r in recs.values():
        argv = r["argv"]  # a JSON list of strings
        assert isinstance(argv, list)
        paths = _socket_paths(argv)
        assert len(paths) == 2 and all(os.path.dirname(p) == r["workdir"] for p in paths), r["argv"]
        sockets += paths
        assert os.path.basename(str(r["workdir"])).startswith(f"qtest-virtio-{r['harness']}-")
    assert len(set(sockets)) == 12
    assert len({r["harness"] for r in recs.values()}) == 2
    for r in recs.values():
        assert not os.path.exists(str(r["workdir"])), f"{r['workdir']} left behind"
        wait_gone(r)
    # --qtest-log from two workers into one directory: one log per test (and machine), no clash.
    logs = sorted(os.listdir(pytester.path / "logs"))
    assert logs == sorted(
        [f"test_wide.py__test_qemu[{n}].qtest.log" for n in range(4)]
        + ["test_wide.py__test_factory.qtest.log", "test_wide.py__test_factory.1.qtest.log"]
    )
    for n in range(4):
        text = (pytester.path / "logs" / f"test_wide.py__test_qemu[{n}].qtest.log").read_text()
        writes = [line for line in text.splitlines() if line.startswith("> writel 0x100000 ")]
        assert writes == [f"> writel 0x100000 {0x1000 + n:#x}"]  # this test's own commands only


DYING_WORKER_TESTS = (
    RECORD
    + """
def owner_state(pid):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return text[text.rindex(")") + 2 :].split()[0]


def test_worker_dies(qemu):
    record(qemu, "dies")
    os._exit(1)


def test_next_start_sweeps_its_directory(machine_factory):
    deadline = time.monotonic() + 60
    while not Path("records", "dies.json").exists():
        assert time.monotonic() < deadline, "the other worker never started its machine"
        time.sleep(0.05)
    dead = json.loads(Path("records", "dies.json").read_text())
    assert dead["worker"] != os.environ["PYTEST_XDIST_WORKER"]
    while owner_state(dead["harness"]) not in ("Z", "X", "gone"):
        assert time.monotonic() < deadline, "the other worker never died"
        time.sleep(0.05)
    Path("records", "owner-state.txt").write_text(owner_state(dead["harness"]))
    machine_factory()  # a start sweeps the directories of harnesses that have ended
    assert not os.path.exists(dead["workdir"]), dead["workdir"]
"""
)


def test_xdist_worker_that_dies_leaves_no_directory(pytester: pytest.Pytester, qemu_path: str) -> None:
    """A worker that dies (os._exit) stays a zombie until the controller reaps it at the end of
    the session; its directory must not wait that long: the next machine start sweeps it."""
    pytester.makepyfile(test_dying=DYING_WORKER_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", f"--qemu={qemu_path}")
    out = result.stdout.str()
    assert "1 passed" in out, out[-3000:]
    assert re.search(r"worker '?gw\d'? crashed|replacing crashed worker", out), out[-3000:]
    # Z with xdist 3.8: the dead worker stays a zombie until the session ends.
    assert (pytester.path / "records" / "owner-state.txt").read_text() in ("Z", "X", "gone")
    rec = records(pytester)["dies"]
    wait_gone(rec)
    assert not os.path.exists(str(rec["workdir"]))


# -- (b) a hung QEMU under pytest-timeout -------------------------------------------------------

HUNG_TESTS = (
    RECORD
    + '''
import signal


def test_hangs(qemu, qtest):
    record(qemu, "hung")
    qtest.timeout = 120   # the qtest layer would wait long: pytest-timeout must end it
    os.kill(qemu.pid, signal.SIGSTOP)
    qtest.inl(0xCFC)


def test_next_one_runs(qtest):
    """Runs after the hung test's teardown: its QEMU is reaped and its directory gone."""
    hung = json.loads(Path("records", "hung.json").read_text())
    stat = Path(f"/proc/{hung['pid']}/stat")
    alive = stat.exists() and int(stat.read_text().rsplit(")", 1)[1].split()[19]) == hung["start"]
    assert not alive, Path(f"/proc/{hung['pid']}/status").read_text()
    assert not os.path.exists(hung["workdir"])
    assert qtest.endianness() == "little"
'''
)


def test_hung_qemu_signal_method(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makepyfile(test_hung=HUNG_TESTS)
    started = time.monotonic()
    result = pytester.runpytest_subprocess(f"--qemu={qemu_path}", "--timeout=3", "--timeout-method=signal")
    elapsed = time.monotonic() - started
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Failed: Timeout*3*", "*- qemu -*", "command line (qtest on stdio):"])
    # The command pytest-timeout interrupted is the last one the section lists.
    result.stdout.fnmatch_lines(
        [
            "last qtest commands:",
            "    endianness  ->  OK little",
            "    inl 0xcfc  ->  (no reply: interrupted by Failed)",
            "=*",
        ],
        consecutive=True,
    )
    assert "test_hangs" in "\n".join(line for line in result.outlines if line.startswith("FAILED"))
    # Not the qtest timeout (120 s): pytest-timeout's, and a bounded teardown.
    assert elapsed < 60, elapsed
    wait_gone(records(pytester)["hung"])


def test_hung_qemu_thread_method_still_dies(pytester: pytest.Pytester, qemu_path: str) -> None:
    """The thread method os._exit()s the whole pytest process: no teardown runs. QEMU dies
    anyway (PR_SET_PDEATHSIG through setpriv) and the next start sweeps its directory."""
    pytester.makepyfile(test_hung=HUNG_TESTS)
    result = pytester.runpytest_subprocess(f"--qemu={qemu_path}", "--timeout=3", "--timeout-method=thread")
    assert result.ret != 0
    assert "Timeout" in result.stdout.str() + result.stderr.str()
    assert "1 passed" not in result.stdout.str()  # the process ended inside the first test
    hung = records(pytester)["hung"]
    wait_gone(hung)
    # No teardown ran, so the directory stays until a harness start sweeps it (any start on
    # this machine may have done so already: its owner pid is dead).
    workdir = str(hung["workdir"])
    sweep_stale_workdirs(os.path.dirname(workdir))
    assert not os.path.exists(workdir)


def test_a_command_interrupted_by_a_signal_does_not_shift_replies(qemu_path: str) -> None:
    """What pytest-timeout's signal method does to the command in flight: an exception raised
    from a signal handler. The next command must get its own reply (or refuse to run)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread only")

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    vm = Machine(MachineSpec(qemu=qemu_path))
    vm.start()
    try:
        q = vm.qtest
        q.writel(0x1000, 0x1111)
        q.writel(0x2000, 0x2222)
        os.kill(vm.pid, signal.SIGSTOP)  # QEMU will not answer until SIGCONT
        main = threading.main_thread().ident
        assert main is not None
        timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGUSR1))
        timer.start()
        with pytest.raises(Interrupted):
            q.readl(0x1000)
        timer.join()
        os.kill(vm.pid, signal.SIGCONT)
        try:
            value = q.readl(0x2000)
        except QtestVirtioError:
            return  # refusing to go on out of step is a fix too
        assert value == 0x2222, f"readl 0x2000 returned {value:#x}: the interrupted readl 0x1000's reply"
    finally:
        signal.signal(signal.SIGUSR1, previous)
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm.pid, signal.SIGCONT)
        vm.shutdown(check=False)


LIVELOCK = os.path.join(
    os.path.dirname(__file__), os.pardir, "scenarios", "reproducers", "virtio-rng-packed-zero-length-livelock.qtest"
)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(True, id="qtest-timeout-first"),  # its "# timeout: 3": pytest-timeout ends the teardown
        pytest.param(False, id="pytest-timeout-first"),  # replay's 10 s: pytest-timeout ends the wait
    ],
)
def test_pytest_timeout_of_a_livelocked_reproducer_reports_qemu(
    pytester: pytest.Pytester, qemu_path: str, header: bool
) -> None:
    """A reproducer item that pytest-timeout ends gets the ``qemu`` section, with the command
    that got no reply, instead of ~1000 lines of pytest's and pluggy's frames."""
    with open(LIVELOCK) as f:
        text = f.read()
    if not header:
        text = "".join(line for line in text.splitlines(True) if not line.startswith("# timeout:"))
    folder = pytester.mkdir("reproducers")
    (folder / "rng-livelock.qtest").write_text(text)  # a name the deviation table does not know
    started = time.monotonic()
    result = pytester.runpytest_subprocess(f"--qemu={qemu_path}", "--timeout=4", "--timeout-method=signal")
    assert time.monotonic() - started < 60
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "Timeout (>4.0s) from pytest-timeout" in out
    assert "pluggy/_hooks.py" not in out and "def from_call" not in out, out[:3000]
    assert len(result.outlines) < 120, len(result.outlines)
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if re.match(r"^-+ qemu -+$", line))
    end = next(i for i in range(start + 1, len(lines)) if re.match(r"^(==|-{5,} .+ -{5,}$)", lines[i]))
    section = lines[start + 1 : end]
    assert section[0] == "command line (qtest on stdio):"
    assert "-device virtio-rng-pci,id=fuzz0,packed=on" in section[1]
    assert any("zero sized buffers are not allowed" in line for line in section)
    commands = section[section.index("last qtest commands:") + 1 :]
    # The livelock starts with the last b64read or with the round trip after it.
    assert re.fullmatch(r"    (b64read 0x100010 0x80|endianness)  ->  \(no reply[^)]*\)", commands[-1]), commands[-3:]
    assert "    writew 0xc0003000 0x0  ->  OK" in commands


# -- (c) a QEMU that crashes --------------------------------------------------------------------

WRAPPER = """\
#!/bin/bash
# Stands in for a QEMU that crashes: exec keeps the pid, so the real binary runs as this very
# process, and once the test has its machine (the trigger file appears) a side process sends
# it SIGABRT. Only machine starts (with -qtest) get the side process, not `-device help` probes.
case " $* " in
  *" -qtest "*)
    ( for _ in $(seq 600); do
        if [ -e TRIGGER_PATH ]; then kill -ABRT $$; exit 0; fi
        sleep 0.05
      done ) &
    ;;
esac
exec REAL_QEMU "$@"
"""

CRASH_TESTS = (
    RECORD
    + """
import pytest


def test_crashes(qemu, qtest):
    record(qemu, "crashed")
    Path(TRIGGER_PATH).touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:   # poll: the next command after the crash raises
        qtest.outl(0xCF8, 0x80000000)
        qtest.inl(0xCFC)
        time.sleep(0.01)
    pytest.fail("QEMU never crashed")
"""
)


def test_crashing_qemu_fails_the_test_once_with_the_signal(pytester: pytest.Pytester, qemu_path: str) -> None:
    trigger = pytester.path / "crash-now"
    wrapper = pytester.path / "qemu-crashing"
    wrapper.write_text(WRAPPER.replace("TRIGGER_PATH", shlex.quote(str(trigger))).replace("REAL_QEMU", qemu_path))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    pytester.makepyfile(test_crash=CRASH_TESTS.replace("TRIGGER_PATH", repr(str(trigger))))
    reprec = pytester.inline_run(f"--qemu={wrapper}")
    reports = {r.when: r for r in reprec.getreports("pytest_runtest_logreport")}
    assert reports["setup"].passed
    call = reports["call"]
    assert call.failed
    assert "QemuCrashed: QEMU died" in call.longreprtext
    assert "(killed by signal 6 (SIGABRT))" in call.longreprtext
    assert "never crashed" not in call.longreprtext
    section = dict(call.sections)["qemu"]
    assert "status: killed by signal 6 (SIGABRT)" in section
    assert section.splitlines()[1].strip().startswith(str(wrapper))  # the command line as run
    assert "outl 0xcf8 0x80000000" in section
    assert reports["teardown"].passed, reports["teardown"].longreprtext  # failed once, not errored too
    reprec.assertoutcome(failed=1)
    rec = records(pytester)["crashed"]
    wait_gone(rec)
    assert not os.path.exists(str(rec["workdir"]))


# -- (d) --qtest-log and JUnit XML ----------------------------------------------------------------

LOGGED_TESTS = """
import pytest


def test_alpha(qtest):
    qtest.writel(0x100000, 0xA1A1)


def test_beta(machine_factory):
    a, b = machine_factory(), machine_factory()
    a.qtest.writel(0x100000, 0xB0B0)
    b.qtest.writel(0x100000, 0xB1B1)


@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"], rings=("split",))
def test_rng(virtio_device):
    assert len(virtio_device.read(8)) == 8
"""


def test_qtest_log_per_test_and_junit_properties(pytester: pytest.Pytester, qemu_path: str) -> None:
    pytester.makepyfile(test_logged=LOGGED_TESTS)
    result = pytester.runpytest(f"--qemu={qemu_path}", "--qtest-log=logs", "--junitxml=out.xml")
    result.assert_outcomes(passed=3)
    logs = pytester.path / "logs"
    names = {
        "alpha": "test_logged.py__test_alpha.qtest.log",
        "beta": "test_logged.py__test_beta.qtest.log",
        "beta1": "test_logged.py__test_beta.1.qtest.log",
        "rng": "test_logged.py__test_rng[virtio-rng-pci-modern].qtest.log",
    }
    assert sorted(os.listdir(logs)) == sorted(names.values())
    text = {key: (logs / name).read_text() for key, name in names.items()}
    assert all(t.startswith("> endianness\n< OK little\n") for t in text.values())
    expected = {"alpha": "0xa1a1", "beta": "0xb0b0", "beta1": "0xb1b1"}
    for key, value in expected.items():
        assert f"> writel 0x100000 {value}\n< OK\n" in text[key]
        assert all(other not in text[key] for other in expected.values() if other != value)
    assert "> b64read" in text["rng"] or "> read" in text["rng"]

    cases = {case.get("name"): case for case in ET.parse(pytester.path / "out.xml").iter("testcase")}
    props = {name: {p.attrib["name"]: p.get("value") for p in case.iter("property")} for name, case in cases.items()}
    rng = props["test_rng[virtio-rng-pci-modern]"]
    assert rng["virtio_device"] == "virtio-rng-pci"
    assert rng["virtio_transport"] == "modern"
    assert rng["virtio_ring"] == "split"
    assert not any(k.startswith("virtio_") for k in props["test_alpha"])
