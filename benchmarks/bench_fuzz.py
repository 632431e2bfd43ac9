#!/usr/bin/env python3
"""Fuzz throughput: examples per second with a fresh QEMU per example against one QEMU process
reused across examples (``qtest_virtio.fuzz.reuse``), and the find rate on known bugs.

- throughput: per device, every round runs the same ``--seeds`` seeded runs (seeds 0, 1, ...)
  fresh and reused, interleaved per seed (which goes first alternates by round), so the rounds
  measure the same examples and differ by timing alone; a round's ratio is its reused
  examples per second over its fresh ones (examples and seconds summed over the seeds), and the
  figure is the median of the per-round ratios with its min-max spread;
- find rate: per known bug (a kept reproducer's target), examples and seconds until the first
  find, fresh and reused, same seeds, and whether the find's signature is the kept one's.

Target (issue 16): at least 5x on virtio-blk, the known finds found at least as fast. A spread
over 15% of the median prints no verdict. Stdlib timing only. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from qtest_virtio.binary import QemuBinary
from qtest_virtio.fuzz import FuzzConfig, fuzz_target, known_signatures, signature
from qtest_virtio.fuzz.reuse import ReuseStats, Session

SPREAD_LIMIT = 0.15
#: Targets whose known bugs a campaign must rediscover (scenarios/reproducers): device, mode, ring.
FIND_TARGETS = (
    ("virtio-blk-pci", "modern", "packed"),
    ("virtio-rng-pci", "modern", "packed"),
)


class _Everything:
    """``known`` for fuzz_target that holds every signature: a failure ends the run unshrunk."""

    def __contains__(self, item: object) -> bool:
        return True


def run(
    config: FuzzConfig, *, reuse: bool, examples: int, seed: int, spare: bool = True
) -> tuple[int, float, Any, ReuseStats]:
    """(examples run, seconds, the failure or None, reuse stats) of one seeded fuzz_target."""
    session = Session(config, spare=spare) if reuse else None
    started = time.perf_counter()
    try:
        report = fuzz_target(config, max_examples=examples, seed=seed, known=_Everything(), session=session)
    finally:
        if session is not None:
            session.close()
    seconds = time.perf_counter() - started
    return report.examples, seconds, report.failure, session.stats if session is not None else ReuseStats()


def spread(ratios: list[float]) -> tuple[float, float, float, bool]:
    med = statistics.median(ratios)
    lo, hi = min(ratios), max(ratios)
    return med, lo, hi, (hi - lo) / med > SPREAD_LIMIT


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", default=os.environ.get("QEMU"), help="QEMU binary (a build with the qtest accelerator)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--examples", type=int, default=60, help="examples per run (a session: its start and close are counted)"
    )
    ap.add_argument(
        "--seeds", type=int, default=3, help="seeded runs per round, the same in every round (a seed's content varies)"
    )
    ap.add_argument("--mode", default="modern")
    ap.add_argument("--device", action="append", default=[], help="default: virtio-blk-pci, virtio-rng-pci")
    ap.add_argument("--find-examples", type=int, default=300, help="budget per run in the find-rate part")
    ap.add_argument("--find-seeds", type=int, default=3, help="seeds per known bug in the find-rate part")
    ap.add_argument("--known", default="scenarios/reproducers")
    ap.add_argument("--no-spare", action="store_true", help="reused sessions restart without a spare process")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    binary = QemuBinary.get(args.qemu)
    print(f"binary: {binary.identity}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    out: dict[str, Any] = {
        "binary": binary.identity,
        "spare": not args.no_spare,
        "seeds": args.seeds,
        "examples_per_run": args.examples,
        "load_start": os.getloadavg()[0],
        "throughput": {},
        "finds": [],
    }
    devices = args.device or ["virtio-blk-pci", "virtio-rng-pci"]
    for device in devices:
        config = FuzzConfig(device, args.mode, "split", binary.path)
        # unrecorded warm-up: hypothesis scans the local modules' source for constants once per
        # interpreter (about 1 s), which would otherwise land on the first round's first side
        for reuse in (False, True):
            run(config, reuse=reuse, examples=3, seed=1000, spare=not args.no_spare)
        ratios: list[float] = []
        rates: dict[str, list[float]] = {"fresh": [], "reused": []}
        processes: list[int] = []
        spares: list[int] = []
        waits: list[float] = []
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            examples = {False: 0, True: 0}
            seconds = {False: 0.0, True: 0.0}
            procs = used = 0
            waited = 0.0
            for seed in range(args.seeds):
                for reuse in order:
                    n, took, _, stats = run(
                        config, reuse=reuse, examples=args.examples, seed=seed, spare=not args.no_spare
                    )
                    examples[reuse] += n
                    seconds[reuse] += took
                    if reuse:
                        procs += stats.processes
                        used += stats.spares_used
                        waited += stats.spare_wait_seconds
            figures = {reuse: examples[reuse] / seconds[reuse] for reuse in (False, True)}
            rates["fresh"].append(figures[False])
            rates["reused"].append(figures[True])
            processes.append(procs)
            spares.append(used)
            waits.append(round(waited, 3))
            ratios.append(figures[True] / figures[False])
            print(
                f"  {device} round {r}: fresh {figures[False]:.1f}/s, reused {figures[True]:.1f}/s "
                f"({processes[-1]} processes, {spares[-1]} spares, waited {waits[-1]:.2f} s for them), "
                f"ratio {ratios[-1]:.2f}; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        med, lo, hi, wide = spread(ratios)
        verdict = "spread > 15%: no verdict" if wide else ("meets 5x" if med >= 5 else "below 5x")
        print(
            f"{device} ({args.mode}, split): fresh {statistics.median(rates['fresh']):.1f} examples/s, reused "
            f"{statistics.median(rates['reused']):.1f} examples/s; ratio median {med:.2f} (min {lo:.2f}, max {hi:.2f}) "
            f"over {args.rounds} rounds of seeds 0-{args.seeds - 1}: {verdict}",
            flush=True,
        )
        out["throughput"][device] = {
            "fresh_per_s": rates["fresh"],
            "reused_per_s": rates["reused"],
            "ratio_median": med,
            "ratio_min": lo,
            "ratio_max": hi,
            "processes": processes,
            "spares_used": spares,
            "spare_wait_seconds": waits,
        }
    known = known_signatures(args.known, binary.version) if os.path.isdir(args.known) else {}
    for device, mode, ring in FIND_TARGETS:
        config = FuzzConfig(device, mode, ring, binary.path)
        for seed in range(args.find_seeds):
            row: dict[str, Any] = {"target": config.name, "seed": seed}
            for reuse in (False, True):
                n, seconds, failure, _ = run(config, reuse=reuse, examples=args.find_examples, seed=seed)
                sig = signature(failure) if failure is not None else None
                row["reused" if reuse else "fresh"] = {
                    "examples": n,
                    "seconds": round(seconds, 2),
                    "signature": sig,
                    "known_as": os.path.basename(known[sig]) if sig in known else None,
                }
            print(f"  find {row}", flush=True)
            out["finds"].append(row)
    for row in out["finds"]:
        f, r = row["fresh"], row["reused"]
        same = f["signature"] == r["signature"]
        print(
            f"{row['target']} seed {row['seed']}: "
            f"fresh {f['examples']} ex / {f['seconds']} s -> {f['known_as'] or f['signature']}; "
            f"reused {r['examples']} ex / {r['seconds']} s -> {r['known_as'] or r['signature']}"
            + ("" if same else "  (different finds)")
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    out["load_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
