"""The command-line pieces ``qtest-virtio`` and its shell share: a parser whose usage errors
exit 128, and a machine spec from ``--qemu/--machine/--memory/--device`` (probe and shell)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..binary import QemuBinary
from ..errors import UsageError
from ..machine import MachineSpec, split_option_list
from .exits import EXIT_USAGE
from .options import machine_type


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; the contract's usage error is 128 (aborts a bisect)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def split_device_option(text: str) -> tuple[str, dict[str, str]]:
    """``NAME,PROP=VAL,...`` as QEMU writes it (``,,`` is a literal comma) -> (name, props)."""
    parts = split_option_list(text)
    name, props = parts[0], {}
    if not name:
        raise UsageError(f"--device {text!r}: no device name")
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if not eq or not key:
            raise UsageError(f"--device {text!r}: {p!r} is not PROP=VALUE")
        props[key] = value
    return name, props


def add_machine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qemu", default=None, help="QEMU binary (default: $QEMU or qemu-system-x86_64 on PATH)")
    p.add_argument(
        "--machine",
        default="q35",
        type=machine_type,
        help="machine type: q35 (default), pc, or a versioned pc-q35-X.Y / pc-i440fx-X.Y",
    )
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="NAME[,PROP=VAL...]",
        help="a -device to add (repeatable); backends such as a scratch disk image are made for you",
    )


def spec_from_args(args: argparse.Namespace) -> MachineSpec:
    """The spec :func:`add_machine_arguments` describes, each device and property checked
    against the binary before QEMU starts (UnknownFlag: 125)."""
    spec = MachineSpec(qemu=args.qemu, machine=args.machine, memory=args.memory)
    binary = QemuBinary.get(args.qemu)
    for text in args.device:
        name, props = split_device_option(text)
        if name not in binary.devices:
            raise binary.unknown_device(name)
        binary.check_properties(name, list(props))
        spec.add_device(name, props)
    return spec
