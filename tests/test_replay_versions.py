"""Replay across binaries and folders, and the upstream bug report, on the binaries
scripts/qemu.sh provides: rows per file and binary, the combined exit code, accel=qtest kept on a
build that has the qtest accelerator, bad input, and the report's sections and facts."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import EXE

from qtest_virtio.binary import QemuBinary, QemuNotFound, cached_qemu
from qtest_virtio.outcome import Outcome
from qtest_virtio.report import PROVIDED, source_location
from qtest_virtio.reproducer import (
    ReplayResult,
    combined_exit_code,
    normalize_args,
    parse,
    replay,
    shell_words,
    tally,
    upstream_command,
)

pytestmark = pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed (pip install -e .)")
SUITE = Path(__file__).resolve().parent.parent / "scenarios" / "reproducers"
#: Aborts 7.2 (an assertion in memory_ldst_cached.h.inc); 10.0 and 10.2 survive it (README table).
QUEUE_SIZE = SUITE / "virtio-queue-size-rewritten-while-live-assert.qtest"
#: Aborts every provided version (address_space_cache_init: Assertion `len > 0').
ZERO_INDIRECT = SUITE / "virtio-packed-zero-length-indirect-assert.qtest"
#: Livelocks every provided version (no reply to line 440 within the file's 3 s).
ZERO_CHAIN = SUITE / "virtio-blk-packed-zero-length-chain-livelock.qtest"

ProvidedQemu = Callable[[str], QemuBinary]
SURVIVES = """\
cat << EOF | ./qemu-system-i386 -display none -machine accel=qtest, -m 512M \\
-qtest stdio
readl 0x100000
EOF
"""
# A crash on every provided version (a QEMU bug still there in 10.2.2).
CRASHES = ZERO_INDIRECT.read_text()
CANNOT_RUN = "# qemu-args: -M q35 -nodefaults -device no-such-device\nreadl 0\n"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert EXE
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def write(directory: Path, name: str, text: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return str(directory / name)


def rows(stdout: str) -> list[str]:
    """The table's data rows: after the header line, before the tally."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("reproducer "))
    return [line for line in lines[start + 1 :] if not re.match(r"\d+ reproducer\(s\) x ", line)]


# -- accel=qtest where it works ------------------------------------------------------------------


def test_normalize_keeps_qtest_accel_only_where_the_binary_has_it(provided_qemu: ProvidedQemu) -> None:
    args = ["-machine", "q35,accel=qtest", "-qtest", "stdio", "-m", "1G"]
    kept, notes = normalize_args(args, provided_qemu("src-newest"))
    assert kept == ["-machine", "q35,accel=qtest", "-m", "1G", "-display", "none"]
    assert not any("accel" in n for n in notes)
    dropped, notes = normalize_args(args, provided_qemu("system"))
    assert dropped == ["-machine", "q35", "-m", "1G", "-display", "none"]
    assert "dropped accel=qtest from -machine q35,accel=qtest" in notes
    assert any("no qtest accelerator" in n for n in notes)


@pytest.mark.parametrize("accel", ["-machine accel=qtest,", "-accel qtest"])
def test_replay_runs_the_reproducers_own_qtest_accel_on_the_source_build(
    provided_qemu: ProvidedQemu, accel: str
) -> None:
    """Kept as written, and really in use: clock_step exists only with the qtest accelerator."""
    rep = parse(f"# qemu-args: {accel} -M q35 -nodefaults\nclock_step 1000\nreadl 0x100000\n", "clock.qtest")
    replies: list[str] = []
    result = replay(rep, qemu=provided_qemu("src-newest").path, trace=True, echo=replies.append)
    assert result.outcome == "survived", result.detail
    assert re.search(r"->  OK \d+$", replies[0]), replies[0]
    assert accel in result.command_line and "-accel tcg" not in result.command_line
    assert result.command_line.count("qtest -") <= 2  # no second accelerator added beside it
    assert not any("dropped" in n for n in result.notes)
    on_72 = replay(rep, qemu=provided_qemu("system").path, trace=True, echo=replies.append)
    assert on_72.outcome == "survived" and "-accel tcg -S" in on_72.command_line
    assert replies[-2].endswith("FAIL Unknown command 'clock_step'")
    assert any("no qtest accelerator" in n for n in on_72.notes)


# -- rows per binary, folders, exit codes --------------------------------------------------------


def test_one_file_on_several_binaries_prints_a_row_per_binary(provided_qemu: ProvidedQemu) -> None:
    old, new = provided_qemu("system"), provided_qemu("src-newest")
    res = run("replay", str(QUEUE_SIZE), "--qemu", old.path, "--qemu", new.path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert old.identity in res.stdout and new.identity in res.stdout
    first, second = rows(res.stdout)
    assert first.startswith(str(QUEUE_SIZE)) and "7.2.22 (Debian " in first
    assert "crashed (signal 6)" in first and "address_space_stw_le_cached: Assertion `addr < cache->len" in first
    assert re.search(r"  10\.2\.2 +survived: \d+ commands replayed, QEMU alive$", second), second
    assert res.stdout.rstrip().endswith("1 reproducer(s) x 2 QEMU binaries: 1 survived, 1 crashed; exit 1")


def test_a_folder_prints_a_row_per_file_and_binary(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    folder = tmp_path / "repros"
    for name, text in (("a-ok.qtest", SURVIVES), ("b-crash.qtest", CRASHES), ("c-cannot.qtest", CANNOT_RUN)):
        write(folder, name, text)
    write(folder, "notes.txt", "not a reproducer, not a .qtest: ignored")
    qemus = [provided_qemu("system").path, provided_qemu("src-newest").path]
    res = run("replay", str(folder), "--qemu", qemus[0], "--qemu", qemus[1])
    table = rows(res.stdout)
    assert [r.split()[0] for r in table] == ["a-ok.qtest"] * 2 + ["b-crash.qtest"] * 2 + ["c-cannot.qtest"] * 2
    assert [r.split("  ")[-1].split(":")[0].split(" (")[0] for r in table] == [
        "survived",
        "survived",
        "crashed",
        "crashed",
        "cannot run here",
        "cannot run here",
    ]
    assert all("no-such-device" in r for r in table[4:])
    # A reproduced crash wins over "cannot test" (design: 1 > 125 > 0).
    assert res.returncode == 1 and res.stdout.rstrip().endswith("; exit 1")
    os.remove(folder / "b-crash.qtest")
    assert run("replay", str(folder), "--qemu", qemus[0], "--qemu", qemus[1]).returncode == 125
    os.remove(folder / "c-cannot.qtest")
    only_ok = run("replay", str(folder), "--qemu", qemus[0])
    assert only_ok.returncode == 0 and len(rows(only_ok.stdout)) == 1


def test_a_machine_type_one_binary_lacks_is_125_on_that_row(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    """pc-i440fx-1.4 is in 7.2 and gone from 10.2: survived there, cannot run here, exit 125."""
    path = write(tmp_path, "old-machine.qtest", "# qemu-args: -M pc-i440fx-1.4 -nodefaults\nreadl 0x100000\n")
    res = run("replay", path, "--qemu", provided_qemu("system").path, "--qemu", provided_qemu("src-newest").path)
    assert res.returncode == 125, res.stdout + res.stderr
    on_72, on_102 = rows(res.stdout)
    assert "survived" in on_72
    newest = provided_qemu("src-newest")
    assert on_102.endswith(
        f"cannot run here: machine type pc-i440fx-1.4 is not in this binary (it has: {', '.join(newest.machines)})"
    )


def test_one_file_one_binary_prints_what_it_always_did(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    res = run("replay", write(tmp_path, "ok.qtest", SURVIVES), "--qemu", provided_qemu("src-newest").path)
    assert res.returncode == 0
    assert res.stdout.splitlines()[-1] == f"{tmp_path / 'ok.qtest'}: survived: 1 commands replayed, QEMU alive"
    assert "reproducer " not in res.stdout  # no table for one row


def bad_target(directory: Path, case: str) -> str:
    """A replay target that is bad input, by case name."""
    if case == "no-such-file":
        return str(directory / "missing.qtest")
    if case == "empty-folder":
        (directory / "empty").mkdir()
        return str(directory / "empty")
    if case == "not-a-reproducer-in-a-folder":
        write(directory / "mixed", "a.qtest", SURVIVES)
        write(directory / "mixed", "b.qtest", "hello\n")
        return str(directory / "mixed")
    return write(directory, "t.qtest", "# timeout: soon\n# qemu-args: -M q35\nreadl 0\n")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-such-file", "missing.qtest: no such file or folder: give a .qtest file or a folder of them"),
        ("empty-folder", "empty: no .qtest reproducers in this folder"),
        ("not-a-reproducer-in-a-folder", "b.qtest:1: not a reproducer"),
        ("bad-timeout-header", "t.qtest:1: '# timeout: soon' is not a number of seconds > 0"),
    ],
)
def test_bad_input_is_128_with_one_line(tmp_path: Path, provided_qemu: ProvidedQemu, case: str, message: str) -> None:
    target = bad_target(tmp_path, case)
    res = run("replay", target, "--qemu", provided_qemu("system").path, "--qemu", provided_qemu("src-newest").path)
    assert res.returncode == 128
    assert res.stdout == ""  # nothing ran: every file is parsed first
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr


def test_a_missing_binary_among_several_is_125_before_anything_runs(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    res = run("replay", write(tmp_path, "ok.qtest", SURVIVES), "--qemu", qemu_binary.path, "--qemu", "/nonexistent")
    assert res.returncode == 125 and "'/nonexistent' does not exist" in res.stderr and res.stdout == ""


def test_trace_with_several_rows_is_a_usage_error(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    res = run("replay", str(SUITE), "--qemu", qemu_binary.path, "--trace")
    assert res.returncode == 128 and "--trace replays one FILE on one --qemu" in res.stderr


def test_combined_exit_code_order() -> None:
    """Pure logic: a reproduced bug beats "cannot test", which beats "survived"."""

    def of(*outcomes: str) -> int:
        return combined_exit_code(ReplayResult(Outcome(o)) for o in outcomes)

    assert of("survived", "survived") == 0
    assert of("survived", "cannot-run") == 125
    assert of("cannot-run", "hung", "survived") == 1
    assert of("unrecovered") == 1 and of("crashed", "cannot-run") == 1


def test_one_outcome_vocabulary_prints_as_the_cli_does() -> None:
    """Pure logic: replay and the fuzzer share Outcome; its words, exit codes and tally order."""
    assert [str(o) for o in Outcome] == ["survived", "crashed", "hung", "unrecovered", "cannot-run"]
    assert {o: o.exit_code for o in Outcome} == {
        Outcome.SURVIVED: 0,
        Outcome.CRASHED: 1,
        Outcome.HUNG: 1,
        Outcome.UNRECOVERED: 1,
        Outcome.CANNOT_RUN: 125,
    }
    assert [o for o in Outcome if o.failed] == [Outcome.CRASHED, Outcome.HUNG, Outcome.UNRECOVERED]
    # The printed word names it too (ReplayResult converts it), which the type, Outcome, does not say.
    assert ReplayResult("cannot-run").outcome is Outcome.CANNOT_RUN  # type: ignore[arg-type]
    results = [ReplayResult(Outcome(o)) for o in ("hung", "survived", "cannot-run", "survived")]
    assert tally(results) == "2 survived, 1 hung, 1 cannot-run"
    with pytest.raises(ValueError):
        ReplayResult("ok")  # type: ignore[arg-type]  # fuzz's old word for survived is gone


# -- the upstream report -------------------------------------------------------------------------


def test_report_has_the_template_sections_and_the_versions(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    old, new = provided_qemu("system"), provided_qemu("src-newest")
    out = tmp_path / "bug.md"
    res = run("report", str(QUEUE_SIZE), "--qemu", old.path, "--qemu", new.path, "-o", str(out))
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    sections = [
        "## Host environment",
        "## Emulated/Virtualized environment",
        "## Description of problem",
        "## Steps to reproduce",
        "## Additional information",
    ]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    host = text[: text.index("## Emulated")]
    assert f" - OS/kernel version: {platform.system()} " in host and platform.release() in host
    assert " - QEMU flavor: qemu-system-x86_64" in host and old.version_text in host and new.version_text in host
    described = text[text.index("## Description") : text.index("## Steps")]
    reproduces = described[described.index("Reproduces on:") : described.index("Does not reproduce on:")]
    does_not = described[described.index("Does not reproduce on:") :]
    assert "- QEMU 7.2.22 (Debian " in reproduces and "crashed (signal 6)" in reproduces and "10.2.2" not in reproduces
    assert "- QEMU 10.2.2: survived" in does_not and "7.2.22" not in does_not.split("Notes from")[0]
    steps = text[text.index("## Steps") : text.index("## Additional")]
    assert "cat << EOF | qemu-system-x86_64 -nodefaults" in steps and "-qtest stdio\n" in steps
    assert "\n   EOF\n" in steps
    extra = text[text.index("## Additional") :]
    assert (
        "Source location QEMU printed: `./include/exec/memory_ldst_cached.h.inc:77 (in address_space_stw_le_cached)`"
        in extra
    )
    assert "Assertion `addr < cache->len && 2 <= cache->len - addr' failed." in extra
    assert text.rstrip().endswith('/label ~"kind::Bug"')
    assert "7.2.22 (Debian" in res.stderr and f"wrote {out}" in res.stderr  # progress on stderr


def test_report_gives_the_hang_point(provided_qemu: ProvidedQemu) -> None:
    res = run("report", str(ZERO_CHAIN), "--qemu", provided_qemu("src-newest").path)
    assert res.returncode == 0, res.stderr
    rep = parse(ZERO_CHAIN.read_text(), str(ZERO_CHAIN))
    (n, last), (_, notify) = rep.commands[-1], rep.commands[-2]
    total = len(rep.commands)
    assert "stop answering (no qtest reply: hang or livelock)" in res.stdout
    # The notify is answered; the next command never is.
    point = f"at command {total} of {total} (file line {n}): `{last}`, right after `{notify}` was answered"
    assert f"2. QEMU stops answering {point}." in res.stdout
    assert "Source location QEMU printed: none" in res.stdout  # a livelock prints no location


def test_report_of_a_reproducer_that_survives_everywhere_exits_1(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    res = run("report", write(tmp_path, "ok.qtest", SURVIVES), "--qemu", provided_qemu("src-newest").path)
    assert res.returncode == 1 and "reproduces on none of these binaries" in res.stderr
    assert "Reproduces on:\n- none of the versions tried" in res.stdout


def test_report_bad_input_is_128_before_anything_runs(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    folder = run("report", str(SUITE), "--qemu", qemu_binary.path)
    assert folder.returncode == 128 and "is a folder: report takes one FILE (replay takes a folder)" in folder.stderr
    ok = write(tmp_path, "ok.qtest", SURVIVES)
    unwritable = run("report", ok, "--qemu", qemu_binary.path, "-o", str(tmp_path / "no" / "bug.md"))
    assert unwritable.returncode == 128 and "its folder does not exist" in unwritable.stderr
    assert len(unwritable.stderr.splitlines()) == 1  # nothing replayed
    bad = run("report", write(tmp_path, "bad.qtest", "hello\n"), "--qemu", qemu_binary.path)
    assert bad.returncode == 128 and "bad.qtest:1: not a reproducer" in bad.stderr


def test_report_defaults_to_every_provided_binary(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    """Every one of report.PROVIDED that scripts/qemu.sh has cached, and only those: setup.sh
    provides system, debian-10.0 and src-newest; src-10.0.2 only where someone provided it."""
    cached = [name for name in PROVIDED if _is_cached(name)]
    assert {"system", "debian-10.0", "src-newest"} <= set(cached), cached
    res = run("report", write(tmp_path, "crash.qtest", CRASHES))
    assert res.returncode == 0, res.stderr
    reproduces = res.stdout[res.stdout.index("Reproduces on:") : res.stdout.index("Does not reproduce on:")]
    for name in cached:
        assert f"`{provided_qemu(name).version_text}`" in res.stdout
    assert reproduces.count("- QEMU ") == len(cached) and "physmem.c:" in res.stdout  # the assertion's file:line


def _is_cached(name: str) -> bool:
    try:
        cached_qemu(name)
    except QemuNotFound:
        return False
    return True


def test_the_reports_heredoc_reproduces_as_pasted(tmp_path: Path, provided_qemu: ProvidedQemu) -> None:
    """What a QEMU developer pastes into a shell: the heredoc aborts an upstream build the same way."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-system-x86_64").symlink_to(provided_qemu("src-newest").path)
    text = upstream_command(parse(ZERO_INDIRECT.read_text(), str(ZERO_INDIRECT)))
    res = subprocess.run(
        ["bash", "-c", text],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
        check=False,
    )
    assert res.returncode != 0
    assert "address_space_cache_init: Assertion `len > 0' failed." in res.stderr


def test_shell_words_round_trip_and_keep_options_with_values() -> None:
    words = ["qemu-system-x86_64", "-device", "virtio-blk-pci,drive=d0", "-m", "512M", "-name", "a b", "-S"]
    text = shell_words(words, "cat << EOF |", width=40)
    assert shlex.split(text.replace("\\\n", " ")) == ["cat", "<<", "EOF", "|", *words]
    lines = text.splitlines()
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines[:-1])
    assert not any(line.removesuffix(" \\").endswith(("-device", "-m", "-name")) for line in lines)


def test_source_location_of_assertions_and_sanitizer_frames() -> None:
    loc = source_location("qemu-system-x86_64: ../system/physmem.c:3848: address_space_cache_init: Assertion `len > 0'")
    assert loc is not None and (loc.file, loc.line, loc.function) == (
        "../system/physmem.c",
        3848,
        "address_space_cache_init",
    )
    frame = source_location("    #1 0x55d1 in virtqueue_split_pop ../hw/virtio/virtio.c:1621:9")
    assert frame is not None and (frame.file, frame.line) == ("../hw/virtio/virtio.c", 1621)
    assert source_location("virtio: zero sized buffers are not allowed") is None
