# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""The next test's QEMU launched while a test runs (plugins/pytest_qtest_virtio/ahead.py), with
real QEMU: the next test gets the very process launched for it, and only it; a wrong guess and
what an interrupted run held are shut down; ``--qtest-log`` (a log from the first command) turns
it off. Inner runs go through pytester in a subprocess, so the harness's children are theirs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from procutil import start_time
from pytest_qtest_virtio.ahead import Ahead

from qtest_virtio import MachineSpec

GONE_WAIT = 15.0

# Inner helper: the harness's child processes (its QEMUs), written where the outer test reads.
CHILDREN = """
import json, os
from pathlib import Path


def children():
    me, out = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z":
            out.append({"pid": int(pid), "start": int(fields[19])})
    return out


def record(name, vm):
    Path("records").mkdir(exist_ok=True)
    Path("records", name + ".json").write_text(json.dumps({"own": vm.pid, "children": children()}))
"""

TWO_TESTS = """
import pytest
from children import record


@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"])
def test_one(virtio_device, qemu):
    record("one", qemu)


@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"])
def test_two(virtio_device, qemu):
    record("two", qemu)
"""


@pytest.fixture(autouse=True)
def _inner_env(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QEMU", raising=False)
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest -p no:benchmark -p no:cacheprovider")
    pytester.makepyfile(children=CHILDREN)


def _records(pytester: pytest.Pytester) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((pytester.path / "records").glob("*.json"))}


def _wait_gone(pid: int, start: int) -> None:
    deadline = time.monotonic() + GONE_WAIT
    while start_time(pid) == start:
        if time.monotonic() > deadline:
            pytest.fail(f"QEMU pid {pid} still there after {GONE_WAIT:g} s")
        time.sleep(0.05)


def test_the_next_test_gets_the_qemu_launched_for_it_while_this_one_ran(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile(test_inner=TWO_TESTS)
    res = pytester.runpytest_subprocess(f"--qemu={qemu_binary.path}", "-p", "no:randomly", "-k", "not packed")
    res.assert_outcomes(passed=2)
    rec = _records(pytester)
    one, two = rec["one"], rec["two"]
    others = [c for c in one["children"] if c["pid"] != one["own"]]
    # While test one ran, exactly one more QEMU was up: the one test two then drove.
    assert [c["pid"] for c in others] == [two["own"]]
    # Test two's run launches nothing: no test comes after it.
    assert [c["pid"] for c in two["children"]] == [two["own"]]
    _wait_gone(others[0]["pid"], others[0]["start"])


def test_a_run_stopped_by_a_failure_shuts_down_the_qemu_it_held_for_the_next_test(
    pytester: pytest.Pytester, qemu_binary
) -> None:
    pytester.makepyfile(test_inner=TWO_TESTS.replace('record("one", qemu)', 'record("one", qemu); assert False'))
    res = pytester.runpytest_subprocess(f"--qemu={qemu_binary.path}", "-p", "no:randomly", "-k", "not packed", "-x")
    res.assert_outcomes(failed=1)
    one = _records(pytester)["one"]
    held = [c for c in one["children"] if c["pid"] != one["own"]]
    assert len(held) == 1  # launched for test two, which -x never ran
    _wait_gone(held[0]["pid"], held[0]["start"])


def test_a_qtest_log_run_starts_each_qemu_in_its_own_test(pytester: pytest.Pytester, qemu_binary) -> None:
    # A log from the first command on: a machine launched before its test would start unlogged.
    pytester.makepyfile(test_inner=TWO_TESTS)
    res = pytester.runpytest_subprocess(
        f"--qemu={qemu_binary.path}", "-p", "no:randomly", "-k", "not packed", "--qtest-log=logs"
    )
    res.assert_outcomes(passed=2)
    one = _records(pytester)["one"]
    assert [c["pid"] for c in one["children"]] == [one["own"]]
    assert len(list((pytester.path / "logs").glob("*.qtest.log"))) == 2


def test_a_machine_launched_for_another_spec_is_shut_down_not_handed_out(qemu_binary) -> None:
    ahead = Ahead()
    rng = MachineSpec(qemu=qemu_binary.path)
    rng.add_virtio("virtio-rng-pci", mode="modern")
    blk = MachineSpec(qemu=qemu_binary.path)
    blk.add_virtio("virtio-blk-pci", mode="modern", backend="null")
    ahead.launch(rng)
    guessed = ahead._vm
    assert guessed is not None
    pid, start = guessed.pid, start_time(guessed.pid)
    assert ahead.take(blk) is None
    assert start is not None
    _wait_gone(pid, start)
    assert (ahead.launched, ahead.taken, ahead.wasted) == (1, 0, 1)
    # The same spec, built again: the launched machine is handed out and starts.
    ahead.launch(rng)
    again = MachineSpec(qemu=qemu_binary.path)
    again.add_virtio("virtio-rng-pci", mode="modern")
    vm = ahead.take(again)
    assert vm is not None and ahead.take(again) is None  # handed out once
    try:
        vm.start()
        assert vm.qtest.readl(0) == 0  # guest RAM: it answers
    finally:
        vm.shutdown()
    assert (ahead.launched, ahead.taken, ahead.wasted) == (2, 1, 1)
    assert not Path(vm.workdir).exists()


def test_a_machine_launched_in_another_environment_is_not_handed_out(
    qemu_binary, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A test's monkeypatched variables end with it: what was launched under them is not the next's.
    ahead = Ahead()
    spec = MachineSpec(qemu=qemu_binary.path)
    monkeypatch.setenv("QTEST_VIRTIO_AHEAD_TEST", "1")
    ahead.launch(spec)
    monkeypatch.delenv("QTEST_VIRTIO_AHEAD_TEST")
    assert ahead.take(MachineSpec(qemu=qemu_binary.path)) is None
    assert (ahead.launched, ahead.taken, ahead.wasted) == (1, 0, 1)
