"""``qtest-virtio``: the command line, a thin adapter over the library.

Exit codes follow ``git bisect run`` (design.md): 0 passed/survived, 1 failed/crashed/hung,
125 cannot be tested here (no binary, QEMU refuses the command line, a flag the binary lacks),
128 usage error or harness bug (aborts a bisect instead of marking a commit bad).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __name__ as _pkg
from .binary import QemuBinary, QemuNotFound, UnknownFlag
from .bisect import BisectError
from .errors import QemuCrashed, QemuStartError, QtestVirtioError, ScenarioError
from .machine import MachineSpec
from .probe import format_report, probe, to_json
from .vm import Machine

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNTESTABLE = 125
EXIT_USAGE = 128


class UsageError(Exception):
    """Bad command-line input: exits 128 so that a typo aborts a bisect."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def split_device_option(text: str) -> tuple[str, dict[str, str]]:
    """``NAME,PROP=VAL,...`` as QEMU writes it (``,,`` is a literal comma) -> (name, props)."""
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    name, props = parts[0], {}
    if not name:
        raise UsageError(f"--device {text!r}: no device name")
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if not eq or not key:
            raise UsageError(f"--device {text!r}: {p!r} is not PROP=VALUE")
        props[key] = value
    return name, props


def _machine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qemu", default=None, help="QEMU binary (default: $QEMU or qemu-system-x86_64 on PATH)")
    p.add_argument("--machine", default="q35", choices=("q35", "pc"), help="machine type (default q35)")
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="NAME[,PROP=VAL...]",
        help="a -device to add (repeatable); backends such as a scratch disk image are made for you",
    )


def _spec_from(args: argparse.Namespace) -> MachineSpec:
    spec = MachineSpec(qemu=args.qemu, machine=args.machine, memory=args.memory)
    binary = QemuBinary.get(args.qemu)
    for text in args.device:
        name, props = split_device_option(text)
        if name not in binary.devices:
            raise binary.unknown_device(name)
        binary.check_properties(name, list(props))
        spec.add_device(name, props)
    return spec


def cmd_probe(args: argparse.Namespace) -> int:
    spec = _spec_from(args)
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


#: Feature-flag properties this project knows on virtio-pci devices: a name missing from an
#: (older) binary makes a run untestable (125), a name unknown everywhere is a typo (128).
KNOWN_FLAGS = frozenset(
    {
        "event_idx", "indirect_desc", "packed", "queue_reset", "any_layout", "notify_on_empty",
        "page-per-vq", "modern-pio-notify", "ioeventfd", "use-disabled-flag", "iommu_platform",
        "disable-legacy", "disable-modern", "use-started", "vectors", "x-disable-legacy-check",
        "num-queues", "queue-size", "mrg_rxbuf", "mq", "ctrl_vq", "seg-max-adjust", "discard",
        "write-zeroes", "deflate-on-oom", "free-page-hint", "max_ports", "emergency-write",
    }
)  # fmt: skip
VIRTIO_DEVICES = ("virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci", "virtio-serial-pci", "virtio-balloon-pci")


def _suite_dir() -> str:
    """The bundled scenario suite (shipped in the wheel as qtest_virtio_scenarios)."""
    import importlib.util

    spec = importlib.util.find_spec("qtest_virtio_scenarios")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the bundled scenario suite (qtest_virtio_scenarios) is not installed; name TARGETS")
    return next(iter(spec.submodule_search_locations))


def _check_run_flags(binary: QemuBinary, flags: dict[str, str]) -> None:
    """A typo aborts (128); a real flag this binary lacks means 'cannot test here' (125)."""
    have: set[str] = set()
    for device in VIRTIO_DEVICES:
        if device in binary.devices:
            have |= set(binary.device_properties(device))
    for name in flags:
        if name in have:
            continue
        if name in KNOWN_FLAGS:
            raise UnknownFlag(f"flag {name!r} is not supported by {binary.path} ({binary.version_text})")
        close = difflib.get_close_matches(name, sorted(have | KNOWN_FLAGS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see `qtest-virtio flags --qemu {binary.path}`"
        raise UsageError(f"--flags: unknown flag {name!r}{hint}")


def _pytest_args(args: argparse.Namespace, binary: QemuBinary) -> list[str]:
    targets = list(args.targets) or [_suite_dir()]
    out = [*targets, f"--qemu={binary.path}", f"--qemu-machine={args.machine}"]
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


def _run_suite(args: argparse.Namespace) -> tuple[int, Any, QemuBinary]:
    from pytest_qtest_virtio.params import OptionError, parse_flags, parse_transports
    from pytest_qtest_virtio.runner import run_pytest

    binary = QemuBinary.get(args.qemu)
    try:
        parse_transports(args.transport)
        flags = parse_flags(args.flags)
    except OptionError as exc:
        raise UsageError(str(exc)) from None
    _check_run_flags(binary, flags)
    print(binary.identity, flush=True)
    code, collector = run_pytest(_pytest_args(args, binary))
    return code, collector, binary


def _exit_code(code: int, collector: Any) -> int:
    """pytest's exit code and the outcomes -> the git-bisect-run contract of design.md."""
    counts = collector.counts()
    ran = counts["passed"] + counts["failed"] + counts["error"] + counts["xfailed"] + counts["xpassed"]
    if code in (2, 3, 4):  # interrupted, internal error, usage error
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
    code, collector, binary = _run_suite(args)
    print()
    print(collector.summary_table(title=binary.identity))
    return _exit_code(code, collector)


def cmd_conformance(args: argparse.Namespace) -> int:
    from pytest_qtest_virtio.runner import conformance_markdown

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
    from .reproducer import describe, load, replay

    rep = load(args.file)  # ScenarioError (file:line) -> 128
    result = replay(rep, qemu=args.qemu, timeout=args.timeout, trace=args.trace)
    for note in result.notes:
        print(f"note: {note}")
    print(f"{args.file}: {describe(result, rep)}")
    if result.outcome in ("crashed", "hung", "unrecovered") and result.stderr_tail.strip():
        print("QEMU stderr (tail):")
        print("\n".join("    " + line for line in result.stderr_tail.splitlines()))
    if result.outcome != "survived" and result.command_line:
        print(f"command line (qtest on stdio): {result.command_line}")
    return result.exit_code


def cmd_bisect_flags(args: argparse.Namespace) -> int:
    from .bisect import bisect_flags, candidate_changes, parse_changes, subprocess_probe

    binary = QemuBinary.get(args.qemu)
    given = parse_changes(args.flags, args.refuse)
    probe = subprocess_probe(args.target, binary.path, [f"--transport={args.transport}"] if args.transport else [])
    candidates = [] if given else candidate_changes(binary)
    answer = bisect_flags(probe, given, candidates, say=lambda s: print(s, flush=True))
    print(answer.line())
    return EXIT_OK


def cmd_bisect(args: argparse.Namespace) -> int:
    from .bisect import DEFAULT_BUILD, describe_commit, git_bisect

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
    from .bisect import bisect_step

    return bisect_step(args.repo, args.build, args.binary, args.target, args.pytest_args)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "targets", nargs="*", metavar="TARGET", help="test files, dirs or node ids (default: the bundled suite)"
    )
    p.add_argument("--qemu", default=None, help="QEMU binary (default: $QEMU or qemu-system-x86_64 on PATH)")
    p.add_argument("--machine", default="q35", choices=("q35", "pc"))
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qtest-virtio", description="Drive virtio-pci devices in QEMU's qtest mode.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("probe", help="start a machine and print what a driver sees: PCI functions, BARs, capabilities")
    _machine_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_probe)
    sh = sub.add_parser(
        "shell", help="an interactive qtest session on a started machine: raw qtest commands and named registers"
    )
    from .shell import add_arguments, run_shell

    add_arguments(sh)
    sh.set_defaults(func=run_shell)
    from .fuzz import add_arguments as add_fuzz_arguments
    from .fuzz import run_fuzz

    fz = sub.add_parser("fuzz", help="hostile-driver fuzzing (hypothesis); shrinks a failure to a .qtest reproducer")
    add_fuzz_arguments(fz)
    fz.set_defaults(func=run_fuzz)
    r = sub.add_parser("run", help="run scenarios (default: the bundled suite) and print a summary table")
    _run_args(r)
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
    rp = sub.add_parser("replay", help="replay a QEMU bug-report reproducer (.qtest): survived, crashed or hung")
    rp.add_argument("file", metavar="FILE")
    rp.add_argument("--qemu", default=None, help="QEMU binary (replaces the one named in the file)")
    rp.add_argument("--timeout", type=float, default=10.0, help="seconds without a reply that count as a hang")
    rp.add_argument("--trace", action="store_true", help="print each command with its reply")
    rp.set_defaults(func=cmd_replay)
    f = sub.add_parser("flags", help="the device properties (flags) this binary supports, with defaults")
    f.add_argument("--qemu", default=None)
    f.add_argument("--device", action="append", default=[], metavar="NAME")
    f.set_defaults(func=cmd_flags)
    return parser


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        # Make SIGTERM unwind like Ctrl-C, so teardown stops QEMU and removes its directory.
        signal.signal(signal.SIGTERM, _sigterm)
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
            "a COMMAND is required (run, replay, bisect, bisect-flags, fuzz, conformance, probe, shell, flags); "
            "see qtest-virtio --help"
        )
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"qtest-virtio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (QemuNotFound, UnknownFlag) as exc:
        print(f"qtest-virtio: cannot test here: {exc}", file=sys.stderr)
        return EXIT_UNTESTABLE
    except QemuStartError as exc:
        print(f"qtest-virtio: cannot test here: {exc}", file=sys.stderr)
        return EXIT_UNTESTABLE
    except QemuCrashed as exc:
        print(f"qtest-virtio: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ScenarioError as exc:
        print(f"qtest-virtio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BisectError as exc:
        print(f"qtest-virtio: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except QtestVirtioError as exc:
        print(f"qtest-virtio: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("qtest-virtio: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"qtest-virtio: internal error in {_pkg} (harness bug), exit {EXIT_USAGE}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
