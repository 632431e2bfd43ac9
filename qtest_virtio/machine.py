"""The QEMU process: argv from a spec, sockets in a private directory, QMP, crash capture.

QEMU connects, as a client, to two Unix sockets the harness listens on in a fresh 0700
directory (the layout libqtest uses): one for qtest, one for QMP. Nothing goes through a shell;
property values are escaped for QEMU's option syntax (a comma is doubled), so a value cannot
inject another option. Teardown always runs: QMP ``quit``, then SIGTERM, then SIGKILL, then
the directory is removed. QEMU is also started with PR_SET_PDEATHSIG so that it dies with us
if Python itself is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import itertools
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from qemu.qmp.legacy import QEMUMonitorProtocol

from . import modes
from .backends import Handle, make_backend
from .binary import QemuBinary, UnknownFlag
from .errors import QemuCrashed, QemuStartError, describe_exit
from .qtest import QtestClient
from .workdirs import make_workdir
from .workdirs import sweep_stale_workdirs as sweep_stale_workdirs  # its home was here

PropValue = str | int | bool

#: Lines in QEMU's stderr that mean it hit an assertion or a sanitizer, even if it survived.
CRASH_MARKERS = (
    "Assertion",
    "assertion failed",
    "Bail out!",
    "AddressSanitizer",
    "LeakSanitizer",
    "UndefinedBehaviorSanitizer",
    "runtime error:",
    "core dumped",
)


def is_crash_marker(line: str) -> bool:
    """Whether a line of QEMU's stderr is one of the ``CRASH_MARKERS``."""
    return any(m in line for m in CRASH_MARKERS)


_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MEM_RE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)
_MEM_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def escape_option_value(value: str) -> str:
    """Escape a value for QEMU's ``key=value,key=value`` syntax: a comma is written twice."""
    if "\0" in value:
        raise ValueError(f"option value {value!r} contains a NUL byte")
    return value.replace(",", ",,")


def split_option_list(text: str) -> list[str]:
    """Split QEMU's ``a=1,b=2`` syntax at single commas; ``,,`` is a literal comma (the
    inverse of :func:`escape_option_value`)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def format_value(value: PropValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def parse_memory(memory: str | int) -> int:
    """Bytes in a ``-m`` size ('256M', '1G', or a number of MiB as QEMU takes it)."""
    if isinstance(memory, int):
        return memory << 20
    m = _MEM_RE.match(memory.strip())
    if not m:
        raise ValueError(f"memory size {memory!r} is not like '256M' or '1G'")
    return int(m.group(1)) * _MEM_UNITS[m.group(2).upper()]


@dataclass
class DeviceSpec:
    """One ``-device``: driver, properties in order, and what the harness adds for it."""

    driver: str
    props: dict[str, str] = field(default_factory=dict)
    #: Transport mode for virtio devices (``None`` for a plain device).
    mode: str | None = None
    #: Backend kind the machine creates when the device needs one ('image', 'null', or a path).
    backend: str | None = None
    image_size: int = 64 << 20

    @property
    def id(self) -> str:
        return self.props["id"]

    def option(self, extra: Mapping[str, str] | None = None) -> str:
        """The ``-device`` argument, every value escaped (``extra``: harness-made wiring)."""
        props = {**self.props, **(extra or {})}
        parts = [self.driver] + [f"{k}={escape_option_value(v)}" for k, v in props.items()]
        return ",".join(parts)


def _short_name(driver: str) -> str:
    name = driver.removeprefix("virtio-").removesuffix("-pci").replace("-", "_")
    return name or "dev"


class MachineSpec:
    """What to start: binary, machine type, RAM, devices. Turns into an argv list.

    ``add_device("virtio-blk-pci", event_idx="off")`` takes properties as keywords; names that
    are not Python identifiers (``page-per-vq``) go in the positional mapping.
    """

    def __init__(
        self,
        qemu: str | None = None,
        machine: str = "q35",
        memory: str | int = "256M",
        *,
        extra_args: list[str] | None = None,
        start_timeout: float = 15.0,
        command_timeout: float = 30.0,
        raw_args: list[str] | None = None,
    ) -> None:
        self.qemu = qemu
        self.machine = machine
        self.memory = memory
        self.memory_bytes = parse_memory(memory)
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.devices: list[DeviceSpec] = []
        #: A command line taken as written (a bug reproducer's): replaces the harness's own
        #: -nodefaults/-machine/-m part; qtest and QMP are still the harness's, and so is the
        #: accelerator unless these arguments name the qtest accelerator themselves.
        self.raw_args = list(raw_args) if raw_args is not None else None
        if not _NAME_RE.match(machine.split(",")[0]):
            raise ValueError(f"machine type {machine!r} is not a valid name")

    def _props(self, props: Mapping[str, PropValue] | None, kwargs: Mapping[str, PropValue]) -> dict[str, str]:
        merged: dict[str, str] = {}
        for key, value in {**(props or {}), **kwargs}.items():
            if not _NAME_RE.match(key):
                raise ValueError(f"property name {key!r} is not valid (letters, digits, '_', '-', '.')")
            merged[key] = format_value(value)
        return merged

    def _new_id(self, driver: str) -> str:
        base = _short_name(driver)
        used = {d.props.get("id") for d in self.devices}
        n = 0
        while f"{base}{n}" in used:
            n += 1
        return f"{base}{n}"

    def add_device(
        self,
        driver: str,
        props: Mapping[str, PropValue] | None = None,
        /,
        *,
        backend: str | None = None,
        image_size: int = 64 << 20,
        **properties: PropValue,
    ) -> DeviceSpec:
        """Add a ``-device``; returns its spec (its ``id`` is made up when not given)."""
        if not _NAME_RE.match(driver):
            raise ValueError(f"device name {driver!r} is not valid")
        merged = self._props(props, properties)
        if "id" in merged and any(d.props.get("id") == merged["id"] for d in self.devices):
            raise ValueError(f"device id {merged['id']!r} is used twice")
        merged.setdefault("id", self._new_id(driver))
        merged = {"id": merged.pop("id"), **merged}
        dev = DeviceSpec(driver, merged, backend=backend, image_size=image_size)
        self.devices.append(dev)
        return dev

    def add_virtio(
        self,
        driver: str,
        props: Mapping[str, PropValue] | None = None,
        /,
        *,
        mode: str = modes.TRANSITIONAL_MODERN,
        backend: str | None = None,
        image_size: int = 64 << 20,
        **properties: PropValue,
    ) -> DeviceSpec:
        """Add a virtio-pci device built for transport ``mode`` (sets disable-legacy/-modern)."""
        mode = modes.check_mode(mode)
        merged = self._props(props, properties)
        for key, value in modes.MODE_PROPERTIES[mode].items():
            if key in merged and merged[key] != value:
                raise ValueError(f"mode {mode!r} needs {key}={value}, but {key}={merged[key]} was given")
            merged[key] = value
        dev = self.add_device(driver, merged, backend=backend, image_size=image_size)
        dev.mode = mode
        return dev

    def device(self, dev_id: str) -> DeviceSpec:
        for d in self.devices:
            if d.props.get("id") == dev_id:
                return d
        raise KeyError(f"no device with id {dev_id!r}; ids: {', '.join(d.id for d in self.devices)}")


#: Reset-vector code of the halt firmware: cli; hlt; jmp short back to the hlt.
_HALT_VECTOR = bytes([0xFA, 0xF4, 0xEB, 0xFD])
_HALT_ROM_SIZE = 64 * 1024


def halt_firmware() -> str:
    """Path of a 64 KiB firmware whose reset vector halts the CPU for good (interrupts off).

    Debian's QEMU has no qtest accelerator, so the machine is TCG started with ``-S``. Some
    devices act only while the run state is RUNNING (virtio-rng's chr_read, virtio-net's
    receive path), but letting SeaBIOS run would assign BARs and write RAM behind our back.
    With this firmware ``cont`` gives a running machine whose only vCPU instruction is hlt.
    Kept in the user's cache directory so a reproducer command line stays valid.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    rom = bytearray(b"\xf4" * _HALT_ROM_SIZE)
    rom[-16 : -16 + len(_HALT_VECTOR)] = _HALT_VECTOR
    for directory in (
        os.path.join(cache, "qtest-virtio"),
        os.path.join(tempfile.gettempdir(), f"qtest-virtio-{os.getuid()}"),
    ):
        path = os.path.join(directory, "halt-firmware-v1.rom")
        try:
            with open(path, "rb") as f:
                if f.read() == rom:
                    return path
        except OSError:
            pass
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(rom)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    raise QemuStartError("cannot write the halt firmware to the cache or temp directory")


@dataclass
class LaunchPlan:
    """The argv QEMU runs with, the copy-pasteable form of it for reports, the fds QEMU
    inherits and the backends' host ends, by device id."""

    argv: list[str]
    repro_argv: list[str]
    pass_fds: list[int] = field(default_factory=list)
    handles: dict[str, Handle] = field(default_factory=dict)

    def close_child_fds(self) -> None:
        """Our copies of what QEMU inherited: closed, so QEMU's exit shows as EOF on our ends."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = []

    def close(self) -> None:
        self.close_child_fds()
        for h in self.handles.values():
            with contextlib.suppress(Exception):
                h.close()


def names_qtest_accel(args: list[str]) -> bool:
    """Whether a command line asks for the qtest accelerator (``-machine ...,accel=qtest`` or
    ``-accel qtest``), as published reproducers do."""
    for opt, value in itertools.pairwise(args):
        if opt in ("-machine", "-M") and "accel=qtest" in value.split(","):
            return True
        if opt == "-accel" and value.split(",")[0] == "qtest":
            return True
    return False


def build_argv(spec: MachineSpec, binary: QemuBinary, workdir: str) -> LaunchPlan:
    """argv for ``spec``: qtest and QMP on sockets in ``workdir``, accel per the binary."""
    if spec.raw_args is not None:
        common = [binary.path, *spec.raw_args]
    else:
        common = [
            binary.path,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            spec.machine,
            "-m",
            str(spec.memory) if isinstance(spec.memory, str) else f"{spec.memory}M",
        ]
    # Debian builds lack the qtest accelerator: TCG with -S keeps firmware and vCPUs from
    # running, so RAM stays zero and BARs unassigned (virtio-facts.md); the halt firmware lets
    # resume() make the run state RUNNING without any guest code beyond hlt.
    if binary.has_qtest_accel:
        # A reproducer's own ``-machine accel=qtest`` / ``-accel qtest`` is kept as written, and
        # QEMU refuses "-machine accel=" beside "-accel": then the harness adds none.
        accel = [] if spec.raw_args is not None and names_qtest_accel(spec.raw_args) else ["-accel", "qtest"]
    else:
        accel = ["-accel", "tcg", "-S", "-bios", halt_firmware()]
    backends: list[str] = []
    repro_backends: list[str] = []
    devices: list[str] = []
    repro_devices: list[str] = []
    pass_fds: list[int] = []
    handles: dict[str, Handle] = {}
    for dev in spec.devices:
        b = make_backend(dev.driver, dev.id, dev.props, dev.backend, dev.image_size, workdir)
        backends += b.args
        repro_backends += b.repro_args
        devices += ["-device", dev.option(b.wiring)]
        repro_devices += ["-device", dev.option(b.wiring)]
        for extra in b.devices:
            devices += ["-device", extra]
        for extra in b.repro_devices:
            repro_devices += ["-device", extra]
        pass_fds += b.child_fds
        if b.handle is not None:
            handles[dev.id] = b.handle
    qtest = os.path.join(workdir, "qtest.sock")
    qmp = os.path.join(workdir, "qmp.sock")
    # On 7.2 `-qtest chardev:NAME` only works when the chardev id is literally "qtest".
    channels = [
        "-chardev",
        f"socket,id=qtest,path={escape_option_value(qtest)}",
        "-qtest",
        "chardev:qtest",
        "-qtest-log",
        "none",
        "-chardev",
        f"socket,id=qmp,path={escape_option_value(qmp)}",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    argv = common + accel + backends + devices + spec.extra_args + channels
    repro = common + accel + repro_backends + repro_devices + spec.extra_args + ["-qtest", "stdio"]
    return LaunchPlan(argv, repro, pass_fds, handles)


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_SETPRIV = shutil.which("setpriv")


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _spawn_args() -> tuple[list[str], Callable[[], None] | None]:
    """How to make QEMU die with us: util-linux ``setpriv --pdeathsig`` keeps Popen on its
    vfork path (a preexec_fn forces fork, ~2 ms more per start); the fallback is prctl in
    a preexec_fn."""
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "KILL", "--"], None
    return [], _set_pdeathsig


#: The lists ``watch_machines`` fills in this context (thread or task), innermost last.
_WATCHERS: contextvars.ContextVar[tuple[list[QemuMachine], ...]] = contextvars.ContextVar(
    "qtest_virtio_machine_watchers", default=()
)


@contextlib.contextmanager
def watch_machines() -> Iterator[list[QemuMachine]]:
    """A list of every machine started in this context from now on, in order, for failure
    reports of code that starts its own (a reproducer's replay, the fuzzer's checks)."""
    started: list[QemuMachine] = []
    token = _WATCHERS.set((*_WATCHERS.get(), started))
    try:
        yield started
    finally:
        _WATCHERS.reset(token)


def _thread_event_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop set for this thread, or None (the main thread's is made on demand, as
    asyncio.get_event_loop makes it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return asyncio.get_event_loop()
    except RuntimeError:
        return None


def _qmp_client(sock: socket.socket) -> tuple[QEMUMonitorProtocol, asyncio.AbstractEventLoop | None]:
    """qemu.qmp's sync client, and the event loop it made for this thread if it made one.

    The client runs on the thread's event loop and sets a new one where there is none (every
    thread but the main one). Left set, that loop (an epoll fd and a self-pipe: 3 fds) outlives
    the thread until a ``gc.collect()``; so a loop made for us is taken off the thread again
    (the client keeps it) and the machine closes it in teardown.
    """
    had_loop = _thread_event_loop() is not None
    qmp = QEMUMonitorProtocol(sock)
    loop = getattr(qmp, "_aloop", None)
    if had_loop or not isinstance(loop, asyncio.AbstractEventLoop):
        return qmp, None
    asyncio.set_event_loop(None)
    return qmp, loop


def _reap(proc: subprocess.Popen[bytes], workdir: str) -> None:
    """Last-resort cleanup (garbage collection / interpreter exit): kill, wait, remove."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)


class QemuMachine:
    """A started QEMU in qtest mode. Use as a context manager; teardown always runs.

    Attributes: ``qtest`` (:class:`QtestClient`), ``qmp`` (qemu.qmp's sync client),
    ``pid``, ``argv``, ``workdir``, ``binary``.
    """

    def __init__(self, spec: MachineSpec, *, qtest_log: TextIO | None = None) -> None:
        self.spec = spec
        self.binary = QemuBinary.get(spec.qemu)
        self._qtest_log = qtest_log
        self.workdir = ""
        self.argv: list[str] = []
        self._repro_argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._qtest: QtestClient | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._qmp_sock: socket.socket | None = None
        #: The event loop made for the QMP client, when this machine owns it (``_qmp_client``).
        self._qmp_loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._running = False
        self._plan: LaunchPlan | None = None
        self._final_stderr: str | None = None
        self._finalizer: Callable[[], object] | None = None
        self.crash: QemuCrashed | None = None

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> QemuMachine:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.shutdown(check=exc is None)

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("machine already started")
        self.workdir = make_workdir()
        for started in _WATCHERS.get():
            started.append(self)
        try:
            self._launch()
        except BaseException:
            self.shutdown(check=False)
            raise

    def _launch(self) -> None:
        plan = build_argv(self.spec, self.binary, self.workdir)
        self._plan = plan
        self.argv, self._repro_argv = plan.argv, plan.repro_argv
        listeners: dict[str, socket.socket] = {}
        try:
            for name in ("qtest", "qmp"):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(os.path.join(self.workdir, f"{name}.sock"))
                s.listen(1)
                listeners[name] = s
            self._stderr_path = os.path.join(self.workdir, "qemu.stderr")
            prefix, preexec = _spawn_args()
            with open(self._stderr_path, "wb") as err:
                # Own session: a Ctrl-C reaches Python, whose teardown then stops QEMU in order.
                self._proc = subprocess.Popen(
                    prefix + self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                    preexec_fn=preexec,
                    pass_fds=plan.pass_fds,
                )
            plan.close_child_fds()
            self._finalizer = weakref.finalize(self, _reap, self._proc, self.workdir)
            conns = self._accept(listeners)
        finally:
            for name, s in listeners.items():
                s.close()
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.workdir, f"{name}.sock"))
        self._qtest = QtestClient(
            conns["qtest"], timeout=self.spec.command_timeout, dead_hook=self._crashed, log=self._qtest_log
        )
        self._qmp_sock = conns["qmp"]
        try:
            # The first reply proves the main loop runs. QMP is negotiated on first use: its
            # greeting waits in the socket, and most tests never need it (saves ~1.5 ms).
            self._qtest.endianness()
        except QemuCrashed as exc:
            raise self._start_error("QEMU exited during start-up") from exc

    def _accept(self, listeners: dict[str, socket.socket]) -> dict[str, socket.socket]:
        assert self._proc is not None
        deadline = time.monotonic() + self.spec.start_timeout
        conns: dict[str, socket.socket] = {}
        try:
            pidfd: int | None = os.pidfd_open(self._proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        try:
            while len(conns) < len(listeners):
                waiting = [s for n, s in listeners.items() if n not in conns]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._start_error(f"QEMU did not connect within {self.spec.start_timeout:g} s")
                watch: list[socket.socket | int] = [*waiting, *([pidfd] if pidfd is not None else [])]
                ready, _, _ = select.select(watch, [], [], min(remaining, 0.05 if pidfd is None else remaining))
                for name, s in listeners.items():
                    if s in ready:
                        conns[name] = s.accept()[0]
                if self._proc.poll() is not None and len(conns) < len(listeners):
                    raise self._start_error("QEMU exited during start-up")
        except BaseException:
            for c in conns.values():
                c.close()
            raise
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return conns

    def _start_error(self, what: str) -> QemuStartError:
        if self._proc is not None and "did not connect" not in what:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2)  # it is exiting: let its last words reach stderr
        stderr = self.stderr_text()
        qemu_lines = [line for line in stderr.splitlines() if line.strip()]
        msg = qemu_lines[-1] if qemu_lines else what
        if msg.startswith("Use ") and len(qemu_lines) > 1:
            # "unsupported machine type: ..." then "Use -machine help to list ...": keep both
            msg = f"{qemu_lines[-2]} ({msg})"
        hint = ""
        m = re.search(r"Property '([^.']+)\.([^']+)' not found", msg)
        if m:
            with contextlib.suppress(UnknownFlag):
                valid = sorted(self.binary.device_properties(m.group(1)))
                hint = f"; valid properties of {m.group(1)}: {', '.join(valid)}"
        m2 = re.search(r"'([^']+)' is not a valid device model name", msg)
        if m2:
            hint = str(self.binary.unknown_device(m2.group(1))).partition(";")[2]
            hint = f";{hint}" if hint else ""
        status = describe_exit(self._proc.poll() if self._proc else None)
        return QemuStartError(
            f"QEMU refused to start ({status}): {msg}{hint}",
            command_line=self.command_line(),
            stderr=stderr,
        )

    def _crashed(self, reason: str) -> QemuCrashed:
        """Build the crash report once QEMU is gone (called by the qtest client on EOF)."""
        rc = None
        if self._proc is not None:
            try:
                rc = self._proc.wait(2)
            except subprocess.TimeoutExpired:
                rc = None
        self.crash = self._crash_report(f"QEMU died: {reason}", rc)
        return self.crash

    def _crash_report(self, summary: str, returncode: int | None) -> QemuCrashed:
        """A crash with everything a report quotes: stderr tail, last commands, reproducer."""
        return QemuCrashed(
            summary,
            returncode=returncode,
            stderr_tail=self.stderr_tail(),
            last_commands=self._qtest.last_commands() if self._qtest else [],
            command_line=self.reproducer(),
        )

    def shutdown(self, check: bool = True) -> None:
        """Stop QEMU (quit, SIGTERM, SIGKILL), remove the workdir; raise QemuCrashed if it had died.

        With ``check=False`` a crash is recorded in ``self.crash`` but not raised.
        """
        if self._stopping:
            return
        self._stopping = True
        died_early = False
        self._signals_sent: set[int] = set()
        try:
            proc = self._proc
            if proc is not None:
                died_early = proc.poll() is not None
                # A QEMU that already failed to answer qtest in time gets no QMP round: it
                # would only spend the same timeout again before the signals.
                hung = self._qtest is not None and self._qtest.timed_out
                quit_sent = False
                if not died_early and not hung and self._qmp_sock is not None:
                    with contextlib.suppress(Exception):
                        if self._qmp is None:
                            self._qmp = self._connect_qmp(2.0)
                        self._qmp.settimeout(2.0)
                        self._qmp.cmd("quit")
                        quit_sent = True
                self._wait_or_kill(proc, quit_sent=quit_sent)
        finally:
            self._close_channels()
            crash = self._check_crash(died_early)
            if self.workdir:
                self._final_stderr = self.stderr_text()  # reports may still quote it
            if self._finalizer is not None:
                self._finalizer()
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        if crash is not None and check:
            raise crash

    def _wait_or_kill(self, proc: subprocess.Popen[bytes], *, quit_sent: bool) -> None:
        """Wait for the quit to take effect, then SIGTERM, then SIGKILL."""
        steps: list[tuple[signal.Signals | None, float]] = [(signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)]
        if quit_sent:
            steps.insert(0, (None, 3.0))
        for sig, grace in steps:
            if sig is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(sig)
                    self._signals_sent.add(sig)
                    if sig == signal.SIGTERM:  # a stopped QEMU (SIGSTOP) acts on it only once continued
                        proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def backend(self, dev_id: str) -> Handle:
        """The host end of a device's backend (image, net socket, serial ports, rng FIFO)."""
        plan = self._plan
        if plan is None or dev_id not in plan.handles:
            have = ", ".join(plan.handles) if plan else "none (not started)"
            raise KeyError(f"device {dev_id!r} has no backend the harness holds; devices with one: {have}")
        return plan.handles[dev_id]

    def _close_channels(self) -> None:
        if self._qtest is not None:
            self._qtest.close()
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
        self._close_qmp_loop()
        if self._qmp_sock is not None:
            self._qmp_sock.close()
        if self._plan is not None:
            self._plan.close()

    def _check_crash(self, died_early: bool) -> QemuCrashed | None:
        """A crash is: QEMU gone before we stopped it, or an assertion/sanitizer on stderr."""
        if self.crash is not None:
            return self.crash
        if self._proc is None:
            return None
        rc = self._proc.returncode
        marker = self.crash_marker()
        foreign_signal = rc is not None and rc < 0 and -rc not in getattr(self, "_signals_sent", set())
        if died_early or marker is not None or foreign_signal:
            if marker is not None:
                reason = marker
            elif died_early:
                reason = "QEMU exited before the harness stopped it"
            else:
                reason = "QEMU died by a signal the harness did not send, while stopping"
            summary = f"QEMU died: {reason}" if died_early or foreign_signal else f"QEMU reported: {reason}"
            self.crash = self._crash_report(summary, rc)
        return self.crash

    # -- access ---------------------------------------------------------------------------

    @property
    def qtest(self) -> QtestClient:
        if self._qtest is None:
            raise RuntimeError("machine not started")
        return self._qtest

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        """qemu.qmp's synchronous client, negotiated on first use."""
        if self._qmp is None:
            if self._qmp_sock is None:
                raise RuntimeError("machine not started")
            self._qmp = self._connect_qmp(self.spec.command_timeout)
        return self._qmp

    def _connect_qmp(self, timeout: float) -> QEMUMonitorProtocol:
        """Negotiate QMP within ``timeout``: qemu.qmp's sync connect() has no timeout of its
        own, and a hung or stopped QEMU would block it forever."""
        assert self._qmp_sock is not None
        self._close_qmp_loop()  # a negotiation that failed before
        qmp, self._qmp_loop = _qmp_client(self._qmp_sock)
        qmp.settimeout(timeout)
        client = qmp._qmp  # the async QMPClient the sync wrapper drives
        client.await_greeting = True
        client.negotiate = True
        try:
            qmp._sync(client.connect(self._qmp_sock), timeout)
        except TimeoutError:
            self._close_qmp_loop()
            raise QemuCrashed(
                f"QEMU did not answer QMP negotiation within {timeout:g} s (hung or stopped)",
                returncode=self.returncode,
                stderr_tail=self.stderr_tail(),
                command_line=self.command_line(),
            ) from None
        return qmp

    def _close_qmp_loop(self) -> None:
        loop, self._qmp_loop = self._qmp_loop, None
        if loop is not None:
            with contextlib.suppress(Exception):
                loop.close()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("machine not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stderr_text(self) -> str:
        """QEMU's stderr so far (kept after teardown removed the file)."""
        if self._final_stderr is not None:
            return self._final_stderr
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except (AttributeError, OSError):
            return ""

    def crash_marker(self) -> str | None:
        """The first assertion or sanitizer line QEMU printed (stripped), if any: it says more
        about a crash than the exit status."""
        return next((line.strip() for line in self.stderr_text().splitlines() if is_crash_marker(line)), None)

    def stderr_tail(self, lines: int = 20) -> str:
        return "\n".join(self.stderr_text().splitlines()[-lines:])

    def command_line(self) -> str:
        """The QEMU command line with qtest on stdio, for a human to paste."""
        return shlex.join(self._repro_argv)

    def reproducer(self, commands: int = 20) -> str:
        """A bug-report style reproducer: the command line fed the last qtest commands."""
        # History entries in parentheses are notes (a late reply dropped), not commands sent.
        history = [c for c, _ in self._qtest.history if not c.startswith("(")] if self._qtest else []
        cmds = history[-commands:]
        if not cmds:
            return self.command_line()
        elided = any("... (" in c for c in cmds)
        note = "\n# (bulk data of long commands elided)" if elided else ""
        return f"cat << EOF | {self.command_line()}\n" + "\n".join(cmds) + f"\nEOF{note}"

    def resume(self) -> None:
        """Make the run state RUNNING (devices such as virtio-rng and virtio-net's receive
        path only work then). Without the qtest accelerator this starts the vCPU on the halt
        firmware, which stops it at its first instruction. Idempotent."""
        if self._running:
            return
        if not self.binary.has_qtest_accel:
            status = self.qmp.cmd("query-status")
            if isinstance(status, dict) and status.get("status") != "running":
                self.qmp.cmd("cont")
        self._running = True

    def throttle_reads(self, dev_id: str, iops: int) -> None:
        """Limit the reads of virtio block device ``dev_id`` to ``iops`` a second with QEMU's
        I/O throttling (QMP ``block_set_io_throttle``; 0 lifts it and lets held requests go): a
        way to keep a request in flight while later ones complete. The first read after setting
        it passes; the next waits about a second on the real-time clock, or, under the qtest
        accelerator, on the virtual clock, which only ``clock_step`` or lifting it moves on."""
        if iops < 0:
            raise ValueError(f"throttle_reads: iops must be >= 0, not {iops}")
        limits = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": iops, "iops_wr": 0}
        self.qmp.cmd("block_set_io_throttle", id=f"/machine/peripheral/{dev_id}/virtio-backend", **limits)

    def version(self) -> dict[str, object]:
        """QMP ``query-version`` of the running QEMU."""
        result = self.qmp.cmd("query-version")
        assert isinstance(result, dict)
        return result

    def processes(self) -> Iterator[int]:
        """Pids this machine owns (for leak checks in tests)."""
        if self._proc is not None and self._proc.poll() is None:
            yield self._proc.pid
