"""``qtest-virtio run --coverage-build DIR``: the run's QEMUs write private gcov counters, read
back into a per-file table (and gcovr's HTML report) once the run is over (issue 14)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..coverage import DEFAULT_FILES, Counters, CoverageError, CoverageReport, GcovBuild


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("coverage (a QEMU built with --enable-gcov)")
    g.add_argument(
        "--coverage-build",
        default=None,
        metavar="DIR",
        help="QEMU gcov build tree: run its qemu-system-x86_64 (unless --qemu names it) and report what the run "
        "executed, from zero, without touching the tree's own counters",
    )
    g.add_argument(
        "--coverage-file",
        action="append",
        default=[],
        metavar="PATH",
        help="a source file to report besides the virtio core and device files (path in QEMU's tree; repeatable)",
    )
    g.add_argument("--coverage-html", default=None, metavar="DIR", help="write gcovr's HTML report into DIR")


@dataclass
class Measurement:
    counters: Counters
    files: tuple[str, ...]
    html: str | None

    def report(self) -> CoverageReport:
        return self.counters.report(self.files, html=self.html)


def _check(args: argparse.Namespace) -> GcovBuild | None:
    """The build to measure, and ``args.qemu`` set to its binary; None when no coverage is asked."""
    wants = args.coverage_file or args.coverage_html
    if args.coverage_build is None:
        if wants:
            option = "--coverage-file" if args.coverage_file else "--coverage-html"
            raise CoverageError(
                f"{option} needs --coverage-build DIR (a QEMU build tree configured with --enable-gcov)"
            )
        return None
    build = GcovBuild.locate(args.coverage_build)
    if args.qemu is None:
        args.qemu = str(build.binary)
    elif Path(args.qemu).resolve().parent != build.build:
        raise CoverageError(
            f"--qemu {args.qemu} is not the binary of --coverage-build {args.coverage_build}: "
            f"leave --qemu out, or name {build.binary}"
        )
    for source_file in args.coverage_file:
        build.notes(source_file)  # CoverageError now, not after the run
    return build


@contextlib.contextmanager
def measuring(args: argparse.Namespace) -> Iterator[Measurement | None]:
    """For the length of the run, every QEMU it starts (in this process or a pytest-xdist worker,
    which inherit the environment) writes its counters into a private directory, removed after."""
    build = _check(args)
    if build is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="qtest-virtio-gcov-") as directory:
        counters = Counters(build, directory)
        counters.reset()
        saved = {k: os.environ.get(k) for k in counters.env()}
        os.environ.update(counters.env())
        try:
            yield Measurement(counters, (*DEFAULT_FILES, *args.coverage_file), args.coverage_html)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def print_report(measurement: Measurement, title: str) -> None:
    print()
    print(measurement.report().table(title=f"coverage of {title}, this run only:"))
