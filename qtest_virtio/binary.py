"""What a QEMU binary offers, asked once per binary and cached (part of the machine layer).

Upper layers validate device flags against ``-device NAME,help`` before QEMU starts, and the
machine decides between ``-accel qtest`` and ``-S`` from ``-accel help`` (Debian removes the qtest
accelerator module; see ../shared/virtio-facts.md).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from . import known_flags
from .errors import QemuStartError, QtestVirtioError

DEFAULT_QEMU = "qemu-system-x86_64"
#: How long a program may take to answer --version before it is not taken for QEMU.
VERSION_TIMEOUT = 10.0
#: Options every ``-device`` takes that are not properties (``-device NAME,help`` omits them).
GENERIC_DEVICE_OPTIONS = frozenset({"id", "bus"})
INSTALL_HINT = "install Debian's qemu-system-x86 (apt-get install -y qemu-system-x86), pass --qemu PATH or set QEMU"


class QemuNotFound(QemuStartError):
    """No QEMU binary at the given name or path."""


class NotQemu(QemuNotFound):
    """The program at that path is not a QEMU binary: no --version answer, or not QEMU's."""


class UnknownFlag(QtestVirtioError, ValueError):
    """A device property (or device) the binary does not know; lists the valid ones."""


class FlagTypo(QtestVirtioError, ValueError):
    """A flag no measured QEMU version has: a usage error (128), never "cannot test" (125)."""


class BadFlagValue(QtestVirtioError, ValueError):
    """A flag value its property's type does not take (``event_idx=maybe``): a usage error (128)."""


@dataclass(frozen=True)
class PropertyInfo:
    """One ``-device NAME,help`` line: ``name=<type> - description (default: value)``."""

    name: str
    type: str
    default: str | None
    description: str


#: ``name=<type>``, where a link property's type nests: ``iothread=<link<iothread>>``.
_PROP_RE = re.compile(r"^\s+(?P<name>[\w.-]+)=<(?P<type>link<[^>]*>|[^>]*)>\s*(?:-\s*(?P<rest>.*))?$")
_DEFAULT_RE = re.compile(r"\(default: (?P<default>.*)\)\s*$")
_DEVICE_RE = re.compile(r'^name "(?P<name>[^"]+)"(?:, bus (?P<bus>[\w-]+))?')
#: Bool defaults as flag values are written (``event_idx=off``), whatever the version prints.
_BOOL_SPELLINGS = {"true": "on", "on": "on", "false": "off", "off": "off"}
#: What QEMU's parser takes for the enumerated property types, and how to name that: a bool
#: as qapi_bool_parse() reads it (qapi/qapi-util.c), OnOffAuto as qapi/common.json lists it.
TYPE_VALUES: dict[str, tuple[str, frozenset[str]]] = {
    "bool": ("on or off", frozenset({"on", "off", "yes", "no", "true", "false", "y", "n"})),
    "OnOffAuto": ("on, off or auto", frozenset({"on", "off", "auto"})),
}
_VERSION_RE = re.compile(r"version (\d+)\.(\d+)\.(\d+)")


#: The project's own provider of the binaries it is tested on (a source checkout only).
QEMU_SH = Path(__file__).resolve().parent.parent / "scripts" / "qemu.sh"


def cached_qemu(name: str, env: Mapping[str, str] | None = None) -> str:
    """The path of binary ``name`` (system, debian-10.0, src-10.0.2, src-newest, ...) as
    ``scripts/qemu.sh path --cached`` finds it, never building it; QemuNotFound (with the script's
    one line, which says how to provide it) when it is not there."""
    if not QEMU_SH.is_file():
        raise QemuNotFound(f"{QEMU_SH} is not there (not a source checkout): name binaries with --qemu")
    res = subprocess.run(
        ["bash", str(QEMU_SH), "path", "--cached", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=None if env is None else dict(env),
    )
    path = res.stdout.strip()
    if res.returncode != 0 or not path:
        raise QemuNotFound(res.stderr.strip() or f"scripts/qemu.sh path --cached {name} failed")
    return path


def resolve_qemu(qemu: str | None = None) -> str:
    """Absolute path of the QEMU binary: the argument, else ``$QEMU``, else PATH's default."""
    name = qemu or os.environ.get("QEMU") or DEFAULT_QEMU
    if os.sep in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return os.path.abspath(name)
        raise QemuNotFound(f"QEMU binary {name!r} does not exist or is not executable: {INSTALL_HINT}")
    found = shutil.which(name)
    if found is None:
        raise QemuNotFound(f"QEMU binary {name!r} not found on PATH: {INSTALL_HINT}")
    return found


def user_cache_dir() -> str:
    """``$XDG_CACHE_HOME/qtest-virtio`` (default ``~/.cache/qtest-virtio``): the halt firmware
    and the probe files live there."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "qtest-virtio")


#: Bumped when the probe file's layout changes (older files are then ignored).
_PROBE_FORMAT = 1
#: Probe files kept (one per binary path; the oldest go): test wrappers in temp directories
#: must not pile up.
_PROBE_FILES_KEPT = 64


class ProbeFile:
    """The answers a binary gave, kept in a JSON file so that every process asking them (the
    CLI, each xdist worker, the next run) does not start the binary again: ``--version``, the
    accelerator trial, ``-device help`` and each ``-device NAME,help`` cost 15-100 ms apiece.
    Valid while the binary's (real path, mtime, size) is the one it was taken from; a file that
    cannot be read or written only costs the questions again."""

    def __init__(self, key: tuple[str, int, int]) -> None:
        self.key = [*key]
        name = hashlib.sha256(key[0].encode()).hexdigest()[:24]
        self.path = os.path.join(user_cache_dir(), "probes", f"{name}.json")
        self.facts = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != _PROBE_FORMAT or data.get("key") != self.key:
            return {}
        facts = data.get("facts")
        return facts if isinstance(facts, dict) else {}

    def save(self, name: str, value: Any) -> None:
        """Add one answer (JSON data) and rewrite the file, keeping what other processes added."""
        self.facts[name] = value
        theirs = self._read()
        merged = {**theirs, **self.facts}
        if name == "properties":  # per device: another process may have asked other devices
            merged["properties"] = {**theirs.get("properties", {}), **self.facts["properties"]}
        tmp = f"{self.path}.{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": _PROBE_FORMAT, "key": self.key, "facts": merged}, f)
            new = not os.path.exists(self.path)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        if new:
            self._prune()

    def _prune(self) -> None:
        directory = os.path.dirname(self.path)
        with contextlib.suppress(OSError):
            files = [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".json")]
            files.sort(key=lambda f: os.stat(f).st_mtime_ns, reverse=True)
            for old in files[_PROBE_FILES_KEPT:]:
                os.unlink(old)


class QemuBinary:
    """A QEMU binary and the facts asked of it; one instance per (path, mtime, size), its
    answers kept across processes in a :class:`ProbeFile`."""

    _cache: ClassVar[dict[tuple[str, int, int], QemuBinary]] = {}

    def __init__(self, path: str, probes: ProbeFile | None = None) -> None:
        self.path = path
        self._probes = probes
        props = probes.facts.get("properties", {}) if probes is not None else {}
        self._properties: dict[str, dict[str, PropertyInfo]] = {
            dev: {n: PropertyInfo(n, *info) for n, info in p.items()} for dev, p in props.items()
        }

    @classmethod
    def get(cls, qemu: str | None = None) -> QemuBinary:
        path = resolve_qemu(qemu)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        if key not in cls._cache:
            binary = cls(path, ProbeFile(key))
            binary.version_text  # noqa: B018 -- a program that is not QEMU is refused here, once
            cls._cache[key] = binary
        return cls._cache[key]

    def _recall(self, name: str) -> Any:
        """An answer the probe file holds (None: ask the binary)."""
        return self._probes.facts.get(name) if self._probes is not None else None

    def _remember(self, name: str, value: Any) -> None:
        if self._probes is not None:
            self._probes.save(name, value)

    def _run(self, *args: str, stdin: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run the binary in a process group of its own, bounded: on a timeout the whole group
        is ended (a wrapper's children too) and QemuStartError says so. Output is decoded
        leniently, so a program printing non-UTF-8 cannot crash the harness."""
        argv = [self.path, *args]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise QemuStartError(f"cannot run {self.path}: {exc.strerror}") from None
        try:
            out, err = proc.communicate(None if stdin is None else stdin.encode(), timeout=timeout)
        except BaseException as exc:  # a timeout, or Ctrl-C/SIGTERM meanwhile: never leave the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            raise NotQemu(
                f"{self.path} did not answer `{' '.join(args)}` within {timeout:g} s: not a QEMU binary? "
                "(it was stopped with its children); pass --qemu PATH of a qemu-system-x86_64"
            ) from None
        return subprocess.CompletedProcess(
            argv, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        )

    @cached_property
    def version_text(self) -> str:
        """First line of ``--version``, e.g. 'QEMU emulator version 7.2.22 (Debian ...)'.
        Anything else is NotQemu (125), before any device question is asked of the program."""
        known = self._recall("version_text")
        if isinstance(known, str):
            return known
        res = self._run("--version", timeout=VERSION_TIMEOUT)
        lines = res.stdout.strip().splitlines()
        first = lines[0] if lines else ""
        if res.returncode != 0 or not first:
            raise NotQemu(
                f"{self.path} did not answer --version (exit {res.returncode}): not a QEMU binary; "
                "pass --qemu PATH of a qemu-system-x86_64"
            )
        if not _VERSION_RE.search(first) or "QEMU" not in first:
            raise NotQemu(f"{self.path} is not a QEMU binary: --version printed {first[:80]!r}")
        self._remember("version_text", first)
        return first

    @cached_property
    def version(self) -> tuple[int, int, int]:
        m = _VERSION_RE.search(self.version_text)
        return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)

    @property
    def version_string(self) -> str:
        """'7.2.22': the version as the deviation and flag tables write it (a binary whose
        --version names none is refused as NotQemu before this is asked)."""
        return ".".join(map(str, self.version))

    @cached_property
    def accelerators(self) -> frozenset[str]:
        """Accelerators ``-accel help`` lists. Upstream never lists qtest there although
        ``-accel qtest`` works, so :attr:`has_qtest_accel` is decided by trial instead."""
        known = self._recall("accelerators")
        if isinstance(known, list):
            return frozenset(known)
        lines = self._run("-accel", "help").stdout.splitlines()
        names = sorted({line.strip() for line in lines[1:] if line.strip()})
        self._remember("accelerators", names)
        return frozenset(names)

    @cached_property
    def has_qtest_accel(self) -> bool:
        """Whether ``-accel qtest`` starts: tried once on an empty machine (virtio-facts.md,
        "More than one QEMU"); Debian's builds answer "invalid accelerator qtest"."""
        known = self._recall("has_qtest_accel")
        if isinstance(known, bool):
            return known
        res = self._run(
            "-accel", "qtest", "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
            stdin='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        )  # fmt: skip
        has = res.returncode == 0 and '"return"' in res.stdout
        if has or "invalid accelerator" in res.stderr:  # a failure of another kind may pass: ask again
            self._remember("has_qtest_accel", has)
        return has

    @property
    def accelerator(self) -> str:
        """The accelerator the machine layer uses with this binary, in words for reports."""
        if self.has_qtest_accel:
            return "qtest"
        return "tcg (-S; no qtest accelerator in this build)"

    @property
    def identity(self) -> str:
        """One line naming the binary, its version and the accelerator in use, e.g.
        'QEMU 10.0.2 (build/qemu-system-x86_64), accelerator: qtest'."""
        return f"QEMU {self.version_string} ({self.path}), accelerator: {self.accelerator}"

    @cached_property
    def devices(self) -> dict[str, str]:
        """Device model name -> bus name, from ``-device help``."""
        known = self._recall("devices")
        if isinstance(known, dict):
            return known
        out: dict[str, str] = {}
        for line in self._run("-device", "help").stdout.splitlines():
            m = _DEVICE_RE.match(line)
            if m:
                out[m.group("name")] = m.group("bus") or ""
        self._remember("devices", out)
        return out

    @cached_property
    def machines(self) -> list[str]:
        return list(self._machine_aliases)

    @cached_property
    def _machine_aliases(self) -> dict[str, str]:
        """Machine type -> the versioned type it is an alias of (itself when it is none)."""
        known = self._recall("machine_aliases")
        if isinstance(known, dict):
            return known
        out: dict[str, str] = {}
        for line in self._run("-machine", "help").stdout.splitlines()[1:]:
            if line.strip():
                m = re.search(r"\(alias of ([^)]+)\)", line)
                name = line.split()[0]
                out[name] = m.group(1) if m else name
        self._remember("machine_aliases", out)
        return out

    def resolve_machine(self, machine: str) -> str:
        """The versioned machine type ``machine`` names in this binary (``q35`` is an alias
        that moves with every release: migration needs the versioned name on both sides)."""
        name = machine.split(",")[0]
        return self._machine_aliases.get(name, name)

    def device_properties(self, device: str) -> dict[str, PropertyInfo]:
        """Properties of ``device`` with type and default; raises UnknownFlag for a bad device."""
        if device not in self._properties:
            if device not in self.devices:
                raise self.unknown_device(device)
            res = self._run("-device", f"{device},help")
            if res.returncode != 0 or "not found" in res.stderr:  # 7.2 exits 0 on an unknown name
                raise self.unknown_device(device)
            props: dict[str, PropertyInfo] = {}
            for line in res.stdout.splitlines():
                m = _PROP_RE.match(line)
                if not m:
                    continue
                rest = (m.group("rest") or "").strip()
                d = _DEFAULT_RE.search(rest)
                default = d.group("default").strip('"') if d else None
                if m.group("type") == "bool" and default in _BOOL_SPELLINGS:  # 7.2 says true, 10.0 on
                    default = _BOOL_SPELLINGS[default]
                desc = rest[: d.start()].strip() if d else rest
                props[m.group("name")] = PropertyInfo(m.group("name"), m.group("type"), default, desc)
            self._properties[device] = props
            self._remember(
                "properties",
                {
                    dev: {n: [i.type, i.default, i.description] for n, i in p.items()}
                    for dev, p in self._properties.items()
                },
            )
        return self._properties[device]

    def unknown_device(self, device: str) -> UnknownFlag:
        close = difflib.get_close_matches(device, list(self.devices), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; `{self.path} -device help` lists them"
        return UnknownFlag(f"device {device!r} is not known to {self.path}{hint}")

    def check_properties(self, device: str, props: dict[str, str] | list[str]) -> None:
        """Raise UnknownFlag naming the first property ``device`` lacks, with the valid ones."""
        known = self.device_properties(device)
        for name in props:
            if name not in known and name not in GENERIC_DEVICE_OPTIONS:
                raise UnknownFlag(
                    f"{device} has no property {name!r} in {self.path}; valid: {', '.join(sorted(known))}"
                )

    def check_flags(self, names: Iterable[str], devices: Iterable[str]) -> None:
        """Every flag name must be a property of one of ``devices`` in this binary. A name some
        measured version has (known_flags) raises UnknownFlag with those versions (125); a name
        none has raises FlagTypo with "did you mean" (128)."""
        names = list(names)
        if not names:  # nothing to check: no -device NAME,help asked
            return
        have: set[str] = set()
        for device in devices:
            if device in self.devices:
                have |= set(self.device_properties(device))
        version = self.version_string
        for name in names:
            if name in have:
                continue
            versions = known_flags.PROPERTIES.get(name)
            if versions:
                raise UnknownFlag(
                    f"flag {name!r} is not in QEMU {version} ({self.path}); it is in QEMU {', '.join(versions)}"
                )
            close = difflib.get_close_matches(name, sorted(have | set(known_flags.PROPERTIES)), n=3)
            listing = f"; `qtest-virtio flags --qemu {self.path}` lists them"
            hint = f"; did you mean {', '.join(close)}?" if close else listing
            raise FlagTypo(f"unknown flag {name!r}{hint}")

    def check_flag_values(self, flags: Mapping[str, str], devices: Iterable[str]) -> None:
        """Each value must be one its property's type takes (bool: on/off; OnOffAuto:
        on/off/auto), checked before QEMU starts; raises BadFlagValue naming those values.
        Names none of ``devices`` has are left to :meth:`check_flags`."""
        if not flags:  # nothing to check: no -device NAME,help asked
            return
        types: dict[str, str] = {}
        for device in devices:
            if device in self.devices:
                for name, info in self.device_properties(device).items():
                    types.setdefault(name, info.type)
        for name, value in flags.items():
            kind = types.get(name, "")
            if kind in TYPE_VALUES and value not in TYPE_VALUES[kind][1]:
                raise BadFlagValue(f"flag {name}={value}: {name} is a {kind} property, it takes {TYPE_VALUES[kind][0]}")
