#!/usr/bin/env python3
"""The whole matrix: wall time of the scenario suite against its irreducible cost.

Every scenario run starts its own QEMU, so the floor is N x (a bare QEMU started with the same
kind of argv until its first qtest reply, then killed) / workers. Both are measured in this run;
the ratio says how much the harness and the scenarios themselves add on top of QEMU start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench_qtest import Bare

from qtest_virtio import MachineSpec


def bare_cycle(qemu: str | None) -> float:
    spec = MachineSpec(qemu=qemu)
    spec.add_virtio("virtio-rng-pci", mode="modern")
    t = time.perf_counter()
    b = Bare(spec)
    b.close()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", default=None)
    ap.add_argument("--jobs", default="2")
    ap.add_argument("--json", default=None)
    ap.add_argument("run_args", nargs="*", help="extra arguments for qtest-virtio run (e.g. --no-refuse-each)")
    args = ap.parse_args()

    cycles = [bare_cycle(args.qemu) for _ in range(20)]
    bare = statistics.median(cycles)
    cmd = [sys.executable, "-m", "qtest_virtio.app.cli", "run", "-n", args.jobs, *args.run_args]
    if args.qemu:
        cmd.append(f"--qemu={args.qemu}")
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    summary = [line for line in res.stdout.splitlines() if line.startswith("wall time")]
    tests = int(summary[0].split(",")[1].split()[0]) if summary else 0
    workers = int(args.jobs) if args.jobs.isdigit() else 1
    floor = tests * bare / workers
    print(f"suite: {tests} runs in {wall:.1f} s with {workers} workers (exit {res.returncode})")
    print(f"bare QEMU start-to-ready + kill: {bare * 1e3:.1f} ms (median of 20)")
    print(f"floor = runs x bare / workers = {floor:.1f} s; ratio suite/floor = {wall / floor:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            figures = {"runs": tests, "wall_s": wall, "bare_ms": bare * 1e3, "floor_s": floor, "ratio": wall / floor}
            json.dump(figures, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
