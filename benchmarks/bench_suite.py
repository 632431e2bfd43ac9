#!/usr/bin/env python3
"""Suite cost against its floor, in interleaved rounds (benchmarks/rounds.py).

Every scenario run starts its own QEMU, so the floor is runs x (a bare QEMU started with the same
kind of argv until its first qtest reply, then killed) / workers. Each round runs a batch of
bare starts and one ``qtest-virtio run`` of the selection (``--select``; default a representative
subset: the rng scenarios and one blk module); the figure is the median of the per-round ratios
suite wall / floor, with its spread. Target (issue 16): at most 1.3. Each round also runs the
same number of bare starts on the workers in parallel (no test, no pytest): how far the floor's
arithmetic is from a run of nothing but starts on this machine, and the suite against that run.

Where the time beyond QEMU's start goes is measured too: the suite runs with pytest's
``--durations=0`` and a junit XML (per-test setup, call and teardown, summed over the run), and
``pytest --collect-only -q`` on the same selection gives the collection cost on its own.
Arguments after ``--`` go to ``qtest-virtio run`` (``-- --transport modern -- -k packed``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import rounds
from bench_qtest import Bare

from qtest_virtio import MachineSpec
from qtest_virtio.app.runner import pytest_args_for_run
from qtest_virtio.binary import QemuBinary

#: A representative subset: every transport and both rings on two devices, a few minutes' worth
#: of the main job's shape in ~150 runs.
DEFAULT_SELECT = ["scenarios/rng", "scenarios/blk/test_blk.py"]
TARGET = 1.3
PHASES = ("setup", "call", "teardown")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s (setup|call|teardown)\s+(\S.*)$")
_SESSION = re.compile(r" in (\d+(?:\.\d+)?)s(?: \(|$)")
_COLLECTED = re.compile(r"(\d+) tests? collected in (\d+(?:\.\d+)?)s")


@dataclass
class Phases:
    """Per-phase totals from ``--durations=0`` lines: seconds and how many tests had each."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    tests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def mean_ms(self, phase: str) -> float:
        return self.seconds[phase] / self.tests[phase] * 1e3 if self.tests[phase] else 0.0


def parse_durations(text: str) -> Phases:
    """pytest's ``--durations=0 --durations-min=0`` report ("0.62s setup    node") summed per phase."""
    out = Phases()
    for line in text.splitlines():
        m = _DURATION.match(line.strip())
        if m:
            out.seconds[m.group(2)] += float(m.group(1))
            out.tests[m.group(2)] += 1
    return out


def parse_session_seconds(text: str) -> float | None:
    """The pytest session's own time from its final line ("28 passed, 2 skipped in 15.83s")."""
    for line in reversed(text.splitlines()):
        if ("passed" in line or "failed" in line or "skipped" in line or "error" in line) and (
            m := _SESSION.search(line)
        ):
            return float(m.group(1))
    return None


def parse_collected(text: str) -> tuple[int, float] | None:
    """``pytest --collect-only -q``'s "217 tests collected in 2.86s"."""
    m = _COLLECTED.search(text)
    return (int(m.group(1)), float(m.group(2))) if m else None


def junit_runs(xml_text: str) -> tuple[int, int]:
    """(tests that ran, so started their QEMU; tests in all) from a junit XML: a skipped test
    started nothing, an xfailed one (junit's skipped type="pytest.xfail") did run."""
    root = ET.fromstring(xml_text)
    ran = total = 0
    for case in root.iter("testcase"):
        total += 1
        skipped = case.find("skipped")
        if skipped is None or skipped.get("type") == "pytest.xfail":
            ran += 1
    return ran, total


def bare_specs(qemu: str | None) -> list[MachineSpec]:
    """The argv kinds of the default selection: an rng and a blk (null backend) machine."""
    rng = MachineSpec(qemu=qemu)
    rng.add_virtio("virtio-rng-pci", mode="modern")
    blk = MachineSpec(qemu=qemu)
    blk.add_virtio("virtio-blk-pci", mode="modern", backend="null")
    return [rng, blk]


def bare_parallel(qemu: str | None, runs: int, workers: int) -> float:
    """Wall seconds of ``runs`` bare starts (start-to-ready + kill, the argv kinds alternating)
    on ``workers`` threads, each starting its next QEMU as soon as its last is killed: the
    floor as a run instead of as arithmetic. On a machine whose cores are fewer than a bare
    start's threads need, it is above ``runs x bare / workers``: that part of the figure no
    test harness can win back."""
    specs = bare_specs(qemu)
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda i: Bare(specs[i % len(specs)]).close(), range(runs)))
    return time.perf_counter() - t


def bare_batch(qemu: str | None, n: int) -> float:
    """Median seconds of ``n`` bare starts (start-to-ready + kill), alternating the argv kinds."""
    specs = bare_specs(qemu)
    times = []
    for i in range(n):
        t = time.perf_counter()
        Bare(specs[i % len(specs)]).close()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass
class SuiteRound:
    wall: float
    code: int
    ran: int
    total: int
    session: float | None
    phases: Phases


def split_run_args(extra: list[str]) -> tuple[list[str], list[str]]:
    """Arguments for ``qtest-virtio run`` and the pytest arguments after its own ``--``."""
    if "--" in extra:
        i = extra.index("--")
        return extra[:i], extra[i + 1 :]
    return extra, []


def run_suite(args: argparse.Namespace, workdir: str, index: int) -> SuiteRound:
    junit = os.path.join(workdir, f"junit-{index}.xml")
    run_args, pytest_args = split_run_args(args.run_args)
    cmd = [sys.executable, "-m", "qtest_virtio.app.cli", "run", "-n", args.jobs, *args.select, *run_args]
    if args.qemu:
        cmd.append(f"--qemu={args.qemu}")
    cmd += ["--", *pytest_args, "--durations=0", "--durations-min=0", f"--junitxml={junit}"]
    cmd += ["-o", "junit_duration_report=total"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if res.returncode not in (0, 1):
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-2000:])
        why = "fix the selection or the binary"
        print(f"bench_suite: qtest-virtio run exited {res.returncode}: {why}", file=sys.stderr)
        sys.exit(res.returncode)
    with open(junit) as f:
        ran, total = junit_runs(f.read())
    return SuiteRound(wall, res.returncode, ran, total, parse_session_seconds(res.stdout), parse_durations(res.stdout))


def collect_only(args: argparse.Namespace) -> tuple[float, int, float]:
    """(wall seconds, tests, pytest's own collection seconds) of ``pytest --collect-only -q``
    on the selection, with the options ``qtest-virtio run`` passes (one process, no workers)."""
    binary = QemuBinary.get(args.qemu)
    options = [*args.select, f"--qemu={binary.path}", "-p", "no:cacheprovider", "-p", "no:benchmark"]
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", *pytest_args_for_run(options)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    found = parse_collected(res.stdout)
    if res.returncode != 0 or found is None:
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-2000:])
        print(f"bench_suite: pytest --collect-only exited {res.returncode}", file=sys.stderr)
        sys.exit(rounds.EXIT_USAGE)
    return wall, found[0], found[1]


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rounds.add_arguments(ap, rounds=rounds.MIN_ROUNDS)
    ap.add_argument("--jobs", default="2", help="workers for qtest-virtio run (default 2)")
    ap.add_argument(
        "--select",
        action="append",
        metavar="TARGET",
        help=f"test files, dirs or node ids (repeatable; default {' '.join(DEFAULT_SELECT)})",
    )
    ap.add_argument("--bare-starts", type=int, default=10, help="bare QEMU starts per round (default 10)")
    ap.add_argument("--collect-runs", type=int, default=3, help="pytest --collect-only runs (default 3)")
    args = ap.parse_args(argv)
    args.run_args = extra
    args.select = args.select or DEFAULT_SELECT
    rounds.check_rounds(args.rounds, args.repeats)
    if not args.jobs.isdigit() or int(args.jobs) < 1:
        print(f"--jobs {args.jobs}: give a number of workers, e.g. --jobs 2", file=sys.stderr)
        return rounds.EXIT_USAGE
    workers = int(args.jobs)
    load = rounds.Load()
    binary = QemuBinary.get(args.qemu)
    _ = binary.has_qtest_accel
    suite_rounds: list[SuiteRound] = []
    with tempfile.TemporaryDirectory(prefix="qtest-virtio-bench-suite-") as workdir:

        def suite() -> float:
            r = run_suite(args, workdir, len(suite_rounds))
            suite_rounds.append(r)
            return r.wall

        #: Per raw batch: (one bare start's median seconds, the same runs' wall on the workers).
        raws: list[tuple[float, float]] = []

        def raw() -> float:
            one = bare_batch(args.qemu, args.bare_starts)
            runs = suite_rounds[-1].ran if suite_rounds else args.bare_starts * workers
            raws.append((one, bare_parallel(args.qemu, runs, workers)))
            return one

        bare, walls = rounds.interleave(raw, suite, args.rounds, repeats=args.repeats)
        measured = suite_rounds[args.repeats :]  # the warm-up round's runs are not counted
        parallel = [p for _, p in raws[args.repeats :]]
        collects = [collect_only(args) for _ in range(args.collect_runs)]
    if len({r.ran for r in measured}) != 1:
        print(f"note: the number of runs changed between rounds: {[r.ran for r in measured]}")
    floors = [measured[-1].ran * b / workers for b in bare]
    figure = rounds.Figure("suite wall / floor", tuple(floors), tuple(walls), TARGET)
    if args.repeats == 1:  # one parallel run per round: the rounds pair up
        figures = [
            figure,
            rounds.Figure(f"bare starts on {workers} workers / floor", tuple(floors), tuple(parallel)),
            rounds.Figure(f"suite wall / bare starts on {workers} workers", tuple(parallel), tuple(walls)),
        ]
    else:
        figures = [figure]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    ran = measured[-1].ran
    bare_ms = med(bare) * 1e3
    sessions = [r.session for r in measured if r.session is not None]
    phase_sum = {p: med([r.phases.seconds[p] for r in measured]) for p in PHASES}
    phase_mean = {p: med([r.phases.mean_ms(p) for r in measured]) for p in PHASES}
    overhead: dict[str, Any] = {
        "selection": args.select,
        "workers": workers,
        "runs": ran,
        "tests": measured[-1].total,
        "exit_codes": [r.code for r in measured],
        "bare_start_ms": bare_ms,
        "floor_s": med(floors),
        "bare_parallel_s": med(parallel),
        "wall_s": med(walls),
        "pytest_session_s": med(sessions) if sessions else None,
        "outside_session_s": med(walls) - med(sessions) if sessions else None,
        "session_beyond_tests_s": med(sessions) - sum(phase_sum.values()) / workers if sessions else None,
        "phase_total_s": phase_sum,
        "phase_mean_ms": phase_mean,
        "setup_beyond_bare_start_ms": phase_mean["setup"] - bare_ms,
        "collect_only_wall_s": med([c[0] for c in collects]),
        "collect_only_tests": collects[0][1],
        "collect_only_pytest_s": med([c[2] for c in collects]),
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
    }
    rounds.report(
        figures,
        qemu=binary.identity,
        load=load,
        rounds=args.rounds,
        repeats=args.repeats,
        path=args.json,
        extra=overhead,
    )
    o = overhead
    print(f"selection: {' '.join(args.select)}; {ran} runs of {o['tests']} tests on {workers} workers")
    print(f"  suite wall {o['wall_s']:.1f} s; floor {o['floor_s']:.1f} s = {ran} x bare {bare_ms:.1f} ms / {workers}")
    print(f"  the same {ran} bare starts run on {workers} workers: {o['bare_parallel_s']:.1f} s")
    if sessions:
        print(
            f"  pytest session {o['pytest_session_s']:.1f} s; before and after it (interpreter, binary probe, "
            f"summary) {o['outside_session_s']:.1f} s; in the session but outside every test's setup, call "
            f"and teardown (worker start-up, collection, reporting) {o['session_beyond_tests_s']:.1f} s"
        )
    print(
        "  per test (median of rounds): "
        + ", ".join(f"{p} {phase_mean[p]:.1f} ms" for p in PHASES)
        + f"; setup beyond a bare start {o['setup_beyond_bare_start_ms']:.1f} ms"
    )
    print(
        "  summed over the run: "
        + ", ".join(f"{p} {phase_sum[p]:.1f} s" for p in PHASES)
        + f" (/ {workers} workers = {sum(phase_sum.values()) / workers:.1f} s)"
    )
    print(
        f"  collection alone: pytest --collect-only -q {o['collect_only_wall_s']:.2f} s wall, "
        f"of which collecting {o['collect_only_pytest_s']:.2f} s ({o['collect_only_tests']} tests)"
    )
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print(
            "  note: PYTHONDONTWRITEBYTECODE is set: without .pyc files on disk every interpreter (and each "
            "worker) compiles its imports and pytest's assertion rewriting again"
        )
    if any(o["exit_codes"]):
        print(f"  note: the suite failed in some rounds (exit codes {o['exit_codes']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
