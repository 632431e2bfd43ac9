# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""Live migration as a fuzz action (issue 15): an example's machine migrates mid-sequence and the
actions go on on the destination; the reproducer holds a ``# qtest-virtio: migrate`` line that
``replay`` honours; a bad directive is a usage error with file and line."""

from __future__ import annotations

import base64
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import EXE, pid_gone
from hypothesis import given, settings

from qtest_virtio import ScenarioError
from qtest_virtio.fuzz import (
    DEVICES,
    Action,
    Addr,
    Desc,
    DescChain,
    FuzzConfig,
    Migrate,
    QueueConfig,
    Unplug,
    Valid,
    actions_strategy,
    fuzz_target,
    run_example,
    write_reproducer,
)
from qtest_virtio.fuzz.actions import DELETED, DEVICE_ADD, DEVICE_DEL
from qtest_virtio.reproducer import Directive, load, parse, replay, upstream_command
from qtest_virtio.vm import Machine

DIRECTIVE = Migrate.directive


@settings(max_examples=200, deadline=None)
@given(actions=actions_strategy())
def test_migration_is_drawn_only_when_enabled(actions: list[Action]) -> None:
    """Without ``migrate`` the strategy is the one earlier campaigns ran (their seeds replay)."""
    assert not any(isinstance(a, Migrate) for a in actions)


def test_the_enabled_strategy_draws_migrations() -> None:
    drawn: list[bool] = []

    @settings(max_examples=100, deadline=None, database=None)
    @given(actions=actions_strategy(migrate=True))
    def draw(actions: list[Action]) -> None:
        drawn.append(any(isinstance(a, Migrate) for a in actions))

    draw()
    assert any(drawn) and not all(drawn), f"{sum(drawn)} of {len(drawn)} examples migrate"


def test_migrate_moves_the_machine_and_the_actions_go_on_there(qemu_binary) -> None:
    """A valid request before, a migration, a valid request after: the hook sees the machine
    change (the source's QEMU is gone), the request after is served by the destination (an
    unserved one would be an observation), and the recording holds the directive once, between
    the two requests' commands, with the destination's commands after it."""
    machines: list[Machine] = []

    def hook(vm: Machine, action: Action) -> None:
        machines.append(vm)

    config = FuzzConfig("virtio-blk-pci", "modern", "split", qemu=qemu_binary.path, migrate=True)
    result = run_example(config, [Valid(), Migrate(), Valid()], hook=hook)
    assert result.outcome == "survived", result.summary()
    assert result.migrations == 1
    assert result.observations == []
    source, _, dest = machines
    assert machines[1] is source and dest is not source
    assert pid_gone(source.pid) and pid_gone(dest.pid)
    at = result.commands.index(DIRECTIVE)
    assert result.commands.count(DIRECTIVE) == 1
    assert result.recovery_from is not None and at < result.recovery_from
    after = result.commands[at + 1 : result.recovery_from]  # the second request: its notify, its reads
    assert any(c.startswith("writew ") for c in after) and any(c.startswith("b64read ") for c in after), after


def test_a_refused_migration_is_an_observation_and_the_source_runs_on(qemu_binary) -> None:
    """virtio_load refuses a queue whose descriptor address is 0 while its last_avail_idx is not
    ("VQ 0 address 0x0 inconsistent with Host index"): the driver zeroed a live queue's
    addresses after a request. That is a refusal with a clean error (the destination exits with
    status 1), not a crash: an observation, and the example goes on on the source."""
    low = Addr("low", 0)
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path, migrate=True)
    result = run_example(config, [Valid(), QueueConfig(0, 8, (low, low, low), True), Migrate(), Valid()])
    assert result.outcome == "survived", result.summary()
    assert result.migrations == 0
    refused = [o for o in result.observations if o.kind == "migration refused (the source runs on)"]
    assert [o.detail for o in refused] == ["VQ N address N inconsistent with Host index N"], result.observations
    assert result.commands.count(DIRECTIVE) == 1

    # replay tries the migration at the same line, is refused the same way, and goes on
    rep = parse(_reproducer_text(result), "refused.qtest")
    verdict = replay(rep, qemu=qemu_binary.path, timeout=5.0)
    assert verdict.outcome == "survived" and verdict.migrations == 0, verdict
    (note,) = [n for n in verdict.notes if "migration" in n]
    assert note.startswith(f"line {rep.directives[0].line}: migration refused, the source ran on: VQ 0 address 0x0 ")


def _reproducer_text(result) -> str:
    from qtest_virtio.fuzz import reproducer_text

    return reproducer_text(result)


def test_a_campaign_with_migration_migrates(qemu_binary) -> None:
    """A short seeded campaign on two devices: examples migrate (counted), and nothing crashes,
    hangs or stays unrecovered across the migrations."""
    total = 0
    for device in ("virtio-net-pci", "virtio-scsi-pci"):
        config = FuzzConfig(device, "transitional-modern", "split", qemu=qemu_binary.path, migrate=True)
        report = fuzz_target(config, max_examples=8, seed=4, shrink_seconds=0.0)
        assert report.failure is None, report.failure.summary()
        assert report.examples == 8
        total += report.migrations
    assert total >= 2, f"{total} migrations in 16 examples"


@pytest.fixture
def logging_qemu(qemu_binary, tmp_path: Path) -> tuple[str, Path]:
    """A "QEMU" that logs the command line of each qtest machine it starts, then runs the real one."""
    log = tmp_path / "starts.log"
    wrapper = tmp_path / "qemu-logging"
    wrapper.write_text(
        f'#!/bin/bash\ncase " $* " in *" -qtest "*) echo "$*" >> {log} ;; esac\nexec {qemu_binary.path} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper), log


def test_replay_migrates_at_the_directive(qemu_binary, logging_qemu: tuple[str, Path], tmp_path: Path) -> None:
    """``qtest-virtio replay`` of a fuzzer reproducer with the directive: a second QEMU starts
    with ``-incoming defer``, the commands after the line go to it, and it holds the guest RAM
    the source had (bytes written before the directive read back after it: a fresh machine
    would read zeros)."""
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path, migrate=True)
    result = run_example(config, [Valid(), Migrate(), Valid()])
    assert result.outcome == "survived" and result.migrations == 1, result.summary()
    path = Path(write_reproducer(result, str(tmp_path)))
    lines = path.read_text().splitlines()
    at = lines.index(DIRECTIVE) + 1  # 1-based line of the directive
    mark = base64.b64encode(b"migrated RAM").decode()
    probe = ["b64write 0x7f0000 0xc " + mark, DIRECTIVE, "b64read 0x7f0000 0xc"]
    lines[at - 1 : at] = probe
    path.write_text("\n".join(lines) + "\n")
    assert [d.line for d in load(str(path)).directives] == [at + 1]

    wrapper, log = logging_qemu
    assert EXE
    res = subprocess.run(
        [EXE, "replay", str(path), "--trace", "--qemu", wrapper], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    starts = log.read_text().splitlines()
    assert len(starts) == 2 and "-incoming defer" not in starts[0] and "-incoming defer" in starts[1], starts
    assert f"{path}:{at + 1}: # qtest-virtio: migrate  ->  migrated to a fresh QEMU (pid " in res.stdout
    assert f"{path}:{at + 2}: b64read 0x7f0000 0xc  ->  OK {mark}" in res.stdout, res.stdout[-2000:]
    assert f"note: line {at + 1}: migrated to a fresh QEMU (pid " in res.stdout
    assert res.stdout.rstrip().endswith("commands replayed across 1 live migration(s), QEMU alive")


def test_unrecovered_after_a_migration_replays_unrecovered(qemu_binary, tmp_path: Path, monkeypatch) -> None:
    """virtio-rng limited to 16 bytes a minute: the valid request after the migration spends the
    destination's budget (rate limits are not migrated), so the recovery fails there. The
    reproducer carries the directive and the ``# fuzz-check:`` line; replay rebuilds the
    machine, migrates at the directive and runs the check on the destination: unrecovered."""
    from dataclasses import replace

    plain = DEVICES["virtio-rng-pci"]
    monkeypatch.setitem(DEVICES, "virtio-rng-pci", replace(plain, props=(("max-bytes", "16"), ("period", "60000"))))
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path, migrate=True)
    result = run_example(config, [Migrate(), Valid()])
    assert result.outcome == "unrecovered" and result.migrations == 1, result.summary()
    rep = load(write_reproducer(result, str(tmp_path)))
    assert len(rep.directives) == 1 and any(c.startswith("fuzz-check:") for c in rep.comments)
    verdict = replay(rep, qemu=qemu_binary.path, timeout=5.0)
    assert verdict.outcome == "unrecovered" and verdict.migrations == 1, verdict


KNOWS = "replay knows '# qtest-virtio: migrate' (a live migration to a fresh QEMU"
#: A "QEMU" whose migration destinations abort (SIGABRT) once the migration stream's socket is
#: there (QMP migrate-incoming made it), while they load; every other start is the real binary.
DEST_ABORTS = """#!/bin/bash
REAL={real}
case " $* " in *" -incoming "*) ;; *) exec "$REAL" "$@" ;; esac
dir=$(printf '%s\\n' "$@" | sed -n 's|^socket,id=qtest,path=\\(.*\\)/qtest.sock$|\\1|p')
"$REAL" "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT
( while [ ! -S "$dir/migration.sock" ]; do kill -0 $child 2>/dev/null || exit; sleep 0.01; done
  kill -ABRT $child ) &
wait $child; rc=$?
while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
if [ $rc -gt 128 ]; then trap - ABRT; kill -ABRT $$; fi
exit $rc
"""


def test_a_destination_that_dies_loading_is_a_crash_of_the_destination(qemu_binary, tmp_path: Path) -> None:
    """The destination aborts while the state streams in: the example is crashed by SIGABRT,
    judged on the destination (its exit, its stderr), with no migration counted and both QEMUs
    gone; replay of the reproducer on the same "QEMU" says crashed, on the real binary survived
    (so the verdict came from the destination, not from the commands)."""
    wrapper = tmp_path / "qemu-dest-aborts"
    wrapper.write_text(DEST_ABORTS.format(real=qemu_binary.path))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    machines: list[Machine] = []
    config = FuzzConfig("virtio-rng-pci", "modern", "split", qemu=str(wrapper), migrate=True)
    result = run_example(config, [Valid(), Migrate(), Valid()], hook=lambda vm, _: machines.append(vm))
    assert result.outcome == "crashed", result.summary()
    assert result.returncode == -signal.SIGABRT and result.migrations == 0, (result.returncode, result.stderr_tail)
    assert machines and all(pid_gone(m.pid) for m in machines)
    path = write_reproducer(result, str(tmp_path / "out"))
    crashed = replay(load(path), qemu=str(wrapper), timeout=5.0)
    assert crashed.outcome == "crashed" and crashed.signal == signal.SIGABRT, crashed
    assert replay(load(path), qemu=qemu_binary.path, timeout=5.0).outcome == "survived"


PLAIN = "# qemu-args: -M q35 -nodefaults -device virtio-rng-pci\nwritel 0x100000 0x1\n{line}\nreadl 0x100000\n"


def test_directives_are_placed_between_the_commands() -> None:
    rep = parse(PLAIN.format(line="# qtest-virtio: migrate") + "# qtest-virtio:   migrate  \n", "d.qtest")
    assert rep.directives == [Directive(3, 1, "migrate"), Directive(5, 2, "migrate")]
    assert [c for _, c in rep.commands] == ["writel 0x100000 0x1", "readl 0x100000"]
    assert not any("migrate" in c for c in rep.comments)
    # a fuzzer's first line ("# qtest-virtio fuzz: ...") stays a comment
    assert parse("# qtest-virtio fuzz: x\n" + PLAIN.format(line=""), "f.qtest").directives == []
    with pytest.raises(ScenarioError, match=r"d\.qtest:3: .*no 'qemu \.\.\. -qtest stdio' form"):
        upstream_command(rep)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "# qtest-virtio: migrat",
            "unknown directive '# qtest-virtio: migrat': replay knows '# qtest-virtio: migrate'",
        ),
        ("# qtest-virtio:", "unknown directive '# qtest-virtio: ': replay knows '# qtest-virtio: migrate'"),
        ("# qtest-virtio: migrate now", "migrate takes no arguments (write '# qtest-virtio: migrate')"),
    ],
)
def test_a_bad_directive_is_a_usage_error_with_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.qtest"
    path.write_text(PLAIN.format(line=line))
    with pytest.raises(ScenarioError, match=r"bad\.qtest:3: "):
        load(str(path))
    assert EXE
    res = subprocess.run([EXE, "replay", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 128, res.stdout + res.stderr
    assert f"{path}:3: " in res.stderr and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1


def test_a_directive_outside_the_plain_form_is_refused(tmp_path: Path) -> None:
    text = "qemu-system-x86_64 -M q35 -qtest stdio\nwritel 0x100000 0x1\n# qtest-virtio: migrate\nreadl 0x100000\n"
    with pytest.raises(ScenarioError, match=r"x\.qtest:3: directive .* in a stdio reproducer: .* plain form"):
        parse(text, "x.qtest")


def test_descchain_state_that_virtio_load_repairs_is_not_refused(qemu_binary) -> None:
    """An avail index 0x8000 ahead, never notified: virtio_load reports "inconsistent with Host
    index" through virtio_error (the device needs a reset) and the migration completes; the
    destination's device then recovers after a reset like any broken device."""
    desc = Desc(0, Addr("scratch", 0), 16, 0, 0)
    config = FuzzConfig("virtio-blk-pci", "modern", "split", qemu=qemu_binary.path, migrate=True)
    result = run_example(config, [DescChain((desc,), (), None, 0x8000, False), Migrate(), Valid()])
    assert result.outcome == "survived" and result.migrations == 1, result.summary()
    kinds = {(o.kind, o.detail) for o in result.observations}
    assert (
        "error reported, DEVICE_NEEDS_RESET set",
        "VQ N size N Guest index N inconsistent with Host index N: delta N",
    ) in kinds, kinds


def test_cli_migrate_counts_the_migrations(qemu_binary, tmp_path: Path) -> None:
    assert EXE
    args = ["--device", "virtio-rng-pci", "--transport", "modern", "--ring", "split", "--migrate"]
    args += ["--examples", "4", "--rounds", "1", "--seed", "0", "--out", str(tmp_path), "--qemu", qemu_binary.path]
    res = subprocess.run([EXE, "fuzz", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("virtio-rng-pci-modern-split: 4 examples in")]
    migrations = int(line.rsplit(", ", 1)[1].split()[0])
    assert migrations >= 1 and line.endswith(f"{migrations} live migration{'' if migrations == 1 else 's'}"), line
    assert f"nothing new found: 4 examples in 1 round(s), seed 0, {migrations} live migration" in res.stdout


def test_unplug_takes_the_device_away_and_the_recovery_plugs_it_again(qemu_binary, tmp_path: Path) -> None:
    """Hot-unplug with a request just served: the QMP steps are recorded as directives around
    the guest's own commands (plugged first, unplugged, DEVICE_DELETED, plugged again for the
    recovery, which then serves a valid request); the valid request while unplugged is skipped
    (no device to serve it). The reproducer replays through ``qtest-virtio replay`` with each
    step done, DEVICE_DELETED included."""
    config = FuzzConfig("virtio-scsi-pci", "modern", "split", qemu=qemu_binary.path, unplug=True)
    result = run_example(config, [Valid(), Unplug(), Valid()])
    assert result.outcome == "survived" and result.unplugs == 1, result.summary()
    assert result.observations == []
    steps = [c for c in result.commands if c.startswith("# qtest-virtio:")]
    assert [step.split()[2] for step in steps] == [*("device_add",) * 2, "device_del", "deleted", *("device_add",) * 2]
    assert steps[2:4] == [f"{DEVICE_DEL} fuzz0", f"{DELETED} fuzz0"]
    assert steps[0] == steps[4] and steps[0].startswith(f"{DEVICE_ADD} virtio-scsi-pci,id=fuzz0,")
    assert steps[1] == steps[5] and steps[1].startswith(f"{DEVICE_ADD} scsi-hd,bus=fuzz0.0,")
    assert result.recovery_from is not None
    assert result.commands.index(f"{DELETED} fuzz0") < result.recovery_from <= result.commands.index(steps[4], 3)

    path = write_reproducer(result, str(tmp_path))
    assert EXE
    res = subprocess.run([EXE, "replay", path, "--trace", "--qemu", qemu_binary.path], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("device_del fuzz0", "deleted fuzz0"):
        assert f"# qtest-virtio: {name.split()[0]}  ->  {name}: done" in res.stdout, res.stdout[-3000:]
    assert res.stdout.count("# qtest-virtio: device_add  ->  device_add ") == 4
    assert "note: line" not in res.stdout  # no step refused or left undone


def test_a_campaign_with_unplug_unplugs(qemu_binary) -> None:
    report = fuzz_target(
        FuzzConfig("virtio-blk-pci", "legacy", "split", qemu=qemu_binary.path, unplug=True),
        max_examples=6,
        seed=4,
        shrink_seconds=0.0,
    )
    assert report.failure is None, report.failure.summary()
    assert report.examples == 6 and report.unplugs >= 1, (report.unplugs, report.observations)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("# qtest-virtio: device_del", "device_del needs an argument (QMP device_del of the device id that follows)"),
        ("# qtest-virtio: migrate fuzz0", "migrate takes no arguments"),
    ],
)
def test_a_directive_with_the_wrong_arguments_is_a_usage_error(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.qtest"
    path.write_text(PLAIN.format(line=line))
    with pytest.raises(ScenarioError, match=r"bad\.qtest:3: ") as err:
        load(str(path))
    assert message in str(err.value)
