"""``qtest-virtio``: the command line, a thin adapter over the library.

Exit codes follow ``git bisect run`` (design.md, mapped in :mod:`.exits`): 0 passed/survived,
1 failed/crashed/hung, 125 cannot be tested here (no binary, QEMU refuses the command line, a
flag the binary lacks), 128 usage error or harness bug (aborts a bisect instead of marking a
commit bad).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..binary import BadFlagValue, FlagTypo, QemuBinary
from ..devices import registry
from ..errors import UsageError
from ..probe import format_report, probe, to_json
from ..vm import Machine
from .args import Parser, add_machine_arguments, spec_from_args
from .exits import EXIT_FAILED, EXIT_OK, EXIT_UNTESTABLE, EXIT_USAGE, INTERRUPTED, guarded
from .options import machine_type, parse_flags, parse_transports

if TYPE_CHECKING:  # the runner imports pytest: only ``run`` and ``conformance`` load it
    from .runner import ResultCollector


def cmd_probe(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    with Machine(spec) as vm:
        functions = probe(vm.pci)
        if args.json:
            print(json.dumps(to_json(functions), indent=2))
        else:
            header = (
                f"# {vm.binary.identity}\n# {vm.binary.version_text}\n# machine {spec.machine}, {spec.memory} RAM, "
                f"config access {vm.pci.config.name}\n"
            )
            print(format_report(functions, header), end="")
    return EXIT_OK


def cmd_flags(args: argparse.Namespace) -> int:
    binary = QemuBinary.get(args.qemu)
    devices = args.device or ["virtio-blk-pci"]
    for name in devices:
        if name not in binary.devices:
            raise binary.unknown_device(name)
        print(f"{name} ({binary.path}, {binary.version_text}):")
        for prop in sorted(binary.device_properties(name).values(), key=lambda p: p.name):
            default = f" (default: {prop.default})" if prop.default is not None else ""
            print(f"  {prop.name}=<{prop.type}>{default}")
    return EXIT_OK


def _suite_dir() -> str:
    """The bundled scenario suite (shipped in the wheel as qtest_virtio_scenarios)."""
    import importlib.util

    spec = importlib.util.find_spec("qtest_virtio_scenarios")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the bundled scenario suite (qtest_virtio_scenarios) is not installed; name TARGETS")
    return next(iter(spec.submodule_search_locations))


def _pytest_args(args: argparse.Namespace, binary: QemuBinary) -> list[str]:
    targets = list(args.targets) or [_suite_dir()]
    out = [*targets, f"--qemu={binary.path}", f"--qemu-machine={args.machine}"]
    if getattr(args, "migrate_to", None):
        out.append(f"--migrate-to={args.migrate_to}")
    if args.flags:
        out.append(f"--virtio-flags={args.flags}")
    if args.transport:
        out.append(f"--virtio-transport={args.transport}")
    if args.refuse:
        out.append(f"--virtio-refuse={args.refuse}")
    if getattr(args, "strict_deviations", False):
        out.append("--strict-deviations")
    refuse_each = getattr(args, "refuse_each", None)
    if refuse_each is None:  # the main job checks every refusal; a named target is run as named
        refuse_each = not args.targets
    if refuse_each:
        out.append("--virtio-refuse-each")
    jobs = args.jobs
    if jobs != "1":
        import importlib.util

        if importlib.util.find_spec("xdist") is not None:
            out += ["-n", jobs]
    return [*out, "-q", "-p", "no:cacheprovider", "-p", "no:benchmark", *args.pytest_args]


def _check_run_flags(text: str, binary: QemuBinary) -> dict[str, str]:
    """``--flags`` as ``run`` passes it to every virtio device: well formed, none the harness
    owns, each value one its type takes (128), each name in this binary (else 125 or 128)."""
    flags = parse_flags(text, option="--flags", transport_option="--transport")  # OptionError: 128
    try:  # a typo aborts (128); a real flag this binary lacks means 'cannot test here' (125)
        binary.check_flags(flags, registry.drivers())
        binary.check_flag_values(flags, registry.drivers())
    except (FlagTypo, BadFlagValue) as exc:
        raise UsageError(f"--flags: {exc}") from None
    return flags


def _run_suite(args: argparse.Namespace) -> tuple[int, ResultCollector, QemuBinary]:
    from .runner import run_pytest

    binary = QemuBinary.get(args.qemu)
    parse_transports(args.transport)  # OptionError: 128
    _check_run_flags(args.flags, binary)
    print(binary.identity, flush=True)
    if getattr(args, "migrate_to", None):
        dest = QemuBinary.get(args.migrate_to)  # not found: 125, as for --qemu
        args.migrate_to = dest.path
        print(f"migration scenarios migrate to: {dest.identity}", flush=True)
    code, collector = run_pytest(_pytest_args(args, binary))
    return code, collector, binary


def _exit_code(code: int, collector: ResultCollector) -> int:
    """pytest's exit code and the outcomes -> the git-bisect-run contract of design.md."""
    counts = collector.counts()
    ran = counts["passed"] + counts["failed"] + counts["error"] + counts["xfailed"] + counts["xpassed"]
    if code == 2:  # pytest caught the interrupt itself
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_USAGE
    if code in (3, 4):  # internal error, usage error
        return EXIT_USAGE
    if code == 5:
        print("qtest-virtio: no tests were collected (check TARGETS and -k)", file=sys.stderr)
        return EXIT_USAGE
    # An XPASS of a deviation not verified on this version is listed, not fatal; a strict one
    # (verified here, or --strict-deviations) is a failure already.
    if code == 1 or counts["failed"] or counts["error"]:
        return EXIT_FAILED
    if ran == 0 and counts["skipped"]:
        print("qtest-virtio: every test was skipped: cannot be tested with this binary", file=sys.stderr)
        return EXIT_UNTESTABLE
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from . import coverage_cmd

    with coverage_cmd.measuring(args) as measurement:
        code, collector, binary = _run_suite(args)
        print()
        print(collector.summary_table(title=binary.identity))
        if measurement is not None:
            coverage_cmd.print_report(measurement, binary.identity)
    return _exit_code(code, collector)


def cmd_conformance(args: argparse.Namespace) -> int:
    from .runner import conformance_markdown

    code, collector, binary = _run_suite(args)
    command = "qtest-virtio conformance" + "".join(
        f" --{k} {v}" for k, v in (("flags", args.flags), ("transport", args.transport)) if v
    )
    text = conformance_markdown(collector, qemu=binary.version_text, command=command)
    output = args.output or os.path.join(_suite_dir(), "CONFORMANCE.md")
    with open(output, "w") as f:
        f.write(text)
    rows = collector.conformance_rows()
    print(f"\nwrote {output}: {len(rows)} requirements, {sum(r['runs'] for r in rows)} runs")
    return _exit_code(code, collector)


def cmd_replay(args: argparse.Namespace) -> int:
    """One FILE on one binary: the verdict with notes, stderr tail and command line. Several
    files (a DIR) or several --qemu: one row per file and binary, and the combined exit code
    (reproducer.combined_exit_code: 1 if any row crashed or hung, else 125 if any could not run)."""
    from ..reproducer import collect, combined_exit_code, describe, load, replay, replay_rows, tally, version_labels

    paths = collect(args.file)  # ScenarioError (file:line) -> 128
    reps = [load(p) for p in paths]  # every file parsed before anything runs
    qemus = args.qemu or [None]
    if len(reps) == 1 and len(qemus) == 1 and not os.path.isdir(args.file):
        rep = reps[0]
        result = replay(rep, qemu=qemus[0], timeout=args.timeout, settle_s=args.settle, trace=args.trace)
        for note in result.notes:
            print(f"note: {note}")
        print(f"{args.file}: {describe(result, rep)}")
        if result.outcome in ("crashed", "hung", "unrecovered") and result.stderr_tail.strip():
            print("QEMU stderr (tail):")
            print("\n".join("    " + line for line in result.stderr_tail.splitlines()))
        if result.outcome != "survived" and result.command_line:
            print(f"command line (qtest on stdio): {result.command_line}")
        return result.exit_code
    if args.trace:
        raise UsageError("--trace replays one FILE on one --qemu; name one of each")
    binaries = [QemuBinary.get(q) for q in qemus]  # a missing one -> 125 before anything runs
    for b in binaries:
        print(b.identity)
    names = {
        id(rep): os.path.basename(p) if os.path.isdir(args.file) else p for rep, p in zip(reps, paths, strict=True)
    }
    width = max(len("reproducer"), *map(len, names.values()))
    label_width = max(len(lab) for lab in version_labels(binaries))
    print(f"{'reproducer':<{width}}  {'QEMU':<{label_width}}  verdict")
    results = []
    for row in replay_rows(reps, binaries, timeout=args.timeout, settle_s=args.settle):
        results.append(row.result)
        print(f"{names[id(row.rep)]:<{width}}  {row.label:<{label_width}}  {row.verdict}", flush=True)
    code = combined_exit_code(results)
    print(f"{len(reps)} reproducer(s) x {len(binaries)} QEMU binaries: {tally(results)}; exit {code}")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    """An upstream-ready report (QEMU's GitLab bug template) of FILE replayed on each binary.
    0: written and it reproduces somewhere; 1: written, but it reproduces nowhere; 125: no binary
    could run it."""
    from ..report import provided_binaries, render
    from ..reproducer import combined_exit_code, load, replay_rows

    if os.path.isdir(args.file):
        raise UsageError(f"{args.file} is a folder: report takes one FILE (replay takes a folder)")
    if args.output not in (None, "-") and not os.access(os.path.dirname(args.output) or ".", os.W_OK):
        raise UsageError(f"--output {args.output}: its folder does not exist or is not writable")
    rep = load(args.file)  # ScenarioError (file:line) -> 128
    binaries = [QemuBinary.get(q) for q in (args.qemu or provided_binaries())]
    rows = []
    for row in replay_rows([rep], binaries, timeout=args.timeout, settle_s=args.settle):
        print(f"{row.label}: {row.verdict}", file=sys.stderr, flush=True)
        rows.append(row)
    text = render(rep, rows)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise UsageError(f"--output {args.output}: cannot write: {exc.strerror}") from None
        print(f"wrote {args.output}", file=sys.stderr)
    if all(r.result.outcome == "cannot-run" for r in rows):
        print("qtest-virtio: cannot test here: no binary could run the reproducer", file=sys.stderr)
        return EXIT_UNTESTABLE
    if combined_exit_code(r.result for r in rows) != EXIT_FAILED:
        print("qtest-virtio: it reproduces on none of these binaries: nothing to report upstream", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_bisect_flags(args: argparse.Namespace) -> int:
    from ..bisect import bisect_flags, candidate_changes, parse_changes, subprocess_probe

    binary = QemuBinary.get(args.qemu)
    _check_run_flags(args.flags, binary)  # every probe would end with the same usage error
    given = parse_changes(args.flags, args.refuse)
    probe = subprocess_probe(args.target, binary.path, [f"--transport={args.transport}"] if args.transport else [])
    candidates = [] if given else candidate_changes(binary)
    answer = bisect_flags(probe, given, candidates, say=lambda s: print(s, flush=True))
    print(answer.line())
    return EXIT_OK


def cmd_bisect(args: argparse.Namespace) -> int:
    from ..bisect import DEFAULT_BUILD, describe_commit, git_bisect

    # The binary is not built yet: its values are checked by each step's run. OptionError: 128.
    parse_flags(args.flags, option="--flags", transport_option="--transport")
    extra = [
        f"--{k}={v}" for k, v in (("flags", args.flags), ("refuse", args.refuse), ("transport", args.transport)) if v
    ]
    first = git_bisect(
        args.repo,
        args.good,
        args.bad,
        args.target,
        build=args.build or DEFAULT_BUILD,
        binary=args.binary,
        extra=extra,
        say=lambda s: print(s, flush=True),
    )
    print(f"first bad commit: {describe_commit(args.repo, first)}")
    return EXIT_OK


def cmd_bisect_step(args: argparse.Namespace) -> int:
    from ..bisect import bisect_step

    return bisect_step(args.repo, args.build, args.binary, args.target, args.pytest_args)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "targets", nargs="*", metavar="TARGET", help="test files, dirs or node ids (default: the bundled suite)"
    )
    p.add_argument("--qemu", default=None, help="QEMU binary (default: $QEMU or qemu-system-x86_64 on PATH)")
    p.add_argument(
        "--machine",
        default="q35",
        type=machine_type,
        help="machine type: q35 (default), pc, or a versioned pc-q35-X.Y / pc-i440fx-X.Y",
    )
    p.add_argument(
        "--migrate-to",
        default=None,
        metavar="PATH",
        help="destination QEMU of the migration scenarios (default: the --qemu binary); across versions, "
        "pass a versioned --machine both have, e.g. pc-q35-7.2",
    )
    p.add_argument("--flags", default="", metavar="K=V,...", help="device properties for every virtio device")
    p.add_argument("--transport", default="", metavar="LIST", help="transport modes (default: all four)")
    p.add_argument("--refuse", default="", metavar="F,...", help="features the driver declines")
    p.add_argument("-n", "--jobs", default="2", help="parallel workers (pytest-xdist; 1 = in this process)")
    p.add_argument(
        "--strict-deviations",
        action="store_true",
        help="every known QEMU deviation strict: an XPASS also on a version the table did not verify fails the run",
    )
    p.add_argument(
        "--refuse-each",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run each scenario with each feature its driver implements refused, one at a time "
        "(modern layout, split ring; default: on for the bundled suite, off for named TARGETS)",
    )
    p.set_defaults(pytest_args=[])


def _settle_seconds(text: str) -> float:
    """--settle S: a finite number of seconds, 0 or more (0: judge right after the last command)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0 (e.g. --settle 1)")
    return value


def _replay_args(p: argparse.ArgumentParser, qemu_help: str) -> None:
    """--qemu (repeatable), --timeout and --settle, as replay and report both take them."""
    from ..outcome import DEFAULT_SETTLE

    p.add_argument("--qemu", action="append", default=[], metavar="PATH", help=qemu_help)
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds without a reply that count as a hang (default: the file's '# timeout:', else 10)",
    )
    p.add_argument(
        "--settle",
        type=_settle_seconds,
        default=DEFAULT_SETTLE,
        metavar="S",
        help="seconds QEMU runs after the last command before the verdict, its virtual clock stepped as "
        f"much where the build has the qtest accelerator (default: {DEFAULT_SETTLE:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qtest-virtio", description="Drive virtio-pci devices in QEMU's qtest mode.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    p = sub.add_parser("probe", help="start a machine and print what a driver sees: PCI functions, BARs, capabilities")
    add_machine_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_probe)
    sh = sub.add_parser(
        "shell", help="an interactive qtest session on a started machine: raw qtest commands and named registers"
    )
    from .shell import add_arguments, run_shell

    add_arguments(sh)
    sh.set_defaults(func=run_shell)
    from .fuzz_cmd import add_arguments as add_fuzz_arguments
    from .fuzz_cmd import run_fuzz

    fz = sub.add_parser("fuzz", help="hostile-driver fuzzing (hypothesis); shrinks a failure to a .qtest reproducer")
    add_fuzz_arguments(fz)
    fz.set_defaults(func=run_fuzz)
    r = sub.add_parser("run", help="run scenarios (default: the bundled suite) and print a summary table")
    _run_args(r)
    from .coverage_cmd import add_arguments as add_coverage_arguments

    add_coverage_arguments(r)
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("conformance", help="run the suite and write the conformance matrix (CONFORMANCE.md)")
    _run_args(c)
    c.add_argument("--output", default=None, help="where to write it (default: the suite's CONFORMANCE.md)")
    c.set_defaults(func=cmd_conformance)
    bf = sub.add_parser("bisect-flags", help="find the smallest set of flag changes that decides a failing target")
    bf.add_argument("target", nargs="+", metavar="TARGET")
    bf.add_argument("--qemu", default=None)
    bf.add_argument("--flags", default="", metavar="K=V,...", help="the settings it fails with (narrowed down)")
    bf.add_argument("--refuse", default="", metavar="F,...")
    bf.add_argument("--transport", default="", metavar="LIST")
    bf.set_defaults(func=cmd_bisect_flags)
    bs = sub.add_parser("bisect", help="git bisect a QEMU tree with a build step and a target")
    bs.add_argument("target", nargs="+", metavar="TARGET")
    bs.add_argument("--repo", required=True, help="the QEMU source tree (a git repository)")
    bs.add_argument("--good", required=True)
    bs.add_argument("--bad", required=True)
    bs.add_argument("--build", default=None, help="build command run in the tree (default: configure + make)")
    bs.add_argument("--binary", default="build/qemu-system-x86_64", help="the built binary, relative to --repo")
    bs.add_argument("--flags", default="")
    bs.add_argument("--refuse", default="")
    bs.add_argument("--transport", default="")
    bs.set_defaults(func=cmd_bisect)
    st = sub.add_parser("bisect-step", help=argparse.SUPPRESS)
    st.add_argument("target", nargs="+")
    st.add_argument("--repo", required=True)
    st.add_argument("--build", required=True)
    st.add_argument("--binary", required=True)
    st.set_defaults(func=cmd_bisect_step, pytest_args=[])
    rp = sub.add_parser(
        "replay", help="replay QEMU bug-report reproducers (.qtest) on one or more binaries: survived, crashed or hung"
    )
    rp.add_argument("file", metavar="FILE|DIR", help="a .qtest reproducer, or a folder of them")
    _replay_args(rp, "QEMU binary (replaces the one named in the file); repeat for one row per binary")
    rp.add_argument("--trace", action="store_true", help="print each command with its reply")
    rp.set_defaults(func=cmd_replay)
    rr = sub.add_parser(
        "report", help="an upstream-ready bug report (QEMU's GitLab template) of a reproducer replayed on each binary"
    )
    rr.add_argument("file", metavar="FILE", help="a .qtest reproducer")
    _replay_args(rr, "QEMU binary to replay on, repeatable (default: every binary scripts/qemu.sh has cached)")
    rr.add_argument("-o", "--output", default=None, metavar="PATH", help="where to write it (default: stdout)")
    rr.set_defaults(func=cmd_report)
    f = sub.add_parser("flags", help="the device properties (flags) this binary supports, with defaults")
    f.add_argument("--qemu", default=None)
    f.add_argument("--device", action="append", default=[], metavar="NAME")
    f.set_defaults(func=cmd_flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:  # everything after -- goes to pytest untouched
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if pytest_args:
        args.pytest_args = pytest_args
    if not getattr(args, "func", None):
        parser.error(
            "a COMMAND is required (run, replay, report, bisect, bisect-flags, fuzz, conformance, probe, shell, "
            "flags); see qtest-virtio --help"
        )
    return guarded(lambda: int(args.func(args)))


if __name__ == "__main__":
    sys.exit(main())
