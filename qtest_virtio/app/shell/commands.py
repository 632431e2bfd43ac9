"""What each line typed at the shell does: the named commands and the raw ones.

:class:`Commands` runs one line at a time against a started :class:`Machine` (``execute``) and
writes what it has to say to a text stream; :class:`~.session.Shell` adds the reading of lines.
The named commands sit on the library's layers: PCI functions, config space by offset or name,
and the virtio register blocks (``common_cfg``, ``legacy``, ``device_cfg``) by register name.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import re
import shlex
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from ...errors import QemuCrashed, QtestError, QtestVirtioError
from ...pci import Bdf, PciError, PciFunction
from ...pci import regs as pci_regs
from ...registers import Field, Layout, RegisterBlock
from ...transport import layout
from ...vm import Machine
from .addresses import Region, build_regions, name_address
from .raw import REFUSED_RAW, parse_raw, raw_table, reply_lines
from .registers import BLOCKS, SIDE_EFFECT_READS, Target, bits_suffix, status_value
from .text import ShellError, first_line, fmt_int, parse_int

_BDF_RE = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_ASSIGN_RE = re.compile(r"^([A-Za-z_][\w.\[\]]*)\s*(?:=\s*(\S.*?))?\s*$")


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


class Commands:
    """The shell's commands against ``vm``, one line at a time (:meth:`execute`).

    Errors print one line and the next line runs; QEMU dying propagates as QemuCrashed.
    Everything the commands look up for their own purposes (BAR windows, virtio capabilities)
    is read at construction, so that later the qtest history (``last``, ``repro``, a crash
    report) holds what the user did, not the shell's look-ups.
    """

    def __init__(self, vm: Machine, stdout: TextIO, transcript: Transcript | None = None) -> None:
        self.vm = vm
        self.stdout = stdout
        self.transcript = transcript
        self.target: Target | None = None
        self._targets: dict[Bdf, Target] = {}
        self._qdev_ids: dict[str, str] | None = None
        self._irq_seen = 0
        self.raw = raw_table(max(vm.spec.memory_bytes, 1 << 20))
        vm.pci.assign_bars()
        for fn in vm.pci.devices():
            self.target_of(fn)
        self._regions: list[Region] = build_regions(self._targets.values())

    # -- I/O ------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        self.say(f"error: {text}")

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
            self.error(first_line(exc))
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
        where = ""
        if command.spec.space:
            name = self.name_address(command.spec.space, command.get_int(command.spec.args[0].name))
            where = f"  [{name}]" if name else ""
        for text in reply_lines(command, reply, where):
            self.say(text)

    def name_address(self, space: str, addr: int) -> str:
        """The register (or BAR) an I/O port or memory address falls on, if the shell knows it."""
        return name_address(self._regions, self.vm.pci.config, space, addr)

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
        with t.features_select_kept():
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
        self.say(f"{where} = {fmt_int(value, width)}{bits_suffix('pci', name.strip(), value)}")

    # -- virtio registers by name ---------------------------------------------------------

    def _selected(self, what: str) -> Target:
        if self.target is None:
            raise ShellError(f"{what}: no device selected (select BDF|ID; devices lists them)")
        return self.target

    def _block(self, name: str) -> RegisterBlock[Layout]:
        return self._selected(name).block(name)

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
        absent = self._selected(block_name).absent(block_name, reg.name)
        if absent:
            raise ShellError(f"{label} {absent}")
        if value_text is None:
            value = block.read(reg)
            self.say(f"{label} = {fmt_int(value, reg.width)}{bits_suffix(block_name, reg.name, value)}")
            return
        value = parse_int(value_text, "value")
        block.write(reg, value)
        if (block_name, reg.name) in SIDE_EFFECT_READS:
            self.say(f"{label} <- {fmt_int(value, reg.width)}")
            return
        back = block.read(reg)
        note = "" if back == value else "  (differs from what was written)"
        self.say(f"{label} <- {fmt_int(value, reg.width)}; reads back {fmt_int(back, reg.width)}{note}")

    def _dump(self, block_name: str, block: RegisterBlock[Layout]) -> None:
        for reg in block.layout:
            label = f"{block_name}.{reg.name}"
            if (block_name, reg.name) in SIDE_EFFECT_READS:
                self.say(f"  {label:<36} (not read: reading clears it)")
                continue
            absent = self._selected(block_name).absent(block_name, reg.name)
            if absent:
                self.say(f"  {label:<36} ({absent})")
                continue
            value = block.read(reg)
            self.say(f"  {label:<36} {fmt_int(value, reg.width)}{bits_suffix(block_name, reg.name, value)}")

    def do_status(self, value_text: str) -> None:
        t = self._selected("status")
        transport = t.transport
        if value_text.strip():
            transport.set_status(status_value(value_text.strip()))
        value = transport.get_status()
        names = " ".join(layout.STATUS.names_set(value)) or "(reset: 0)"
        via = "common_cfg" if transport is t.modern else "legacy"
        self.say(f"device_status = {fmt_int(value, 1)}: {names}  [via {via}]")

    def do_features(self, words: list[str]) -> None:
        t = self._selected("features")
        if t.modern is None and t.legacy is None:
            raise ShellError(f"{t.fn.bdf} is not a virtio device")
        with t.features_select_kept():
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
            raise ShellError(f"qmp {words[1]}: {first_line(exc)}") from None
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


def _walk_pci(devices: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in devices:
        yield d
        bridge = d.get("pci_bridge")
        if bridge:
            yield from _walk_pci(bridge.get("devices", []))


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
