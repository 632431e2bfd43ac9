#!/usr/bin/env python3
"""The README's tables from the benchmarks' JSON files (``--json``), so the table always shows
one run: each figure as its median ratio with the spread, and the virtqueue counts.

``python3 benchmarks/table.py bench-results-qtest.json bench-results-virtqueue.json ...``
"""

from __future__ import annotations

import json
import sys
from typing import Any


def figure_rows(doc: dict[str, Any]) -> list[str]:
    rows = []
    for name, fig in doc["figures"].items():
        rs = fig["ratios"]
        verdict = fig["verdict"]
        if verdict is None:
            verdict = "no verdict (spread > 15%)" if fig["spread"] > doc["spread_limit"] else "no target"
        rows.append(f"| {name} | {fig['median']:.2f} | {fig['spread']:.0%} ({min(rs):.2f}-{max(rs):.2f}) | {verdict} |")
    return rows


def header(doc: dict[str, Any]) -> str:
    load = doc["load"]
    return (
        f"{doc['qemu']}; {doc['date']}; {doc['rounds']} rounds; 1-min loadavg {load['loadavg_before'][0]:.2f} "
        f"before, {load['loadavg_after'][0]:.2f} after on {load['cpus']} CPUs; other QEMU processes "
        f"{load['other_qemus_before']} before, {load['other_qemus_after']} after"
    )


def count_rows(counts: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| row | init round trips (commands) | one at a time: rt (cmds) / request | full queue: rt (cmds) / request |",
        "|---|---|---|---|",
    ]
    for name, c in counts.items():
        lo, hi = c["single_round_trips_per_request_range"]
        rows.append(
            f"| {name} | {c['init_round_trips']} ({c['init_commands']}) | "
            f"{c['single_round_trips_per_request']:.2f} [{lo:.2f}-{hi:.2f}] ({c['single_commands_per_request']:.2f}) | "
            f"{c['full_round_trips_per_request']:.2f} ({c['full_commands_per_request']:.2f}) |"
        )
    return rows


USAGE = "usage: table.py FILE.json... (files the benchmarks wrote with --json)"


def main(paths: list[str]) -> int:
    if any(p in ("-h", "--help") for p in paths):
        print(USAGE)
        return 0
    if not paths:
        print(USAGE, file=sys.stderr)
        return 128
    docs = []
    for path in paths:
        try:
            with open(path) as f:
                docs.append((path, json.load(f)))
        except (OSError, ValueError) as exc:
            print(f"table.py: {path}: {exc}; give the files the benchmarks wrote with --json", file=sys.stderr)
            return 128
    print("| figure | median ratio | spread (min-max) | verdict |")
    print("|---|---|---|---|")
    for _, doc in docs:
        for row in figure_rows(doc):
            print(row)
    print()
    for path, doc in docs:
        print(f"- {path}: {header(doc)}")
    for _, doc in docs:
        if "counts" in doc:
            print()
            print("\n".join(count_rows(doc["counts"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
