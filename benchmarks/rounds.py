"""Interleaved rounds: the one way every benchmark here turns timings into a figure.

A figure on this shared 2-core machine is only worth something relative to a baseline taken at
the same moment: the raw baseline and the measured thing run alternately inside each round (raw
first in even rounds, measured first in odd ones, so drift hits both alike), each round gives a
ratio measured/raw, and the figure is the median ratio with its min-max spread,
(max - min) / median. A spread above 15% means the rounds disagree: the figure is printed with
that warning and without a verdict against its target.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Rounds whose ratios spread more than this (relative to their median) give no verdict.
SPREAD_LIMIT = 0.15
MIN_ROUNDS = 5
DEFAULT_ROUNDS = 7
#: The contract's exit code for a usage error (design.md).
EXIT_USAGE = 128


def ratios(raw: Sequence[float], measured: Sequence[float]) -> list[float]:
    """Per round, measured / raw (both costs: seconds, or anything where more is worse)."""
    if len(raw) != len(measured):
        raise ValueError(f"{len(raw)} raw rounds but {len(measured)} measured ones")
    if not raw:
        raise ValueError("no rounds")
    if any(r <= 0 for r in raw):
        raise ValueError(f"a raw baseline must be positive, not {min(raw)}")
    return [m / r for r, m in zip(raw, measured, strict=True)]


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far the rounds disagree, relative to the figure itself."""
    if not values:
        raise ValueError("no values")
    mid = statistics.median(values)
    if mid <= 0:
        raise ValueError(f"the median must be positive, not {mid}")
    return (max(values) - min(values)) / mid


def verdict(median: float, spread_: float, target: float | None) -> str | None:
    """'meets target <= X' or 'misses target <= X'; None without a target or when the rounds
    spread more than SPREAD_LIMIT (then the figure cannot decide anything)."""
    if target is None or spread_ > SPREAD_LIMIT:
        return None
    word = "meets" if median <= target else "misses"
    return f"{word} target <= {target:g}"


def round_order(index: int) -> tuple[str, str]:
    """Which side runs first in round ``index``: raw in even rounds, measured in odd ones."""
    return ("raw", "measured") if index % 2 == 0 else ("measured", "raw")


def interleave(
    raw: Callable[[], float], measured: Callable[[], float], rounds: int, *, warmup: int = 1, repeats: int = 1
) -> tuple[list[float], list[float]]:
    """Run ``raw`` and ``measured`` (each returns one batch's cost) alternately, ``rounds``
    times after ``warmup`` unrecorded rounds; returns the per-round costs of each. With
    ``repeats``, a round is that many raw/measured pairs (in the round's order) and each side's
    cost is the median of its batches: one hiccup of the scheduler no longer moves a round."""
    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds and repeats must be positive, not {rounds} and {repeats}")
    side = {"raw": raw, "measured": measured}
    got: dict[str, list[float]] = {"raw": [], "measured": []}
    for i in range(warmup + rounds):
        batches: dict[str, list[float]] = {"raw": [], "measured": []}
        for _ in range(repeats):
            for name in round_order(i):
                batches[name].append(side[name]())
        if i >= warmup:
            for name, values in batches.items():
                got[name].append(statistics.median(values))
    return got["raw"], got["measured"]


@dataclass(frozen=True)
class Figure:
    """One benchmark figure: the per-round costs of the raw baseline and the measured thing."""

    name: str
    raw: tuple[float, ...]
    measured: tuple[float, ...]
    #: The largest acceptable median ratio, or None (the figure is reported, not judged).
    target: float | None = None
    #: What one round's cost is (for the JSON and the absolute figures): "s", "s/op", ...
    unit: str = "s"

    @property
    def ratios(self) -> list[float]:
        return ratios(self.raw, self.measured)

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        return spread(self.ratios)

    @property
    def steady(self) -> bool:
        return self.spread <= SPREAD_LIMIT

    @property
    def verdict(self) -> str | None:
        return verdict(self.median, self.spread, self.target)

    def line(self) -> str:
        """The figure as printed: median ratio, range, spread, and the verdict or why none."""
        rs = self.ratios
        text = (
            f"{self.name}: median {self.median:.2f} [{min(rs):.2f}-{max(rs):.2f}], "
            f"spread {self.spread:.0%} over {len(rs)} rounds"
        )
        if not self.steady:
            target = f" (target <= {self.target:g})" if self.target is not None else ""
            return f"{text}; spread exceeds {SPREAD_LIMIT:.0%}: no verdict{target}"
        if self.verdict is not None:
            return text + f": {self.verdict}"
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "median": self.median,
            "spread": self.spread,
            "rounds": len(self.raw),
            "target": self.target,
            "verdict": self.verdict,
            "raw": list(self.raw),
            "measured": list(self.measured),
            "unit": self.unit,
        }


def measure(
    name: str,
    raw: Callable[[], float],
    measured: Callable[[], float],
    rounds: int,
    *,
    target: float | None = None,
    unit: str = "s",
    warmup: int = 1,
    repeats: int = 1,
) -> Figure:
    """:func:`interleave`, then the :class:`Figure` of it."""
    r, m = interleave(raw, measured, rounds, warmup=warmup, repeats=repeats)
    return Figure(name, tuple(r), tuple(m), target, unit)


# -- the command line and the report every benchmark shares -----------------------------------


def add_arguments(ap: argparse.ArgumentParser, *, rounds: int = DEFAULT_ROUNDS, repeats: int = 1) -> None:
    ap.add_argument("--qemu", default=None, help="QEMU binary (default: $QEMU or qemu-system-x86_64 on PATH)")
    ap.add_argument(
        "--rounds", type=int, default=rounds, help=f"interleaved rounds (at least {MIN_ROUNDS}; default {rounds})"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"raw/measured batch pairs per round, each side's median taken (default {repeats})",
    )
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")


def check_rounds(rounds: int, repeats: int = 1) -> None:
    """Fewer than MIN_ROUNDS rounds cannot show a spread worth the name: a usage error."""
    if repeats < 1:
        print(
            f"--repeats {repeats}: a round needs at least one batch per side; pass --repeats 1 or more", file=sys.stderr
        )
        sys.exit(EXIT_USAGE)
    if rounds < MIN_ROUNDS:
        print(
            f"--rounds {rounds}: at least {MIN_ROUNDS} rounds are needed for a spread; pass --rounds 5 or more",
            file=sys.stderr,
        )
        sys.exit(EXIT_USAGE)


def other_qemus() -> int:
    """QEMU processes on this machine that are not ours (other engineers' load), from /proc."""
    mine = os.getpid()
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        if comm.startswith("qemu-system") and ppid != mine:
            count += 1
    return count


@dataclass
class Load:
    """The machine's load when a run started and ended: a figure taken under load is noise."""

    loadavg_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    other_qemus_before: int = field(default_factory=other_qemus)
    loadavg_after: tuple[float, float, float] | None = None
    other_qemus_after: int | None = None

    def finish(self) -> None:
        self.loadavg_after = os.getloadavg()
        self.other_qemus_after = other_qemus()

    def line(self) -> str:
        after = self.loadavg_after or os.getloadavg()
        return (
            f"load: 1-min loadavg {self.loadavg_before[0]:.2f} before, {after[0]:.2f} after "
            f"on {os.cpu_count()} CPUs; other QEMU processes {self.other_qemus_before} before, "
            f"{self.other_qemus_after} after"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "cpus": os.cpu_count(),
            "loadavg_before": list(self.loadavg_before),
            "loadavg_after": list(self.loadavg_after) if self.loadavg_after else None,
            "other_qemus_before": self.other_qemus_before,
            "other_qemus_after": self.other_qemus_after,
        }


def report(
    figures: Sequence[Figure],
    *,
    qemu: str,
    load: Load,
    rounds: int,
    repeats: int,
    path: str | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Print every figure's line and the load; write the JSON when ``path`` is given."""
    load.finish()
    print(f"QEMU: {qemu}")
    print(load.line())
    for fig in figures:
        print(f"  {fig.line()}")
    if path:
        doc: dict[str, Any] = {
            "qemu": qemu,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "rounds": rounds,
            "repeats": repeats,
            "spread_limit": SPREAD_LIMIT,
            "load": load.as_json(),
            "figures": {fig.name: fig.as_json() for fig in figures},
            **(extra or {}),
        }
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
