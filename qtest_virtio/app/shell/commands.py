"""``qtest-virtio shell``: an interactive session on a started machine.

What a QEMU developer does by hand with ``-qtest stdio``, made safer and readable: raw qtest
commands (validated first, because QEMU's qtest server ``g_assert``\\ s on a malformed argument
and a typo would abort QEMU), replies decoded (numbers in hex and decimal, buffers as a
hexdump, addresses named when they fall on a known register), and named commands on top of
the library's layers: PCI functions, config space by offset or name, and the virtio register
blocks (``common_cfg``, ``legacy``, ``device_cfg``) by register name.

The qtest channel is the machine's own Unix socket (never a pty: a pty cuts lines at 4095
bytes); only the user's terminal is one. With a terminal, input goes through ``readline``
with a history file (``$QTEST_VIRTIO_HISTORY``, else ``~/.qtest_virtio_history``).

``Shell`` is the testable core (a started :class:`Machine` and two text streams);
``run_shell(args)`` is the ``qtest-virtio shell`` entry point. ``python3 -m qtest_virtio.app.shell``
runs it stand-alone with the same options.
"""

from __future__ import annotations

import argparse
import binascii
import contextlib
import difflib
import io
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ...errors import MalformedCommand, QemuCrashed, QtestError, QtestVirtioError, UsageError
from ...pci import Bdf, EcamAccess, PciError, PciFunction
from ...pci import regs as pci_regs
from ...qtest import GRAMMAR, INT64_MAX, ArgKind, Command, CommandSpec, Reply
from ...registers import BitLayout, Field, Layout, RegisterBlock
from ...transport import LegacyTransport, ModernTransport, TransportError, VirtioPciMap, device_kind, layout
from ...vm import Machine
from ..args import Parser, add_machine_arguments, spec_from_args
from ..exits import Interrupted, guarded, unwinding

HISTORY_ENV = "QTEST_VIRTIO_HISTORY"
DEFAULT_HISTORY = "~/.qtest_virtio_history"
HISTORY_LENGTH = 1000
#: Largest ``read``/``b64read`` the shell shows (a hexdump of more helps nobody).
MAX_DUMP = 64 * 1024
#: Largest ``write``/``b64write`` (QEMU g_malloc()s the declared size: a typo must not abort it).
MAX_WRITE = 1 << 20
DEFAULT_TIMEOUT = 10.0
EXIT_INTERRUPTED = 130

_BDF_RE = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_ASSIGN_RE = re.compile(r"^([A-Za-z_][\w.\[\]]*)\s*(?:=\s*(\S.*?))?\s*$")


class ShellError(UsageError):
    """A command the shell refuses (bad syntax, unknown name): printed, and the shell goes on."""


# -- numbers and formatting -------------------------------------------------------------------


def parse_int(text: str, what: str = "number") -> int:
    """``0x10``, ``16``, ``0b10000``, ``0o20`` (not C's ``020``, which QEMU would read as octal)."""
    try:
        value = int(text, 0)
    except ValueError:
        hint = " (a leading 0 is ambiguous: write 0x.. or 0o..)" if re.fullmatch(r"0\d+", text) else ""
        raise ShellError(f"{what} {text!r} is not a number{hint}") from None
    if value < 0:
        raise ShellError(f"{what} {text} is negative")
    return value


def fmt_int(value: int, width: int | None = None) -> str:
    """``0x0007 (7)``: hex padded to the access width, and decimal."""
    digits = 2 * width if width else 1
    return f"{value:#0{digits + 2}x} ({value})"


def hexdump(data: bytes, base: int = 0) -> list[str]:
    """``hexdump -C`` style lines, guest addresses on the left; repeated lines become ``*``."""
    lines: list[str] = []
    addr_width = max(8, len(f"{base + max(len(data) - 1, 0):x}"))
    prev: bytes | None = None
    starred = False
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        if chunk == prev and off + 16 < len(data):
            if not starred:
                lines.append("*")
                starred = True
            continue
        prev, starred = chunk, False
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + off:0{addr_width}x}  {left:<23}  {right:<23}  |{text}|")
    return lines


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# -- raw qtest commands -----------------------------------------------------------------------


def _raw_table(max_memset: int) -> dict[str, CommandSpec]:
    """The grammar's commands the shell sends, with the shell's own limits on top of QEMU's."""
    dump, put = (1, MAX_DUMP), (1, MAX_WRITE)
    limits: dict[str, dict[str, tuple[int, int]]] = {
        "read": {"size": dump},
        "b64read": {"size": dump},
        "write": {"size": put},
        "b64write": {"size": put},
        "memset": {"size": (0, max_memset)},
        "clock_step": {"ns": (0, INT64_MAX)},  # a step of 0 is QEMU's to refuse (FAIL)
    }
    return {n: spec.with_limits(**limits.get(n, {})) for n, spec in GRAMMAR.items() if n not in REFUSED_RAW}


#: Commands QEMU accepts that the shell will not send: QEMU asserts on arguments nobody can
#: check from outside.
REFUSED_RAW = {
    "set_irq_in": "set_irq_in can abort QEMU: qdev asserts when the pin or GPIO name does not exist, "
    "which cannot be checked from outside",
}


def parse_raw(words: Sequence[str], table: dict[str, CommandSpec]) -> tuple[Command, str, bytes | None]:
    """Check a raw qtest command; return it, its canonical wire form, and the data it writes.

    Numbers are read the shell's way (:func:`parse_int`), data as hex or base64; the grammar
    then checks them against ``table``'s limits. Raises ShellError with a message naming the
    argument: nothing malformed reaches QEMU.
    """
    op = words[0]
    cmd = table[op]
    given = list(words[1:])
    values: list[int | str | bytes] = []
    data: bytes | None = None
    try:
        cmd.check_count(len(given))
        for arg, text in zip(cmd.args, given, strict=False):
            if arg.kind is ArgKind.INT:
                values.append(parse_int(text, f"{op}: {arg.name}"))
            elif arg.kind is ArgKind.WORD:
                values.append(text)
            else:
                data = _raw_data(op, arg.kind, text)
                values.append(data)
        command = cmd.build(*values)
    except MalformedCommand as exc:
        raise ShellError(str(exc)) from None
    return command, command.encode(), data


def _raw_data(op: str, kind: ArgKind, text: str) -> bytes:
    """Data typed at the shell: hex bytes (``0x`` optional, any case) or base64."""
    if kind is ArgKind.HEX:
        digits = text[2:] if text.lower().startswith("0x") else text
        if not re.fullmatch(r"[0-9a-fA-F]*", digits) or len(digits) % 2:
            raise ShellError(f"{op}: data {text!r} is not hex bytes (like 0xdeadbeef)")
        return bytes.fromhex(digits)
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ShellError(f"{op}: data {text!r} is not base64") from None


# -- what the shell knows about one PCI function -----------------------------------------------


def device_config_layout(device_type: int | None) -> Layout | None:
    """The device-specific config layout of a virtio device ID (from the device registry)."""
    from ...devices import registry

    return registry.config_layouts().get(device_type or -1)


def _device_feature_bits(device_type: int | None) -> dict[int, str]:
    from ...devices import registry

    return registry.feature_bits().get(device_type or -1, {})


@dataclass
class Target:
    """A selected PCI function with whatever virtio register layouts it has."""

    fn: PciFunction
    modern: ModernTransport | None = None
    legacy: LegacyTransport | None = None
    device_type: int | None = None
    kind: str = ""
    device_bits: dict[int, str] = field(default_factory=dict)
    device_layout: Layout | None = None

    @classmethod
    def of(cls, fn: PciFunction) -> Target:
        t = cls(fn)
        if fn.vendor_id != layout.VIRTIO_PCI_VENDOR_ID:
            return t
        subsystem = fn.subsystem
        t.device_type = layout.virtio_device_type(fn.device_id, subsystem[1] if subsystem else None)
        if t.device_type is None:
            return t
        t.kind = device_kind(fn)
        modern_mode = "modern" if t.kind == "modern" else "transitional-modern"
        legacy_mode = "legacy" if t.kind == "legacy" else "transitional-legacy"
        with contextlib.suppress(TransportError):
            t.modern = ModernTransport(fn, modern_mode)
        if VirtioPciMap.of(fn).has_legacy_bar:
            with contextlib.suppress(TransportError):
                t.legacy = LegacyTransport(fn, legacy_mode)
        t.device_bits = _device_feature_bits(t.device_type)
        t.device_layout = device_config_layout(t.device_type)
        return t

    @property
    def transport(self) -> ModernTransport | LegacyTransport:
        """The layout ``status``/``device_cfg`` go through: modern where there is one."""
        found = self.modern or self.legacy
        if found is None:
            raise ShellError(f"{self.fn.bdf} is not a virtio device (or its BARs are not assigned)")
        return found

    def describe(self) -> str:
        if self.device_type is None:
            return f"{self.fn.bdf}: not a virtio device; cfg and pci.NAME work"
        name = layout.DEVICE_TYPES.get(self.device_type, f"type {self.device_type}")
        blocks = [b for b, ok in (("common_cfg", self.modern), ("legacy", self.legacy)) if ok]
        if self.device_layout is not None:
            blocks.append("device_cfg")
        return f"{self.fn.bdf}: virtio {name} ({self.kind}); registers: {', '.join([*blocks, 'pci'])}"


# -- address naming for raw accesses -------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    space: str  # "mem" or "io"
    start: int
    size: int
    label: str
    layout: Layout | None = None

    def name(self, addr: int) -> str:
        off = addr - self.start
        f = self.layout.at(off) if self.layout is not None else None
        if f is not None:
            return f"{self.label}.{f.name}"
        return f"{self.label}+{off:#x}"


def build_regions(functions: Sequence[PciFunction]) -> list[Region]:
    """Every assigned BAR, and inside virtio BARs the register windows by name."""
    regions: list[Region] = []
    for fn in functions:
        bars = {b.index: b for b in fn.bars if b.address is not None}
        for b in bars.values():
            regions.append(Region("io" if b.is_io else "mem", b.address or 0, b.size, f"{fn.bdf} BAR{b.index}"))
        if fn.vendor_id != layout.VIRTIO_PCI_VENDOR_ID:
            continue
        subsystem = fn.subsystem
        vtype = layout.virtio_device_type(fn.device_id, subsystem[1] if subsystem else None)
        if vtype is None:
            continue
        vmap = VirtioPciMap.of(fn)
        if vmap.legacy is not None and (start := vmap.address(vmap.legacy)) is not None:
            label = f"{fn.bdf} legacy"
            regions.append(Region("io", start, layout.LEGACY_DEVICE_CFG_OFFSET, label, layout.LEGACY_CFG))
        for w in vmap.cap_windows:
            start = vmap.address(w)
            if start is None or w.cap is None or not w.length:
                continue
            block: Layout | None = None
            if w.cap.cfg_type == layout.CFG_TYPE_COMMON:
                block = layout.COMMON_CFG
            elif w.cap.cfg_type == layout.CFG_TYPE_DEVICE:
                block = device_config_layout(vtype)
            regions.append(Region(w.access, start, w.length, f"{fn.bdf} {w.name}", block))
    return regions


# -- the shell ----------------------------------------------------------------------------------


class Transcript(io.StringIO):
    """A qtest log (``Machine(spec, qtest_log=...)``) that keeps only the commands, in order:
    everything sent since QEMU started, for ``repro``."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[str] = []
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        self.commands += [line[2:] for line in lines if line.startswith("> ")]
        return len(text)


HELP = """\
Raw qtest commands (checked before they are sent; replies decoded):
  inb/inw/inl PORT            outb/outw/outl PORT VALUE
  readb/readw/readl/readq ADDR   writeb/writew/writel/writeq ADDR VALUE
  read ADDR SIZE   b64read ADDR SIZE   (shown as a hexdump, at most 64 KiB)
  write ADDR SIZE 0xDATA   b64write ADDR SIZE BASE64   memset ADDR SIZE BYTE
  endianness   clock_step [NS]   clock_set NS   irq_intercept_in/out QOM_PATH [NAME]
Machine:
  devices                     PCI functions (virtio ones with their kind and qdev id)
  cfg[.b|.w|.l] [BDF] OFF|NAME [VALUE]   config space read, or write with VALUE
                              (width: the suffix, else the register's, else the alignment)
  select BDF|ID               pick a function for the named commands below
  caps [BDF]   bars [BDF]     decoded capability list; BARs as assigned
Selected virtio device (select first):
  BLOCK.REG  /  BLOCK.REG = VALUE   registers by name; BLOCK alone dumps it
      blocks: common_cfg (modern), legacy (I/O BAR0), device_cfg, pci (config header)
  status [= VALUE|NAME|NAME...]  device status by bit name (write: 0 resets)
  features                    device and driver features by name, per register layout
  isr                         ISR status (reading clears it)
Session:
  qmp COMMAND [{json} | KEY=VALUE...]   a QMP command, reply as JSON
  last [N]   repro            last qtest commands; a bug-report reproducer of this session
  info   help [BLOCK]   quit (or Ctrl-D)"""

NAMED_COMMANDS = (
    "devices", "cfg", "cfg.b", "cfg.w", "cfg.l", "select", "caps", "bars", "status", "features", "isr",
    "qmp", "last", "repro", "info", "help", "quit", "exit",
)  # fmt: skip
BLOCKS = ("common_cfg", "legacy", "device_cfg", "pci")
#: Registers whose read has a side effect: left out of dumps and never read back after a write.
SIDE_EFFECT_READS = {("legacy", "isr_status")}
#: Legacy registers that exist only while MSI-X is enabled (virtio 1.2 §4.1.4.10).
LEGACY_MSIX_REGS = frozenset({"config_msix_vector", "queue_msix_vector"})


class Shell:
    """The interactive core: reads lines from ``stdin``, writes replies to ``stdout``.

    ``readline=True`` reads through ``input()`` (line editing, history file, completion):
    only for a real terminal on the process's own stdin/stdout. Errors print one line and the
    session goes on; QEMU dying ends it with exit status 1.
    """

    def __init__(
        self,
        vm: Machine,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        *,
        readline: bool = False,
        prompt: bool | None = None,
        history_file: str | None = None,
        transcript: Transcript | None = None,
    ) -> None:
        self.vm = vm
        self.transcript = transcript
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.use_readline = readline
        self.show_prompt = prompt if prompt is not None else (readline or _isatty(self.stdin))
        self.history_file = history_file if history_file is not None else history_path()
        self.target: Target | None = None
        self._targets: dict[Bdf, Target] = {}
        self._regions: list[Region] | None = None
        self._qdev_ids: dict[str, str] | None = None
        self._irq_seen = 0
        self.raw = _raw_table(max(vm.spec.memory_bytes, 1 << 20))
        # Everything the shell reads for its own purposes (BAR windows, virtio capabilities) is
        # read now, so that later the qtest history (last, repro, a crash report) holds what
        # the user did, not the shell's look-ups.
        vm.pci.assign_bars()
        for fn in vm.pci.devices():
            self.target_of(fn)
        self._regions = build_regions(vm.pci.devices())

    # -- I/O ------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        self.say(f"error: {text}")

    @property
    def prompt(self) -> str:
        return f"(qtest {self.target.fn.bdf}) " if self.target else "(qtest) "

    def _read_line(self) -> str:
        if self.use_readline:
            return input(self.prompt)
        if self.show_prompt:
            self.stdout.write(self.prompt)
            self.stdout.flush()
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Until ``quit`` or end of input: 0; QEMU died: its report, and 1."""
        if self.use_readline:
            self._setup_readline()
        try:
            while True:
                try:
                    line = self._read_line()
                except EOFError:
                    if self.show_prompt:
                        self.say()
                    return 0
                except Interrupted:  # SIGTERM or a closed terminal: leave, not just a new prompt
                    raise
                except KeyboardInterrupt:
                    self.say("^C")
                    continue
                try:
                    if not self.execute(line):
                        return 0
                except QemuCrashed as exc:
                    self.say(f"QEMU crashed: {exc}")
                    return 1
                except Interrupted:
                    raise
                except KeyboardInterrupt:
                    # The reply of the command in flight would be taken for the next one's.
                    self.say("interrupted while QEMU was answering: the qtest stream is out of step; leaving")
                    return EXIT_INTERRUPTED
        finally:
            if self.use_readline:
                self._save_history()

    def execute(self, line: str) -> bool:
        """Run one line; False when it asks to quit. QemuCrashed propagates."""
        line = line.strip()
        if not line or line.startswith("#"):
            return True
        try:
            return self._dispatch(line)
        except QemuCrashed:
            raise
        except KeyError as exc:
            self.error(str(exc.args[0]) if exc.args else "unknown name")
        except (ShellError, QtestError, QtestVirtioError, PciError, ValueError) as exc:
            self.error(_first_line(exc))
        finally:
            self._report_irqs()
        return True

    def _dispatch(self, line: str) -> bool:
        words = line.split()
        op = words[0]
        if op.lower() in self.raw:
            words[0] = op.lower()
            self._raw(words)
            return True
        if op in REFUSED_RAW:
            raise ShellError(f"refused: {REFUSED_RAW[op]}")
        if op in ("quit", "exit", "q"):
            return False
        m = _ASSIGN_RE.match(line)
        name = m.group(1) if m else ""
        if name.partition(".")[0] in BLOCKS:
            assert m is not None
            self._register(name, m.group(2))
            return True
        if name == "status" or op == "status":
            self.do_status((m.group(2) or "") if m and name == "status" else " ".join(words[1:]))
            return True
        if op == "cfg" or op.startswith("cfg."):
            self.do_cfg(words)
            return True
        handler = self._commands().get(op)
        if handler is not None:
            handler(words)
            return True
        known = [*NAMED_COMMANDS, *self.raw, *BLOCKS]
        close = difflib.get_close_matches(op, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ShellError(f"unknown command {op!r}{hint} (help lists the commands)")

    def _commands(self) -> dict[str, Callable[[list[str]], None]]:
        return {
            "devices": self.do_devices,
            "select": self.do_select,
            "bars": self.do_bars,
            "caps": self.do_caps,
            "features": self.do_features,
            "isr": self.do_isr,
            "qmp": self.do_qmp,
            "last": self.do_last,
            "repro": self.do_repro,
            "info": self.do_info,
            "help": self.do_help,
        }

    def _report_irqs(self) -> None:
        events = self.vm.qtest.irq_events
        for n, raised in events[self._irq_seen :]:
            self.say(f"IRQ {'raise' if raised else 'lower'} {n}")
        self._irq_seen = len(events)

    # -- raw commands ---------------------------------------------------------------------

    def _raw(self, words: list[str]) -> None:
        command, wire, _ = parse_raw(words, self.raw)
        reply = self.vm.qtest.command(wire)
        cmd, where = command.spec, ""
        if cmd.space:
            name = self.name_address(cmd.space, command.get_int(cmd.args[0].name))
            where = f"  [{name}]" if name else ""
        if cmd.reply is Reply.INT:
            self.say(f"{fmt_int(command.reply_int(reply.encode('ascii')), cmd.width)}{where}")
        elif cmd.reply is Reply.NS:
            self.say(f"{command.reply_int(reply.encode('ascii'))} ns")
        elif cmd.reply in (Reply.HEX, Reply.B64):
            for text in hexdump(command.reply_bytes(reply.encode("ascii")), command.get_int("addr")):
                self.say(text)
        elif cmd.reply is Reply.TEXT:
            self.say(reply)
        else:
            self.say(f"OK{where}")

    def name_address(self, space: str, addr: int) -> str:
        """The register (or BAR) an I/O port or memory address falls on, if the shell knows it."""
        if self._regions is None:
            self._regions = build_regions(self.vm.pci.devices())
        config = self.vm.pci.config
        if space == "mem" and isinstance(config, EcamAccess) and config.base <= addr < config.base + (256 << 20):
            off = addr - config.base
            bdf = Bdf(off >> 20 & 0xFF, off >> 15 & 0x1F, off >> 12 & 0x7)
            reg = pci_regs.TYPE0_HEADER.at(off & 0xFFF)
            return f"{bdf} config {reg.name if reg else hex(off & 0xFFF)}"
        best: Region | None = None
        for r in self._regions:
            if r.space == space and r.start <= addr < r.start + r.size and (best is None or r.size < best.size):
                best = r
        return best.name(addr) if best else ""

    # -- machine-level commands -----------------------------------------------------------

    def _qdev_id(self, bdf: str) -> str:
        if self._qdev_ids is None:
            self._qdev_ids = {}
            with contextlib.suppress(Exception):
                for bus in self.vm.qmp.cmd("query-pci"):  # type: ignore[attr-defined]
                    for d in _walk_pci(bus.get("devices", [])):
                        if d.get("qdev_id"):
                            b = Bdf(d["bus"], d["slot"], d["function"])
                            self._qdev_ids[str(b)] = str(d["qdev_id"])
        return self._qdev_ids.get(bdf, "")

    def function(self, text: str) -> PciFunction:
        """A function by PCI address or by qdev id."""
        if _BDF_RE.match(text):
            return self.vm.pci.find(bdf=text)
        try:
            return self.vm.pci_function(text)
        except KeyError:
            ids = sorted(set(self._qdev_ids_all().values()))
            raise ShellError(
                f"no PCI function {text!r} (give 00:04.0 or a device id: {', '.join(ids) or 'none'})"
            ) from None

    def _qdev_ids_all(self) -> dict[str, str]:
        self._qdev_id("")
        return dict(self._qdev_ids or {})

    def target_of(self, fn: PciFunction) -> Target:
        if fn.bdf_addr not in self._targets:
            self._targets[fn.bdf_addr] = Target.of(fn)
        return self._targets[fn.bdf_addr]

    def do_devices(self, words: list[str]) -> None:
        from ...probe import VENDOR_NAMES

        for fn in self.vm.pci.devices():
            vendor = VENDOR_NAMES.get(fn.vendor_id, f"vendor {fn.vendor_id:04x}")
            line = (
                f"{fn.bdf} {fn.class_name} [{fn.base_class:02x}{fn.subclass:02x}]: {vendor} "
                f"[{fn.vendor_id:04x}:{fn.device_id:04x}] (rev {fn.revision_id:02x})"
            )
            t = self.target_of(fn)
            extras = []
            if t.device_type is not None:
                extras.append(f"virtio {layout.DEVICE_TYPES.get(t.device_type, t.device_type)}, {t.kind}")
            qdev = self._qdev_id(fn.bdf)
            if qdev:
                extras.append(f"id={qdev}")
            self.say(line + (f"  ({'; '.join(extras)})" if extras else ""))

    def _function_arg(self, words: list[str], command: str) -> PciFunction:
        if len(words) > 2:
            raise ShellError(f"usage: {command} [BDF|ID]")
        if len(words) == 2:
            return self.function(words[1])
        if self.target is None:
            raise ShellError(f"{command}: no function selected (select BDF|ID, or {command} BDF)")
        return self.target.fn

    def do_select(self, words: list[str]) -> None:
        if len(words) == 1:
            self.say(self.target.describe() if self.target else "nothing selected (select BDF|ID)")
            return
        if len(words) != 2:
            raise ShellError("usage: select BDF|ID")
        if words[1] in ("none", "-"):
            self.target = None
            return
        self.target = self.target_of(self.function(words[1]))
        self.say(self.target.describe())

    def do_bars(self, words: list[str]) -> None:
        fn = self._function_arg(words, "bars")
        if not fn.bars:
            self.say(f"{fn.bdf}: no BARs")
        for b in fn.bars:
            self.say(f"Region {b.index}: {b.describe()}")

    def do_caps(self, words: list[str]) -> None:
        from ...probe import describe_function

        fn = self._function_arg(words, "caps")
        t = self.target_of(fn)
        with self._features_select_kept(t):
            info = describe_function(fn)
        if not info.capabilities:
            self.say(f"{fn.bdf}: no capabilities")
        for c in info.capabilities:
            where = f"{c.offset:03x}" if c.extended else f"{c.offset:02x}"
            self.say(f"[{where}] {c.name}{': ' + c.detail if c.detail else ''}")

    def do_cfg(self, words: list[str]) -> None:
        op, args = words[0], words[1:]
        suffix = op.partition(".")[2]
        widths = {"b": 1, "w": 2, "l": 4}
        if suffix and suffix not in widths:
            raise ShellError(f"{op}: width suffix must be .b, .w or .l")
        bdf: Bdf
        if args and _BDF_RE.match(args[0]):
            bdf = Bdf.parse(args.pop(0))
        elif self.target is not None:
            bdf = self.target.fn.bdf_addr
        else:
            raise ShellError("cfg: give a BDF (cfg 00:04.0 0x10) or select a function first")
        if not 1 <= len(args) <= 2:
            raise ShellError("usage: cfg[.b|.w|.l] [BDF] OFFSET|NAME [VALUE]")
        fn = next((f for f in self.vm.pci.devices() if f.bdf_addr == bdf), None)
        header = fn.config.layout if fn is not None else pci_regs.TYPE0_HEADER
        reg: Field | None
        if re.fullmatch(r"[A-Za-z_]\w*", args[0]):
            if args[0] not in header:
                names = ", ".join(f.name for f in header)
                raise ShellError(f"no config register {args[0]!r}; names: {names}")
            reg = header[args[0]]
            offset = reg.offset
        else:
            offset = parse_int(args[0], "offset")
            reg = header.at(offset)
        if suffix:
            width = widths[suffix]
        elif reg is not None and reg.offset == offset and reg.width in (1, 2, 4):
            width = reg.width
        else:
            width = 4 if offset % 4 == 0 else 2 if offset % 2 == 0 else 1
        config = self.vm.pci.config
        name = f" {reg.name}" if reg is not None and reg.offset == offset and reg.width == width else ""
        where = f"{bdf} cfg {offset:#04x}{name} ({width} byte{'s' if width > 1 else ''})"
        if len(args) == 2:
            value = parse_int(args[1], "value")
            if value >> (8 * width):
                raise ShellError(f"value {value:#x} does not fit in {width} byte(s)")
            config.write(bdf, offset, width, value)
            self.say(f"{where} <- {fmt_int(value, width)}")
            return
        value = config.read(bdf, offset, width)
        self.say(f"{where} = {fmt_int(value, width)}{_bits_suffix('pci', name.strip(), value)}")

    # -- virtio registers by name ---------------------------------------------------------

    def _selected(self, what: str) -> Target:
        if self.target is None:
            raise ShellError(f"{what}: no device selected (select BDF|ID; devices lists them)")
        return self.target

    def _block(self, name: str) -> RegisterBlock[Layout]:
        t = self._selected(name)
        if name == "pci":
            return t.fn.config
        if name == "common_cfg":
            if t.modern is None:
                raise ShellError(f"{t.fn.bdf} has no modern common_cfg ({t.kind or 'not virtio'})")
            return t.modern.common
        if name == "legacy":
            if t.legacy is None:
                raise ShellError(f"{t.fn.bdf} has no legacy I/O BAR0 ({t.kind or 'not virtio'})")
            return t.legacy.regs
        transport = t.transport
        if t.device_layout is None:
            kind = layout.DEVICE_TYPES.get(t.device_type or -1, "this device")
            raise ShellError(f"no device_cfg layout known for {kind}")
        return RegisterBlock(t.device_layout, transport.config_read, transport.config_write)

    def _register(self, name: str, value_text: str | None) -> None:
        block_name, _, reg_name = name.partition(".")
        block = self._block(block_name)
        if not reg_name:
            if value_text is not None:
                raise ShellError(f"{block_name}: name a register to write ({block_name}.NAME = VALUE)")
            self._dump(block_name, block)
            return
        if reg_name not in block.layout:
            names = ", ".join(f.name for f in block.layout)
            close = difflib.get_close_matches(reg_name, [f.name for f in block.layout], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ShellError(f"{block_name} has no register {reg_name!r}; {hint}registers: {names}")
        reg = block.layout[reg_name]
        label = f"{block_name}.{reg.name}"
        absent = self._absent(block_name, reg.name)
        if absent:
            raise ShellError(f"{label} {absent}")
        if value_text is None:
            value = block.read(reg)
            self.say(f"{label} = {fmt_int(value, reg.width)}{_bits_suffix(block_name, reg.name, value)}")
            return
        value = parse_int(value_text, "value")
        block.write(reg, value)
        if (block_name, reg.name) in SIDE_EFFECT_READS:
            self.say(f"{label} <- {fmt_int(value, reg.width)}")
            return
        back = block.read(reg)
        note = "" if back == value else "  (differs from what was written)"
        self.say(f"{label} <- {fmt_int(value, reg.width)}; reads back {fmt_int(back, reg.width)}{note}")

    def _absent(self, block_name: str, reg_name: str) -> str:
        """Why a register of the layout is not there now ("" when it is)."""
        t = self.target
        if block_name == "legacy" and reg_name in LEGACY_MSIX_REGS and t and t.legacy and not t.legacy.msix_enabled:
            return "exists only while MSI-X is enabled; until then the device config starts here"
        return ""

    def _dump(self, block_name: str, block: RegisterBlock[Layout]) -> None:
        for reg in block.layout:
            label = f"{block_name}.{reg.name}"
            if (block_name, reg.name) in SIDE_EFFECT_READS:
                self.say(f"  {label:<36} (not read: reading clears it)")
                continue
            absent = self._absent(block_name, reg.name)
            if absent:
                self.say(f"  {label:<36} ({absent})")
                continue
            value = block.read(reg)
            self.say(f"  {label:<36} {fmt_int(value, reg.width)}{_bits_suffix(block_name, reg.name, value)}")

    def do_status(self, value_text: str) -> None:
        t = self._selected("status")
        transport = t.transport
        if value_text.strip():
            transport.set_status(_status_value(value_text.strip()))
        value = transport.get_status()
        names = " ".join(layout.STATUS.names_set(value)) or "(reset: 0)"
        via = "common_cfg" if transport is t.modern else "legacy"
        self.say(f"device_status = {fmt_int(value, 1)}: {names}  [via {via}]")

    @contextlib.contextmanager
    def _features_select_kept(self, t: Target) -> Iterator[None]:
        """Reading 64-bit features moves the modern select registers: put them back."""
        if t.modern is None:
            yield
            return
        common = t.modern.common
        saved = {
            r: common.read(r)
            for r in (layout.COMMON_CFG.device_feature_select, layout.COMMON_CFG.driver_feature_select)
        }
        try:
            yield
        finally:
            for reg, value in saved.items():
                common.write(reg, value)

    def do_features(self, words: list[str]) -> None:
        t = self._selected("features")
        if t.modern is None and t.legacy is None:
            raise ShellError(f"{t.fn.bdf} is not a virtio device")
        with self._features_select_kept(t):
            for label, transport, width in (("modern", t.modern, 8), ("legacy", t.legacy, 4)):
                if transport is None:
                    continue
                for who, bits in (("device", transport.device_features()), ("driver", transport.driver_features())):
                    names = " ".join(layout.feature_names(bits, t.device_bits)) or "(none)"
                    self.say(f"{label} layout, {who}: {bits:#0{2 * width + 2}x}  {names}")

    def do_isr(self, words: list[str]) -> None:
        t = self._selected("isr")
        value = t.transport.read_isr()
        names = " ".join(layout.ISR.names_set(value)) or "(none)"
        self.say(f"isr = {fmt_int(value, 1)}: {names}  (reading cleared it)")

    # -- session commands -----------------------------------------------------------------

    def do_qmp(self, words: list[str]) -> None:
        if len(words) < 2:
            raise ShellError("usage: qmp COMMAND [{json} | KEY=VALUE...]")
        args = _qmp_arguments(words[2:])
        try:
            result = self.vm.qmp.cmd(words[1], **args)
        except QtestVirtioError:
            raise
        except Exception as exc:  # qemu.qmp's ExecuteError and friends
            raise ShellError(f"qmp {words[1]}: {_first_line(exc)}") from None
        self.say(json.dumps(result, indent=2, sort_keys=True))

    def do_last(self, words: list[str]) -> None:
        n = parse_int(words[1], "count") if len(words) > 1 else 20
        for line in self.vm.qtest.last_commands(n):
            self.say(line)

    def do_repro(self, words: list[str]) -> None:
        """The whole session as a bug-report reproducer when a transcript was kept (it includes
        the BAR assignment the later accesses depend on), else the last qtest commands."""
        if self.transcript is None:
            self.say(self.vm.reproducer())
            return
        commands = self.transcript.commands
        note = "\n# (bulk data of long commands elided)" if any("... (" in c for c in commands) else ""
        self.say(f"cat << EOF | {self.vm.command_line()}\n" + "\n".join(commands) + f"\nEOF{note}")

    def do_info(self, words: list[str]) -> None:
        vm = self.vm
        self.say(f"QEMU pid {vm.pid}, {vm.binary.version_text}")
        self.say(f"machine {vm.spec.machine}, {vm.spec.memory} RAM, config access {vm.pci.config.name}")
        self.say(f"workdir {vm.workdir} (qtest and QMP sockets, QEMU's stderr)")
        self.say(f"command line (qtest on stdio): {vm.command_line()}")

    def do_help(self, words: list[str]) -> None:
        if len(words) > 1 and words[1] in BLOCKS:
            block = self._block(words[1])
            for f in block.layout:
                doc = f"  {f.doc}" if f.doc else ""
                self.say(f"  {words[1]}.{f.name:<32} offset {f.offset:#04x}, {f.width} byte(s){doc}")
            return
        self.say(HELP)

    # -- readline -------------------------------------------------------------------------

    def _setup_readline(self) -> None:
        import readline

        with contextlib.suppress(OSError):
            readline.read_history_file(self.history_file)
        readline.set_history_length(HISTORY_LENGTH)
        readline.set_completer_delims(" \t")
        readline.set_completer(self._complete)
        readline.parse_and_bind("tab: complete")

    def _save_history(self) -> None:
        import readline

        with contextlib.suppress(OSError):
            readline.write_history_file(self.history_file)

    def _complete(self, text: str, state: int) -> str | None:
        try:
            options = [w for w in self._completions() if w.startswith(text)]
        except Exception:
            return None
        return options[state] if state < len(options) else None

    def _completions(self) -> list[str]:
        words = [*NAMED_COMMANDS, *self.raw]
        if self.target is not None:
            for name in BLOCKS:
                with contextlib.suppress(ShellError):
                    words += [name] + [f"{name}.{f.name}" for f in self._block(name).layout]
        words += [fn.bdf for fn in self.vm.pci.devices()]
        return sorted(set(words))


def _walk_pci(devices: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in devices:
        yield d
        bridge = d.get("pci_bridge")
        if bridge:
            yield from _walk_pci(bridge.get("devices", []))


#: Registers whose bits have names, by (block, register).
NAMED_BITS: dict[tuple[str, str], BitLayout] = {
    ("pci", "command"): pci_regs.COMMAND,
    ("pci", "status"): pci_regs.STATUS,
    ("common_cfg", "device_status"): layout.STATUS,
    ("legacy", "device_status"): layout.STATUS,
    ("legacy", "isr_status"): layout.ISR,
}


def _bits_suffix(block: str, reg_name: str, value: int) -> str:
    """``: io_space memory_space`` for the registers whose bits have names."""
    bits = NAMED_BITS.get((block, reg_name))
    if bits is None:
        return ""
    return ": " + (" ".join(bits.names_set(value)) or "(none)")


def _status_value(text: str) -> int:
    """``0x0b``, or bit names joined by ``|``, ``,`` or spaces (``ACKNOWLEDGE|DRIVER``)."""
    if re.fullmatch(r"\d\w*", text):
        return parse_int(text, "status")
    value = 0
    for name in filter(None, re.split(r"[|,\s]+", text)):
        try:
            value |= getattr(layout.STATUS, name.upper()).mask
        except AttributeError:
            names = ", ".join(b.name for b in layout.STATUS)
            raise ShellError(f"unknown status bit {name!r}; bits: {names}") from None
    return value


def _qmp_arguments(words: list[str]) -> dict[str, Any]:
    if not words:
        return {}
    text = " ".join(words)
    if text.startswith("{"):
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShellError(f"qmp arguments are not JSON: {exc}") from None
        if not isinstance(args, dict):
            raise ShellError("qmp arguments must be a JSON object")
        return args
    out: dict[str, Any] = {}
    for word in shlex.split(text):
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ShellError(f"qmp argument {word!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def history_path() -> str:
    return os.environ.get(HISTORY_ENV) or os.path.expanduser(DEFAULT_HISTORY)


# -- entry points --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``shell`` options: probe's machine options, and the qtest reply timeout."""
    add_machine_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for a qtest reply before calling QEMU hung (default {DEFAULT_TIMEOUT:g})",
    )


def run_shell(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """``qtest-virtio shell``: start the machine from probe's options, run the session.

    Exit status: 0 after ``quit`` or end of input, 1 when QEMU crashed. Start-up errors
    (unknown device, QEMU refusing the command line) propagate for the CLI to map.
    """
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    spec = spec_from_args(args)
    spec.command_timeout = float(getattr(args, "timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)
    interactive = _isatty(stdin) and stdin is sys.stdin and _isatty(stdout)
    transcript = Transcript()
    vm = Machine(spec, qtest_log=transcript)
    # A closed terminal (SIGHUP) unwinds like Ctrl-C would, so QEMU is stopped and its directory
    # removed instead of being left to PDEATHSIG and the next start's sweep.
    with unwinding(signal.SIGHUP):
        vm.start()
        code = 1
        try:
            accel = "qtest accelerator" if vm.binary.has_qtest_accel else "TCG with -S (no qtest accelerator)"
            shell = Shell(vm, stdin, stdout, readline=interactive, transcript=transcript)
            stdout.write(
                f"# {vm.binary.version_text}\n"
                f"# QEMU pid {vm.pid}: machine {spec.machine}, {spec.memory} RAM, config access "
                f"{vm.pci.config.name}, {accel}\n"
                "# type help for the commands, quit or Ctrl-D to leave\n"
            )
            stdout.flush()
            code = shell.run()
        finally:
            if code == 0:
                try:
                    vm.shutdown(check=True)
                except QemuCrashed as exc:
                    stdout.write(f"QEMU crashed: {exc}\n")
                    stdout.flush()
                    code = 1
            else:
                vm.shutdown(check=False)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m qtest_virtio.app.shell``: the same as ``qtest-virtio shell``."""
    parser = Parser(prog="qtest-virtio shell", description="An interactive qtest session on a started machine.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: run_shell(args))


if __name__ == "__main__":
    sys.exit(main())
