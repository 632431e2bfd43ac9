# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""Regression hunting: delta debugging over flags (pure), then bisect-flags and git bisect end to
end against real QEMU (the git repository is a fake whose commits hold a QEMU wrapper)."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import EXE

from qtest_virtio.bisect import FAIL, PASS, BisectError, Change, bisect_flags, ddmin, run_args

pytestmark = pytest.mark.timeout(300)

NEEDS_EVENT_IDX = """
import pytest
pytestmark = pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"], rings=("split",))

def test_needs_event_idx(virtio_device):
    assert "EVENT_IDX" in virtio_device.negotiated
"""

BREAKS_WITH_EVENT_IDX = NEEDS_EVENT_IDX.replace('"EVENT_IDX" in', '"EVENT_IDX" not in').replace(
    "test_needs_event_idx", "test_breaks_with_event_idx"
)


def changes(*items: str) -> list[Change]:
    return [Change(*i.split("=", 1)) for i in items]


def test_ddmin_finds_a_minimal_failing_subset() -> None:
    cs = changes("a=1", "b=1", "c=1", "d=1", "e=1")
    assert ddmin(cs, lambda sub: Change("c", "1") in sub) == changes("c=1")
    both = ddmin(cs, lambda sub: Change("b", "1") in sub and Change("e", "1") in sub)
    assert sorted(map(str, both)) == ["b=1", "e=1"]


def test_bisect_flags_narrows_given_flags() -> None:
    given = changes("event_idx=off", "indirect_desc=off", "packed=on", "refuse=RING_RESET")
    seen: list[str] = []

    def probe(cs: Sequence[Change]) -> int:
        return FAIL if Change("packed", "on") in cs else PASS

    answer = bisect_flags(probe, given, [], say=seen.append)
    assert answer.kind == "fails-only-with" and answer.changes == changes("packed=on")
    assert answer.line().startswith("fails only with packed=on")
    assert seen[0].startswith("probe 1 of ~") and "-> FAILED" in seen[0]


def test_bisect_flags_finds_what_to_turn_off() -> None:
    candidates = changes("event_idx=off", "indirect_desc=off", "refuse=EVENT_IDX")

    def probe(cs: Sequence[Change]) -> int:
        return PASS if Change("indirect_desc", "off") in cs else FAIL

    answer = bisect_flags(probe, [], candidates, say=lambda s: None)
    assert answer.kind == "passes-with" and answer.changes == changes("indirect_desc=off")
    assert "--flags=indirect_desc=off" in answer.line()


def test_bisect_flags_refuses_what_it_cannot_answer() -> None:
    with pytest.raises(BisectError, match="passes with"):
        bisect_flags(lambda cs: PASS, changes("a=1"), [], say=lambda s: None)
    with pytest.raises(BisectError, match="not a flag"):
        bisect_flags(lambda cs: FAIL, [], changes("a=0"), say=lambda s: None)
    assert run_args(changes("event_idx=off", "refuse=EVENT_IDX")) == ["--flags=event_idx=off", "--refuse=EVENT_IDX"]


@pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed")
def test_bisect_flags_end_to_end(tmp_path: Path, qemu_binary) -> None:
    assert EXE
    target = tmp_path / "test_target.py"
    target.write_text(BREAKS_WITH_EVENT_IDX)
    res = subprocess.run(
        [EXE, "bisect-flags", str(target), "--qemu", qemu_binary.path], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "probe 1 of ~" in res.stdout
    assert "passes with event_idx=off" in res.stdout.splitlines()[-1]

    target.write_text(NEEDS_EVENT_IDX)
    res = subprocess.run(
        [EXE, "bisect-flags", str(target), "--qemu", qemu_binary.path,
         "--flags", "indirect_desc=off,event_idx=off,any_layout=off"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].startswith("fails only with event_idx=off")


def _commit(repo: Path, message: str, script: str) -> str:
    wrapper = repo / "qemu"
    wrapper.write_text(script)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    subprocess.run(["git", "-C", str(repo), "add", "qemu"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", message], check=True)
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed")
def test_git_bisect_names_the_commit(tmp_path: Path, qemu_binary) -> None:
    """A wrapper 'QEMU' per commit; at one commit it starts passing -global ...event_idx=off."""
    assert EXE
    repo = tmp_path / "qemu-src"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for key, value in (("user.email", "t@example.invalid"), ("user.name", "t")):
        subprocess.run(["git", "-C", str(repo), "config", key, value], check=True)
    good = f'#!/bin/bash\nexec {qemu_binary.path} "$@"\n'
    bad = f'#!/bin/bash\nexec {qemu_binary.path} -global virtio-rng-pci.event_idx=off "$@"\n'
    revs = [_commit(repo, f"good {i}", good + f"# {i}\n") for i in range(3)]
    culprit = _commit(repo, "virtio: the culprit", bad)
    revs += [culprit] + [_commit(repo, f"after {i}", bad + f"# {i}\n") for i in range(3)]
    head_before = revs[-1]
    target = tmp_path / "test_target.py"
    target.write_text(NEEDS_EVENT_IDX)
    res = subprocess.run(
        [EXE, "bisect", "--repo", str(repo), "--good", revs[0], "--bad", revs[-1],
         "--build", "true", "--binary", "qemu", str(target)],
        capture_output=True, text=True, check=False, timeout=280,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"first bad commit: {culprit[:7]}" in res.stdout and "the culprit" in res.stdout
    # The tree is left as found: bisect reset, HEAD back where it was.
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head == head_before
    assert not (repo / ".git" / "BISECT_LOG").exists()


def test_git_bisect_refuses_a_dirty_tree(tmp_path: Path) -> None:
    from qtest_virtio.bisect import git_bisect

    repo = tmp_path / "r"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("1")
    subprocess.run(["git", "-C", str(repo), "add", "f"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@x", "-c", "user.name=t", "commit", "-qm", "c"], check=True
    )
    (repo / "f").write_text("2")
    with pytest.raises(BisectError, match="uncommitted changes"):
        git_bisect(str(repo), "HEAD", "HEAD", ["t.py"], build="true", say=lambda s: None)


def _two_commit_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "r"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for message in ("one", "two"):
        who = ("-c", "user.email=t@x", "-c", "user.name=t")
        subprocess.run(["git", "-C", str(repo), *who, "commit", "-q", "--allow-empty", "-m", message], check=True)
    return repo


@pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed")
@pytest.mark.parametrize(
    ("where", "good", "bad", "reason"),
    [
        ("plain", "HEAD~1", "HEAD", "--repo {plain}: not a git repository"),
        ("missing", "HEAD~1", "HEAD", "--repo {missing}: cannot change to '{missing}': No such file or directory"),
        ("repo", "nosuch", "HEAD", "--good nosuch: bad revision 'nosuch'"),
        ("repo", "HEAD~1", "HEAD^{tree}", "--bad HEAD^{{tree}}: 'HEAD^{{tree}}' does not name one commit"),
        ("repo", "HEAD", "HEAD~1", "git bisect start HEAD~1 HEAD: Some good revs are not ancestors of the bad rev."),
    ],
)
def test_git_bisect_bad_repo_or_revision_is_a_usage_error(
    tmp_path: Path, where: str, good: str, bad: str, reason: str
) -> None:
    """Nothing to bisect: 128 (aborts an outer bisect) with git's reason on one line, never
    exit 1 with an empty "did not name a first bad commit", and the repository left as found."""
    assert EXE
    dirs = {"plain": tmp_path / "plain", "missing": tmp_path / "missing", "repo": _two_commit_repo(tmp_path)}
    dirs["plain"].mkdir()
    res = subprocess.run(
        [EXE, "bisect", "--repo", str(dirs[where]), "--good", good, "--bad", bad, "--build", "true", "t.py"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert res.returncode == 128, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("qtest-virtio: error: "), res.stderr
    assert reason.format(**{k: str(v) for k, v in dirs.items()}) in res.stderr
    assert not (dirs["repo"] / ".git" / "BISECT_LOG").exists()


@pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed")
def test_git_bisect_refuses_harness_owned_flags_before_it_starts(tmp_path: Path) -> None:
    assert EXE
    repo = _two_commit_repo(tmp_path)
    res = subprocess.run(
        [EXE, "bisect", "--repo", str(repo), "--good", "HEAD~1", "--bad", "HEAD", "--build", "true",
         "--flags", "serial=a,,b,id=x", "t.py"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert res.returncode == 128, res.stdout + res.stderr
    assert res.stderr.startswith("qtest-virtio: error: --flags: id=x cannot be set: the harness names")
    assert res.stderr.count("\n") == 1 and not (repo / ".git" / "BISECT_LOG").exists()
