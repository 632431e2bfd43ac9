"""The coverage tool (issue 14) on the real gcov build of 10.0.2: private counters from zero,
gcovr's per-file rows, and ``qtest-virtio run --coverage-build`` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.binary import QemuBinary
from qtest_virtio.coverage import DEFAULT_FILES, Counters, CoverageError, GcovBuild
from qtest_virtio.devices.rng.driver import VirtioRng

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gcov(provided_qemu) -> GcovBuild:  # type: ignore[no-untyped-def]
    binary: QemuBinary = provided_qemu("gcov-10.0.2")
    return GcovBuild.locate(binary.path)


def _run_rng(binary: Path, monkeypatch: pytest.MonkeyPatch, counters: Counters, reads: int) -> None:
    for key, value in counters.env().items():
        monkeypatch.setenv(key, value)
    spec = MachineSpec(qemu=str(binary))
    spec.add_virtio("virtio-rng-pci", mode="modern", id="rng0")
    with Machine(spec) as vm:
        rng = vm.virtio("rng0", VirtioRng)
        for _ in range(reads):
            assert len(rng.read(16)) == 16


def test_locate_reads_the_source_tree_from_meson(gcov: GcovBuild) -> None:
    assert (gcov.source / "hw/virtio/virtio.c").is_file()
    assert gcov.binary.is_file()
    assert GcovBuild.locate(gcov.binary) == gcov  # the binary names its tree too
    assert [n.name for n in gcov.notes("hw/virtio/virtio-rng.c")] == ["hw_virtio_virtio-rng.c.gcno"]


def test_a_build_without_gcov_is_refused_with_the_fix(provided_qemu) -> None:  # type: ignore[no-untyped-def]
    plain = Path(provided_qemu("src-newest").path).parent
    with pytest.raises(CoverageError, match=r"not a gcov build .*--enable-gcov"):
        GcovBuild.locate(plain)
    with pytest.raises(CoverageError, match="no such directory"):
        GcovBuild.locate(plain / "nowhere")


def test_unknown_source_file_is_named(gcov: GcovBuild) -> None:
    with pytest.raises(CoverageError, match=r"hw/virtio/nope\.c: no object"):
        gcov.notes("hw/virtio/nope.c")


def test_counters_start_from_zero_and_count_what_ran(
    gcov: GcovBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's counters are its own: nothing before it counts, the build tree's counters are not
    written, and what the driver did shows up in the device's file."""
    tree_counter = gcov.build / "libqemu-x86_64-softmmu.a.p" / "hw_virtio_virtio-rng.c.gcda"
    before = tree_counter.stat().st_mtime_ns if tree_counter.exists() else None
    counters = Counters(gcov, tmp_path / "counters")
    counters.reset()
    idle = counters.report(["hw/virtio/virtio-rng.c"]).by_file()["hw/virtio/virtio-rng.c"]
    assert idle.lines_total > 100 and idle.lines_covered == 0, "a fresh run has executed nothing"

    _run_rng(gcov.binary, monkeypatch, counters, reads=3)
    report = counters.report(["hw/virtio/virtio-rng.c", "hw/virtio/virtio-balloon.c"], html=tmp_path / "html")
    rng = report.by_file()["hw/virtio/virtio-rng.c"]
    assert rng.lines_total == idle.lines_total, "the denominator is the whole file"
    assert 0 < rng.lines_covered < rng.lines_total
    assert 0 < rng.branches_covered <= rng.branches_total
    assert "chr_read" not in rng.never_called, "entropy reached the guest through chr_read"
    balloon = report.by_file()["hw/virtio/virtio-balloon.c"]
    assert "balloon_stats_poll_cb" in balloon.never_called, "no balloon was started"
    assert report.html is not None and report.html.is_file()
    assert "virtio-rng.c" in report.html.read_text()
    after = tree_counter.stat().st_mtime_ns if tree_counter.exists() else None
    assert after == before, "the build tree's own counters were written"

    counters.reset()
    again = counters.report(["hw/virtio/virtio-rng.c"]).by_file()["hw/virtio/virtio-rng.c"]
    assert again.lines_covered == 0, "reset left counters behind"


def test_table_lists_every_file_and_a_total(gcov: GcovBuild, tmp_path: Path) -> None:
    counters = Counters(gcov, tmp_path)
    counters.reset()
    text = counters.report().table(title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["file", "lines", "branches", "functions"]
    assert [line.split()[0] for line in lines[2:]] == [*DEFAULT_FILES, "total"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtest_virtio.app.cli", *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_run_with_coverage_prints_the_table_and_writes_html(gcov: GcovBuild, tmp_path: Path) -> None:
    html = tmp_path / "report"
    done = _cli(
        "run",
        "--coverage-build",
        str(gcov.build),
        "--coverage-file",
        "hw/virtio/virtio-qmp.c",
        "--coverage-html",
        str(html),
        "-n",
        "1",
        "scenarios/rng/test_rng.py::test_request_is_filled_from_the_entropy_source",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith("QEMU 10.0.2 (" + str(gcov.binary))
    table = done.stdout.split("\ncoverage of QEMU 10.0.2", 1)[1].splitlines()
    rows = {line.split()[0]: line.split() for line in table if line.startswith(("hw/", "total"))}
    assert list(rows) == [*DEFAULT_FILES, "hw/virtio/virtio-qmp.c", "total"]
    rng_lines = rows["hw/virtio/virtio-rng.c"][1]
    covered, total = map(int, rng_lines.split("/"))
    assert 0 < covered < total
    assert (html / "index.html").is_file()
    assert f"html report: {html / 'index.html'}" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--coverage-html", "x"], "--coverage-html needs --coverage-build DIR"),
        (["--coverage-file", "hw/virtio/virtio.c"], "--coverage-file needs --coverage-build DIR"),
        (["--coverage-build", "/nonexistent"], "--coverage-build /nonexistent: no such directory"),
    ],
)
def test_coverage_usage_errors_are_one_line_and_128(args: list[str], message: str) -> None:
    done = _cli("run", *args, "scenarios/rng")
    assert done.returncode == 128
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qtest-virtio: error: {message}"), done.stderr


def test_coverage_of_another_binary_or_file_is_refused(gcov: GcovBuild) -> None:
    other = _cli("run", "--coverage-build", str(gcov.build), "--qemu", "/usr/bin/qemu-system-x86_64", "scenarios/rng")
    assert other.returncode == 128
    assert "is not the binary of --coverage-build" in other.stderr
    missing = _cli("run", "--coverage-build", str(gcov.build), "--coverage-file", "hw/virtio/nope.c", "scenarios/rng")
    assert missing.returncode == 128
    assert "hw/virtio/nope.c: no object" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
