# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""The deviation table (qtest_virtio.deviations) and what the plugin and ``qtest-virtio run`` make
of it: a strict xfail on a verified version, a plain pass requirement where fixed (or not yet
there), a non-strict xfail on an unverified version whose XPASS is listed as "possibly fixed"
without changing the exit code, and ``--strict-deviations`` making that XPASS a failure.

The version-dependent behaviours run real scenarios on real binaries; "unverified" and "fixed"
are reached with a test-only extra table (``$QTEST_VIRTIO_DEVIATIONS`` / ``--deviations``) that
claims other versions for a real scenario, never by faking QEMU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qtest_virtio.binary import QemuBinary
from qtest_virtio.deviations import (
    DEVIATIONS,
    Condition,
    Deviation,
    Status,
    Strength,
    TableError,
    format_version,
    load_table,
    table,
)

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
VLAN = "scenarios/net/test_control.py::test_vlan_table_filters_tagged_frames"
#: A scenario QEMU passes everywhere (conformance id pci-absent-queue-size-zero).
PASSING = "scenarios/pci/test_pci.py::test_absent_queue_reads_size_zero"
#: A scenario with a real deviation on every checked QEMU (pci-large-queue-select-size-zero).
DEVIATING = "scenarios/pci/test_pci.py::test_large_queue_select_reads_size_zero"


def entry(**kw: object) -> Deviation:
    base: dict[str, object] = {
        "id": "x",
        "does": "does otherwise",
        "strength": Strength.MUST,
        "section": "2.7.8.2",
        "first_seen": (7, 2, 22),
        "verified_on": ((7, 2, 22), (10, 0, 2)),
    }
    base.update(kw)
    return Deviation(**base)  # type: ignore[arg-type]  # kw may give any field any value, wrong ones on purpose


# -- the table as data ---------------------------------------------------------------------------


def test_status_follows_the_versions() -> None:
    dev = entry(fixed_in=(10, 2, 2))
    assert dev.status((7, 2, 22)) is Status.VERIFIED
    assert dev.status((10, 0, 2)) is Status.VERIFIED
    assert dev.status((10, 1, 50)) is Status.UNVERIFIED  # a developer's tree between releases
    assert dev.status((7, 1, 0)) is Status.UNVERIFIED  # older, and nobody checked it is absent there
    assert dev.status((10, 2, 2)) is Status.FIXED and dev.status((11, 0, 0)) is Status.FIXED
    assert not Status.FIXED.live and not Status.NOT_YET.live and Status.UNVERIFIED.live


def test_vlan_and_queue_size_entries_claim_what_was_measured() -> None:
    """The VLAN change is 10.0's: nothing on 7.2, nor on 10.2.2; the queue-size abort is 7.2's,
    fixed by 10.0.2."""
    t = table()
    vlan = t["net-vlan-filter"]
    assert [vlan.status(v) for v in ((7, 2, 22), (10, 0, 2), (10, 1, 50), (10, 2, 2))] == [
        Status.NOT_YET,
        Status.VERIFIED,
        Status.UNVERIFIED,
        Status.FIXED,
    ]
    assert vlan.strength is Strength.SHOULD and vlan.section == "5.1.6.5.3"
    size = t["virtio-queue-size-rewritten-while-live-assert"]
    assert size.status((7, 2, 22)) is Status.VERIFIED and size.status((10, 0, 2)) is Status.FIXED


def test_reason_is_worded_from_the_strength() -> None:
    assert entry().reason == "QEMU deviates from the MUST of §2.7.8.2: does otherwise"
    assert entry(strength=Strength.SHOULD, section="5.5.6.3.3").reason.startswith(
        "QEMU does not follow the SHOULD of §5.5.6.3.3: "
    )
    for dev in DEVIATIONS:
        assert dev.reason.startswith(dev.strength.lead(dev.section))
        assert ("deviates" in dev.reason.split(":")[0]) is (dev.strength is Strength.MUST), dev.id
        assert re.fullmatch(r"\d+(\.\d+)*", dev.section), dev.id
        assert all(v[0] >= 7 for v in dev.verified_on) and dev.verified_on, dev.id


def test_every_entry_names_a_scenario_or_a_reproducer() -> None:
    """An id must be a conformance (or regression) id of a scenario or a reproducer's file stem:
    a typo would silently claim nothing."""
    text = "\n".join(p.read_text() for p in SCENARIOS.rglob("test_*.py"))
    conformance = set(re.findall(r'(?:conformance|regression)\("([^"]+)"', text))
    stems = {p.stem for p in (SCENARIOS / "reproducers").glob("*.qtest")}
    assert len({d.id for d in DEVIATIONS}) == len(DEVIATIONS)
    assert sorted(d.id for d in DEVIATIONS if d.id not in conformance | stems) == []


def test_the_table_is_the_one_place() -> None:
    """No hand-written xfail is left on a scenario, nor a '# xfail:' line in a reproducer."""
    marked = [str(p) for p in SCENARIOS.rglob("*.py") if "mark.xfail" in p.read_text()]
    lines = [str(p) for p in (SCENARIOS / "reproducers").glob("*.qtest") if "\n# xfail:" in "\n" + p.read_text()]
    assert marked == [] and lines == []


def test_condition_matches_only_the_runs_it_names() -> None:
    cond = Condition(transports=frozenset({"modern"}), flags=(("packed", "on"),), refused=frozenset({"FLUSH"}))
    assert cond.matches(transport="modern", flags={"packed": "on"}, refused={"FLUSH", "EVENT_IDX"})
    assert not cond.matches(transport="legacy", flags={"packed": "on"}, refused={"FLUSH"})
    assert not cond.matches(transport="modern", flags={}, refused={"FLUSH"})
    assert not cond.matches(transport="modern", flags={"packed": "on"})
    assert Condition().matches()


def test_extra_table_adds_and_replaces_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "extra.json"
    path.write_text(
        json.dumps(
            [
                {"id": "net-vlan-filter", "does": "d", "strength": "SHOULD", "section": "§5.1.6.5.3",
                 "first_seen": "10.0.2", "verified_on": ["10.0.2", "10.1.50"], "fixed_in": "10.2.2",
                 "when": {"transports": ["modern"]}},
                {"id": "my-own", "does": "d", "strength": "descriptive text", "section": "2.1",
                 "first_seen": "10.1.50", "verified_on": ["10.1.50"]},
            ]
        )
    )  # fmt: skip
    monkeypatch.setenv("QTEST_VIRTIO_DEVIATIONS", str(path))
    t = table()
    assert t["net-vlan-filter"].status((10, 1, 50)) is Status.VERIFIED
    assert t["net-vlan-filter"].section == "5.1.6.5.3" and t["net-vlan-filter"].when.transports == {"modern"}
    assert t["my-own"].strength is Strength.DESCRIPTIVE
    assert len(t) == len(DEVIATIONS) + 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"id": "a"}, "entry 0: missing key(s) does, first_seen, section, strength, verified_on"),
        ({"id": "a", "does": "d", "strength": "MAY", "section": "1", "first_seen": "1.0.0", "verified_on": []},
         "strength 'MAY'; use one of MUST, SHOULD, note, descriptive text"),
        ({"id": "a", "does": "d", "strength": "MUST", "section": "1", "first_seen": "10.1", "verified_on": []},
         "'10.1' is not a QEMU version MAJOR.MINOR.MICRO"),
        ({"id": "a", "fixed": "1.0.0"}, "unknown key(s) fixed"),
    ],
)  # fmt: skip
def test_bad_extra_table_names_file_entry_and_problem(tmp_path: Path, raw: dict[str, object], message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([raw]))
    with pytest.raises(TableError) as exc:
        load_table(str(path))
    assert str(path) in str(exc.value) and message in str(exc.value), str(exc.value)


# -- on real binaries ----------------------------------------------------------------------------


def run(qemu: QemuBinary, *args: str, extra: list[dict[str, object]] | None = None, tmp: Path | None = None):
    """``qtest-virtio run`` of this checkout (python -m: a console script on PATH may be another's)."""
    env = {k: v for k, v in os.environ.items() if k != "QTEST_VIRTIO_DEVIATIONS"}
    if extra is not None:
        assert tmp is not None
        path = tmp / "extra-deviations.json"
        path.write_text(json.dumps(extra))
        env["QTEST_VIRTIO_DEVIATIONS"] = str(path)
    cmd = [sys.executable, "-m", "qtest_virtio.app.cli", "run", *args, "--qemu", qemu.path, "-n", "1"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def totals(stdout: str) -> dict[str, int]:
    """The summary's total row."""
    line = next(line for line in stdout.splitlines() if line.startswith("total "))
    cols = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    return dict(zip(cols, map(int, line.split()[1:]), strict=True))


def claim(test_id: str, version: tuple[int, int, int], **kw: object) -> dict[str, object]:
    out: dict[str, object] = {
        "id": test_id,
        "does": "pretends to deviate (test-only entry)",
        "strength": "MUST",
        "section": "4.1.4.3.1",
        "first_seen": format_version(version),
        "verified_on": [format_version(version)],
    }
    out.update(kw)
    return out


@pytest.mark.parametrize(
    ("name", "outcome"), [("system", "passed"), ("debian-10.0", "xfailed"), ("src-newest", "passed")]
)
def test_vlan_change_is_a_deviation_of_10_0_only(
    provided_qemu: Callable[[str], QemuBinary], name: str, outcome: str
) -> None:
    """Strict xfail where verified (10.0.2); a pass requirement on 7.2 (before it) and on 10.2.2
    (fixed): the same scenario, three answers, all exit 0."""
    qemu = provided_qemu(name)
    res = run(qemu, VLAN, "--transport", "modern")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    counts = totals(res.stdout)
    assert counts[outcome] == 2 and counts["failed"] == counts["xpassed"] == 0, res.stdout
    if outcome == "xfailed":
        assert "deviations: 1 seen (1 verified on this version, 0 not verified), 0 possibly fixed" in res.stdout
    else:
        assert "deviations: 0 seen" in res.stdout and "1 fixed or not yet in this version (must pass)" in res.stdout


def test_unverified_version_xpass_is_listed_and_not_fatal(qemu_binary: QemuBinary, tmp_path: Path) -> None:
    """An entry seen on other versions only is a non-strict xfail here: the scenario passes (an
    XPASS), the summary says "possibly fixed", and the exit code stays 0; --strict-deviations
    makes the same XPASS a failure (exit 1)."""
    other = claim("pci-absent-queue-size-zero", (1, 0, 0))  # seen on a version this binary is not
    res = run(qemu_binary, PASSING, "--transport", "modern", extra=[other], tmp=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert totals(res.stdout)["xpassed"] == 1
    assert (
        "  possibly fixed in this QEMU: verify and update the table: pci-absent-queue-size-zero (1 of 1 runs passed)"
        in res.stdout
    )
    assert "0 seen (0 verified on this version, 0 not verified), 1 possibly fixed" in res.stdout

    strict = run(qemu_binary, PASSING, "--transport", "modern", "--strict-deviations", extra=[other], tmp=tmp_path)
    assert strict.returncode == 1, strict.stdout[-3000:]
    assert totals(strict.stdout)["failed"] == 1
    assert "possibly fixed in this QEMU: verify and update the table: pci-absent-queue-size-zero" in strict.stdout


def test_verified_version_xpass_fails_the_run(qemu_binary: QemuBinary, tmp_path: Path) -> None:
    """Verified on this very version, a passing scenario is an XPASS(strict): exit 1."""
    here = claim("pci-absent-queue-size-zero", qemu_binary.version)
    res = run(qemu_binary, PASSING, "--transport", "modern", extra=[here], tmp=tmp_path)
    assert res.returncode == 1 and totals(res.stdout)["failed"] == 1, res.stdout[-3000:]


def test_fixed_version_is_a_plain_pass_requirement(qemu_binary: QemuBinary, tmp_path: Path) -> None:
    """With the table saying the queue_select deviation is fixed before this version, the
    scenario is an ordinary test again, and QEMU's real behaviour fails it (exit 1); with the
    built-in table (verified here) it is a strict xfail (exit 0)."""
    assert table()["pci-large-queue-select-size-zero"].status(qemu_binary.version) is Status.VERIFIED
    res = run(qemu_binary, DEVIATING, "--transport", "modern")
    assert res.returncode == 0 and totals(res.stdout)["xfailed"] == 1, res.stdout[-3000:]
    fixed = claim("pci-large-queue-select-size-zero", (7, 0, 0), fixed_in="7.1.0")
    res = run(qemu_binary, DEVIATING, "--transport", "modern", extra=[fixed], tmp=tmp_path)
    assert res.returncode == 1 and totals(res.stdout)["failed"] == 1, res.stdout[-3000:]
    assert "queue_select 0x400 reads back" in res.stdout + res.stderr
