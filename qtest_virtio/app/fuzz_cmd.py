"""``qtest-virtio fuzz``: the options and the campaign loop over the fuzz targets (README,
"Hostile-driver fuzzing"). The fuzzing itself is :mod:`qtest_virtio.fuzz`; this module only reads
the options, prints and maps the result to the exit codes (0 nothing new found, 1 a find, 125
cannot run here, 128 a usage error or an interrupt).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import random
import sys
import time
from collections import Counter

from .. import modes
from ..binary import QemuBinary, QemuNotFound
from ..deviations import TableError, format_version
from ..errors import QemuStartError, QtestVirtioError
from ..fuzz import (
    DEVICES,
    RINGS,
    SIGNATURE_HEADER,
    FuzzConfig,
    FuzzInterrupted,
    FuzzReport,
    comment_value,
    fuzz_target,
    known_signatures,
    signature,
    write_reproducer,
)
from ..fuzz.reuse import RESTART_EVERY, ReuseStats, Session
from ..reproducer import ReplayResult, load, replay
from .exits import EXIT_FAILED, EXIT_OK, EXIT_UNTESTABLE, EXIT_USAGE

#: Where, under ``--out``, a find that does not fail on a fresh QEMU is set aside.
UNREPLAYED_DIR = "not-reproduced-fresh"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", action="append", default=[], metavar="NAME", help=f"device to fuzz (default: {', '.join(DEVICES)})"
    )
    parser.add_argument(
        "--transport", action="append", default=[], metavar="MODE", help="transport mode (default: all four)"
    )
    parser.add_argument("--ring", action="append", default=[], choices=RINGS, help="ring layout (default: both)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="time budget of the whole run, shrinking included (default 60; a shrink still running then keeps "
        "the smallest reproducer found so far)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, metavar="N", help="stop after N rounds (e.g. 1), or at --seconds if sooner"
    )
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    parser.add_argument(
        "--out", default="fuzz-out", metavar="DIR", help="where reproducers go (earlier ones there are replayed first)"
    )
    parser.add_argument("--qemu", default=None, help="QEMU binary (default: $QEMU or qemu-system-x86_64)")
    parser.add_argument("--hang-timeout", type=float, default=3.0, help="seconds without a qtest reply = hang")
    parser.add_argument("--examples", type=int, default=25, help="examples per target per round")
    parser.add_argument(
        "--shrink-seconds", type=float, default=120.0, help="time spent shrinking a new find (default 120)"
    )
    parser.add_argument(
        "--known",
        metavar="DIR",
        default=None,
        help="reproducers of known bugs (e.g. scenarios/reproducers): a find is known when its reproducer's "
        "deviation-table entry is live on this QEMU's version",
    )
    parser.add_argument(
        "--migrate",
        action="store_true",
        help="live migration is one more action: mid-sequence the machine moves to a fresh QEMU of the same binary "
        "and the actions go on there (the device's state saved and loaded as the hostile driver left it)",
    )
    parser.add_argument(
        "--unplug",
        action="store_true",
        help="hot-unplug is one more action: the device sits in a hot-plug slot, is unplugged mid-sequence as the "
        "hostile driver left it (device_del, the guest's part, DEVICE_DELETED) and plugged again for the recovery",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a fresh QEMU for every example instead of reusing one process across examples (reset and "
        "checked between them; always so with --migrate or --unplug)",
    )
    parser.add_argument(
        "--restart-every",
        type=int,
        default=RESTART_EVERY,
        metavar="N",
        help=f"a reused QEMU is restarted after N examples (default {RESTART_EVERY}; also after any crash, hang, "
        "error report or failed reset check)",
    )
    parser.add_argument(
        "--no-spare",
        action="store_true",
        help="a restart of the reused QEMU waits for a new process, instead of swapping in a spare one started "
        "ahead on a worker thread (the spare costs a second QEMU's memory and a core while it starts)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="after a find, write its reproducer and go on until the budget is spent (finds de-duplicated)",
    )


def _bad_numbers(args: argparse.Namespace) -> str | None:
    """The first numeric option out of range, as a one-line reason (argparse takes -1, nan, inf)."""
    one_round = "a positive number of seconds (for exactly one round: --rounds 1)"
    checks: tuple[tuple[str, float | None, bool, str], ...] = (
        ("--seconds", args.seconds, args.seconds > 0, one_round),
        ("--shrink-seconds", args.shrink_seconds, args.shrink_seconds >= 0, "0 or more seconds"),
        ("--hang-timeout", args.hang_timeout, args.hang_timeout > 0, "a positive number of seconds"),
        ("--examples", args.examples, args.examples >= 1, "1 or more"),
        ("--rounds", args.rounds, args.rounds is None or args.rounds >= 1, "1 or more"),
        ("--restart-every", args.restart_every, args.restart_every >= 1, "1 or more"),
    )
    for option, value, ok, wanted in checks:
        if not ok or (value is not None and not math.isfinite(value)):
            return f"{option} {value:g}: must be {wanted}"
    return None


def run_fuzz(args: argparse.Namespace) -> int:
    """``qtest-virtio fuzz``: 0 nothing found, 1 a failure found and written, 125 cannot run,
    128 a usage error or an interrupt (what was found by then is written and listed)."""
    bad = _bad_numbers(args)
    if bad:
        print(f"qtest-virtio fuzz: {bad}", file=sys.stderr)
        return EXIT_USAGE

    try:
        import hypothesis  # noqa: F401
    except ImportError:
        print(
            "qtest-virtio fuzz: needs hypothesis: pip install 'qtest-virtio[fuzz]' (or pip install hypothesis)",
            file=sys.stderr,
        )
        return EXIT_UNTESTABLE
    devices = args.device or list(DEVICES)
    for d in devices:
        if d not in DEVICES:
            print(f"qtest-virtio fuzz: no fuzz profile for {d!r}; known: {', '.join(DEVICES)}", file=sys.stderr)
            return EXIT_USAGE
    try:
        transports = [modes.check_mode(m) for m in (args.transport or modes.ALL_MODES)]
    except ValueError as exc:
        print(f"qtest-virtio fuzz: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rings = args.ring or list(RINGS)
    try:
        binary = QemuBinary.get(args.qemu)
        qemu = binary.path
    except QemuNotFound as exc:
        print(f"qtest-virtio fuzz: {exc}", file=sys.stderr)
        return EXIT_UNTESTABLE
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    earlier = sorted(glob.glob(os.path.join(args.out, "*.qtest")))
    print(
        f"seed {seed}; finds kept in {os.path.abspath(args.out)} ({len(earlier)} from earlier runs, replayed first)",
        flush=True,
    )
    # The legacy layout has no packed rings: those targets would repeat the split ones.
    targets = [
        FuzzConfig(d, m, r, qemu, queue=q, hang_timeout=args.hang_timeout, migrate=args.migrate, unplug=args.unplug)
        for d in devices
        for q in DEVICES[d].queues
        for m in transports
        for r in rings
        if not (r == "packed" and modes.USES_LEGACY_LAYOUT[m])
    ]
    deadline = time.monotonic() + args.seconds
    observations: Counter[str] = Counter()
    try:
        known = known_signatures(args.known, binary.version) if args.known else {}
    except TableError as exc:
        print(f"qtest-virtio fuzz: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.known and not known:
        print(
            f"qtest-virtio fuzz: --known {args.known}: no reproducer there is a deviation-table entry live on "
            f"QEMU {format_version(binary.version)} with '{SIGNATURE_HEADER}'"
        )
    found: dict[str, str] = dict(known)
    total = 0
    migrations = 0
    unplugs = 0
    rounds = 0
    still: list[str] = []
    reuse = ReuseStats()
    unreplayed: list[str] = []
    try:
        still = _replay_earlier(earlier, found, qemu, args.hang_timeout)
        while True:
            for config in targets:
                if time.monotonic() >= deadline:
                    break
                reused = not (args.fresh or config.migrate or config.unplug)
                session = Session(config, every=args.restart_every, spare=not args.no_spare) if reused else None
                try:
                    report = fuzz_target(
                        config,
                        max_examples=args.examples,
                        seed=seed + rounds,
                        known=found,
                        shrink_seconds=args.shrink_seconds,
                        deadline=deadline,
                        session=session,
                    )
                except QemuStartError as exc:
                    print(f"{config.name}: cannot run here: {str(exc).splitlines()[0]}", file=sys.stderr)
                    return EXIT_UNTESTABLE
                except FuzzInterrupted as exc:
                    total += exc.report.examples
                    observations.update(exc.report.observations)
                    _keep_interrupted(exc.report, args, found, seed + rounds)
                    raise
                finally:
                    if session is not None:
                        session.close()
                        reuse.merge(session.stats)
                total += report.examples
                migrations += report.migrations
                unplugs += report.unplugs
                observations.update(report.observations)
                print(
                    f"{config.name}: {report.examples} examples in {report.seconds:.1f} s "
                    f"(round {rounds}, seed {seed + rounds})" + _counts(args, report.migrations, report.unplugs),
                    flush=True,
                )
                if report.failure is not None:
                    sig = signature(report.failure)
                    if sig in found:
                        print(f"  {'known' if sig in known else 'again'}: {sig} (as {found[sig]})", flush=True)
                        continue
                    if not _report_failure(report, args, qemu, seed + rounds, found, checked=session is not None):
                        unreplayed.append(sig)
                        continue
                    if not args.keep_going:
                        _print_reuse(reuse, unreplayed, args)
                        return EXIT_FAILED
            rounds += 1
            if time.monotonic() >= deadline or (args.rounds is not None and rounds >= args.rounds):
                break
    except KeyboardInterrupt:
        new = {s: p for s, p in found.items() if s not in known and p not in earlier and s not in unreplayed}
        print(f"interrupted: {total} examples, seed {seed}; kept {len(new)} new find(s) in {os.path.abspath(args.out)}")
        for sig, path in new.items():
            print(f"  {sig}: {path}")
        sys.stdout.flush()
        print("qtest-virtio fuzz: interrupted, exit 128 (aborts a git bisect run)", file=sys.stderr)
        return EXIT_USAGE
    new = {s: p for s, p in found.items() if s not in known and p not in earlier and s not in unreplayed}
    verdict = f"{len(new)} distinct new find(s)" if new else "nothing new found"
    if still:
        verdict += f", {len(still)} earlier find(s) still failing"
    print(f"{verdict}: {total} examples in {rounds} round(s), seed {seed}" + _counts(args, migrations, unplugs))
    for sig, path in new.items():
        print(f"  {sig}: {path}")
    _print_reuse(reuse, unreplayed, args)
    for text, n in observations.most_common():
        print(f"  observed {n}x: {text}")
    return EXIT_FAILED if new or still else EXIT_OK


def _print_reuse(stats: ReuseStats, unreplayed: list[str], args: argparse.Namespace) -> None:
    """What process reuse did: processes started, examples on them, restarts by cause, and the
    finds that did not replay on a fresh QEMU (not kept)."""
    if args.fresh or not stats.processes:
        return
    causes = ", ".join(f"{cause} {n}" for cause, n in stats.restarts.most_common()) or "none"
    spares = (
        ""
        if args.no_spare
        else f", {stats.spares_used} of them spares started ahead (waited {stats.spare_wait_seconds:.1f} s for them"
        + (f"; {stats.spares_failed} failed to start" if stats.spares_failed else "")
        + ")"
    )
    print(
        f"reuse: {stats.examples} examples on {stats.processes} QEMU process(es){spares}, {stats.resets} checked "
        f"resets ({stats.reset_seconds:.1f} s); restarts: {causes}"
    )
    for what, n in stats.reset_failures.most_common():
        print(f"  reset check failed {n}x: {what}")
    if unreplayed:
        print(
            f"  {len(unreplayed)} find(s) did not fail on a fresh QEMU (not kept as reproducers; set aside in "
            f"{os.path.join(args.out, UNREPLAYED_DIR)}): {'; '.join(unreplayed)}"
        )


def _counts(args: argparse.Namespace, migrations: int, unplugs: int) -> str:
    """``, N live migrations`` when ``--migrate`` made migration an action, ``, N unplugs`` when
    ``--unplug`` made hot-unplug one, else nothing."""
    out = f", {migrations} live migration{'' if migrations == 1 else 's'}" if args.migrate else ""
    return out + (f", {unplugs} unplug{'' if unplugs == 1 else 's'}" if args.unplug else "")


def _keep_interrupted(report: FuzzReport, args: argparse.Namespace, found: dict[str, str], seed: int) -> None:
    """Write the failure an interrupted target had found (the smallest by then), unreplayed."""
    failure = report.failure
    if failure is None or signature(failure) in found:
        return
    path = write_reproducer(failure, args.out, seed=seed)
    found[signature(failure)] = path
    print(f"FOUND {failure.summary()}")
    print(f"  interrupted while shrinking: kept the smallest so far, {len(failure.actions)} action(s): {path}")


def _replay_earlier(paths: list[str], found: dict[str, str], qemu: str, timeout: float) -> list[str]:
    """Replay the finds an earlier run left in the output directory (what hypothesis's example
    database would do, which a seeded run does not use): the ones that still fail are not new
    when found again. Returns those paths."""
    still: list[str] = []
    for path in paths:
        try:
            rep = load(path)
            verdict = _verify(path, qemu=qemu, timeout=timeout)
        except QtestVirtioError as exc:
            print(f"  earlier find {os.path.basename(path)}: cannot replay: {str(exc).splitlines()[0]}")
            continue
        print(f"  earlier find {os.path.basename(path)}: {verdict.outcome}", flush=True)
        if verdict.outcome.failed:  # crashed, hung or unrecovered
            still.append(path)
            sig = comment_value(rep.comments, SIGNATURE_HEADER)
            if sig:
                found.setdefault(sig, path)
    return still


def _report_failure(
    report: FuzzReport,
    args: argparse.Namespace,
    qemu: str,
    seed: int,
    found: dict[str, str],
    *,
    checked: bool = False,
) -> bool:
    """Write the find, record it in ``found`` (before the replay, which an interrupt may cut
    short), say what it is and replay the file as ``replay`` would. ``checked`` (the find was
    made on a reused QEMU): the file is kept only when that replay on a fresh QEMU fails too;
    False when it was dropped."""
    failure = report.failure
    assert failure is not None
    path = write_reproducer(failure, args.out, seed=seed)
    found[signature(failure)] = path
    print(f"FOUND {failure.summary()}")
    cut = " (the budget ran out while shrinking: the smallest so far)" if report.shrink_cut else ""
    print(f"  shrunk to {len(failure.actions)} action(s), {len(failure.commands)} qtest commands{cut}: {path}")
    verdict: ReplayResult | None = None
    with contextlib.suppress(QtestVirtioError):
        verdict = _verify(path, qemu=qemu, timeout=args.hang_timeout)
        print(f"  replay: {verdict.outcome}: {verdict.detail}")  # on a fresh QEMU, as replay runs it
    sys.stdout.flush()
    if checked and (verdict is None or not verdict.outcome.failed):
        # Not a reproducer; kept aside (not replayed first by the next run), and its signature
        # stays in ``found``, so finding it again does not cost another shrink.
        aside = os.path.join(args.out, UNREPLAYED_DIR)
        os.makedirs(aside, exist_ok=True)
        moved = os.path.join(aside, os.path.basename(path))
        os.replace(path, moved)
        found[signature(failure)] = moved
        print(f"  not kept: found on a reused QEMU, it does not fail on a fresh one (moved to {moved})", flush=True)
        return False
    return True


def _verify(path: str, *, qemu: str | None, timeout: float) -> ReplayResult:
    """Replay the written file as ``qtest-virtio replay`` would."""
    return replay(load(path), qemu=qemu, timeout=timeout)
