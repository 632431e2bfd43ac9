"""The process layer (the qtest_virtio/machine package, binary.py) against the real QEMU binary.

Spec-building rules are checked as plain unit tests; everything about the process (argv, escaping,
start errors, teardown, crash capture) is checked by starting QEMU and asking it (QMP, /proc).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import pid_gone
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from qtest_virtio import Machine, MachineSpec, QemuCrashed, QemuStartError, modes
from qtest_virtio.binary import QemuBinary, QemuNotFound, UnknownFlag
from qtest_virtio.machine import escape_option_value, format_value, parse_memory
from qtest_virtio.workdirs import sweep_stale_workdirs

MachineFactory = Callable[..., Machine]

RAM = 0x100000
#: virtio-pci device IDs of an rng device: transitional (legacy ID) and modern-only.
RNG_TRANSITIONAL_ID, RNG_MODERN_ID = 0x1005, 0x1044

E = TypeVar("E", bound=Exception)


def qmp_cmd(qmp: QEMUMonitorProtocol, command: str, **args: object) -> Any:
    """A QMP command's return value, read as the JSON it is (qemu.qmp types it ``object``)."""
    return qmp.cmd(command, **args)


def assert_cleaned_up(pid: int, workdir: str) -> None:
    assert pid_gone(pid), f"QEMU pid {pid} still running"
    assert workdir and not os.path.exists(workdir), f"workdir {workdir} left behind"


def pci_ids(vm: Machine) -> dict[str, int]:
    """qdev id -> PCI device ID, as QEMU reports them (query-pci)."""
    out: dict[str, int] = {}
    for bus in qmp_cmd(vm.qmp, "query-pci"):
        for dev in bus["devices"]:
            if dev.get("qdev_id"):
                out[dev["qdev_id"]] = dev["id"]["device"]
    return out


def qom_get(vm: Machine, dev_id: str, prop: str) -> object:
    return vm.qmp.cmd("qom-get", path=f"/machine/peripheral/{dev_id}", property=prop)


def wrapper(tmp_path: Path, body: str) -> str:
    """An executable bash script standing in for QEMU (it usually execs the real one)."""
    path = tmp_path / "qemu-wrapper"
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


# -- argv ------------------------------------------------------------------------------------


def test_argv_is_a_list_run_without_a_shell(machine_factory: MachineFactory, qemu_binary: QemuBinary) -> None:
    """QEMU runs exactly the argv list (no shell), logs no qtest traffic, and stays in prelaunch."""
    vm = machine_factory()
    argv = vm.argv
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[0] == qemu_binary.path
    i = argv.index("-qtest-log")
    assert argv[i + 1] == "none"
    assert argv[argv.index("-qtest") + 1] == "chardev:qtest"
    accel = argv[argv.index("-accel") + 1]
    if qemu_binary.has_qtest_accel:
        assert accel == "qtest"
    else:
        assert accel == "tcg" and "-S" in argv
        assert "qtest" not in [argv[j + 1] for j, a in enumerate(argv) if a == "-accel"]
        assert qmp_cmd(vm.qmp, "query-status")["status"] == "prelaunch"
    with open(f"/proc/{vm.pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")[:-1]
    if cmdline[0] == argv[0].encode():
        assert cmdline == [a.encode() for a in argv]
    else:  # a wrapper script that execs the real binary with options first (scripts/qemu.sh's 10.0)
        assert os.path.basename(cmdline[0]).startswith(b"qemu-system-")
        assert cmdline[len(cmdline) - len(argv) + 1 :] == [a.encode() for a in argv[1:]]


def test_command_line_is_copy_pasteable(machine_factory: MachineFactory) -> None:
    """command_line() is argv with qtest on stdio and no QMP; pasted, it answers qtest commands."""
    spec = MachineSpec()
    spec.add_virtio("virtio-rng-pci", mode="modern")
    vm = machine_factory(spec)
    line = vm.command_line()
    words = shlex.split(line)
    assert words[-2:] == ["-qtest", "stdio"]
    assert "-qtest stdio" in line
    for absent in ("qmp", "-mon", "-chardev", "-qtest-log", "qtest.sock", vm.workdir):
        assert absent not in line
    assert words[:-2] == vm.argv[: len(words) - 2]
    proc = subprocess.Popen(words, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"endianness\noutl 0xcf8 0x80000000\ninl 0xcfc\n")
        proc.stdin.flush()
        assert [proc.stdout.readline() for _ in range(3)] == [b"OK little\n", b"OK\n", b"OK 0x29c08086\n"]
    finally:
        proc.kill()  # QEMU does not exit when qtest's stdin closes
        proc.wait(5)


def test_command_line_with_blk_device_runs_after_teardown(machine_factory: MachineFactory) -> None:
    """The command line in a failure report is used after the test ended: it must still start.

    Regression: it named the scratch image inside the workdir, which teardown deletes (and which
    the running QEMU holds locked).
    """
    spec = MachineSpec()
    spec.add_device("virtio-blk-pci")
    vm = machine_factory(spec)
    words = shlex.split(vm.command_line())
    vm.shutdown()
    proc = subprocess.Popen(words, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"endianness\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"OK little\n"
    finally:
        proc.kill()
        proc.wait(5)


# -- property escaping and formatting --------------------------------------------------------


def test_comma_in_value_cannot_inject_an_option(machine_factory: MachineFactory) -> None:
    """A comma in a value is data: QEMU sees serial="a,id=evil,b", not an id=evil option."""
    spec = MachineSpec()
    dev = spec.add_device("virtio-blk-pci", serial="a,id=evil,b")
    shell = spec.add_device("virtio-blk-pci", serial="$(id) `x`;'q\" b")
    assert dev.option() == "virtio-blk-pci,id=blk0,serial=a,,id=evil,,b"
    vm = machine_factory(spec)
    assert qom_get(vm, dev.id, "serial") == "a,id=evil,b"
    assert qom_get(vm, shell.id, "serial") == "$(id) `x`;'q\" b"
    names = {p["name"] for p in qmp_cmd(vm.qmp, "qom-list", path="/machine/peripheral")}
    assert {"blk0", "blk1"} <= names and "evil" not in names


def test_escape_option_value() -> None:
    assert escape_option_value("a,b") == "a,,b"
    assert escape_option_value(",,") == ",,,,"
    assert escape_option_value("plain=value") == "plain=value"
    with pytest.raises(ValueError):
        escape_option_value("a\0b")


@pytest.mark.parametrize("name", ["bad name", "a=b", "x,y", "", "-lead", "tab\there"])
def test_invalid_property_names_rejected(name: str) -> None:
    spec = MachineSpec()
    with pytest.raises(ValueError, match="property name"):
        spec.add_device("virtio-rng-pci", {name: "1"})
    with pytest.raises(ValueError, match="property name"):
        spec.add_virtio("virtio-rng-pci", {name: "1"})
    assert spec.devices == []


@pytest.mark.parametrize("driver", ["virtio-rng-pci,id=x", "virtio rng", ""])
def test_invalid_device_names_rejected(driver: str) -> None:
    with pytest.raises(ValueError, match="device name"):
        MachineSpec().add_device(driver)


def test_invalid_machine_name_rejected() -> None:
    with pytest.raises(ValueError, match="machine type"):
        MachineSpec(machine="q35 -S")


def test_values_are_formatted_for_qemu() -> None:
    """Bools become on/off (QEMU's spelling), ints decimal; property order is kept, id first."""
    assert (format_value(True), format_value(False), format_value(16), format_value("x")) == ("on", "off", "16", "x")
    dev = MachineSpec().add_device("virtio-rng-pci", {"page-per-vq": True}, event_idx=False, vectors=3)
    assert dev.props == {"id": "rng0", "page-per-vq": "on", "event_idx": "off", "vectors": "3"}
    assert dev.option() == "virtio-rng-pci,id=rng0,page-per-vq=on,event_idx=off,vectors=3"


# -- transport modes -------------------------------------------------------------------------


def test_add_virtio_sets_mode_properties() -> None:
    spec = MachineSpec()
    for mode in modes.ALL_MODES:
        dev = spec.add_virtio("virtio-rng-pci", mode=mode)
        assert dev.mode == mode
        for key, value in modes.MODE_PROPERTIES[mode].items():
            assert dev.props[key] == value
    assert [d.props["disable-modern"] for d in spec.devices] == ["on", "off", "off", "off"]
    assert [d.props["disable-legacy"] for d in spec.devices] == ["off", "off", "off", "on"]
    assert spec.add_virtio("virtio-rng-pci").mode == modes.TRANSITIONAL_MODERN
    assert spec.add_device("virtio-rng-pci").mode is None


def test_add_virtio_conflicting_property_rejected() -> None:
    spec = MachineSpec()
    with pytest.raises(ValueError, match="disable-legacy"):
        spec.add_virtio("virtio-rng-pci", {"disable-legacy": "off"}, mode=modes.MODERN)
    with pytest.raises(ValueError, match="disable-modern"):
        spec.add_virtio("virtio-rng-pci", {"disable-modern": False}, mode=modes.LEGACY)
    with pytest.raises(ValueError, match="transport mode"):
        spec.add_virtio("virtio-rng-pci", mode="semi-modern")
    assert spec.devices == []
    # An explicit property that agrees with the mode is fine (True formats as "on").
    dev = spec.add_virtio("virtio-rng-pci", {"disable-modern": True}, mode=modes.LEGACY)
    assert dev.props["disable-modern"] == "on"


def test_modes_build_the_devices_qemu_reports(machine_factory: MachineFactory) -> None:
    """QEMU accepts the mode properties and builds the device each mode means (IDs per virtio-facts)."""
    spec = MachineSpec()
    for mode in modes.ALL_MODES:
        spec.add_virtio("virtio-rng-pci", mode=mode, id=mode, event_idx=False)
    vm = machine_factory(spec)
    ids = pci_ids(vm)
    assert ids == {
        "legacy": RNG_TRANSITIONAL_ID,
        "transitional-legacy": RNG_TRANSITIONAL_ID,
        "transitional-modern": RNG_TRANSITIONAL_ID,
        "modern": RNG_MODERN_ID,
    }
    assert qom_get(vm, "legacy", "disable-modern") is True
    assert qom_get(vm, "modern", "disable-legacy") == "on"
    assert qom_get(vm, "transitional-modern", "disable-legacy") == "off"
    assert qom_get(vm, "modern", "event_idx") is False


# -- memory, ids -----------------------------------------------------------------------------


def test_parse_memory() -> None:
    assert parse_memory("256M") == 256 << 20
    assert parse_memory("1G") == 1 << 30
    assert parse_memory("512k") == 512 << 10
    assert parse_memory("64MiB") == 64 << 20
    assert parse_memory(" 2G ") == 2 << 30
    assert parse_memory("300") == 300 << 20  # QEMU's -m: a bare number is MiB
    assert parse_memory(512) == 512 << 20
    for bad in ("lots", "1.5G", "-1M", "", "1X"):
        with pytest.raises(ValueError):
            parse_memory(bad)
    with pytest.raises(ValueError):
        MachineSpec(memory="lots")
    assert MachineSpec(memory="1G").memory_bytes == 1 << 30


@pytest.mark.parametrize("memory", [128, "192M"])
def test_memory_reaches_qemu(machine_factory: MachineFactory, memory: int | str) -> None:
    vm = machine_factory(memory=memory)
    expected = parse_memory(memory)
    assert qmp_cmd(vm.qmp, "query-memory-size-summary")["base-memory"] == expected
    vm.qtest.writel(expected - 4, 0xABCD)  # the last RAM word exists
    assert vm.qtest.readl(expected - 4) == 0xABCD


def test_auto_ids_and_duplicates() -> None:
    spec = MachineSpec()
    assert spec.add_device("virtio-blk-pci").id == "blk0"
    assert spec.add_device("virtio-blk-pci").id == "blk1"
    assert spec.add_virtio("virtio-rng-pci").id == "rng0"
    assert spec.add_device("virtio-blk-pci", id="blk3").id == "blk3"
    assert spec.add_device("virtio-blk-pci").id == "blk2"
    assert spec.add_device("virtio-blk-pci").id == "blk4"
    assert spec.add_device("virtio-net-pci").id == "net0"
    with pytest.raises(ValueError, match="used twice"):
        spec.add_device("virtio-rng-pci", id="blk0")
    with pytest.raises(ValueError, match="used twice"):
        spec.add_virtio("virtio-rng-pci", id="rng0")
    assert [d.id for d in spec.devices] == ["blk0", "blk1", "rng0", "blk3", "blk2", "blk4", "net0"]
    assert spec.device("blk3").driver == "virtio-blk-pci"
    assert next(iter(spec.device("blk3").props)) == "id"
    with pytest.raises(KeyError, match="blk9"):
        spec.device("blk9")


# -- bad input: clear errors, no process left ------------------------------------------------


def start_expecting(spec: MachineSpec, error: type[E]) -> tuple[Machine, pytest.ExceptionInfo[E]]:
    """Start ``spec`` expecting ``error``; checks nothing of that machine is left."""
    vm = Machine(spec)
    with pytest.raises(error) as info:
        vm.start()
    assert vm.argv, "QEMU was not even launched"
    assert_cleaned_up(vm.pid, vm.workdir)
    assert not vm.alive
    return vm, info


def test_unknown_device(qemu_binary: QemuBinary) -> None:
    spec = MachineSpec(qemu=qemu_binary.path)
    spec.add_device("virtio-rng-pcx")
    _, info = start_expecting(spec, QemuStartError)
    msg = str(info.value)
    assert "'virtio-rng-pcx' is not a valid device model name" in msg
    assert re.search(r"did you mean .*virtio-rng-pci", msg)
    assert "-qtest stdio" in info.value.command_line
    assert "is not a valid device model name" in info.value.stderr


def test_unknown_property(qemu_binary: QemuBinary) -> None:
    spec = MachineSpec(qemu=qemu_binary.path)
    spec.add_device("virtio-blk-pci", foo="1")
    _, info = start_expecting(spec, QemuStartError)
    msg = str(info.value)
    assert "Property 'virtio-blk-pci.foo' not found" in msg
    valid = msg.partition("valid properties of virtio-blk-pci:")[2]
    assert "event_idx" in valid and "serial" in valid and "drive" in valid


def test_binary_that_exits_at_once(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    """A QEMU that answers --version but exits as soon as it is started for real."""
    script = wrapper(tmp_path, f'[ "$1" = --version ] && exec {shlex.quote(qemu_binary.path)} --version\nexit 1\n')
    _, info = start_expecting(MachineSpec(qemu=script), QemuStartError)
    assert "exited during start-up" in str(info.value) and "exit status 1" in str(info.value)


def test_program_that_is_not_qemu() -> None:
    """/bin/false is refused before any start: it does not answer --version (issue 12)."""
    false = shutil.which("false")
    assert false
    with pytest.raises(QemuNotFound, match=r"did not answer --version \(exit 1\): not a QEMU binary"):
        QemuBinary.get(false)


@pytest.mark.timeout(30)
def test_qemu_that_never_connects(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    """A QEMU that never connects its sockets fails start within start_timeout and is killed."""
    script = wrapper(
        tmp_path,
        f"""\
        case "$*" in *-qtest*) exec sleep 60;; esac
        exec {shlex.quote(qemu_binary.path)} "$@"
        """,
    )
    t0 = time.monotonic()
    _, info = start_expecting(MachineSpec(qemu=script, start_timeout=0.5), QemuStartError)
    assert "did not connect within 0.5 s" in str(info.value)
    assert time.monotonic() - t0 < 10


def test_missing_binary_path() -> None:
    with pytest.raises(QemuNotFound) as info:
        Machine(MachineSpec(qemu="/nonexistent/qemu"))
    msg = str(info.value)
    assert "/nonexistent/qemu" in msg and "apt-get install" in msg and "qemu-system-x86" in msg
    assert isinstance(info.value, QemuStartError)


def test_missing_binary_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QEMU", raising=False)
    with pytest.raises(QemuNotFound) as info:
        Machine(MachineSpec(qemu="qemu-system-nosuch-arch"))
    msg = str(info.value)
    assert "qemu-system-nosuch-arch" in msg and "not found on PATH" in msg and "apt-get install" in msg


def test_sigkill_mid_test(machine_factory: MachineFactory) -> None:
    """A SIGKILLed QEMU: the next command and shutdown(check=True) both raise QemuCrashed."""
    vm = machine_factory()
    pid, workdir = vm.pid, vm.workdir
    vm.qtest.writel(RAM, 1)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(QemuCrashed) as info:
        vm.qtest.readl(RAM)
    assert info.value.signal == signal.SIGKILL
    assert "SIGKILL" in str(info.value)
    with pytest.raises(QemuCrashed) as again:
        vm.shutdown(check=True)
    assert again.value is info.value
    assert_cleaned_up(pid, workdir)


def test_sigkill_noticed_by_shutdown_alone(machine_factory: MachineFactory) -> None:
    """Even with no command after the kill, shutdown(check=True) reports the death."""
    vm = machine_factory()
    pid, workdir = vm.pid, vm.workdir
    os.kill(pid, signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, but leave the reaping to Popen
    with pytest.raises(QemuCrashed) as info:
        vm.shutdown(check=True)
    assert info.value.signal == signal.SIGKILL
    assert "before the harness stopped it" in str(info.value)
    assert_cleaned_up(pid, workdir)


# -- teardown always runs --------------------------------------------------------------------


def test_normal_exit_is_a_clean_exit_without_qmp(machine_factory: MachineFactory) -> None:
    """Normal teardown: SIGTERM, on which QEMU exits cleanly (status 0, the QMP quit path's
    cleanup), well within the 3 s grace; QMP is never negotiated
    for it, which is what makes teardown cheap."""
    vm = machine_factory()
    pid, workdir = vm.pid, vm.workdir
    assert list(vm.processes()) == [pid]
    assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
    assert os.listdir(workdir) == ["qemu.stderr"]  # sockets are unlinked once connected
    t0 = time.monotonic()
    vm.shutdown(check=True)
    assert time.monotonic() - t0 < 2.0
    assert vm.returncode == 0
    assert vm.crash is None
    assert vm._qmp is None
    assert vm.stderr_text() == ""  # under qtest QEMU does not report the signal (qemu_kill_report)
    assert list(vm.processes()) == []
    assert_cleaned_up(pid, workdir)


def test_clean_exit_after_qmp_was_used(machine_factory: MachineFactory) -> None:
    """A machine whose QMP was negotiated leaves the same way, exit status 0, no crash."""
    vm = machine_factory()
    pid, workdir = vm.pid, vm.workdir
    assert vm.run_state() in ("prelaunch", "running", "paused")
    vm.shutdown(check=True)
    assert vm.returncode == 0 and vm.crash is None
    assert_cleaned_up(pid, workdir)


def test_teardown_reaches_qemu_under_a_wrapper_script(
    machine_factory: MachineFactory, tmp_path: Path, qemu_binary: QemuBinary
) -> None:
    """A wrapper that runs QEMU as its child (no exec) and ignores SIGTERM itself: the signal goes
    to QEMU's process group, so QEMU still exits cleanly and the wrapper with it (no orphan)."""
    script = wrapper(tmp_path, f"trap '' TERM\n{shlex.quote(qemu_binary.path)} \"$@\"\n")
    vm = machine_factory(MachineSpec(qemu=script))
    assert vm.qtest.readl(RAM) == 0
    wrapper_pid = vm.pid
    children = [int(p) for p in Path(f"/proc/{wrapper_pid}/task/{wrapper_pid}/children").read_text().split()]
    assert len(children) == 1
    t0 = time.monotonic()
    vm.shutdown(check=True)
    assert time.monotonic() - t0 < 2.0  # QEMU exited on SIGTERM, not on the SIGKILL stage
    assert vm.returncode == 0
    assert not os.path.exists(f"/proc/{children[0]}")


def test_exception_in_with_block(qemu_binary: QemuBinary) -> None:
    vm = Machine(MachineSpec(qemu=qemu_binary.path))
    with pytest.raises(RuntimeError, match="test body failed"), vm:
        pid, workdir = vm.pid, vm.workdir
        assert vm.alive
        raise RuntimeError("test body failed")
    assert_cleaned_up(pid, workdir)


def test_keyboard_interrupt_in_with_block(qemu_binary: QemuBinary) -> None:
    vm = Machine(MachineSpec(qemu=qemu_binary.path))
    with pytest.raises(KeyboardInterrupt), vm:
        pid, workdir = vm.pid, vm.workdir
        raise KeyboardInterrupt
    assert_cleaned_up(pid, workdir)
    assert vm.returncode == 0


def test_exception_is_not_masked_by_a_crash(qemu_binary: QemuBinary) -> None:
    """When QEMU died and the body raised too, the body's exception wins; the crash is recorded."""
    vm = Machine(MachineSpec(qemu=qemu_binary.path))
    with pytest.raises(AssertionError, match="body"), vm:
        pid, workdir = vm.pid, vm.workdir
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, but leave the reaping to Popen
        raise AssertionError("body")
    assert vm.crash is not None and vm.crash.signal == signal.SIGKILL
    assert_cleaned_up(pid, workdir)


@pytest.mark.timeout(60)
def test_sigkilled_python_takes_qemu_with_it(qemu_binary: QemuBinary) -> None:
    """PDEATHSIG: QEMU dies within ~2 s of its Python parent being SIGKILLed; the sweep removes
    the directory the dead parent could not."""
    code = textwrap.dedent(
        """\
        import sys, time
        from qtest_virtio import Machine, MachineSpec
        vm = Machine(MachineSpec(qemu=sys.argv[1]))
        vm.start()
        print(vm.pid, vm.workdir, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code, qemu_binary.path], stdout=subprocess.PIPE, text=True)
    qemu_pid = 0
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "child never started its machine"
        pid_text, workdir = child.stdout.readline().split()
        qemu_pid = int(pid_text)
        assert not pid_gone(qemu_pid) and os.path.isdir(workdir)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 2.0
        while not pid_gone(qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid_gone(qemu_pid), "QEMU outlived its SIGKILLed parent"
        sweep_stale_workdirs(os.path.dirname(workdir))  # a parallel Machine.start may sweep first
        assert not os.path.exists(workdir)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if qemu_pid and not pid_gone(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)


def test_sweep_removes_only_dead_owners(tmp_path: Path) -> None:
    """Workdirs are swept by their owner's pid: dead owners only, never ours or a live one's."""
    child = subprocess.Popen(["true"])
    child.wait()
    dead = tmp_path / f"qtest-virtio-{child.pid}-abc"
    mine = tmp_path / f"qtest-virtio-{os.getpid()}-def"
    live = tmp_path / f"qtest-virtio-{os.getppid()}-ghi"
    other = tmp_path / "unrelated-1-x"
    for d in (dead, mine, live, other):
        d.mkdir()
        (d / "qemu.stderr").write_text("x")
    assert sweep_stale_workdirs(str(tmp_path)) == [dead.name]
    assert not dead.exists() and mine.exists() and live.exists() and other.exists()


def _start_time(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[19])


def test_workdir_names_its_owner_with_pid_and_start_time(qemu_binary: QemuBinary) -> None:
    with Machine(MachineSpec(qemu=qemu_binary.path)) as vm:
        name = os.path.basename(vm.workdir)
    assert name.startswith(f"qtest-virtio-{os.getpid()}-{_start_time(os.getpid())}-"), name


def test_sweep_removes_dirs_of_zombies_and_of_reused_pids(tmp_path: Path) -> None:
    """An owner that died but is not reaped yet (a zombie: an xdist worker that os._exit()ed
    stays one until the session ends) has ended; so has one whose pid a later process took
    (its start time differs). A live owner with the recorded start time keeps its directory."""
    zombie = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        parent = os.getppid()
        dirs = {
            "zombie-old-form": tmp_path / f"qtest-virtio-{zombie.pid}-abc",
            "zombie": tmp_path / f"qtest-virtio-{zombie.pid}-{_start_time(zombie.pid)}-abc",
            "reused-pid": tmp_path / f"qtest-virtio-{parent}-{_start_time(parent) + 1}-def",
            "live": tmp_path / f"qtest-virtio-{parent}-{_start_time(parent)}-ghi",
            "live-old-form": tmp_path / f"qtest-virtio-{parent}-12345678",
        }
        for d in dirs.values():
            d.mkdir()
        assert sorted(sweep_stale_workdirs(str(tmp_path))) == sorted(
            dirs[k].name for k in ("zombie-old-form", "zombie", "reused-pid")
        )
        assert dirs["live"].exists() and dirs["live-old-form"].exists()
    finally:
        zombie.wait()


@pytest.mark.timeout(60)
def test_machines_started_from_threads_leave_no_file_descriptors(qemu_binary: QemuBinary) -> None:
    """qemu.qmp's sync client makes an event loop for a thread that has none (3 fds); the
    machine closes it in teardown instead of leaving it to the garbage collector."""

    def run() -> None:
        with Machine(MachineSpec(qemu=qemu_binary.path)) as vm:
            assert qmp_cmd(vm.qmp, "query-status")["status"] in ("running", "prelaunch")

    def in_thread() -> None:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(30)
        assert not thread.is_alive()

    def fds() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sorted(out)

    in_thread()  # first use: imports, the halt firmware, the binary's probes
    gc.collect()
    gc.disable()
    try:
        before = fds()
        for _ in range(3):
            in_thread()
        after = fds()
    finally:
        gc.enable()
    assert after == before
    run()  # the main thread's own loop still works after all that
    in_thread()


# -- crash markers ---------------------------------------------------------------------------


def test_assertion_on_stderr_reported_even_if_qemu_survived(
    machine_factory: MachineFactory, tmp_path: Path, qemu_binary: QemuBinary
) -> None:
    """An assertion line on stderr is a crash even when QEMU exits cleanly afterwards."""
    line = "qemu-system-x86_64: ../hw/virtio/virtio.c:1234: virtqueue_pop: Assertion `elem' failed."
    script = wrapper(tmp_path, f'echo {shlex.quote(line)} >&2\nexec {shlex.quote(qemu_binary.path)} "$@"\n')
    vm = machine_factory(MachineSpec(qemu=script))
    assert vm.qtest.readl(RAM) == 0  # QEMU itself is fine
    with pytest.raises(QemuCrashed) as info:
        vm.shutdown(check=True)
    assert info.value.summary.startswith("QEMU reported: ")
    assert "Assertion `elem' failed" in info.value.summary
    assert line in info.value.stderr_tail
    assert info.value.returncode == 0
    assert f"readl {RAM:#x}" in str(info.value)


def test_qemu_assertion_is_reported(machine_factory: MachineFactory) -> None:
    """A real g_assert in QEMU (a malformed command sent raw, on purpose) is SIGABRT + its text."""
    vm = machine_factory()
    pid, workdir = vm.pid, vm.workdir
    vm.qtest._sock.sendall(b"inb 0x10000\n")  # bypasses validation on purpose
    with pytest.raises(QemuCrashed) as info:
        vm.qtest.readl(RAM)
    crash = info.value
    assert crash.signal == signal.SIGABRT
    assert "assertion failed" in crash.stderr_tail
    assert "addr <= 0xffff" in crash.stderr_tail
    assert "assertion failed" in str(crash)
    vm.shutdown(check=False)
    assert vm.crash is crash
    assert_cleaned_up(pid, workdir)


# -- the binary ------------------------------------------------------------------------------


def test_binary_version(qemu_binary: QemuBinary, machine_factory: MachineFactory) -> None:
    """The version parsed from --version agrees with QEMU's own (QMP) and with a fresh run."""
    assert qemu_binary.version >= (6, 0, 0)
    out = subprocess.run([qemu_binary.path, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert m and tuple(int(g) for g in m.groups()) == qemu_binary.version
    assert qemu_binary.version_text == out.splitlines()[0]
    qmp_version = machine_factory().version()["qemu"]
    assert isinstance(qmp_version, dict)
    assert (qmp_version["major"], qmp_version["minor"], qmp_version["micro"]) == qemu_binary.version
    assert QemuBinary.get(qemu_binary.path) is qemu_binary  # asked once per binary


def test_binary_capabilities(qemu_binary: QemuBinary) -> None:
    assert "tcg" in qemu_binary.accelerators
    # Decided by trial, not from -accel help (upstream hides qtest there): QEMU itself agrees.
    res = subprocess.run(
        [qemu_binary.path, "-accel", "qtest", "-machine", "none", "-display", "none", "-nodefaults", "-qmp", "stdio"],
        input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    refused = "invalid accelerator qtest" in res.stderr
    assert qemu_binary.has_qtest_accel != refused, res.stderr
    accel = "qtest" if qemu_binary.has_qtest_accel else "tcg (-S; no qtest accelerator in this build)"
    assert qemu_binary.identity.endswith(f"accelerator: {accel}")
    assert qemu_binary.identity.startswith("QEMU " + ".".join(map(str, qemu_binary.version)))
    assert {"q35", "pc"} <= set(qemu_binary.machines)
    assert qemu_binary.devices.get("virtio-rng-pci") == "PCI"


def test_probe_answers_are_kept_across_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qemu_binary: QemuBinary
) -> None:
    """A binary's answers (--version, the accelerator trial, -device help, -device NAME,help,
    -machine help) are asked once and kept in the cache directory: a fresh process (here a fresh
    class cache) runs the binary not once; a changed binary (another mtime) is asked again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    script = wrapper(tmp_path, f'echo "$*" >> {shlex.quote(str(calls))}\nexec {shlex.quote(qemu_binary.path)} "$@"\n')

    def facts() -> tuple[object, ...]:
        b = QemuBinary.get(script)
        props = b.device_properties("virtio-rng-pci")
        return b.version, b.has_qtest_accel, b.accelerators, b.devices, props, b.machines

    monkeypatch.setattr(QemuBinary, "_cache", {})
    first = facts()
    asked = calls.read_text().splitlines()
    assert len(asked) == 6 and asked[0] == "--version", asked
    assert first[0] == qemu_binary.version and first[1] == qemu_binary.has_qtest_accel
    monkeypatch.setattr(QemuBinary, "_cache", {})
    assert facts() == first
    assert calls.read_text().splitlines() == asked  # nothing run the second time
    st = os.stat(script)
    os.utime(script, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    monkeypatch.setattr(QemuBinary, "_cache", {})
    assert facts() == first
    assert len(calls.read_text().splitlines()) == 2 * len(asked)  # a changed file is asked again


def test_device_properties(qemu_binary: QemuBinary) -> None:
    props = qemu_binary.device_properties("virtio-rng-pci")
    event_idx = props["event_idx"]
    assert (event_idx.name, event_idx.type, event_idx.default) == ("event_idx", "bool", "on")
    assert props["disable-legacy"].type == "OnOffAuto" and props["disable-legacy"].default == "auto"
    assert {"indirect_desc", "packed", "disable-modern", "vectors"} <= set(props)
    qemu_binary.check_properties("virtio-rng-pci", {"event_idx": "off", "packed": "on"})
    with pytest.raises(UnknownFlag) as info:
        qemu_binary.check_properties("virtio-rng-pci", ["event_idx", "evnt_idx"])
    msg = str(info.value)
    assert "'evnt_idx'" in msg and "event_idx" in msg.partition("valid:")[2]
    assert isinstance(info.value, ValueError)


def test_unknown_device_flag(qemu_binary: QemuBinary) -> None:
    """An unknown device is UnknownFlag naming close device names, not a device without properties.

    Regression: QEMU 7.2 exits 0 after "Device 'X' not found" for ``-device X,help``, and the
    exit status was all that was checked.
    """
    with pytest.raises(UnknownFlag, match=r"did you mean .*virtio-rng-pci"):
        qemu_binary.device_properties("virtio-rng-pcx")


def test_unknown_device_in_check_properties(qemu_binary: QemuBinary) -> None:
    """check_properties on an unknown device says the device is unknown, not "valid: (nothing)"."""
    with pytest.raises(UnknownFlag, match="'no-such-device-at-all' is not known"):
        qemu_binary.check_properties("no-such-device-at-all", ["x"])


def test_signal_during_quit_is_a_crash(
    machine_factory: MachineFactory, tmp_path: Path, qemu_binary: QemuBinary
) -> None:
    """QEMU segfaulting on its way out (teardown's SIGTERM takes QMP quit's cleanup path; a real
    class of QEMU bugs) must be reported.

    The wrapper runs QEMU as a child and, once it has quit, dies by SIGSEGV itself: to the harness
    that is the QEMU process ending with signal 11 although nobody signalled it. Regression: only
    a death before shutdown began, or a stderr marker, used to count as a crash.
    """
    # SIGTERM reaches the wrapper's process group: the wrapper ignores it, QEMU exits cleanly.
    script = wrapper(
        tmp_path, f'trap "" TERM\n{shlex.quote(qemu_binary.path)} "$@"\n[ "$1" = --version ] || kill -SEGV $$\n'
    )
    vm = machine_factory(MachineSpec(qemu=script))
    assert vm.qtest.readl(RAM) == 0
    with pytest.raises(QemuCrashed) as info:
        vm.shutdown(check=True)
    assert vm.returncode == -signal.SIGSEGV
    assert info.value.signal == signal.SIGSEGV


def test_qtest_and_qmp_reach_the_same_qemu(qemu: Machine, qtest: Any, qmp: Any) -> None:
    """The fixtures' two channels end in one process: a qtest write is visible to the monitor."""
    assert qtest is qemu.qtest and qmp is qemu.qmp
    qtest.writel(RAM, 0xC0FFEE11)
    out = qmp_cmd(qmp, "human-monitor-command", **{"command-line": f"xp /1wx {RAM:#x}"})
    assert "0xc0ffee11" in out
    if not qemu.binary.has_qtest_accel:
        assert qmp_cmd(qmp, "query-status")["running"] is False  # -S: no vCPU ever ran


def test_qmp_many_sends_together_and_answers_in_order(qemu: Machine) -> None:
    """``qmp_many`` gives what one ``qmp.cmd`` per command gives, in order; a failed command
    raises as ``qmp.cmd`` does, and the monitor goes on answering."""
    qemu.qtest.writel(RAM, 0xC0FFEE22)  # posted writes are answered before the monitor's view
    commands: list[tuple[str, dict[str, Any]]] = [
        ("query-status", {}),
        ("human-monitor-command", {"command-line": f"xp /1wx {RAM:#x}"}),
        ("query-name", {}),
    ]
    together = qemu.qmp_many(commands)
    assert together == [qemu.qmp.cmd(name, **args) for name, args in commands]
    assert "0xc0ffee22" in together[1]
    assert qemu.qmp_many([]) == []
    with pytest.raises(ExecuteError, match="no-such-command"):
        qemu.qmp_many([("query-status", {}), ("no-such-command", {})])
    assert qemu.qmp_many([("query-name", {})]) == [together[2]]


def test_stop_and_cont_keep_resume_right(machine_factory: MachineFactory) -> None:
    """``stop()`` pauses a running VM (QMP says paused, not running); ``resume()`` afterwards
    makes it run again on every build (under the qtest accelerator too, where the run state is
    otherwise RUNNING from the start, so resume() sends nothing); ``cont()`` does the same, and a
    resume() after it changes nothing."""
    vm = machine_factory()
    vm.resume()
    assert vm.run_state() == "running"
    vm.stop()
    assert vm.run_state() == "paused"
    assert qmp_cmd(vm.qmp, "query-status")["running"] is False
    vm.resume()
    assert vm.run_state() == "running"
    vm.stop()
    vm.cont()
    assert vm.run_state() == "running"
    vm.resume()
    assert vm.run_state() == "running"


def test_relative_paths_on_the_command_line_land_in_the_workdir(machine_factory: MachineFactory) -> None:
    """QEMU runs in the machine's private workdir: a relative path (a reproducer's unix socket)
    names a file there, which goes with the machine, not one in the caller's directory."""
    before = set(os.listdir("."))
    vm = machine_factory(MachineSpec(extra_args=["-chardev", "socket,id=rel0,path=rel0.sock,server=on,wait=off"]))
    workdir, pid = vm.workdir, vm.pid
    assert os.path.exists(os.path.join(workdir, "rel0.sock"))
    assert set(os.listdir(".")) == before
    vm.shutdown(check=True)
    assert_cleaned_up(pid, workdir)
