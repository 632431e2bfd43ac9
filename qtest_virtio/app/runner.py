"""Running the scenario suite in-process for ``qtest-virtio run`` and ``conformance``: pytest
with a result collector, a summary table (device x transport x flags) and the conformance
matrix. Works under ``-n`` (xdist): everything it needs travels in the reports'
``user_properties``, which the plugin fills at collection and setup.

Application layer: the one part of qtest_virtio that imports pytest (tests/test_layers.py).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

OUTCOME_ORDER = ("failed", "error", "xpassed", "passed", "xfailed", "skipped")


@dataclass
class TestResult:
    nodeid: str
    outcome: str = "passed"
    props: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    duration: float = 0.0

    @property
    def base(self) -> str:
        """The test without its parameters: one scenario of the conformance matrix."""
        return self.nodeid.split("[", 1)[0]


class ResultCollector:
    """A pytest plugin object recording one final outcome per test."""

    def __init__(self) -> None:
        self.results: dict[str, TestResult] = {}
        self.started = time.monotonic()
        self.wall = 0.0

    def _result(self, report: pytest.TestReport) -> TestResult:
        res = self.results.setdefault(report.nodeid, TestResult(report.nodeid))
        res.props.update({k: str(v) for k, v in report.user_properties})
        res.duration += report.duration
        return res

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        res = self._result(report)
        if report.when == "setup" and report.skipped:
            res.outcome = "skipped"
            res.reason = _skip_reason(report)
        elif report.failed:
            if res.outcome not in ("failed", "error"):  # a strict XPASS lands here: pytest fails it
                res.outcome = "error" if report.when != "call" else "failed"
                res.reason = str(report.longrepr).strip().splitlines()[-1][:200] if report.longrepr else ""
        elif report.when == "call" and report.passed and hasattr(report, "wasxfail"):
            res.outcome = "xpassed"  # a non-strict xfail that passed: listed, not fatal
            res.reason = str(report.wasxfail)
        elif report.when == "call" and report.skipped and hasattr(report, "wasxfail"):
            res.outcome = "xfailed"
            res.reason = str(report.wasxfail)
        elif report.when == "call" and report.skipped:
            res.outcome = "skipped"
            res.reason = _skip_reason(report)

    def pytest_sessionfinish(self) -> None:
        self.wall = time.monotonic() - self.started

    # -- summaries --------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOME_ORDER, 0)
        for r in self.results.values():
            out[r.outcome] += 1
        return out

    def summary_table(self, title: str = "") -> str:
        """Counts per device x transport x flags (flags include packed=on for packed rings),
        under ``title`` (the binary, its version and accelerator) when one is given."""
        rows: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOME_ORDER, 0))
        for r in self.results.values():
            device = r.props.get("virtio_device") or ("(reproducers)" if "reproducer_outcome" in r.props else "(other)")
            transport = r.props.get("virtio_transport", "-")
            flags = r.props.get("virtio_id_flags", "")
            if r.props.get("virtio_refuse_each"):
                flags = ",".join(filter(None, (flags, "refuse=each one")))
            flags = flags or "-"
            rows[(device, transport, flags)][r.outcome] += 1
        cols = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        header = f"{'device':22} {'transport':20} {'flags':22} " + " ".join(f"{c:>7}" for c in cols)
        lines = [title] if title else []
        lines += [header, "-" * len(header)]
        order = {"-": 0, "legacy": 1, "transitional-legacy": 2, "transitional-modern": 3, "modern": 4}
        for (device, transport, flags), c in sorted(
            rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][2])
        ):
            lines.append(f"{device:22} {transport:20} {flags:22} " + " ".join(f"{c[k]:>7}" for k in cols))
        total = self.counts()
        lines.append("-" * len(header))
        lines.append(f"{'total':22} {'':20} {'':22} " + " ".join(f"{total[k]:>7}" for k in cols))
        lines.append(f"wall time {self.wall:.1f} s, {len(self.results)} tests")
        lines += self.deviation_lines()
        return "\n".join(lines)

    def deviations(self) -> dict[str, dict[str, Any]]:
        """Per deviation-table entry that applied to some test of this run: its status on this
        binary and the outcomes of its runs."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.results.values():
            dev = r.props.get("deviation")
            if not dev:
                continue
            entry = out.setdefault(dev, {"status": r.props.get("deviation_status", ""), "outcomes": Counter()})
            entry["outcomes"][r.outcome] += 1
            if r.outcome == "failed" and r.reason.startswith("[XPASS(strict)]"):
                entry["outcomes"]["xpassed-strict"] += 1
        return out

    def deviation_lines(self) -> list[str]:
        """ "deviations: N seen (M verified on this version), K possibly fixed", then one line per
        possibly fixed entry (an XPASS: the scenario passed where the table expects QEMU to fail)."""
        devs = self.deviations()
        if not devs:
            return []
        seen = sorted(d for d, e in devs.items() if e["outcomes"]["xfailed"])
        verified = [d for d in seen if devs[d]["status"] == "verified"]
        fixed = sorted(d for d, e in devs.items() if e["outcomes"]["xpassed"] or e["outcomes"]["xpassed-strict"])
        claim_nothing = sorted(d for d, e in devs.items() if e["status"] in ("fixed", "not yet"))
        lines = [
            f"deviations: {len(seen)} seen ({len(verified)} verified on this version, "
            f"{len(seen) - len(verified)} not verified), {len(fixed)} possibly fixed"
            + (f"; {len(claim_nothing)} fixed or not yet in this version (must pass)" if claim_nothing else "")
        ]
        for dev in fixed:
            o = devs[dev]["outcomes"]
            passed = o["xpassed"] + o["xpassed-strict"]
            lines.append(
                f"  possibly fixed in this QEMU: verify and update the table: {dev} "
                f"({passed} of {sum(o.values()) - o['xpassed-strict']} runs passed)"
            )
        return lines

    def conformance_rows(self) -> list[dict[str, Any]]:
        """One row per conformance requirement: id, spec section, scenario, results."""
        by_id: dict[str, list[TestResult]] = defaultdict(list)
        for r in self.results.values():
            if "conformance" in r.props:
                by_id[r.props["conformance"]].append(r)
        rows = []
        for cid in sorted(by_id):
            results = by_id[cid]
            counts = dict.fromkeys(OUTCOME_ORDER, 0)
            for r in results:
                counts[r.outcome] += 1
            rows.append(
                {
                    "id": cid,
                    "spec": results[0].props.get("spec", ""),
                    # every scenario that checks it, sorted: the row must not depend on which
                    # xdist worker reported first
                    "scenario": ", ".join(sorted({r.base for r in results})),
                    "counts": counts,
                    "runs": len(results),
                    "reasons": sorted({r.reason for r in results if r.reason and r.outcome != "passed"}),
                    "failed_in": sorted(
                        {r.props.get("virtio_transport", "") for r in results if r.outcome in ("failed", "error")}
                    ),
                }
            )
        return rows


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


#: Plugins of the environment that the scenario suite does not use and that cost every run:
#: hypothesis's pytest plugin imports all of hypothesis for its terminal summary (about a
#: second without .pyc files; the fuzz scenarios drive hypothesis themselves, without it). Kept
#: when the arguments name one of its options (``--hypothesis-seed``) or enable it (``-p``).
UNUSED_PLUGINS = {"hypothesispytest": "--hypothesis"}


def pytest_args_for_run(args: Sequence[str]) -> list[str]:
    """``args`` with the unused plugins blocked (``-p no:NAME``), unless the arguments use them."""
    out = list(args)
    for name, option_prefix in UNUSED_PLUGINS.items():
        if any(a.startswith(option_prefix) or a.endswith(name) for a in out):
            continue
        out += ["-p", f"no:{name}"]
    return out


def run_pytest(args: Sequence[str]) -> tuple[int, ResultCollector]:
    """pytest.main in this process with the collector; returns pytest's exit code."""
    collector = ResultCollector()
    code = pytest.main(pytest_args_for_run(args), plugins=[collector])
    return int(code), collector


def conformance_markdown(collector: ResultCollector, *, qemu: str, command: str) -> str:
    """scenarios/CONFORMANCE.md: generated from the markers and one run, never by hand."""

    def result(row: dict[str, Any]) -> str:
        c = row["counts"]
        n = row["runs"]
        if c["failed"] or c["error"]:
            bad = c["failed"] + c["error"]
            where = f" ({', '.join(row['failed_in'])})" if row["failed_in"] else ""
            return f"FAIL {bad}/{n}{where}"
        if c["xpassed"]:
            return f"possibly fixed {c['xpassed']}/{n}: verify and update the deviation table"
        if c["xfailed"]:
            return f"deviation {c['xfailed']}/{n}: {'; '.join(row['reasons'])[:160]}"
        if c["passed"] == 0:
            return f"skipped: {'; '.join(row['reasons'])[:160]}"
        skipped = f", {c['skipped']} skipped" if c["skipped"] else ""
        return f"pass {c['passed']}/{n}{skipped}"

    rows = collector.conformance_rows()
    lines = [
        "# Conformance matrix",
        "",
        "Generated by `qtest-virtio conformance` from the `@pytest.mark.conformance(id, spec=...)` markers of",
        "the scenarios and one run of them; do not edit by hand. A requirement runs once per transport mode",
        "and ring layout that applies (columns count those runs). 'deviation' rows are entries of the",
        "deviation table (`qtest_virtio/deviations.py`): the scenario asserts the spec, QEMU does",
        "otherwise, and the reason says how strong the requirement is (MUST, SHOULD, note, descriptive text).",
        "",
        f"- QEMU: {qemu}",
        f"- command: `{command}`",
        f"- requirements: {len(rows)}; runs: {sum(r['runs'] for r in rows)}; "
        f"failing requirements: {sum(1 for r in rows if result(r).startswith('FAIL'))}",
        "",
        "| id | spec | scenario | result |",
        "|---|---|---|---|",
    ]
    for row in rows:
        scenario = row["scenario"].replace(os.sep, "/")
        lines.append(f"| `{row['id']}` | {row['spec']} | `{scenario}` | {result(row)} |")
    return "\n".join(lines) + "\n"
