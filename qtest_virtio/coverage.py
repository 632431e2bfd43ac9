"""What a run of the suite executed of QEMU's own code, read from a gcov build (issue 14).

A QEMU configured with ``--enable-gcov`` writes its line and branch counters (``.gcda``) when it
exits. :class:`Counters` gives one run a private counter directory through libgcov's
``GCOV_PREFIX``, so the run starts from zero without touching the build tree's own counters (a
developer's earlier runs stay as they were) and two runs at once cannot mix. :meth:`Counters.report`
links each object's ``.gcno`` beside its counters and reads them with gcovr: lines, branches and
the functions never called, per source file, and gcovr's HTML report when asked.

QEMU is stopped with QMP ``quit`` or SIGTERM by the Machine layer, and both run libgcov's exit
handler; a QEMU killed with SIGKILL or by an abort leaves no counters, as gcov always does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

#: The files issue 14 measures: the virtio core, the PCI transport and the six device models the
#: drivers of this project drive (their paths in QEMU's source tree).
DEFAULT_FILES: tuple[str, ...] = (
    "hw/virtio/virtio.c",
    "hw/virtio/virtio-pci.c",
    "hw/block/virtio-blk.c",
    "hw/net/virtio-net.c",
    "hw/scsi/virtio-scsi.c",
    "hw/char/virtio-serial-bus.c",
    "hw/char/virtio-console.c",
    "hw/virtio/virtio-balloon.c",
    "hw/virtio/virtio-rng.c",
)

#: The system emulator meson builds at the top of its build tree.
BINARY = "qemu-system-x86_64"


class CoverageError(UsageError):
    """A coverage request that cannot be met as given (not a gcov build, no such source file,
    gcovr missing); each message names the fix. A usage error: it aborts a bisect (128)."""


def _source_of(build: Path) -> Path:
    """The source tree meson configured ``build`` from (``meson-info/meson-info.json``), else
    the build tree's parent, where ``./configure`` puts ``build/``."""
    info = build / "meson-info" / "meson-info.json"
    try:
        source = json.loads(info.read_text())["directories"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return build.parent
    return Path(source)


def _object_stem(source_file: str) -> str:
    """meson's object name for a source file: ``hw/virtio/virtio.c`` -> ``hw_virtio_virtio.c``."""
    return source_file.replace("/", "_")


@dataclass(frozen=True)
class GcovBuild:
    """A QEMU build tree configured with ``--enable-gcov``: its ``.gcno`` notes say which lines
    and branches each object has."""

    build: Path
    source: Path

    @classmethod
    def locate(cls, path: str | os.PathLike[str]) -> GcovBuild:
        """The gcov build at ``path`` (its build directory, or the QEMU binary inside it)."""
        given = Path(path).expanduser()
        build = given.parent if given.is_file() else given
        if not build.is_dir():
            raise CoverageError(f"--coverage-build {path}: no such directory; name a QEMU build tree")
        build = build.resolve()
        if next(build.glob("*.p/*.gcno"), None) is None:
            raise CoverageError(
                f"--coverage-build {path}: not a gcov build (no .gcno notes under it); "
                "configure QEMU with --enable-gcov and build it, or run: bash scripts/qemu.sh provide gcov-10.0.2"
            )
        return cls(build=build, source=_source_of(build))

    @property
    def binary(self) -> Path:
        return self.build / BINARY

    def notes(self, source_file: str) -> list[Path]:
        """The ``.gcno`` of every object compiled from ``source_file`` (a file may go into more
        than one library); CoverageError when there is none."""
        found = sorted(self.build.glob(f"*.p/{_object_stem(source_file)}.gcno"))
        if not found:
            raise CoverageError(
                f"--coverage-file {source_file}: no object of {self.build} was compiled from it; "
                f"name a path under {self.source} that this build compiles (e.g. hw/virtio/virtio-mem.c)"
            )
        return found


@dataclass(frozen=True)
class FileCoverage:
    """One source file's counts, as gcovr reads them; the denominator is the whole file."""

    file: str
    lines_covered: int
    lines_total: int
    branches_covered: int
    branches_total: int
    functions_covered: int
    functions_total: int
    never_called: tuple[str, ...] = ()

    @staticmethod
    def percent(covered: int, total: int) -> float:
        return 100.0 * covered / total if total else 0.0

    @property
    def line_percent(self) -> float:
        return self.percent(self.lines_covered, self.lines_total)

    @property
    def branch_percent(self) -> float:
        return self.percent(self.branches_covered, self.branches_total)


@dataclass(frozen=True)
class CoverageReport:
    """The per-file rows of one run, and where the HTML report went (if asked)."""

    build: GcovBuild
    files: tuple[FileCoverage, ...]
    html: Path | None = None

    def total(self) -> FileCoverage:
        def add(name: str) -> int:
            return sum(int(getattr(f, name)) for f in self.files)

        return FileCoverage(
            "total",
            add("lines_covered"),
            add("lines_total"),
            add("branches_covered"),
            add("branches_total"),
            add("functions_covered"),
            add("functions_total"),
        )

    def by_file(self) -> dict[str, FileCoverage]:
        return {f.file: f for f in self.files}

    def table(self, title: str = "") -> str:
        """The per-file table ``run`` prints: lines and branches, covered/total and percent."""
        width = max([len("total"), *(len(f.file) for f in self.files)])
        rows = [title] if title else []
        rows.append(f"{'file':<{width}}  {'lines':>18}  {'branches':>18}  {'functions':>13}")
        for f in (*self.files, self.total()):
            rows.append(
                f"{f.file:<{width}}  {f'{f.lines_covered}/{f.lines_total}':>11} {f.line_percent:5.1f}%"
                f"  {f'{f.branches_covered}/{f.branches_total}':>11} {f.branch_percent:5.1f}%"
                f"  {f'{f.functions_covered}/{f.functions_total}':>13}"
            )
        if self.html is not None:
            rows.append(f"html report: {self.html}")
        return "\n".join(rows)


def gcovr_command() -> list[str]:
    """How to run gcovr: the module in this Python, else a ``gcovr`` on PATH."""
    if importlib.util.find_spec("gcovr") is not None:
        return [sys.executable, "-m", "gcovr"]
    found = shutil.which("gcovr")
    if found is None:
        raise CoverageError("gcovr is not installed: pip install gcovr (or pip install -e '.[dev]')")
    return [found]


class Counters:
    """One run's private gcov counters: ``env()`` goes to every QEMU of the run, ``report()``
    reads what they wrote."""

    def __init__(self, build: GcovBuild, directory: str | os.PathLike[str]) -> None:
        self.build = build
        self.directory = Path(directory).resolve()

    def env(self) -> dict[str, str]:
        """libgcov writes ``<GCOV_PREFIX>/<absolute .gcda path>`` with a strip count of 0."""
        return {"GCOV_PREFIX": str(self.directory), "GCOV_PREFIX_STRIP": "0"}

    def reset(self) -> None:
        """Zero the counters: remove every ``.gcda`` a QEMU of this run wrote."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)

    def _counter_of(self, note: Path) -> Path:
        return self.directory / note.relative_to(note.anchor).with_suffix(".gcda")

    def _inputs(self, files: Sequence[str]) -> list[Path]:
        """Each file's counters, with its note linked beside them (gcov reads both from one
        place). An object no QEMU of the run wrote counters for is read from its linked note
        alone, as never executed: never from the build tree, whose counters are not this run's."""
        inputs: list[Path] = []
        for source_file in files:
            for note in self.build.notes(source_file):
                counter = self._counter_of(note)
                link = counter.with_suffix(".gcno")
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(note)
                inputs.append(counter if counter.exists() else link)
        return inputs

    def report(
        self, files: Sequence[str] = DEFAULT_FILES, *, html: str | os.PathLike[str] | None = None
    ) -> CoverageReport:
        """Read the counters of ``files`` with gcovr; write its HTML report into ``html``."""
        files = list(dict.fromkeys(files))
        inputs = self._inputs(files)
        summary = self.directory / "summary.json"
        detail = self.directory / "detail.json"
        argv = [
            *gcovr_command(),
            "--root", str(self.build.source),
            "--object-directory", str(self.build.build),
            *(a for f in files for a in ("--filter", _exact(self.build.source, f))),
            "--json-summary", str(summary),
            "--json", str(detail),
        ]  # fmt: skip
        html_index: Path | None = None
        if html is not None:
            html_dir = Path(html).resolve()
            html_dir.mkdir(parents=True, exist_ok=True)
            html_index = html_dir / "index.html"
            argv += ["--html-details", str(html_index), "--html-title", f"qtest-virtio: {self.build.build}"]
        done = subprocess.run([*argv, *map(str, inputs)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CoverageError(f"gcovr failed on {self.build.build}: {tail}")
        rows = _rows(json.loads(summary.read_text()), json.loads(detail.read_text()), files)
        return CoverageReport(self.build, rows, html_index)


def _exact(source: Path, source_file: str) -> str:
    """A gcovr filter (a regex on the absolute path) matching exactly one source file."""
    return re.escape(str(source / source_file)) + "$"


def _never_called(detail: Mapping[str, object], source_file: str) -> tuple[str, ...]:
    """The functions of ``source_file`` no object of the run executed (a function compiled into
    several objects counts as called when any of them ran it)."""
    files = detail.get("files", [])
    calls: dict[str, int] = {}
    for entry in files if isinstance(files, list) else []:
        if entry.get("file") == source_file:
            for fn in entry.get("functions", []):
                name = str(fn.get("demangled_name") or fn.get("name"))
                calls[name] = calls.get(name, 0) + int(fn.get("execution_count", 0))
    return tuple(sorted(name for name, count in calls.items() if not count))


def _rows(
    summary: Mapping[str, object], detail: Mapping[str, object], files: Iterable[str]
) -> tuple[FileCoverage, ...]:
    """The summary's rows in the order asked; a file gcovr found nothing for (no line of it is
    executable in this build) is a row of zeros, so the table still names it."""
    entries = summary.get("files", [])
    found = {e["filename"]: e for e in entries if isinstance(e, dict)} if isinstance(entries, list) else {}
    out = []
    for name in files:
        e = found.get(name, {})
        out.append(
            FileCoverage(
                name,
                int(e.get("line_covered", 0)),
                int(e.get("line_total", 0)),
                int(e.get("branch_covered", 0)),
                int(e.get("branch_total", 0)),
                int(e.get("function_covered", 0)),
                int(e.get("function_total", 0)),
                _never_called(detail, name),
            )
        )
    return tuple(out)
