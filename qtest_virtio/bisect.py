"""Regression hunting: which flags make a target fail (``bisect-flags``), and which commit
(``bisect``, driving ``git bisect run`` with a build step).

Every probe is a fresh ``qtest-virtio run`` in a subprocess, hence a fresh QEMU; its exit code
is the contract of design.md (0 pass, 1 fail, 125 untestable, 128 usage error).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .binary import QemuBinary
from .errors import QtestVirtioError
from .machine import escape_option_value, split_option_list

PASS, FAIL, UNTESTABLE, USAGE = 0, 1, 125, 128

#: Boolean virtio-pci properties that switch a feature *on* by default: the candidates for
#: "turn it off" when a target fails with the defaults (only those the binary has are tried).
DEFAULT_ON_FLAGS = ("event_idx", "indirect_desc", "queue_reset", "any_layout", "notify_on_empty", "ioeventfd")
#: Features the driver can decline, tried the same way.
REFUSABLE = ("EVENT_IDX", "INDIRECT_DESC", "RING_RESET", "RING_PACKED")


class BisectError(QtestVirtioError):
    """The hunt cannot go on (the target passes as given, the repository is dirty, ...)."""


class BisectUsageError(BisectError):
    """What was asked cannot be bisected at all (no repository there, a revision git does not
    know): a usage error, 128, with git's own reason."""


@dataclass(frozen=True)
class Change:
    """One flag setting: a device property (``event_idx=off``) or a refusal (``refuse=EVENT_IDX``)."""

    key: str
    value: str

    @property
    def is_refusal(self) -> bool:
        return self.key == "refuse"

    def __str__(self) -> str:
        return f"{self.key}={escape_option_value(self.value)}"


def run_args(changes: Sequence[Change]) -> list[str]:
    flags = ",".join(str(c) for c in changes if not c.is_refusal)
    refuse = ",".join(c.value for c in changes if c.is_refusal)
    return ([f"--flags={flags}"] if flags else []) + ([f"--refuse={refuse}"] if refuse else [])


Probe = Callable[[Sequence[Change]], int]


def subprocess_probe(target: Sequence[str], qemu: str, extra: Sequence[str] = ()) -> Probe:
    """A probe running ``qtest-virtio run TARGET --qemu Q [changes]`` in a fresh process."""

    def probe(changes: Sequence[Change]) -> int:
        cmd = [sys.executable, "-m", "qtest_virtio.app.cli", "run", *target, f"--qemu={qemu}", "-n", "1", *extra]
        cmd += run_args(changes)
        return subprocess.run(cmd, capture_output=True, text=True, check=False).returncode

    return probe


class Prober:
    """Counts and reports probes: "probe 3 of ~9: event_idx=off -> passed"."""

    def __init__(self, probe: Probe, estimate: int, say: Callable[[str], None]) -> None:
        self.probe, self.estimate, self.say = probe, estimate, say
        self.count = 0
        self._cache: dict[frozenset[Change], int] = {}

    def __call__(self, changes: Sequence[Change]) -> int:
        key = frozenset(changes)
        if key in self._cache:
            return self._cache[key]
        self.count += 1
        self.estimate = max(self.estimate, self.count)
        code = self.probe(list(changes))
        verdict = {PASS: "passed", FAIL: "FAILED", UNTESTABLE: "untestable"}.get(code, f"exit {code}")
        self.say(f"probe {self.count} of ~{self.estimate}: {' '.join(map(str, changes)) or '(defaults)'} -> {verdict}")
        if code == USAGE:
            raise BisectError(f"a probe ended with a usage error (128): {' '.join(map(str, changes))}")
        self._cache[key] = code
        return code


def ddmin(changes: list[Change], fails: Callable[[list[Change]], bool]) -> list[Change]:
    """Zeller's delta debugging: a 1-minimal subset of ``changes`` for which ``fails`` holds
    (``fails(changes)`` must hold to begin with)."""
    n = 2
    while len(changes) >= 2:
        size = max(1, len(changes) // n)
        chunks = [changes[i : i + size] for i in range(0, len(changes), size)]
        for chunk in chunks:
            if fails(chunk):
                changes, n = chunk, 2
                break
        else:
            for chunk in chunks:
                complement = [c for c in changes if c not in chunk]
                if complement and fails(complement):
                    changes, n = complement, max(n - 1, 2)
                    break
            else:
                if n >= len(changes):
                    break
                n = min(len(changes), 2 * n)
    return changes


@dataclass
class FlagAnswer:
    kind: str  # "fails-only-with" or "passes-with"
    changes: list[Change]
    probes: int

    def line(self) -> str:
        what = " ".join(map(str, self.changes))
        args = " ".join(run_args(self.changes))
        if self.kind == "fails-only-with":
            return f"fails only with {what}   (reproduce: {args})"
        return f"passes with {what}   (use: {args})"


def bisect_flags(
    probe: Probe,
    given: list[Change],
    candidates: list[Change],
    say: Callable[[str], None] = print,
) -> FlagAnswer:
    """With explicit ``given`` settings: the smallest subset that still fails. With none: the
    smallest set of ``candidates`` (features turned off or refused) that makes it pass."""
    prober = Prober(probe, 1 + 2 * max(len(given), 1), say)
    if given:
        first = prober(given)
        if first == UNTESTABLE:
            raise BisectError("the target cannot be tested with these flags on this binary (125)")
        if first == PASS:
            raise BisectError(f"the target passes with {' '.join(map(str, given))}: nothing to narrow down")
        if prober([]) == FAIL:
            raise BisectError(
                "the target fails with the defaults too: the given flags are not what makes it fail; "
                "run bisect-flags without --flags to find what makes it pass"
            )
        minimal = ddmin(list(given), lambda cs: prober(cs) == FAIL)
        return FlagAnswer("fails-only-with", minimal, prober.count)
    prober.estimate = 2 + len(candidates)
    if prober([]) != FAIL:
        raise BisectError("the target does not fail with the defaults: give the failing --flags to narrow down")
    for c in candidates:  # one change is the common answer: try each first
        if prober([c]) == PASS:
            return FlagAnswer("passes-with", [c], prober.count)
    if prober(candidates) != PASS:
        raise BisectError("the target fails even with every candidate feature off: it is not a flag")
    minimal = ddmin(list(candidates), lambda cs: prober(cs) == PASS)
    return FlagAnswer("passes-with", minimal, prober.count)


def candidate_changes(binary: QemuBinary, device: str = "virtio-rng-pci") -> list[Change]:
    """Features this binary turns on by default, and the driver-side refusals."""
    props = binary.device_properties(device)
    out = [Change(p, "off") for p in DEFAULT_ON_FLAGS if p in props and props[p].default == "on"]
    return out + [Change("refuse", f) for f in REFUSABLE]


def parse_changes(flags: str, refuse: str) -> list[Change]:
    out = []
    for item in split_option_list(flags or ""):
        if item.strip():
            key, eq, value = item.strip().partition("=")
            if not eq:
                raise BisectError(f"--flags item {item!r} is not K=V")
            out.append(Change(key, value))
    out += [Change("refuse", f.strip().upper()) for f in (refuse or "").split(",") if f.strip()]
    return out


# -- git bisect -----------------------------------------------------------------------------------

DEFAULT_BUILD = (
    "[ -f build/build.ninja ] || (mkdir -p build && cd build && ../configure --target-list=x86_64-softmmu) "
    "&& make -C build -j$(nproc) qemu-system-x86_64"
)


def _git(repo: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise BisectError(f"git {' '.join(args)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _git_reason(res: subprocess.CompletedProcess[str]) -> str:
    """git's message on one line, without its ``fatal:``/``error:`` prefix."""
    lines = [line.strip() for line in (res.stderr.strip() or res.stdout.strip()).splitlines() if line.strip()]
    text = " ".join(lines) or f"git exited {res.returncode}"
    for prefix in ("fatal: ", "error: "):
        text = text.removeprefix(prefix)
    return text


def check_repo(repo: str, revs: dict[str, str]) -> None:
    """``repo`` is a git work tree and each of ``revs`` (option -> revision) names a commit;
    otherwise BisectUsageError with git's reason. ``git bisect start`` would take an unknown
    revision for a path and bisect with no good commit at all."""
    res = _git(repo, "rev-parse", "--is-inside-work-tree", check=False)
    if res.returncode != 0 or res.stdout.strip() != "true":
        reason = _git_reason(res) if res.returncode != 0 else "it is not a work tree"
        raise BisectUsageError(f"--repo {repo}: {reason}")
    for option, rev in revs.items():
        if _git(repo, "rev-parse", "-q", "--verify", "--end-of-options", f"{rev}^{{commit}}", check=False).returncode:
            res = _git(repo, "rev-parse", "--end-of-options", rev, "--", check=False)
            reason = _git_reason(res) if res.returncode != 0 else f"{rev!r} does not name one commit"
            raise BisectUsageError(f"{option} {rev}: {reason} (in {repo})")


def bisect_step(repo: str, build: str, binary: str, target: Sequence[str], extra: Sequence[str]) -> int:
    """One `git bisect run` step: build (a failed build is 125: skip this commit), then run."""
    if subprocess.run(build, shell=True, cwd=repo, check=False).returncode != 0:
        print(f"bisect step: build failed at {_git(repo, 'rev-parse', '--short', 'HEAD').stdout.strip()}: skip (125)")
        return UNTESTABLE
    path = binary if os.path.isabs(binary) else os.path.join(repo, binary)
    code = subprocess.run(
        [sys.executable, "-m", "qtest_virtio.app.cli", "run", *target, f"--qemu={path}", "-n", "1", *extra], check=False
    ).returncode
    return code if code in (PASS, FAIL, UNTESTABLE) else USAGE


def git_bisect(
    repo: str,
    good: str,
    bad: str,
    target: Sequence[str],
    *,
    build: str = DEFAULT_BUILD,
    binary: str = "build/qemu-system-x86_64",
    extra: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> str:
    """Run git bisect between ``good`` and ``bad``; returns the first bad commit. The tree is
    left as it was found: bisect reset always runs (also on Ctrl-C)."""
    check_repo(repo, {"--good": good, "--bad": bad})
    if _git(repo, "status", "--porcelain", "--untracked-files=no").stdout.strip():
        raise BisectError(f"{repo} has uncommitted changes: commit or stash them first")
    if _git(repo, "rev-parse", "-q", "--verify", "BISECT_HEAD", check=False).returncode == 0 or os.path.exists(
        os.path.join(repo, ".git", "BISECT_LOG")
    ):
        raise BisectError(f"{repo} is already bisecting: finish it with git bisect reset")
    step = [
        sys.executable, "-m", "qtest_virtio.app.cli", "bisect-step", "--repo", os.path.abspath(repo),
        "--build", build, "--binary", binary, *target, *(["--", *extra] if extra else []),
    ]  # fmt: skip
    try:
        start = _git(repo, "bisect", "start", bad, good, "--", check=False)
        if start.returncode != 0:  # e.g. good is not an ancestor of bad
            raise BisectUsageError(f"git bisect start {bad} {good}: {_git_reason(start)}")
        res = subprocess.run(["git", "-C", repo, "bisect", "run", *step], capture_output=True, text=True, check=False)
        for line in res.stdout.splitlines():
            if line.startswith(("running", "Bisecting:", "bisect step")) or "is the first bad commit" in line:
                say(line)
        found = [line.split()[0] for line in res.stdout.splitlines() if line.endswith("is the first bad commit")]
        if not found:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-8:])
            raise BisectError(f"git bisect run did not name a first bad commit:\n{tail}")
        return found[0]
    finally:
        _git(repo, "bisect", "reset", check=False)


def describe_commit(repo: str, rev: str) -> str:
    return _git(repo, "log", "-1", "--format=%h %s", rev).stdout.strip()
