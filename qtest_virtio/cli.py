"""``qtest-virtio``: the command line, a thin adapter over the library.

Exit codes follow ``git bisect run`` (design.md): 0 passed/survived, 1 failed/crashed/hung,
125 cannot be tested here (no binary, QEMU refuses the command line, a flag the binary lacks),
128 usage error or harness bug (aborts a bisect instead of marking a commit bad).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import NoReturn

from . import __name__ as _pkg
from .binary import QemuBinary, QemuNotFound, UnknownFlag
from .errors import QemuCrashed, QemuStartError, QtestVirtioError
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
            accel = "qtest accelerator" if vm.binary.has_qtest_accel else "no qtest accelerator: TCG, -S, halt firmware"
            header = (
                f"# {vm.binary.version_text}\n# machine {spec.machine}, {spec.memory} RAM, "
                f"config access {vm.pci.config.name}, {accel}\n"
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qtest-virtio", description="Drive virtio-pci devices in QEMU's qtest mode.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("probe", help="start a machine and print what a driver sees: PCI functions, BARs, capabilities")
    _machine_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_probe)
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
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.error("a COMMAND is required (probe, flags); see qtest-virtio --help")
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
