# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""Process reuse in the fuzzer (issue 16): examples share one QEMU, the reset between them is
checked and a skipped part of it is caught (a restart, counted), a crash restarts, and a find
made on a reused process replays on a fresh one from its .qtest, which holds only its own
example's commands."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import EXE, pid_gone
from test_fuzz import qemu_with_bug, status_write_bug  # noqa: F401 - the fixture is used by name

from qtest_virtio.fuzz import (
    Action,
    FuzzConfig,
    FuzzInterrupted,
    StatusWrites,
    Valid,
    fuzz_target,
    run_example,
    write_reproducer,
)
from qtest_virtio.fuzz.cores import Cores
from qtest_virtio.fuzz.reset import STEPS
from qtest_virtio.fuzz.reuse import SPARES, Session
from qtest_virtio.outcome import Outcome
from qtest_virtio.reproducer import load, replay
from qtest_virtio.vm import Machine

#: Commands whose count depends on timing (polls for the used ring, the MSI-X mailbox) or on
#: the settle's slicing: the comparisons below look at what changes QEMU's state.
_TIMED = ("read", "in", "b64read", "clock_step", "endianness")


def _own(commands: list[str]) -> list[str]:
    """An example's state-changing commands, in order."""
    return [c for c in commands if not c.startswith(_TIMED)]


@pytest.mark.parametrize(
    ("device", "mode"),
    [("virtio-blk-pci", "modern"), ("virtio-rng-pci", "legacy"), ("virtio-net-pci", "transitional-legacy")],
)
def test_reuse_runs_examples_on_one_process_with_a_fresh_machines_commands(qemu_binary, device: str, mode: str) -> None:
    config = FuzzConfig(device, mode, "split", qemu=qemu_binary.path)
    pids: set[int] = set()

    def hook(vm: Machine, action: Action) -> None:
        pids.add(vm.pid)

    actions: list[Action] = [Valid(), Valid()]
    with Session(config, every=50) as session:
        results = [run_example(config, actions, hook=hook, session=session) for _ in range(6)]
        stats = session.stats
    assert [r.outcome for r in results] == [Outcome.SURVIVED] * 6, [r.summary() for r in results]
    assert stats.processes == 1 and len(pids) == 1
    assert stats.examples == 6 and stats.resets == 6 and not stats.restarts
    fresh = run_example(config, actions)
    # What a reused example sends is what the same example sends to a fresh QEMU.
    assert all(_own(r.commands) == _own(fresh.commands) for r in results)


@pytest.mark.parametrize("step", STEPS)
def test_a_skipped_reset_step_fails_the_check_and_restarts(qemu_binary, step: str) -> None:
    config = FuzzConfig("virtio-blk-pci", "transitional-modern", "split", qemu=qemu_binary.path)
    with Session(config, skip={step}) as session:
        first = run_example(config, [Valid()], session=session)
        second = run_example(config, [Valid()], session=session)
        stats = session.stats
    assert first.outcome is Outcome.SURVIVED and second.outcome is Outcome.SURVIVED
    assert stats.restarts["reset check failed"] == 2, stats
    assert stats.processes == 2 and stats.resets == 0
    assert sum(stats.reset_failures.values()) == 2


def test_the_full_reset_passes_where_the_skipped_one_fails(qemu_binary) -> None:
    config = FuzzConfig("virtio-blk-pci", "transitional-modern", "split", qemu=qemu_binary.path)
    with Session(config) as session:
        for _ in range(2):
            run_example(config, [Valid()], session=session)
        assert session.stats.processes == 1 and session.stats.resets == 2


def test_every_n_examples_restarts(qemu_binary) -> None:
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path)
    with Session(config, every=2) as session:
        for _ in range(5):
            run_example(config, [Valid()], session=session)
        stats = session.stats
    assert stats.processes == 3
    assert stats.restarts["every 2 examples"] == 2


def test_a_crash_restarts_and_the_find_replays_fresh_with_only_its_commands(
    qemu_binary,
    qemu_with_bug: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_with_bug)
    pids: list[int] = []

    def hook(vm: Machine, action: Action) -> None:
        pids.append(vm.pid)
        status_write_bug(vm, action)

    crashing: list[Action] = [Valid(), StatusWrites((0,))]
    with Session(config) as session:
        before = run_example(config, [Valid()], hook=hook, session=session)
        crash = run_example(config, crashing, hook=hook, session=session)
        after = run_example(config, [Valid()], hook=hook, session=session)
        stats = session.stats
    assert before.outcome is Outcome.SURVIVED and after.outcome is Outcome.SURVIVED
    assert crash.outcome is Outcome.CRASHED and crash.returncode == -signal.SIGABRT
    assert stats.processes == 2 and stats.restarts["crashed"] == 1
    assert pids[0] == pids[1] != pids[-1]  # the crash ran on the reused process, the next on a new one

    fresh = run_example(config, crashing, hook=status_write_bug)
    assert fresh.outcome is Outcome.CRASHED
    assert _own(crash.commands) == _own(fresh.commands)  # nothing of the example before it
    path = write_reproducer(crash, str(tmp_path / "out"))
    verdict = replay(load(path), qemu=qemu_with_bug, timeout=5.0)
    assert verdict.outcome == "crashed" and verdict.signal == signal.SIGABRT, verdict
    assert replay(load(path), qemu=qemu_binary.path, timeout=5.0).outcome == "survived"


def test_migration_and_unplug_campaigns_do_not_reuse(qemu_binary) -> None:
    with pytest.raises(ValueError, match="fresh machines"):
        Session(FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path, migrate=True))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert EXE is not None
    return subprocess.run([EXE, "fuzz", *args], capture_output=True, text=True, timeout=240)


def test_cli_reports_reuse_and_fresh_does_not(qemu_binary, tmp_path: Path) -> None:
    common = ["--qemu", qemu_binary.path, "--device", "virtio-rng-pci", "--transport", "modern", "--ring", "split"]
    common += ["--examples", "4", "--rounds", "1", "--seconds", "120", "--seed", "5"]
    reused = _cli(*common, "--out", str(tmp_path / "a"))
    assert reused.returncode in (0, 1), reused.stderr
    line = next(x for x in reused.stdout.splitlines() if x.startswith("reuse:"))
    assert "QEMU process(es)" in line and "restarts:" in line and "spares started ahead" in line
    no_spare = _cli(*common, "--no-spare", "--out", str(tmp_path / "c"))
    assert no_spare.returncode in (0, 1), no_spare.stderr
    line = next(x for x in no_spare.stdout.splitlines() if x.startswith("reuse:"))
    assert "QEMU process(es)" in line and "spares" not in line
    fresh = _cli(*common, "--fresh", "--out", str(tmp_path / "b"))
    assert fresh.returncode in (0, 1), fresh.stderr
    assert not any(x.startswith("reuse:") for x in fresh.stdout.splitlines())


def test_cli_restart_every_must_be_positive() -> None:
    r = _cli("--restart-every", "0")
    assert r.returncode == 128
    assert r.stderr.strip() == "qtest-virtio fuzz: --restart-every 0: must be 1 or more"


def _start_time(pid: int) -> int:
    """A process's start time in clock ticks since boot (/proc/PID/stat, field 22)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_a_restart_swaps_in_the_spare_started_after_it_that_ran_no_example(qemu_binary) -> None:
    config = FuzzConfig("virtio-blk-pci", "modern", "split", qemu=qemu_binary.path)
    served: list[int] = []

    def hook(vm: Machine, action: Action) -> None:
        served.append(vm.pid)

    with Session(config, every=1) as session:
        first = run_example(config, [Valid()], hook=hook, session=session)
        spares = session.spares()
        assert len(spares) == SPARES == 2  # a run of restarts finds the next one started too
        (spare_vm, _), (after, _) = spares
        baseline = session._baseline
        assert baseline is not None
        # each started after the process it follows, and sent nothing but the enumeration
        for vm, sent in spares:
            assert vm.pid not in served and _start_time(vm.pid) >= _start_time(served[0])
            assert b"".join(sent).decode("latin-1").splitlines() == list(baseline.enumeration)
        second = run_example(config, [Valid()], hook=hook, session=session)
        third = run_example(config, [Valid()], hook=hook, session=session)
        stats = session.stats
    assert [r.outcome for r in (first, second, third)] == [Outcome.SURVIVED] * 3
    assert served == [served[0], spare_vm.pid, after.pid] and len(set(served)) == 3
    assert stats.restarts["every 1 examples"] == 3 and stats.spares_used == 2 and stats.processes == 3
    assert stats.resets == 0  # every example ended in a planned restart
    # the spare's example sent what a fresh QEMU's does
    assert _own(second.commands) == _own(run_example(config, [Valid()]).commands)
    assert all(pid_gone(p) for p in served)


def test_a_spare_swapped_in_passes_the_checked_reset(qemu_binary) -> None:
    config = FuzzConfig("virtio-blk-pci", "transitional-modern", "split", qemu=qemu_binary.path)
    with Session(config, every=2) as session:
        results = [run_example(config, [Valid()], session=session) for _ in range(5)]
        stats = session.stats
    assert [r.outcome for r in results] == [Outcome.SURVIVED] * 5
    # processes 1, 2 (a spare), 3 (a spare); each served two examples, the first reset on each checked
    assert stats.processes == 3 and stats.spares_used == 2 and stats.resets == 3
    assert not stats.reset_failures and stats.restarts == {"every 2 examples": 2}


def test_an_error_in_an_example_stops_the_current_process_and_the_spare(qemu_binary) -> None:
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path)

    def boom(vm: Machine, action: Action) -> None:
        raise RuntimeError("a harness bug")

    with pytest.raises(RuntimeError, match="a harness bug"), Session(config) as session:
        run_example(config, [Valid()], session=session)
        spares = session.spares()
        assert len(spares) == 2
        pids = [session.pid, *(vm.pid for vm, _ in spares)]
        run_example(config, [Valid()], hook=boom, session=session)
    assert all(p is not None and pid_gone(p) for p in pids)


def test_an_interrupt_stops_the_current_process_and_the_spare(qemu_binary) -> None:
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path)
    seen: list[int] = []

    with Session(config, every=1) as session:

        def hook(vm: Machine, action: Action) -> None:
            seen.append(vm.pid)
            seen.extend(vm.pid for vm, _ in session.spares())
            if len(seen) >= 6:
                raise KeyboardInterrupt

        with pytest.raises(FuzzInterrupted):
            fuzz_target(config, max_examples=20, seed=1, hook=hook, session=session)
    assert len(set(seen)) >= 3  # the examples ran on swapped-in spares
    assert all(pid_gone(p) for p in seen)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_close_stops_a_wrapper_scripts_qemu_in_the_spare_too(
    qemu_with_bug: str,  # noqa: F811 - the fixture
) -> None:
    """A spare run through a wrapper script (its QEMU a child of the script) is stopped with
    its QEMU: not left to the parent-death signal, which kills only the script."""
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_with_bug)
    qemus: set[int] = set()
    with Session(config, every=1) as session:
        for _ in range(3):
            run_example(config, [Valid()], session=session)
            spares = session.spares()
            assert len(spares) == 2
            for vm, _ in spares:
                qemus.update(_children(vm.pid))
    assert len(qemus) == 4  # each spare's real QEMU, seen while it ran (3 restarts: 2 + 2 more)
    time.sleep(0.2)
    assert all(pid_gone(p) for p in qemus)


def test_a_retired_process_closes_qmp_on_the_thread_that_used_it(qemu_binary, monkeypatch) -> None:
    """The reset asks QMP here; a retired process is stopped on a worker. qemu.qmp's client
    runs on the event loop of the thread that made it: closed from the worker while this
    thread ran that loop, it failed and left a traceback to its ``__del__``."""
    import threading

    from qemu.qmp.legacy import QEMUMonitorProtocol

    closed_on: list[str] = []
    close = QEMUMonitorProtocol.close

    def spy(self: QEMUMonitorProtocol) -> None:
        closed_on.append(threading.current_thread().name)
        close(self)

    monkeypatch.setattr(QEMUMonitorProtocol, "close", spy)
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path)
    with Session(config, every=2) as session:
        results = [run_example(config, [Valid()], session=session) for _ in range(6)]
        stats = session.stats
    assert [r.outcome for r in results] == [Outcome.SURVIVED] * 6 and stats.resets == 3
    assert len(closed_on) == 3  # each process's reset used QMP
    assert set(closed_on) == {threading.main_thread().name}


def _cores_of(pid: int) -> set[frozenset[int]]:
    """The affinity of every thread of ``pid``."""
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="placement needs two usable cores")
def test_examples_and_the_process_in_use_share_one_core_and_the_spares_run_on_the_others(qemu_binary) -> None:
    config = FuzzConfig("virtio-blk-pci", "modern", "split", qemu=qemu_binary.path)
    mine = frozenset(os.sched_getaffinity(0))
    cores = Cores.split()
    assert cores is not None and cores.examples | cores.others == mine and not cores.examples & cores.others
    during: list[tuple[frozenset[int], set[frozenset[int]], list[set[frozenset[int]]]]] = []

    def hook(vm: Machine, action: Action) -> None:
        spares = [_cores_of(s.pid) for s, _ in session.spares()]
        during.append((frozenset(os.sched_getaffinity(0)), _cores_of(vm.pid), spares))

    with Session(config, every=1) as session:
        for _ in range(3):  # the first process, then two swapped-in spares
            run_example(config, [Valid()], hook=hook, session=session)
    assert len(during) == 3
    for thread, in_use, spares in during:
        assert thread == cores.examples and in_use == {cores.examples}
        assert spares and all(s == {cores.others} for s in spares)
    assert frozenset(os.sched_getaffinity(0)) == mine  # put back at close
    # pin=False leaves everything where it was
    with Session(config, every=1, pin=False) as session:
        during.clear()
        run_example(config, [Valid()], hook=hook, session=session)
    assert during[0][0] == mine and during[0][1] == {mine}
