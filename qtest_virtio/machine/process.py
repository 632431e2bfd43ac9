"""The QEMU process and its channels: spawn it so it dies with us, accept its qtest and QMP
connections, stop it (SIGTERM, then SIGKILL), reap it, and set up the QMP client.

QEMU connects, as a client, to Unix sockets the harness listens on in a fresh 0700 directory
(the layout libqtest uses). QEMU is started with PR_SET_PDEATHSIG so that it dies with us if
Python itself is killed, and in its own session so that a Ctrl-C reaches Python first.
None of this knows what a machine spec is: it takes argv and paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # qemu.qmp (and asyncio under it) is imported when QMP is first used
    import asyncio

    from qemu.qmp.legacy import QEMUMonitorProtocol

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


def spawn(argv: list[str], stderr_path: str, pass_fds: list[int], cwd: str | None = None) -> subprocess.Popen[bytes]:
    """Start QEMU with stdout and stderr to ``stderr_path``, stdin closed, in its own session
    (a Ctrl-C reaches Python, whose teardown then stops QEMU in order), dying with us. ``cwd``:
    the machine's private workdir, so a relative path on the command line (a reproducer's unix
    sockets) names a file that goes with it."""
    prefix, preexec = _spawn_args()
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(
            prefix + argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
            preexec_fn=preexec,
            pass_fds=pass_fds,
        )


def listen(workdir: str, names: tuple[str, ...]) -> dict[str, socket.socket]:
    """A listening Unix socket ``NAME.sock`` in ``workdir`` for each name, for QEMU to connect to."""
    listeners: dict[str, socket.socket] = {}
    try:
        for name in names:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners[name] = s
            s.bind(os.path.join(workdir, f"{name}.sock"))
            s.listen(1)
    except BaseException:
        close_listeners(workdir, listeners)
        raise
    return listeners


def close_listeners(workdir: str, listeners: dict[str, socket.socket]) -> None:
    """Close the listening sockets and remove their files (the accepted connections stay)."""
    for name, s in listeners.items():
        s.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(workdir, f"{name}.sock"))


def accept(
    proc: subprocess.Popen[bytes],
    listeners: dict[str, socket.socket],
    timeout: float,
    fail: Callable[[str], BaseException],
) -> dict[str, socket.socket]:
    """QEMU's connection on each listener, by name, within ``timeout`` seconds; ``fail(what)``
    is raised if QEMU exits first or the time runs out (a pidfd wakes us on its exit)."""
    deadline = time.monotonic() + timeout
    conns: dict[str, socket.socket] = {}
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while len(conns) < len(listeners):
            waiting = [s for n, s in listeners.items() if n not in conns]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise fail(f"QEMU did not connect within {timeout:g} s")
            watch: list[socket.socket | int] = [*waiting, *([pidfd] if pidfd is not None else [])]
            ready, _, _ = select.select(watch, [], [], min(remaining, 0.05 if pidfd is None else remaining))
            for name, s in listeners.items():
                if s in ready:
                    conns[name] = s.accept()[0]
            if proc.poll() is not None and len(conns) < len(listeners):
                raise fail("QEMU exited during start-up")
    except BaseException:
        for c in conns.values():
            c.close()
        raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return conns


def terminate(proc: subprocess.Popen[bytes], *, grace: float, signals_sent: set[int]) -> None:
    """Stop QEMU: SIGTERM to its process group, ``grace`` seconds, then SIGKILL; each signal
    sent is added to ``signals_sent`` (any other signal QEMU died of is a crash).

    QEMU handles SIGTERM as it handles QMP ``quit`` (``qemu_system_killed`` requests a shutdown;
    the main loop ends in ``qemu_cleanup`` and ``exit``: atexit handlers, gcov data, exit 0), so
    the graceful path costs no QMP negotiation. The group (QEMU runs in a session of its own)
    also reaches a QEMU that a wrapper script runs as its child. A hung main loop never reads
    the signal: SIGKILL after ``grace``.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, sig)
                signals_sent.add(sig)
                if sig == signal.SIGTERM:  # a stopped QEMU (SIGSTOP) acts on it only once continued
                    os.killpg(proc.pid, signal.SIGCONT)
        if wait_exit(proc, wait):
            return


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``proc`` to end and reap it; whether it ended. A pidfd
    wakes us the moment it exits (``Popen.wait(timeout)`` polls with growing sleeps, which costs
    a machine's teardown about a millisecond)."""
    if proc.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        timeout = 0.0  # ended, or the time is up: reap, or find it still running
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def reap(proc: subprocess.Popen[bytes], workdir: str) -> None:
    """Last-resort cleanup (garbage collection / interpreter exit): kill, wait, remove."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)


def _thread_event_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop set for this thread, or None (the main thread's is made on demand, as
    asyncio.get_event_loop makes it)."""
    import asyncio

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
    import asyncio

    from qemu.qmp.legacy import QEMUMonitorProtocol

    had_loop = _thread_event_loop() is not None
    qmp = QEMUMonitorProtocol(sock)
    loop = getattr(qmp, "_aloop", None)
    if had_loop or not isinstance(loop, asyncio.AbstractEventLoop):
        return qmp, None
    asyncio.set_event_loop(None)
    return qmp, loop


def connect_qmp(
    sock: socket.socket, timeout: float, *, negotiated: bool = False, events: list[dict[str, Any]] | None = None
) -> tuple[QEMUMonitorProtocol, asyncio.AbstractEventLoop | None]:
    """Negotiate QMP on ``sock`` within ``timeout`` (TimeoutError otherwise) and hand the
    session to qemu.qmp's sync client. The negotiation is :func:`raw_qmp`'s: qemu.qmp's own
    asserts that the first message after ``qmp_capabilities`` is its reply, but an event QEMU
    emits meanwhile (a werror=stop's STOP and BLOCK_IO_ERROR) can come first; and its connect()
    has no timeout of its own. ``negotiated``: a raw exchange did it already. The events read
    on the way (and ``events``, from an earlier raw exchange) are handed to the client, so its
    ``get_events``/``pull_event`` see them. Returns the client and the event loop made for it,
    which the caller closes (``close_loop``)."""
    from qemu.qmp.message import Message

    early = list(events or [])
    if not negotiated:
        early += raw_qmp(sock, [], timeout)
    qmp, loop = _qmp_client(sock)
    qmp.settimeout(timeout)
    client = qmp._qmp  # the async QMPClient the sync wrapper drives
    client.await_greeting = False
    client.negotiate = False
    try:
        qmp._sync(client.connect(sock), timeout)
        for event in early:
            qmp._sync(client.events.put(Message(event)), timeout)
    except BaseException:  # TimeoutError above all: the caller keeps no client, so no loop
        close_loop(loop)
        raise
    return qmp, loop


class RawQmpError(Exception):
    """A command :func:`raw_qmp` sent came back with QMP's ``error`` (its ``desc`` is the message)."""


def raw_qmp(sock: socket.socket, commands: list[str], timeout: float) -> list[dict[str, Any]]:
    """Negotiate QMP and run ``commands`` (names, no arguments) on a fresh monitor ``sock``
    without qemu.qmp: the greeting, ``qmp_capabilities`` and the commands in one exchange, on
    the blocking socket. qemu.qmp's asyncio client costs milliseconds to set up and to close,
    for the one ``cont`` a machine without the qtest accelerator needs; it can still take the
    session over later (``connect_qmp(negotiated=True)``). Returns the events QEMU sent
    meanwhile (for that client). Raises RawQmpError for a command QEMU refused,
    TimeoutError when QEMU does not answer in time, EOFError when it closed the monitor."""
    wanted = 1 + len(commands)  # qmp_capabilities, then each command
    out = "".join(json.dumps({"execute": c}) + "\n" for c in ("qmp_capabilities", *commands))
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    replies: list[dict[str, Any]] = []
    buf = b""
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        sock.sendall(out.encode())
        # Read whole messages only: whatever follows the last reply stays for qemu.qmp.
        while len(replies) < wanted or buf:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"QEMU did not answer QMP within {timeout:g} s") from None
            if not chunk:
                raise EOFError("QEMU closed the QMP monitor")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "event" in msg:
                    events.append(msg)
                elif "return" in msg or "error" in msg:
                    replies.append(msg)
    finally:
        sock.settimeout(previous)
    for name, reply in zip(("qmp_capabilities", *commands), replies, strict=True):
        if "error" in reply:
            raise RawQmpError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
    return events


def close_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Close an event loop ``connect_qmp`` made (None: nothing to close)."""
    if loop is not None:
        with contextlib.suppress(Exception):
            loop.close()
