"""The qtest client: typed commands over one stream socket.

QEMU's qtest server (system/qtest.c) reads ASCII lines split on single spaces and answers
``OK [value]``, ``FAIL message`` or ``ERR message``; ``IRQ raise N`` / ``IRQ lower N`` lines may
arrive before any reply. It ``g_assert``\\ s on malformed arguments, killing QEMU with SIGABRT,
so every typed method builds its line through the grammar (:class:`.grammar.Command`), which
refuses a bad argument with :class:`MalformedCommand` (a ValueError) before anything is sent.

Posted writes: inside :meth:`QtestClient.posting`, a write (port, memory, bulk) is queued instead
of waiting for its ``OK``, which carries no information. The queue goes out ahead of the next
command that waits for a reply (or at :meth:`QtestClient.sync`, or, sent but unanswered, when the
outermost ``posting`` block ends), and its replies are read and checked there: a ``FAIL`` is
raised as the QtestError of the write that failed. QEMU runs the commands in the order they were
written either way, so the wire carries the same lines in the same order; only the waits go.

Bulk transfers: QEMU's line reader rescans its whole input buffer for every 1 KiB it reads, so
a long ``b64write`` line costs quadratic time. Large writes therefore go as base64 lines of
``WRITE_CHUNK`` bytes, pipelined (all sent, then all replies read); large reads as pipelined
``b64read`` of ``READ_CHUNK`` bytes. The sizes are the best measured in ``benchmarks/``.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

from ..errors import ClockUnavailable, MalformedCommand, QemuCrashed, QtestError, QtestTimeout
from .batch import CommandBatch, RecordingSocket
from .grammar import GRAMMAR, Command, check_raw, check_span

#: Measured on Debian 7.2 (benchmarks/bench_qtest.py --chunks): writes peak at 32 KiB lines
#: (64 KiB is level, 1 MiB halves it); reads at 256 KiB (1 MiB loses ~40%).
WRITE_CHUNK = 32 * 1024
READ_CHUNK = 256 * 1024
_RECV_SIZE = 256 * 1024
#: At most this much per send() after select() said writable, so a send never blocks long.
_SEND_SIZE = 64 * 1024
_HISTORY_TEXT = 160
#: Posted commands (queued or sent) after which the next write waits for every reply: each unread
#: reply holds ~700 bytes of the socket's buffer, and QEMU stops reading commands when its replies
#: cannot be written (see ``_exchange``).
_MAX_POSTED = 128
#: Queued bytes after which the queue is sent and answered (bulk writes inside ``posting``).
_MAX_POSTED_BYTES = 256 * 1024


def _short(text: str) -> str:
    if len(text) <= _HISTORY_TEXT:
        return text
    return f"{text[:_HISTORY_TEXT]}... ({len(text)} chars)"


def _short_bytes(line: bytes) -> str:
    return f"{line[:_HISTORY_TEXT].decode('ascii', errors='replace')}... ({len(line)} chars)"


def _short_reply(line: bytes) -> str:
    return line.decode("ascii", errors="replace") if len(line) <= _HISTORY_TEXT else _short_bytes(line)


DeadHook = Callable[[str], QemuCrashed]


class QtestClient:
    """A qtest connection. Not thread-safe; one command in flight unless pipelined on purpose.

    ``dead_hook(reason)`` is called when the socket closes under us; it returns the
    :class:`QemuCrashed` to raise (the machine layer fills in exit status and stderr).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = 30.0,
        history: int = 64,
        dead_hook: DeadHook | None = None,
        log: TextIO | None = None,
    ) -> None:
        self._sock = sock
        self.timeout = timeout
        #: Replies still owed for commands that timed out: dropped when they arrive, so a late
        #: reply is never taken for the next command's.
        self._stale_replies = 0
        self._closed_reason = "already closed"
        self._exchange_sent = 0
        self._buf = bytearray()
        self._scan = 0
        self._dead_hook = dead_hook
        self._log = log
        self.history: deque[tuple[str, str]] = deque(maxlen=history)
        #: Current level of each intercepted IRQ line, from ``IRQ raise/lower`` lines.
        self.irq_levels: dict[int, bool] = {}
        #: Every IRQ transition seen, in order: (line, raised).
        self.irq_events: list[tuple[int, bool]] = []
        self.commands_sent = 0
        #: Waits for QEMU's replies: one per exchange, however many commands it carried. This is
        #: the harness's real cost under qtest (a round trip is 20-45 us, a pipelined command ~2.5).
        self.round_trips = 0
        #: The exchange under way: its commands and the replies read so far. Reports list the
        #: commands still waiting (``last_commands``), and a timeout or an interruption moves
        #: them into ``history`` with why they have no reply.
        self._in_flight: Sequence[str] = ()
        self._in_flight_lines: list[bytes] = []
        self._closed = False
        self._endianness: str | None = None
        #: The irq_intercept commands sent, so a migration destination gets them too.
        self._intercepts: list[Command] = []
        #: Posted writes: queued (not sent yet), and sent whose replies are still unread.
        self._post_depth = 0
        self._posted: list[str] = []
        self._posted_wire = bytearray()
        self._owed: list[str] = []
        #: Off (or env ``QTEST_VIRTIO_POSTING=0``): ``posting`` blocks wait for every reply, as
        #: before pipelining; the wire is the same, only slower (to rule the pipelining out).
        self.post_writes = os.environ.get("QTEST_VIRTIO_POSTING", "1") != "0"

    # -- plumbing -------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        """Seconds without progress before a command raises QtestTimeout."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"timeout must be positive, not {value}")
        self._timeout = value
        # Timeout mode: send/recv wait inside C (poll) for single commands; the pipeline
        # selects before each call, so its sends and receives never block.
        self._sock.settimeout(value)

    @property
    def timed_out(self) -> bool:
        """Whether a command ever timed out on this connection (QEMU hung or stopped)."""
        return self._stale_replies > 0 or self._closed_reason.startswith("closed after a timeout")

    def _timed_out(self, owed: int, *, cut: bool) -> None:
        """Remember the replies still owed; if a command was only partly sent, the stream is
        cut mid-line and nothing sent later could be parsed by QEMU: close it."""
        self._stale_replies += owed
        if cut:
            self._closed_reason = "closed after a timeout in the middle of sending a command"
            self.close()

    def _pop_line(self) -> bytes | None:
        """The next complete line from the receive buffer (without its newline), or None. The
        search resumes where the last one stopped, so a long reply is scanned only once."""
        buf = self._buf
        i = buf.find(b"\n", self._scan)
        if i < 0:
            self._scan = len(buf)
            return None
        with memoryview(buf) as mv:
            line = mv[:i].tobytes()
        del buf[: i + 1]
        self._scan = 0
        return line

    def _take_line(self, line: bytes) -> bool:
        """Whether ``line`` is a reply for the caller (IRQ lines and stale replies are not)."""
        if line.startswith(b"IRQ "):
            self._record_irq(line)
            return False
        if self._stale_replies:
            self._stale_replies -= 1
            self.history.append(("(reply of a command that timed out)", line[:_HISTORY_TEXT].decode(errors="replace")))
            return False
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._posted, self._posted_wire = [], bytearray()
            try:
                self._sock.close()
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def record(self) -> list[bytes]:
        """Start keeping a copy of every byte sent to QEMU from now on (bulk data included)
        and return the list the copies go to: a reproducer then holds exactly what QEMU got,
        not the ``history`` ring's shortened text."""
        sink: list[bytes] = []
        self._sock = RecordingSocket(self._sock, sink)
        return sink

    def last_commands(self, n: int = 20) -> list[str]:
        """The last ``n`` commands with their replies, oldest first, for failure reports; a
        command still waiting for its reply is among them (``(no reply yet)``)."""
        items = [
            *self.history,
            *self._in_flight_items("no reply yet"),
            *((_short(c), "(posted, no reply read yet)") for c in self._owed),
            *((_short(c), "(posted, not sent yet)") for c in self._posted),
        ][-n:]
        return [f"{cmd}  ->  {reply}" if reply else cmd for cmd, reply in items]

    def _in_flight_items(self, why: str) -> list[tuple[str, str]]:
        """The exchange under way as history entries: replies read so far, then ``(why)``."""
        lines = self._in_flight_lines
        items = [(_short(c), _short_reply(line)) for c, line in zip(self._in_flight, lines, strict=False)]
        return items + [(_short(c), f"({why})") for c in self._in_flight[len(lines) :]]

    def _begin(self, commands: Sequence[str], lines: list[bytes]) -> None:
        self._in_flight, self._in_flight_lines = commands, lines

    def _end(self, why: str | None = None) -> None:
        """The exchange is over; with ``why`` (it failed), what it sent goes into history."""
        if why is not None and self._in_flight:
            self.history.extend(self._in_flight_items(why))
            if self._log is not None:
                for cmd, reply in self._in_flight_items(why):
                    self._log.write(f"> {cmd}\n< {reply}\n")
        self._in_flight, self._in_flight_lines = (), []

    def _dead(self, reason: str) -> QemuCrashed:
        self._end("no reply: QEMU closed the qtest socket")
        self.close()
        if self._dead_hook is not None:
            return self._dead_hook(reason)
        return QemuCrashed(reason, last_commands=self.last_commands())

    def _exchange(self, commands: Sequence[str], payload: bytes) -> list[bytes]:
        """Send ``payload`` (the commands' lines) while reading their replies.

        Sending and receiving are interleaved with select(): QEMU stops reading commands while
        its reply writes block, and a Unix socket accounts each small reply at ~700 bytes of
        buffer, so "send everything, then read" deadlocks after a few hundred commands. The
        timeout is for lack of progress, so a long bulk transfer never times out while moving.
        """
        if self._closed:
            raise self._dead(f"qtest connection {self._closed_reason}")
        posted = len(self._owed) + len(self._posted)
        if posted:
            commands = [*self._owed, *self._posted, *commands]
            payload = bytes(self._posted_wire) + payload
            self._owed, self._posted, self._posted_wire = [], [], bytearray()
        view = memoryview(payload)
        total = len(view)
        lines: list[bytes] = []
        wanted = len(commands)
        deadline = time.monotonic() + self.timeout
        self._begin(commands, lines)
        self.round_trips += 1
        try:
            lines = self._exchange_loop(commands, view, lines, wanted, deadline)
        except QtestTimeout:
            self._end(f"no reply within {self.timeout:g} s")
            raise
        except QemuCrashed:
            raise
        except BaseException as exc:
            # Interrupted: the replies not read are owed; a half-sent payload cuts the stream.
            self._end(f"no reply: interrupted by {type(exc).__name__}")
            self._timed_out(wanted - len(lines), cut=self._exchange_sent < total)
            raise
        self._end()
        if posted:
            self._check_posted(commands[:posted], lines[:posted])
            del lines[:posted]
        return lines

    def _check_posted(self, commands: Sequence[str], lines: Sequence[bytes]) -> None:
        """Check the replies of posted writes; raise the first failure, named after its write."""
        first: QtestError | None = None
        for command, line in zip(commands, lines, strict=True):
            try:
                self._payload(command, line)
            except QtestError as exc:
                if first is None:
                    first = QtestError(command, f"{exc.message} (a posted write: reported at the next wait)")
        if first is not None:
            raise first

    # -- posted writes --------------------------------------------------------------------

    class _Posting:
        def __init__(self, client: QtestClient) -> None:
            self.client = client
            self.on = client.post_writes

        def __enter__(self) -> None:
            if self.on:
                self.client._post_depth += 1

        def __exit__(self, *exc: object) -> None:
            client = self.client
            if not self.on:
                return
            client._post_depth -= 1
            if client._post_depth == 0 and client._posted and exc[0] is None:
                client._send_posted()

    def posting(self) -> QtestClient._Posting:
        """A block whose writes are posted: queued, and sent ahead of the next command that
        waits (at the end of the outermost block they are sent, their replies read later).
        Blocks nest."""
        return QtestClient._Posting(self)

    @property
    def pending_writes(self) -> int:
        """Posted writes whose replies have not been read yet (queued or sent)."""
        return len(self._posted) + len(self._owed)

    def sync(self) -> None:
        """Send every posted write and wait for their replies; raises the first failure. Call it
        before looking at QEMU some other way (QMP, a backend, its output), or at a point where a
        crash must be reported."""
        if self._posted or self._owed:
            self._exchange((), b"")

    def _post(self, command: str, wire: bytes) -> None:
        if self._closed or self._stale_replies:
            self._pipeline((command,), wire)
            return
        self.commands_sent += 1
        self._posted.append(command)
        self._posted_wire += wire
        if len(self._posted) + len(self._owed) >= _MAX_POSTED or len(self._posted_wire) >= _MAX_POSTED_BYTES:
            self.sync()

    def _send_posted(self) -> None:
        """Send the queued writes without waiting; their replies are read at the next exchange."""
        if self._closed or not self._posted:
            return
        wire, self._posted_wire = bytes(self._posted_wire), bytearray()
        commands, self._posted = self._posted, []
        try:
            self._sock.sendall(wire)
        except TimeoutError:
            self._in_flight = commands
            self._end(f"no reply within {self.timeout:g} s")
            self._timed_out(len(self._owed) + len(commands), cut=True)
            raise QtestTimeout(commands[-1], self.timeout) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._in_flight = commands
            raise self._dead(f"QEMU closed the qtest socket ({exc.strerror})") from None
        self._owed += commands

    @property
    def posting_now(self) -> bool:
        """Whether writes are posted here (inside ``posting``, with ``post_writes`` on)."""
        return self._post_depth > 0

    def post_many(self, commands: Sequence[str]) -> None:
        """Post well-formed command lines (a :class:`CommandBatch`'s) as writes."""
        for c in commands:
            self._post(c, c.encode("ascii") + b"\n")

    def _write(self, command: Command) -> None:
        """A write: posted inside ``posting``, else sent and answered."""
        if self._post_depth:
            self._post(command.encode(), command.wire())
        else:
            self._command(command.encode())

    def _exchange_loop(
        self, commands: Sequence[str], view: memoryview, lines: list[bytes], wanted: int, deadline: float
    ) -> list[bytes]:
        sock, total, buf = self._sock, len(view), self._buf
        self._exchange_sent = sent = 0
        while True:
            while len(lines) < wanted and (line := self._pop_line()) is not None:
                if self._take_line(line):
                    lines.append(line)
            if len(lines) == wanted:
                return lines
            remaining = deadline - time.monotonic()
            pending = commands[len(lines)]
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], max(remaining, 0))
            if not readable and not writable:
                self._timed_out(wanted - len(lines), cut=sent < total)
                raise QtestTimeout(_short(pending), self.timeout)
            if writable:
                try:
                    sent += sock.send(view[sent : sent + _SEND_SIZE])
                    self._exchange_sent = sent
                except (BlockingIOError, TimeoutError):
                    pass
                except OSError as exc:
                    raise self._dead(f"QEMU closed the qtest socket ({exc.strerror})") from None
                deadline = time.monotonic() + self.timeout
            if readable:
                try:
                    chunk = sock.recv(_RECV_SIZE)
                except (BlockingIOError, TimeoutError):
                    continue
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    raise self._dead(f"QEMU closed the qtest socket while {_short(pending)!r} waited for its reply")
                buf += chunk
                deadline = time.monotonic() + self.timeout

    def _record_irq(self, line: bytes) -> None:
        words = line.split()
        if len(words) == 3 and words[1] in (b"raise", b"lower") and words[2].isdigit():
            n, raised = int(words[2]), words[1] == b"raise"
            self.irq_levels[n] = raised
            self.irq_events.append((n, raised))
        if self._log is not None:
            self._log.write(f"< {line.decode(errors='replace')}\n")

    def _payload(self, command: str, line: bytes) -> bytes:
        """Check one reply line; return what follows ``OK`` or raise QtestError."""
        reply = _short_reply(line)
        self.history.append((command if len(command) <= _HISTORY_TEXT else _short(command), reply))
        if self._log is not None:
            self._log.write(f"> {_short(command)}\n< {reply}\n")
        if line[:3] == b"OK " or line == b"OK":
            return line[3:]
        text = line.decode("ascii", errors="replace")
        spec = GRAMMAR.get(command.split(" ", 1)[0])
        if text.startswith("FAIL Unknown command") and spec is not None and spec.needs_accel:
            raise ClockUnavailable(command)
        if text.startswith(("FAIL", "ERR")):
            _, _, message = text.partition(" ")
            raise QtestError(command, message or text)
        raise QtestError(command, f"unexpected reply {_short(text)!r}")

    def command(self, command: str) -> str:
        """Send one raw command line (checked to be one line of single-spaced words); return
        the text after ``OK``. The typed methods validate their arguments instead."""
        return self._command(check_raw(command)).decode("ascii")

    def send_raw(self, line: str) -> str:
        """Send one line exactly as written (a bug reproducer's) and return QEMU's whole reply
        line, ``FAIL`` and ``ERR`` included: replaying, they are data, not errors. Only a line
        break inside it is refused (it would be two commands)."""
        (text,) = self.send_raw_many([line])
        return text

    def send_raw_many(self, lines: Sequence[str]) -> list[str]:
        """Send lines exactly as written in one write, then read their whole reply lines (a
        reproducer's send group: QEMU gets them as the fuzzer sent them, so they run in one
        main-loop pass where they fit its 1 KiB read). As :meth:`send_raw`, FAIL and ERR are data."""
        for line in lines:
            if "\n" in line or "\r" in line:
                raise ValueError(f"send_raw: {line[:60]!r} contains a line break")
        replies = self._exchange(tuple(lines), b"".join(line.encode("latin-1") + b"\n" for line in lines))
        self.commands_sent += len(lines)
        texts = [reply.decode("latin-1") for reply in replies]
        for line, text in zip(lines, texts, strict=True):
            self.history.append((_short(line), _short(text)))
            if self._log is not None:
                self._log.write(f"> {_short(line)}\n< {_short(text)}\n")
        return texts

    def _command(self, command: str) -> bytes:
        """One command built by this class (well-formed by construction)."""
        data = command.encode("ascii") + b"\n"
        self.commands_sent += 1
        if len(data) > 4096 or self._closed or self._stale_replies or self._owed or self._posted:
            (line,) = self._exchange((command,), data)
            return self._payload(command, line)
        # Fast path for one short command: the per-op latency budget is a few microseconds.
        buf = self._buf
        self.round_trips += 1
        self._in_flight = (command,)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            self._end(f"no reply within {self.timeout:g} s")
            self._timed_out(1, cut=True)
            raise QtestTimeout(command, self.timeout) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._dead(f"QEMU closed the qtest socket ({exc.strerror})") from None
        except BaseException as exc:
            # Interrupted (Ctrl-C, pytest-timeout's signal) in the middle of sending: QEMU may
            # hold half a line, so nothing sent later could be parsed.
            self._end(f"no reply: interrupted by {type(exc).__name__}")
            self._timed_out(1, cut=True)
            raise
        line = b""
        try:
            while True:
                popped = self._pop_line()
                if popped is not None:
                    line = popped
                    if (line[:4] == b"IRQ " or self._stale_replies) and not self._take_line(line):
                        continue
                    break
                chunk = self._sock.recv(_RECV_SIZE)
                if not chunk:
                    raise self._dead(f"QEMU closed the qtest socket while {command!r} waited for its reply")
                buf += chunk
        except TimeoutError:
            self._end(f"no reply within {self.timeout:g} s")
            self._timed_out(1, cut=False)
            raise QtestTimeout(command, self.timeout) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._dead(f"QEMU closed the qtest socket ({exc.strerror})") from None
        except QemuCrashed:
            raise
        except BaseException as exc:
            # Interrupted while waiting (Ctrl-C, a timeout signal): the reply is still owed and
            # must not be taken for the next command's.
            self._end(f"no reply: interrupted by {type(exc).__name__}")
            self._timed_out(1, cut=False)
            raise
        self._in_flight = ()
        return self._payload(command, line)  # the reply is consumed: FAIL raises from here

    def pipeline(self, commands: Sequence[str]) -> list[str]:
        """Send many commands before reading their replies: several times faster than one by one.

        Raises the first failure, after all replies have been read.
        """
        return [p.decode("ascii") for p in self._pipeline(commands)]

    def _pipeline(self, commands: Sequence[str], payload: bytes | None = None) -> list[bytes]:
        """``payload``, when given, is the commands' wire form built by the caller (bulk paths
        build it directly; ``commands`` then only names them in history and errors)."""
        if payload is None:
            for c in commands:
                check_raw(c)
            payload = b"".join(c.encode("ascii") + b"\n" for c in commands)
        lines = self._exchange(commands, payload)
        self.commands_sent += len(commands)
        results: list[bytes] = []
        first_error: QtestError | None = None
        for c, line in zip(commands, lines, strict=True):
            try:
                results.append(self._payload(c, line))
            except QtestError as exc:
                first_error = first_error or exc
                results.append(b"")
        if first_error is not None:
            raise first_error
        return results

    def poll_irqs(self, timeout: float = 0.0) -> list[tuple[int, bool]]:
        """Collect IRQ lines that arrive with no command in flight (e.g. from an iothread).

        Waits up to ``timeout`` for the first one, then takes whatever else is already there.
        """
        self.sync()  # a posted notify must reach QEMU before its interrupt is waited for
        before = len(self.irq_events)
        deadline = time.monotonic() + timeout
        while True:
            while (line := self._pop_line()) is not None:
                if self._take_line(line):  # neither an IRQ line nor a reply owed to a timed-out command
                    raise QtestError("(none)", f"unsolicited reply {line!r} with no command in flight")
            wait = 0.0 if len(self.irq_events) > before else max(deadline - time.monotonic(), 0.0)
            ready, _, _ = select.select([self._sock], [], [], wait)
            if not ready:
                return self.irq_events[before:]
            try:
                chunk = self._sock.recv(_RECV_SIZE)
            except (BlockingIOError, TimeoutError):
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise self._dead("QEMU closed the qtest socket")
            self._buf += chunk

    def wait_irq(self, line: int, level: bool = True, timeout: float = 5.0) -> None:
        """Wait until intercepted IRQ ``line`` is at ``level``; sends no command."""
        deadline = time.monotonic() + timeout
        while self.irq_levels.get(line, False) != level:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = "raised" if self.irq_levels.get(line) else "low"
                raise QtestTimeout(f"(wait for IRQ {line} {'raise' if level else 'lower'}; line is {state})", timeout)
            self.poll_irqs(min(remaining, 0.05))

    # -- typed commands (each built and checked by the grammar) ----------------------------

    def _send(self, command: Command) -> bytes:
        return self._command(command.encode())

    def _int(self, command: Command) -> int:
        return command.reply_int(self._command(command.encode()))

    # -- port I/O -------------------------------------------------------------------------

    def outb(self, port: int, value: int) -> None:
        self._write(Command.build("outb", port, value))

    def outw(self, port: int, value: int) -> None:
        self._write(Command.build("outw", port, value))

    def outl(self, port: int, value: int) -> None:
        self._write(Command.build("outl", port, value))

    def inb(self, port: int) -> int:
        return self._int(Command.build("inb", port))

    def inw(self, port: int) -> int:
        return self._int(Command.build("inw", port))

    def inl(self, port: int) -> int:
        return self._int(Command.build("inl", port))

    # -- memory (target-endian words) -----------------------------------------------------

    def writeb(self, addr: int, value: int) -> None:
        self._write(Command.build("writeb", addr, value))

    def writew(self, addr: int, value: int) -> None:
        self._write(Command.build("writew", addr, value))

    def writel(self, addr: int, value: int) -> None:
        self._write(Command.build("writel", addr, value))

    def writeq(self, addr: int, value: int) -> None:
        self._write(Command.build("writeq", addr, value))

    def readb(self, addr: int) -> int:
        return self._int(Command.build("readb", addr))

    def readw(self, addr: int) -> int:
        return self._int(Command.build("readw", addr))

    def readl(self, addr: int) -> int:
        return self._int(Command.build("readl", addr))

    def readq(self, addr: int) -> int:
        return self._int(Command.build("readq", addr))

    # -- buffers (raw bytes) --------------------------------------------------------------

    def read(self, addr: int, size: int) -> bytes:
        """Hex ``read``: slow (2 characters a byte); ``memread`` is the fast path."""
        command = Command.build("read", addr, size)
        return command.reply_bytes(self._send(command))

    def write(self, addr: int, data: bytes) -> None:
        """Hex ``write`` of ``data`` (empty data sends nothing: QEMU rejects it)."""
        check_span("write", addr, len(data), min_size=0)
        if data:
            self._write(Command.build("write", addr, len(data), data))

    def b64read(self, addr: int, size: int) -> bytes:
        command = Command.build("b64read", addr, size)
        return command.reply_bytes(self._send(command))

    def b64write(self, addr: int, data: bytes) -> None:
        check_span("b64write", addr, len(data), min_size=0)
        if data:
            self._write(Command.build("b64write", addr, len(data), data))

    def memset(self, addr: int, size: int, value: int = 0) -> None:
        command = Command.build("memset", addr, size, value)
        if size:
            self._write(command)

    def memwrite(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write a buffer of any size: base64 chunks of ``WRITE_CHUNK``, pipelined."""
        data = memoryview(data).cast("B")
        check_span("memwrite", addr, len(data), min_size=0)
        if not data:
            return
        chunks = []
        for off in range(0, len(data), WRITE_CHUNK):
            chunk = data[off : off + WRITE_CHUNK]
            chunks.append(Command.build("b64write", addr + off, len(chunk), chunk))
        if self._post_depth:
            for c in chunks:
                self._post(f"b64write {c['addr']:#x} {c['size']:#x} <{c['size']} bytes>", c.wire())
            return
        payload = b"".join(c.wire() for c in chunks)
        self._pipeline([f"b64write {c['addr']:#x} {c['size']:#x} <{c['size']} bytes>" for c in chunks], payload)

    def memread(self, addr: int, size: int) -> bytes:
        """Read a buffer of any size: ``b64read`` chunks of ``READ_CHUNK``, pipelined."""
        check_span("memread", addr, size, min_size=0)
        if size == 0:
            return b""
        chunks = [
            Command.build("b64read", addr + off, min(READ_CHUNK, size - off)) for off in range(0, size, READ_CHUNK)
        ]
        replies = self._pipeline([c.encode() for c in chunks])
        return b"".join(c.reply_bytes(r) for c, r in zip(chunks, replies, strict=True))

    def read_many(self, spans: Iterable[tuple[int, int]]) -> list[bytes]:
        """Several buffers, ``(addr, size)`` each, read in one exchange (as ``memread`` reads
        them, so the wire is the same as one ``memread`` per buffer)."""
        spans = list(spans)
        chunks: list[Command] = []
        owner: list[int] = []
        for i, (addr, size) in enumerate(spans):
            check_span("memread", addr, size, min_size=0)
            for off in range(0, size, READ_CHUNK):
                chunks.append(Command.build("b64read", addr + off, min(READ_CHUNK, size - off)))
                owner.append(i)
        out = [bytearray() for _ in spans]
        if chunks:
            replies = self._pipeline([c.encode() for c in chunks])
            for i, c, r in zip(owner, chunks, replies, strict=True):
                out[i] += c.reply_bytes(r)
        return [bytes(b) for b in out]

    def run_many(self, commands: Sequence[Command]) -> list[bytes]:
        """Typed commands (reads among them) in one exchange: each one's reply payload, to decode
        with its ``reply_int`` / ``reply_bytes``. What comes next in order goes together."""
        return self._pipeline([c.encode() for c in commands]) if commands else []

    # -- batches of small writes ----------------------------------------------------------

    #: The commands ``write_many`` takes.
    WRITES = ("outb", "outl", "outw", "writeb", "writel", "writeq", "writew")

    def write_many(self, writes: Iterable[tuple[str, int, int]]) -> None:
        """Pipeline many small register writes: ``(op, address_or_port, value)`` triples."""
        commands = []
        for op, where, value in writes:
            if op not in self.WRITES:
                raise MalformedCommand(op, f"write_many: {op!r} is not one of {sorted(self.WRITES)}")
            commands.append(Command.build(op, where, value).encode())
        if self._post_depth:
            self.post_many(commands)
            return
        self.pipeline(commands)

    def batch(self) -> CommandBatch:
        """Validated writes queued and sent in order as one pipelined exchange."""
        return CommandBatch(self)

    # -- interrupts -----------------------------------------------------------------------

    def irq_intercept_in(self, qom_path: str) -> None:
        """Report the gpio-in lines of ``qom_path`` (e.g. ``ioapic``) as IRQ lines."""
        self._intercept(Command.build("irq_intercept_in", qom_path))

    def irq_intercept_out(self, qom_path: str, name: str | None = None) -> None:
        if name is None:
            self._intercept(Command.build("irq_intercept_out", qom_path))
        else:
            self._intercept(Command.build("irq_intercept_out", qom_path, name))

    def _intercept(self, command: Command) -> None:
        self._send(command)
        self._intercepts.append(command)

    def take_over(self, other: QtestClient) -> None:
        """Swap connections with ``other`` (a migration destination's fresh client): this
        object, which the guest memory, PCI and driver objects hold, now talks to ``other``'s
        QEMU, and ``other`` to this one's. The interceptions made here are made there too. IRQ
        levels start from low, as QEMU's qtest server starts them on the destination (it reports
        changes from its own table, which is not migrated): a line left raised on the source is
        reported again when the device next raises it, after its ISR read (§4.1.4.5)."""
        self.sync()
        intercepts = list(self._intercepts)
        self.__dict__, other.__dict__ = other.__dict__, self.__dict__
        for command in intercepts:
            self._intercept(command)

    def set_irq_in(self, qom_path: str, name: str | None, line: int, level: int) -> None:
        """Force a gpio-in pin; ``name=None`` is the unnamed list."""
        gpio = "unnamed-gpio-in" if name is None else name
        self._send(Command.build("set_irq_in", qom_path, gpio, line, level))

    def get_irq(self, line: int) -> bool:
        """Level of an intercepted line as last reported (reads pending IRQ lines first)."""
        self.poll_irqs(0.0)
        return self.irq_levels.get(line, False)

    # -- clock and target -----------------------------------------------------------------

    def clock_step(self, ns: int | None = None) -> int:
        """Advance the virtual clock by ``ns`` (at least 1: QEMU answers a step of 0 with "FAIL
        could not advance time"), or to the next timer deadline; returns the new time. Needs the
        qtest accelerator (see ClockUnavailable)."""
        return self._int(Command.build("clock_step") if ns is None else Command.build("clock_step", ns))

    def clock_set(self, ns: int) -> int:
        return self._int(Command.build("clock_set", ns))

    def endianness(self) -> str:
        """'little' or 'big': the byte order of readw/l/q and writew/l/q."""
        if self._endianness is None:
            self._endianness = self._send(Command.build("endianness")).decode("ascii")
        return self._endianness

    def module_load(self, prefix: str, name: str) -> None:
        """Load a QEMU module (QEMU 8.0 and later; older builds answer Unknown command)."""
        self._send(Command.build("module_load", prefix, name))
