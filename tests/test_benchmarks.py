"""benchmarks/: the interleaved-rounds logic on plain numbers, the suite benchmark's parsers on
pytest's own output, and the scripts run in a tiny configuration against real QEMU (their JSON
carries per-round ratios, spreads, rounds and a verdict or null). No timing is asserted."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qtest_virtio.binary import QemuBinary

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    """A benchmark module by name (benchmarks/ is scripts that import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


rounds = load("rounds")


# -- rounds.py: pure logic ---------------------------------------------------------------------


def test_ratio_is_measured_over_raw_per_round() -> None:
    assert rounds.ratios([2.0, 4.0, 5.0], [3.0, 4.0, 10.0]) == [1.5, 1.0, 2.0]


def test_ratios_refuse_unpaired_or_empty_rounds_and_a_zero_baseline() -> None:
    with pytest.raises(ValueError, match="2 raw rounds but 1 measured"):
        rounds.ratios([1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="no rounds"):
        rounds.ratios([], [])
    with pytest.raises(ValueError, match="positive"):
        rounds.ratios([1.0, 0.0], [1.0, 1.0])


def test_spread_is_max_minus_min_over_median() -> None:
    assert rounds.spread([1.0, 1.2, 1.1]) == pytest.approx(0.2 / 1.1)
    assert rounds.spread([2.0, 2.0, 2.0, 2.0, 2.0]) == 0.0
    # One outlier round moves the spread, not the median.
    assert rounds.spread([1.0, 1.0, 1.0, 1.0, 2.0]) == pytest.approx(1.0)


def test_verdict_only_within_the_spread_limit() -> None:
    assert rounds.verdict(1.2, 0.10, 1.3) == "meets target <= 1.3"
    assert rounds.verdict(1.4, 0.10, 1.3) == "misses target <= 1.3"
    assert rounds.verdict(1.3, 0.15, 1.3) == "meets target <= 1.3"  # the limit itself still judges
    assert rounds.verdict(1.2, 0.151, 1.3) is None
    assert rounds.verdict(9.9, 0.50, 1.3) is None  # a swinging figure cannot even say "misses"
    assert rounds.verdict(1.2, 0.0, None) is None


def test_interleave_alternates_which_side_goes_first_and_drops_the_warmup() -> None:
    calls: list[str] = []

    def side(name: str, values: list[float]) -> Callable[[], float]:
        def run() -> float:
            calls.append(name)
            return values.pop(0)

        return run

    raw, measured = rounds.interleave(
        side("raw", [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]), side("m", [99.0, 10.0, 20.0, 30.0, 40.0, 50.0]), 5
    )
    assert calls == ["raw", "m", "m", "raw", "raw", "m", "m", "raw", "raw", "m", "m", "raw"]
    assert raw == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert measured == [10.0, 20.0, 30.0, 40.0, 50.0]


def test_repeats_take_each_sides_median_batch_in_the_rounds_order() -> None:
    calls: list[str] = []
    # Three batches per side per round: the warm-up round's, then two recorded rounds'.
    raw_values = iter([5.0, 5.0, 5.0, 1.0, 9.0, 2.0, 3.0, 3.0, 100.0])
    measured_values = iter([5.0, 5.0, 5.0, 10.0, 90.0, 30.0, 1.0, 20.0, 20.0])

    def raw() -> float:
        calls.append("raw")
        return next(raw_values)

    def measured() -> float:
        calls.append("m")
        return next(measured_values)

    r, m = rounds.interleave(raw, measured, 2, warmup=1, repeats=3)
    # Round 0 (warm-up) raw first, round 1 measured first, round 2 raw first again.
    assert calls == ["raw", "m"] * 3 + ["m", "raw"] * 3 + ["raw", "m"] * 3
    assert r == [2.0, 3.0]  # one slow batch (9.0, 100.0) does not move its round
    assert m == [30.0, 20.0]
    with pytest.raises(ValueError, match="positive"):
        rounds.interleave(raw, measured, 2, repeats=0)


def test_figure_reports_median_spread_and_withholds_the_verdict_past_15_percent() -> None:
    steady = rounds.Figure("readl", (1.0,) * 5, (1.10, 1.12, 1.15, 1.13, 1.11), target=1.3)
    assert steady.median == pytest.approx(1.12)
    assert steady.spread == pytest.approx(0.05 / 1.12)
    assert steady.verdict == "meets target <= 1.3"
    assert steady.line().endswith(": meets target <= 1.3")
    swinging = rounds.Figure("write", (1.0,) * 5, (0.35, 0.94, 0.80, 0.90, 0.85), target=1.3)
    assert swinging.verdict is None
    assert "spread exceeds 15%: no verdict" in swinging.line()
    assert "meets" not in swinging.line() and "misses" not in swinging.line()
    doc = swinging.as_json()
    assert doc["rounds"] == 5 and doc["verdict"] is None and len(doc["ratios"]) == 5
    assert doc["spread"] == pytest.approx((0.94 - 0.35) / 0.85)


def test_fewer_than_five_rounds_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        rounds.check_rounds(4)
    assert exc.value.code == 128
    assert "at least 5 rounds" in capsys.readouterr().err
    rounds.check_rounds(5)


# -- bench_suite.py: parsing what pytest prints --------------------------------------------------

DURATIONS = """\
============================== slowest durations ===============================
0.62s setup    scenarios/rng/test_rng.py::test_a[virtio-rng-pci-legacy]
0.50s setup    scenarios/rng/test_rng.py::test_b[virtio-rng-pci-modern]
0.01s teardown scenarios/rng/test_rng.py::test_a[virtio-rng-pci-legacy]
0.00s call     scenarios/rng/test_rng.py::test_a[virtio-rng-pci-legacy]
0.03s call     scenarios/rng/test_rng.py::test_b[virtio-rng-pci-modern]
28 passed, 2 skipped in 15.83s
"""


def test_durations_are_summed_per_phase() -> None:
    bench_suite = load("bench_suite")
    phases = bench_suite.parse_durations(DURATIONS)
    assert phases.seconds == pytest.approx({"setup": 1.12, "call": 0.03, "teardown": 0.01})
    assert phases.tests == {"setup": 2, "call": 2, "teardown": 1}
    assert phases.mean_ms("setup") == pytest.approx(560.0)
    assert bench_suite.parse_session_seconds(DURATIONS) == 15.83
    assert bench_suite.parse_session_seconds("nothing here") is None
    assert bench_suite.parse_collected("foo\n217 tests collected in 2.86s\n") == (217, 2.86)


def test_junit_runs_count_xfails_as_run_and_skips_as_not() -> None:
    bench_suite = load("bench_suite")
    xml = (
        '<testsuites><testsuite tests="4">'
        '<testcase name="a" time="0.1"/>'
        '<testcase name="b" time="0.1"><skipped type="pytest.skip" message="no"/></testcase>'
        '<testcase name="c" time="0.1"><skipped type="pytest.xfail" message="deviation"/></testcase>'
        '<testcase name="d" time="0.1"><failure message="x"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert bench_suite.junit_runs(xml) == (3, 4)


def test_run_arguments_split_at_the_inner_double_dash() -> None:
    bench_suite = load("bench_suite")
    assert bench_suite.split_run_args(["--transport", "modern", "--", "-k", "packed"]) == (
        ["--transport", "modern"],
        ["-k", "packed"],
    )
    assert bench_suite.split_run_args(["--no-refuse-each"]) == (["--no-refuse-each"], [])


# -- the scripts against real QEMU ---------------------------------------------------------------


def run_script(name: str, qemu: QemuBinary, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--qemu", qemu.path, "--json", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "QEMU 7.2" in res.stdout and "load: " in res.stdout
    doc = json.loads(out.read_text())
    assert isinstance(doc, dict)
    return doc


def check_figures(doc: dict[str, Any], names: list[str], rounds_: int) -> None:
    assert doc["rounds"] == rounds_ and doc["repeats"] == 2
    assert set(doc["load"]) >= {"loadavg_before", "loadavg_after", "other_qemus_before"}
    assert sorted(doc["figures"]) == sorted(names)
    for name, fig in doc["figures"].items():
        assert fig["rounds"] == rounds_, name
        assert len(fig["ratios"]) == len(fig["raw"]) == len(fig["measured"]) == rounds_, name
        assert all(r > 0 for r in fig["ratios"]), name
        assert fig["ratios"] == pytest.approx([m / r for r, m in zip(fig["raw"], fig["measured"], strict=True)])
        assert fig["spread"] == pytest.approx(rounds.spread(fig["ratios"])), name
        assert "verdict" in fig, name
        if fig["target"] is None or fig["spread"] > rounds.SPREAD_LIMIT:
            assert fig["verdict"] is None, name
        else:
            assert fig["verdict"] in (f"meets target <= {fig['target']:g}", f"misses target <= {fig['target']:g}")


def test_bench_qtest_tiny_run_writes_ratios_spreads_and_verdicts(
    provided_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    doc = run_script(
        "bench_qtest",
        provided_qemu("system"),
        tmp_path,
        *["--rounds", "5", "--repeats", "2", "--ops", "20", "--bulk-mib", "1", "--starts", "1"],
    )
    names = [
        "readl latency (client/raw)",
        "readl, socket in timeout mode (raw/raw blocking)",
        "1 MiB write (client/raw)",
        "1 MiB read (client/raw)",
        "start-to-ready (machine/bare)",
    ]
    check_figures(doc, names, 5)
    assert doc["figures"]["readl latency (client/raw)"]["target"] == 1.3
    assert doc["figures"]["1 MiB write (client/raw)"]["target"] is None
    assert all(v > 0 for v in doc["absolute"].values())


def test_bench_virtqueue_counts_come_from_the_client(
    provided_qemu: Callable[[str], QemuBinary], tmp_path: Path
) -> None:
    row = "rng-modern-split-event_idx=on"
    doc = run_script(
        "bench_virtqueue",
        provided_qemu("system"),
        tmp_path,
        *["--rounds", "5", "--repeats", "2", "--requests", "4", "--ops", "10", "--row"],
        row,
    )
    check_figures(doc, [f"{row} one at a time (time/readl)", f"{row} full queue (time/readl)"], 5)
    counts = doc["counts"][row]
    # Init walks the PCI bus and the capabilities: at least one wait per command batch, never
    # more waits than commands; the split between PCI and driver adds up.
    assert 0 < counts["init_round_trips"] <= counts["init_commands"]
    assert counts["init_round_trips"] == counts["init_pci_round_trips"] + counts["init_driver_round_trips"]
    # A request one at a time waits at least once for its used entry; a full queue shares its waits.
    assert counts["single_round_trips_per_request"] >= 1
    assert counts["full_round_trips_per_request"] < counts["single_round_trips_per_request"]
    assert counts["queue_size"] > 1
    assert set(counts["verdicts"]) == {"init", "single"}
    # Empty polls are counted, not guessed: the net figure is what is left of the waits.
    for kind in ("single", "full"):
        net, empty = counts[f"{kind}_net_round_trips_per_request"], counts[f"{kind}_empty_polls_per_request"]
        assert empty >= 0 and 0 < net <= counts[f"{kind}_round_trips_per_request"]
    assert counts["single_net_round_trips_per_request"] == 2, counts


def test_bench_suite_bare_starts_in_parallel_use_every_worker_and_leave_nothing_behind(
    provided_qemu: Callable[[str], QemuBinary],
) -> None:
    bench_suite = load("bench_suite")
    qemu = provided_qemu("system").path
    started: list[int] = []
    alive: list[int] = []
    most = [0]
    init, close = bench_suite.Bare.__init__, bench_suite.Bare.close

    def counting_init(self: Any, spec: Any) -> None:
        alive.append(id(self))  # from before its Popen to after its reaping
        most[0] = max(most[0], len(alive))
        init(self, spec)
        started.append(self.proc.pid)

    def counting_close(self: Any) -> None:
        close(self)
        alive.remove(id(self))

    bench_suite.Bare.__init__, bench_suite.Bare.close = counting_init, counting_close
    try:
        wall = bench_suite.bare_parallel(qemu, 6, 2)
    finally:
        bench_suite.Bare.__init__, bench_suite.Bare.close = init, close
    assert wall > 0
    assert len(set(started)) == 6 and not alive
    assert most[0] == 2  # both workers had a QEMU up at once, never more
    for pid in started:  # every one killed and reaped
        assert not Path(f"/proc/{pid}").exists()


def test_bench_virtqueue_refuses_too_few_rounds(provided_qemu: Callable[[str], QemuBinary]) -> None:
    cmd = [sys.executable, str(BENCH / "bench_virtqueue.py"), "--qemu", provided_qemu("system").path, "--rounds", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 128
    assert res.stderr.strip() == "--rounds 3: at least 5 rounds are needed for a spread; pass --rounds 5 or more"


def test_table_usage_and_unreadable_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = load("table")
    assert table.main(["--help"]) == 0 and "usage: table.py" in capsys.readouterr().out
    assert table.main([]) == 128
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert table.main([str(bad)]) == 128
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"table.py: {bad}:") and "--json" in err[-1]
