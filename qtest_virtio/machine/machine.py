"""QemuMachine: one started QEMU in qtest mode, from a spec to teardown.

It ties the layer together: argv from launch.py, the process and its channels from process.py,
and what a failure report quotes (stderr, the last qtest commands, a reproducer). Teardown always
runs: SIGTERM (QEMU's own clean exit, the one QMP ``quit`` gives, without negotiating QMP for
it), then SIGKILL, then the directory is removed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import shlex
import shutil
import socket
import subprocess
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self, TextIO, TypeVar, overload

from ..backends import Handle
from ..binary import QemuBinary, UnknownFlag
from ..errors import QemuCrashed, QemuStartError, QtestVirtioError, describe_exit
from ..qtest import QtestClient
from ..workdirs import make_workdir
from . import migration, process, qdev
from .launch import LaunchPlan, build_argv
from .spec import MachineSpec

if TYPE_CHECKING:  # qemu.qmp (asyncio) is imported on first QMP use: most tests never need it
    import asyncio

    from qemu.qmp.legacy import QEMUMonitorProtocol

#: The lists ``watch_machines`` fills in this context (thread or task), innermost last.
_WATCHERS: contextvars.ContextVar[tuple[list[QemuMachine], ...]] = contextvars.ContextVar(
    "qtest_virtio_machine_watchers", default=()
)

#: The type a caller expects a backend handle to be (Machine.backend(dev_id, kind)).
H = TypeVar("H")


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
        self._qmp_closed = False
        self._qmp_sock: socket.socket | None = None
        #: The event loop made for the QMP client, when this machine owns it (``process.connect_qmp``).
        self._qmp_loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._running = False
        self._plan: LaunchPlan | None = None
        self._final_stderr: str | None = None
        self._finalizer: Callable[[], object] | None = None
        self.crash: QemuCrashed | None = None
        #: A migration destination: ``-incoming defer``, images linked to the source's.
        self._incoming = False
        #: The listening sockets between :meth:`launch` and :meth:`start`.
        self._listeners: dict[str, socket.socket] = {}
        self._shared_images: dict[str, str] = {}
        #: QMP events a wait_event passed over, kept for later waits.
        self._event_backlog: list[dict[str, Any]] = []
        #: The monitor was negotiated by a raw exchange (``_raw_qmp``), not by qemu.qmp, and
        #: the events read then, for the qemu.qmp client set up later.
        self._qmp_raw = False
        self._raw_events: list[dict[str, Any]] = []

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> QemuMachine:
        if self._proc is None:  # a migration destination comes started
            self.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.shutdown(check=exc is None)

    def start(self) -> None:
        """Start QEMU and wait for its first qtest reply (after :meth:`launch`: only the wait)."""
        if self._proc is None:
            self.launch()
        elif self._qtest is not None or self._stopping:
            raise RuntimeError("machine already started")
        try:
            self._connect()
        except BaseException:
            self.shutdown(check=False)
            raise

    def launch(self) -> None:
        """Spawn QEMU without waiting for it: its start-up runs while the caller does something
        else, and :meth:`start` later takes its connections. What fails here (a backend, the
        spawn) raises here; what QEMU itself refuses is reported by :meth:`start`."""
        if self._proc is not None:
            raise RuntimeError("machine already started")
        self.workdir = make_workdir()
        for started in _WATCHERS.get():
            started.append(self)
        try:
            plan = build_argv(
                self.spec, self.binary, self.workdir, incoming=self._incoming, shared_images=self._shared_images
            )
            self._plan = plan
            self.argv, self._repro_argv = plan.argv, plan.repro_argv
            self._listeners = process.listen(self.workdir, ("qtest", "qmp"))
            self._stderr_path = os.path.join(self.workdir, "qemu.stderr")
            self._proc = process.spawn(self.argv, self._stderr_path, plan.pass_fds, cwd=self.workdir)
            plan.close_child_fds()
            self._finalizer = weakref.finalize(self, process.reap, self._proc, self.workdir)
        except BaseException:
            self.shutdown(check=False)
            raise

    def _connect(self) -> None:
        assert self._proc is not None
        listeners, self._listeners = self._listeners, {}
        try:
            conns = process.accept(self._proc, listeners, self.spec.start_timeout, self._start_error)
        finally:
            process.close_listeners(self.workdir, listeners)
        self._qtest = QtestClient(
            conns["qtest"], timeout=self.spec.command_timeout, dead_hook=self._crashed, log=self._qtest_log
        )
        self._qmp_sock = conns["qmp"]
        self._set_barriers()
        try:
            # The first reply proves the main loop runs. QMP is negotiated on first use: its
            # greeting waits in the socket, and most tests never need it (saves ~1.5 ms).
            self._qtest.endianness()
        except QemuCrashed as exc:
            raise self._start_error("QEMU exited during start-up") from exc

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
        """Stop QEMU (SIGTERM, then SIGKILL), remove the workdir; raise QemuCrashed if it had died.

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
                # A QEMU that already failed to answer qtest in time is likely hung (its main
                # loop never reads the signal): a shorter grace before SIGKILL.
                hung = self._qtest is not None and self._qtest.timed_out
                if not died_early and not hung:
                    # The test's last posted writes are answered first: a crash they caused is
                    # reported (by _check_crash below), not hidden by the signal.
                    with contextlib.suppress(QtestVirtioError):
                        self._barrier()
                if not died_early:
                    process.terminate(proc, grace=2.0 if hung else 3.0, signals_sent=self._signals_sent)
        finally:
            process.close_listeners(self.workdir, self._listeners)  # launched, never started
            self._listeners = {}
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

    @overload
    def backend(self, dev_id: str) -> Handle: ...
    @overload
    def backend(self, dev_id: str, kind: type[H]) -> H: ...
    def backend(self, dev_id: str, kind: type[Any] | None = None) -> Any:
        """The host end of a device's backend (image, net socket, serial ports, rng FIFO); with
        ``kind`` (``NetBackend``, ``RngFifo``, ...) checked to be one, and typed as one."""
        plan = self._plan
        if plan is None or dev_id not in plan.handles:
            have = ", ".join(plan.handles) if plan else "none (not started)"
            raise KeyError(f"device {dev_id!r} has no backend the harness holds; devices with one: {have}")
        end = plan.handles[dev_id]
        if kind is not None and not isinstance(end, kind):
            raise TypeError(f"device {dev_id!r}'s backend is a {type(end).__name__}, not a {kind.__name__}")
        return end

    def _close_channels(self) -> None:
        if self._qtest is not None:
            self._qtest.close()
        self.close_qmp()
        if self._qmp_sock is not None:
            self._qmp_sock.close()
        if self._plan is not None:
            self._plan.close()

    def close_qmp(self) -> None:
        """Disconnect qemu.qmp's client (QMP is not used again). Call it on the thread that
        used QMP before stopping the machine on another one: the client runs on the event
        loop of the thread that made it, and closing it from another thread while that one
        runs its loop fails, leaving the client to a traceback in its ``__del__``."""
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            self._qmp_closed = True
            with contextlib.suppress(Exception):
                qmp.close()
        self._close_qmp_loop()

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
        """qemu.qmp's synchronous client, negotiated on first use. Posted qtest writes are
        answered first: QMP is another channel, and what it sees must follow them."""
        self._barrier()
        if self._qmp is None:
            if self._qmp_sock is None:
                raise RuntimeError("machine not started")
            if self._qmp_closed:
                raise RuntimeError("QMP was closed (close_qmp)")
            self._qmp = self._connect_qmp(self.spec.command_timeout)
        return self._qmp

    def qmp_many(self, commands: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Several QMP commands sent together and their return values in order: one wait
        instead of one per command (QEMU's monitor runs them one at a time, in the order
        sent). A failed command raises as ``qmp.cmd`` would, after all have been answered."""
        qmp = self.qmp
        if not commands:
            return []

        import asyncio  # here, as qemu.qmp is: most machines never use QMP

        async def run_all() -> list[Any]:
            return list(await asyncio.gather(*(qmp._qmp.execute(name, args) for name, args in commands)))

        return qmp._sync(run_all(), qmp._timeout)  # what qmp.cmd does for one command

    def _connect_qmp(self, timeout: float) -> QEMUMonitorProtocol:
        """Negotiate QMP within ``timeout`` (one raw exchange, unless ``_raw_qmp`` did it) and
        hand the session to qemu.qmp; a QEMU that does not answer is reported as hung."""
        assert self._qmp_sock is not None
        self._close_qmp_loop()  # a negotiation that failed before
        if not self._qmp_raw:
            self._raw_qmp([])
        try:
            qmp, self._qmp_loop = process.connect_qmp(self._qmp_sock, timeout, negotiated=True, events=self._raw_events)
        except TimeoutError:
            raise self._qmp_hung("negotiation", timeout) from None
        self._raw_events = []
        return qmp

    def _qmp_hung(self, what: str, timeout: float) -> QemuCrashed:
        return QemuCrashed(
            f"QEMU did not answer QMP {what} within {timeout:g} s (hung or stopped)",
            returncode=self.returncode,
            stderr_tail=self.stderr_tail(),
            command_line=self.command_line(),
        )

    def _close_qmp_loop(self) -> None:
        loop, self._qmp_loop = self._qmp_loop, None
        process.close_loop(loop)

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
        return next((line.strip() for line in self.stderr_text().splitlines() if process.is_crash_marker(line)), None)

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
        if self._qmp is None and not self._paused and not self._incoming and not self.binary.has_qtest_accel:
            # QMP never used: the run state is the start's, prelaunch (-S). One raw exchange
            # (qmp_capabilities, cont) instead of setting up qemu.qmp for it.
            self._raw_qmp(["cont"])
        elif self._paused or not self.binary.has_qtest_accel:
            status = self.qmp.cmd("query-status")
            if isinstance(status, dict) and status.get("status") != "running":
                self.qmp.cmd("cont")
        self._running = True

    def _raw_qmp(self, commands: list[str]) -> None:
        """Negotiate the monitor and run QMP ``commands`` without qemu.qmp
        (``process.raw_qmp``); the client set up later takes the session over, with the
        events read meanwhile."""
        assert self._qmp_sock is not None and not self._qmp_raw
        self._barrier()
        timeout = self.spec.command_timeout
        what = ", ".join(commands) or "negotiation"
        try:
            self._raw_events += process.raw_qmp(self._qmp_sock, commands, timeout)
        except TimeoutError:
            raise self._qmp_hung(what, timeout) from None
        except (EOFError, OSError):
            raise self._crashed(f"QMP closed during {what}") from None
        finally:
            self._qmp_raw = True  # the greeting is read: it is not waited for again

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

    def _barrier(self) -> None:
        """Posted qtest writes reach QEMU (and are answered) before a backend is touched."""
        qtest = self._qtest
        if qtest is not None and qtest.pending_writes and not qtest.closed:
            qtest.sync()

    def _set_barriers(self) -> None:
        for handle in self.backend_handles().values():
            set_barrier = getattr(handle, "set_barrier", None)
            if set_barrier is not None:
                set_barrier(self._barrier)

    def backend_handles(self) -> dict[str, Handle]:
        """The host ends of the devices' backends, by device id (see :meth:`backend`)."""
        return dict(self._plan.handles) if self._plan is not None else {}

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` for QEMU to exit by itself; its exit status, or None."""
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self._proc.wait(timeout)
        return None

    def migrate_to(self, spec: MachineSpec | None = None, *, keep_source: bool = False) -> Self:
        """Live-migrate this machine to a new QEMU started from ``spec`` (default: a clone of
        this one's; another binary or a versioned machine type may be given, with the same
        devices) and return it, running if this one ran. Objects holding this machine's qtest
        client (guest memory, PCI functions, drivers) talk to the destination afterwards: the
        destination's connection is swapped in (:meth:`QtestClient.take_over`), and nothing is
        re-initialised. The source is shut down (a crash there is raised) unless
        ``keep_source``. Raises MigrationUnsupported before starting anything that cannot
        migrate, MigrationError when QEMU refuses; the destination is torn down then."""
        spec = spec if spec is not None else self.spec.clone()
        if spec.qemu is None:
            spec.qemu = self.binary.path
        dest = type(self)(spec, qtest_log=self._qtest_log)
        migration.check_destination(self, spec, dest.binary)
        dest._incoming = True
        dest._shared_images = migration.shared_images(self)
        running = self.run_state() == "running"
        dest.start()
        try:
            try:
                migration.run(self, dest, spec.command_timeout)
            except BaseException:
                if running and self.alive and self.run_state() != "running":
                    self.qmp.cmd("cont")  # the source sent it all and stopped: it runs on, as before
                raise
            if running and dest.run_state() != "running":
                dest.qmp.cmd("cont")  # TCG -S builds: the destination waits stopped
            dest._running, dest._paused = running, self._paused
            mine, theirs = self.qtest, dest.qtest
            mine.take_over(theirs)
            self._qtest, dest._qtest = theirs, mine
        except BaseException:
            dest.shutdown(check=False)
            raise
        if not keep_source:
            self.shutdown(check=True)
        return dest

    # -- run state (QMP stop / cont) --------------------------------------------------------

    #: Set by :meth:`stop`: the VM was paused after it ran, so :meth:`resume` must ``cont`` even
    #: under the qtest accelerator (where the run state is otherwise RUNNING from the start).
    _paused = False

    def run_state(self) -> str:
        """QMP ``query-status``'s status: ``running``, ``paused``, ``prelaunch``, ``io-error``, ..."""
        status = self.qmp.cmd("query-status")
        assert isinstance(status, dict), f"query-status returned {status!r}"
        return str(status["status"])

    def stop(self) -> None:
        """Pause the VM (QMP ``stop``): the run state becomes ``paused`` and devices that check it
        hold their work until :meth:`cont` (or :meth:`resume`). QEMU drains the block layer
        before ``stop`` returns (``do_vm_stop``)."""
        self.qmp.cmd("stop")
        self._running = False
        self._paused = True

    def cont(self) -> None:
        """Make the VM run again (QMP ``cont``), from ``paused``, ``io-error`` or ``prelaunch``;
        :meth:`resume` is a no-op afterwards."""
        self.qmp.cmd("cont")
        self._running = True
        self._paused = False

    # -- hot(un)plug: QMP's part (the guest's is qtest_virtio.pci.hotplug) --------------------

    def hotplug_options(self, dev_id: str) -> list[str]:
        """The ``-device`` options a spec's ``hotplug=True`` device is plugged with (its own,
        then the devices on its bus: a scsi-hd, serial ports), backends wired in."""
        plan = self._plan
        if plan is None or dev_id not in plan.hotplug:
            declared = ", ".join(plan.hotplug) if plan else "none (not started)"
            raise qdev.HotplugError(
                f"device {dev_id!r} was not declared for hot-plug; add it with spec.add_virtio(..., hotplug=True) "
                f"(hot-plug devices: {declared or 'none'})"
            )
        return plan.hotplug[dev_id]

    def device_add(self, option: str) -> None:
        """QMP ``device_add`` of a ``-device`` option (values typed for JSON, see qdev.py)."""
        try:
            self.qmp.cmd("device_add", **qdev.device_add_arguments(option, self.binary))
        except Exception as exc:  # qemu.qmp's ExecuteError
            raise qdev.HotplugError(f"device_add {option}: {qdev.qmp_error(exc)}") from exc

    def device_del(self, dev_id: str) -> None:
        """QMP ``device_del``: asks the device's hot-plug controller to unplug it; QEMU deletes
        it once the guest lets go (``DEVICE_DELETED``, :meth:`wait_device_deleted`)."""
        try:
            self.qmp.cmd("device_del", id=dev_id)
        except Exception as exc:
            raise qdev.HotplugError(f"device_del {dev_id}: {qdev.qmp_error(exc)}") from exc

    def wait_event(self, name: str, timeout: float = 5.0, **match: object) -> dict[str, Any] | None:
        """The next QMP event ``name`` whose data has the ``match`` items (a callable value is a
        test of the item: ``status=lambda s: s in ENDED``), or None after ``timeout`` seconds or
        once QEMU closed the monitor; others seen meanwhile stay for later waits."""
        qmp = self.qmp
        return qdev.wait_event(lambda t: qmp.pull_event(wait=t), name, match, timeout, self._event_backlog)

    def wait_device_deleted(self, dev_id: str, timeout: float = 5.0) -> None:
        """Wait for ``DEVICE_DELETED`` of ``dev_id``; a HotplugError when it does not come."""
        if self.wait_event("DEVICE_DELETED", timeout, device=dev_id) is None:
            raise qdev.HotplugError(
                f"QEMU did not delete device {dev_id!r} within {timeout:g} s (no DEVICE_DELETED): its hot-plug "
                "controller is still waiting for the guest (eject, slot power-off) or refused the unplug"
            )
