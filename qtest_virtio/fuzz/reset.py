"""Returning a reused QEMU to its post-start state between fuzz examples, and proving it did.

A fresh QEMU per example costs a process start; a reused one must look, to the next example,
exactly like a fresh one. :func:`take_baseline` records what a fresh machine shows right after
start; :func:`reset_to_baseline` puts it back after an example and compares, raising
:class:`ResetFailed` (the caller restarts the process) on any difference:

- the device reset: status 0 written, read back as 0 (virtio 1.2 §2.4, §4.1.4.3.2; the legacy
  status register alike, §4.1.4.8), then QEMU's own view of the device
  (``x-query-virtio-status`` and ``x-query-virtio-queue-status`` of every queue) equal to the
  post-start answers, and the device config space (§4.1.4.6) read back equal to it;
- the MSI-X table (PCI 3.0 §6.8.2.6-9) written back to its post-start contents (every vector
  masked, address and data zero), read back and compared, and the PBA clear;
- the PCI config space of every function on bus 0 (the enumeration of each example assigns
  them all, and the q35 MCH's PCIEXBAR, which enables ECAM): the dwords that differ from the
  post-start snapshot written back in ascending order (command before the BARs, so decoding
  is off while they move; the virtio pci_cfg capability's bar/offset/length before its data
  window, §4.1.4.9, so writing the data reaches no BAR), then everything read back and
  compared; the CF8 address latch put back too;
- guest RAM: every region the allocator handed out (rings, buffers, MSI-X mailboxes, the fuzz
  scratch area), the span up to 1 MiB past the highest of them (where a long device-writable
  descriptor from the scratch area reaches) and the conventional memory below 640 KiB (the
  ``low`` addresses of :class:`~.actions.Addr`) set to zero, the allocations read back as
  zero; the next example's allocator starts empty, as a fresh machine's does.

Config space is read through CF8/CFC (PCI 3.0 §3.2.2.3.2), which needs nothing enabled and
has no side effect except the address latch, so the snapshot disturbs nothing a fresh machine
would not show. A dword of the pci_cfg data window is read only after its capability's length
is 0 (reading it otherwise accesses a BAR).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import modes
from ..errors import QtestVirtioError
from ..memory import PAGE_SIZE, RAM_START
from ..pci.config import CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, Bdf, Cf8Access, EcamAccess
from ..pci.regs import MCH_PCIEXBAR, PCIEXBAR, PCIEXBAR_LENGTH_256M
from ..transport import Access, ModernTransport, VirtioPciMap
from ..transport.layout import VIRTIO_PCI_CFG_CAP
from ..vm import Machine
from .targets import DEVICE_ID

#: Dwords of a function's config space reachable through CF8 (256 bytes, PCI 3.0 §6.1).
CONFIG_DWORDS = 64
#: Conventional memory that the ``low`` fuzz addresses reach and that is RAM on pc and q35.
LOW_RAM_END = 0xA0000
#: How far past the highest allocation the reset zeroes (a long device-writable buffer).
ZERO_SLACK = 1 << 20
#: The q35 MCH (host bridge), whose PCIEXBAR the example's enumeration sets.
MCH = Bdf(0, 0, 0)
#: The reset steps, by name: a test may skip one to see the check catch it.
STEPS = ("status", "msix", "pci", "ram")


class ResetFailed(QtestVirtioError):
    """The machine does not look as it did right after start: it must be restarted."""


@dataclass(frozen=True)
class Baseline:
    """What a fresh machine shows right after start (and what the reset compares with)."""

    #: 64 config dwords of each function on bus 0, read through CF8.
    config: dict[Bdf, tuple[int, ...]]
    #: The CF8 address latch.
    cf8: int
    #: The fuzz device's function.
    bdf: Bdf
    #: Config offset of the pci_cfg capability's data dword (None: no such capability).
    pci_cfg_data: int | None
    #: QOM path of the virtio device (``x-query-virtio``).
    path: str
    status: dict[str, Any]
    queues: tuple[dict[str, Any], ...]
    #: The MSI-X table and the device config space (as many bytes as both legacy layouts
    #: show, MSI-X on or off), as read once the BARs were first assigned.
    msix_table: bytes
    device_config: bytes
    #: What the example's enumeration sends a fresh machine (ECAM enabled, BARs sized and
    #: assigned, decoding on), and QEMU's replies to it re-sent after the first write-back:
    #: the reset re-assigns the BARs by sending it again, and checks the replies.
    enumeration: tuple[str, ...] = ()
    enumeration_replies: tuple[str, ...] = ()


def _cf8_read_commands(addresses: Sequence[tuple[Bdf, int]]) -> list[str]:
    commands: list[str] = []
    for bdf, offset in addresses:
        commands += [f"outl {CONFIG_ADDRESS_PORT:#x} {Cf8Access.address(bdf, offset):#x}", f"inl {CONFIG_DATA_PORT:#x}"]
    return commands


def _cf8_values(replies: Sequence[str]) -> list[int]:
    """The dwords of :func:`_cf8_read_commands`' replies (every second one)."""
    return [int(r, 16) for r in replies[1::2]]


def _cf8_read(vm: Machine, addresses: Sequence[tuple[Bdf, int]]) -> list[int]:
    """Config dwords through CF8/CFC, pipelined: one round trip for all."""
    return _cf8_values(vm.qtest.pipeline(_cf8_read_commands(addresses)))


def _cf8_write_commands(writes: Sequence[tuple[Bdf, int, int]]) -> list[str]:
    commands: list[str] = []
    for bdf, offset, value in writes:
        commands += [
            f"outl {CONFIG_ADDRESS_PORT:#x} {Cf8Access.address(bdf, offset):#x}",
            f"outl {CONFIG_DATA_PORT:#x} {value:#x}",
        ]
    return commands


def _bulk(vm: Machine, commands: Sequence[str]) -> list[bytes]:
    """Pipelined ``b64read``/``b64write``/``memset`` commands, one round trip; the bytes each
    ``b64read`` read (empty for the others)."""
    replies = vm.qtest.pipeline(commands)
    return [base64.b64decode(r) if c.startswith("b64read") else b"" for c, r in zip(commands, replies, strict=True)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64read(addr: int, size: int) -> str:
    return f"b64read {addr:#x} {size:#x}"


def _bus0_functions(vm: Machine) -> list[Bdf]:
    """The functions present on bus 0 (vendor ID neither 0xFFFF nor 0)."""
    bdfs = [Bdf(0, dev, fn) for dev in range(32) for fn in range(8)]
    ids = _cf8_read(vm, [(b, 0) for b in bdfs])
    return [b for b, v in zip(bdfs, ids, strict=True) if v & 0xFFFF not in (0xFFFF, 0)]


def _config(vm: Machine, bdfs: Sequence[Bdf], skip: Container[tuple[Bdf, int]] = ()) -> dict[Bdf, list[int]]:
    """Config dwords of ``bdfs`` through CF8 (-1 where ``skip``ped)."""
    wanted = [(b, 4 * i) for b in bdfs for i in range(CONFIG_DWORDS) if (b, 4 * i) not in skip]
    values = dict(zip(wanted, _cf8_read(vm, wanted), strict=True))
    return {b: [values.get((b, 4 * i), -1) for i in range(CONFIG_DWORDS)] for b in bdfs}


def _ecam(vm: Machine) -> EcamAccess | None:
    """The ECAM window when the MCH's PCIEXBAR enables one (the example's enumeration did), else None."""
    lo, hi = _cf8_read(vm, [(MCH, MCH_PCIEXBAR.offset), (MCH, MCH_PCIEXBAR.offset + 4)])
    value = hi << 32 | lo
    if not PCIEXBAR.enable.get(value) or PCIEXBAR.length.get(value) != PCIEXBAR_LENGTH_256M:
        return None
    return EcamAccess(vm.qtest, value & 0xFF_F000_0000)


def _ecam_plan(
    ecam: EcamAccess, bdfs: Sequence[Bdf], skip: Container[tuple[Bdf, int]] = ()
) -> tuple[list[str], list[tuple[Bdf, int, int]]]:
    """The bulk reads of :func:`_config_ecam` (commands, and each one's function, start, end)."""
    plan: list[tuple[Bdf, int, int]] = []  # (function, start, end) of each bulk read
    for b in bdfs:
        at = 0
        for end in [*sorted(off for off in range(0, 4 * CONFIG_DWORDS, 4) if (b, off) in skip), 4 * CONFIG_DWORDS]:
            if end > at:
                plan.append((b, at, end))
            at = end + 4
    return [_b64read(ecam.address(b, start), end - start) for b, start, end in plan], plan


def _ecam_values(
    plan: Sequence[tuple[Bdf, int, int]], replies: Sequence[str], bdfs: Sequence[Bdf]
) -> dict[Bdf, list[int]]:
    out: dict[Bdf, list[int]] = {b: [-1] * CONFIG_DWORDS for b in bdfs}
    for (b, start, _), reply in zip(plan, replies, strict=True):
        raw = base64.b64decode(reply)
        for i in range(0, len(raw), 4):
            out[b][(start + i) // 4] = int.from_bytes(raw[i : i + 4], "little")
    return out


def _config_ecam(
    vm: Machine, ecam: EcamAccess, bdfs: Sequence[Bdf], skip: Container[tuple[Bdf, int]] = ()
) -> dict[Bdf, list[int]]:
    """The first 256 bytes of each function through ECAM: bulk reads (QEMU splits them into
    dword config reads) around a ``skip``ped dword (-1 there), all in one round trip."""
    commands, plan = _ecam_plan(ecam, bdfs, skip)
    return _ecam_values(plan, vm.qtest.pipeline(commands), bdfs)


def _virtio_state(vm: Machine, path: str, queues: int) -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
    """``x-query-virtio-status`` and ``x-query-virtio-queue-status`` of every queue, sent
    together (one wait for all)."""
    status, *qs = vm.qmp_many(
        [("x-query-virtio-status", {"path": path})]
        + [("x-query-virtio-queue-status", {"path": path, "queue": q}) for q in range(queues)]
    )
    return status, tuple(qs)


def _device_config(vm: Machine, vmap: VirtioPciMap, legacy: bool) -> bytes:
    """The device config space (§4.1.4.6; legacy §4.1.4.8), byte by byte as a driver reads it,
    pipelined: as many bytes as both legacy layouts (MSI-X on, off) show."""
    window = (vmap.legacy_device() if vmap.legacy is not None else None) if legacy else vmap.device
    start = vmap.address(window) if window is not None else None
    if window is None or start is None:
        return b""
    size = (vmap.legacy.length - 24 if vmap.legacy is not None else 0) if legacy else window.length
    size = max(0, min(size, 0x100))
    op = "inb" if window.access == Access.IO else "readb"
    replies = vm.qtest.pipeline([f"{op} {start + i:#x}" for i in range(size)])
    return bytes(int(r, 16) & 0xFF for r in replies)


def _msix_table(vm: Machine, vmap: VirtioPciMap) -> bytes:
    if vmap.msix_table is None:
        return b""
    addr = vmap.address(vmap.msix_table)
    return b"" if addr is None else vm.qtest.memread(addr, vmap.msix_table.length)


def take_baseline(vm: Machine, mode: str, sink: list[bytes]) -> Baseline:
    """Snapshot a machine right after start: config space, CF8 latch and QEMU's view of the
    device; then, with the BARs assigned as an example's enumeration assigns them (its
    commands recorded from ``sink``, the client's recording), the MSI-X table and the device
    config; then the config space written back to the snapshot (checked) and the enumeration
    re-sent, its replies kept. The machine is resumed first, as every example's driver does
    (``Machine.virtio``; without the qtest accelerator QEMU starts paused, ``vm-running`` false)."""
    vm.resume()
    bdfs = _bus0_functions(vm)
    cf8 = vm.qtest.inl(CONFIG_ADDRESS_PORT)
    config = {b: tuple(v) for b, v in _config(vm, bdfs).items()}
    vm.qtest.outl(CONFIG_ADDRESS_PORT, cf8)
    devices: list[dict[str, str]] = vm.qmp.cmd("x-query-virtio")  # type: ignore[assignment]
    path = devices[0]["path"]
    status0 = vm.qmp.cmd("x-query-virtio-status", path=path)
    status, queues = _virtio_state(vm, path, int(status0["num-vqs"]))  # type: ignore[index]
    sink.clear()
    fn = vm.pci_function(DEVICE_ID)  # assigns the BARs: the MSI-X table and device config are reachable
    vmap = VirtioPciMap.of(fn)  # the capability walk a driver's first use makes (the map is kept)
    enumeration = tuple(b"".join(sink).decode("latin-1").splitlines())
    pci_cfg = vmap.pci_cfg.offset + VIRTIO_PCI_CFG_CAP.pci_cfg_data.offset if vmap.pci_cfg is not None else None
    baseline = Baseline(
        config=config,
        cf8=cf8,
        bdf=fn.bdf_addr,
        pci_cfg_data=pci_cfg,
        path=path,
        status=status,
        queues=queues,
        msix_table=_msix_table(vm, vmap),
        device_config=_device_config(vm, vmap, modes.USES_LEGACY_LAYOUT[modes.check_mode(mode)]),
    )
    _restore_config(vm, baseline, ())
    return replace(baseline, enumeration=enumeration, enumeration_replies=tuple(vm.qtest.pipeline(enumeration)))


def enumerate_again(vm: Machine, baseline: Baseline, sink: list[bytes]) -> None:
    """A new process of the same command line, taken to where :func:`take_baseline` left the
    first one: resumed, enumerated (the PCI objects built anew) with exactly the commands the
    first enumeration sent (else ResetFailed: the enumerator saw something else). Its first
    reset is then checked against the first process's snapshot."""
    vm.resume()
    sink.clear()
    VirtioPciMap.of(vm.pci_function(DEVICE_ID))
    sent = tuple(b"".join(sink).decode("latin-1").splitlines())
    if sent != baseline.enumeration:
        raise ResetFailed("a new QEMU process enumerates differently from the first one")


def _reassign_commands(baseline: Baseline) -> tuple[list[str], Callable[[Sequence[str]], None]]:
    """Assign the BARs again: the enumeration's commands, and the check that each reply is as
    the first time (else ResetFailed)."""

    def check(replies: Sequence[str]) -> None:
        for i, (got, want) in enumerate(zip(replies, baseline.enumeration_replies, strict=True)):
            if got != want:
                raise ResetFailed(f"re-assigning the BARs: {baseline.enumeration[i]!r} answered {got!r}, not {want!r}")

    return list(baseline.enumeration), check


def _differences(what: str, got: Any, want: Any) -> str | None:
    if got == want:
        return None
    if isinstance(got, dict) and isinstance(want, dict):
        keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        return f"{what}: " + ", ".join(f"{k} {got.get(k)!r} (after start: {want.get(k)!r})" for k in keys[:4])
    return f"{what} differs"


def reset_to_baseline(vm: Machine, driver: Any, baseline: Baseline, *, skip: Container[str] = ()) -> None:
    """Reset the device and the machine to ``baseline`` and prove it (ResetFailed naming the
    first difference). ``skip`` leaves out steps of :data:`STEPS` (tests: the check must then
    fail)."""
    fn = driver.fn
    vmap = VirtioPciMap.of(fn)
    fn.restore()  # BARs where the example's enumeration put them, decoding on: the registers reachable
    tr = driver.transport
    if "status" not in skip:
        try:
            tr.reset(timeout=1.0)  # status 0, read back 0
        except QtestVirtioError as exc:
            raise ResetFailed(f"device reset: {exc}") from None
    config_now = _device_config(vm, vmap, not isinstance(tr, ModernTransport))
    if config_now != baseline.device_config:
        raise ResetFailed(
            f"device config space differs after reset: {config_now.hex()} (after start: {baseline.device_config.hex()})"
        )
    if baseline.msix_table and vmap.msix_table is not None:
        addr = vmap.address(vmap.msix_table)
        assert addr is not None
        commands = (
            [] if "msix" in skip else [f"b64write {addr:#x} {len(baseline.msix_table):#x} " + b64(baseline.msix_table)]
        )
        commands.append(_b64read(addr, len(baseline.msix_table)))
        pba = vmap.address(vmap.msix_pba) if vmap.msix_pba is not None else None
        if pba is not None and vmap.msix_pba is not None:
            commands.append(_b64read(pba, vmap.msix_pba.length))
        table, *pending = _bulk(vm, commands)[-2 if pba is not None else -1 :]
        if table != baseline.msix_table:
            raise ResetFailed("MSI-X table differs from its post-start contents after the write-back")
        if pending and any(pending[0]):
            raise ResetFailed("MSI-X pending bits set after the device reset")
    _restore_config(vm, baseline, skip)
    status, queues = _virtio_state(vm, baseline.path, len(baseline.queues))
    # virtio-pci marks the device disabled at every command-register write with bus mastering
    # off (virtio_write_config), as the write-back of the post-start command register is. The
    # next example's first write to this function (BAR sizing writes the command register, bus
    # mastering off) sets it on a fresh machine too, before anything could see the difference.
    want_status = {**baseline.status, "disabled": True} if "disabled" in baseline.status else baseline.status
    for what, got, want in (
        ("x-query-virtio-status", status, want_status),
        *(
            (f"x-query-virtio-queue-status queue {i}", q, w)
            for i, (q, w) in enumerate(zip(queues, baseline.queues, strict=True))
        ),
    ):
        diff = _differences(what, got, want)
        if diff is not None:
            raise ResetFailed(diff)
    # the BARs re-assigned and the RAM zeroed and read back in one exchange
    commands, check = _reassign_commands(baseline)
    zero, ram_check = _zero_ram_commands(vm, skip="ram" in skip)
    replies = vm.qtest.pipeline(commands + zero)
    check(replies[: len(commands)])
    ram_check(replies[len(commands) :])


def _restore_config(vm: Machine, baseline: Baseline, skip: Container[str]) -> None:
    """Write back the dwords that differ from the post-start snapshot and prove it. With ECAM
    enabled (the example's enumeration on q35), everything but the MCH's PCIEXBAR is written
    back and read back through ECAM (one bulk read per function), then PCIEXBAR is put back
    and read back through CF8; else all of it through CF8."""
    bdfs = list(baseline.config)
    data = {(baseline.bdf, baseline.pci_cfg_data)} if baseline.pci_cfg_data is not None else set()
    ecam = _ecam(vm)
    last = {(MCH, MCH_PCIEXBAR.offset), (MCH, MCH_PCIEXBAR.offset + 4)} if ecam is not None else set()
    # pci_cfg's data dword is read only once its length is 0
    now = _config_ecam(vm, ecam, bdfs, skip=data) if ecam is not None else _config(vm, bdfs, skip=data)

    def writes(
        state: dict[Bdf, list[int]], keys: Container[tuple[Bdf, int]], exclude: bool
    ) -> list[tuple[Bdf, int, int]]:
        return [
            (b, 4 * i, want)
            for b in bdfs
            for i, (got, want) in enumerate(zip(state[b], baseline.config[b], strict=True))
            if got != want and (b, 4 * i) not in data and (((b, 4 * i) in keys) != exclude)
        ]

    first = writes(now, last, exclude=True) + [(b, off, baseline.config[b][off // 4]) for b, off in data]
    # Each write-back goes out with its read-back in one exchange (QEMU runs them in order).
    put = [] if "pci" in skip else _cf8_write_commands(first)  # pci_cfg's data dword last: its length is back first
    if ecam is not None:
        reads, plan = _ecam_plan(ecam, bdfs)
        back = _ecam_values(plan, vm.qtest.pipeline(put + reads)[len(put) :], bdfs)
        for b, off in last:
            back[b][off // 4] = baseline.config[b][off // 4] if now[b][off // 4] == back[b][off // 4] else -1
        _compare(back, baseline)
        put = [] if "pci" in skip else _cf8_write_commands(writes(now, last, exclude=False))
        # the rest of the MCH was read back through ECAM above: only PCIEXBAR is read here
        at = sorted(off for _, off in last)
        replies = vm.qtest.pipeline(
            [*put, *_cf8_read_commands([(MCH, off) for off in at]), f"outl {CONFIG_ADDRESS_PORT:#x} {baseline.cf8:#x}"]
        )
        mch = list(baseline.config[MCH])
        for off, value in zip(at, _cf8_values(replies[len(put) : -1]), strict=True):
            mch[off // 4] = value
        _compare({MCH: mch}, baseline, only=last)
    else:
        reads = _cf8_read_commands([(b, 4 * i) for b in bdfs for i in range(CONFIG_DWORDS)])
        values = _cf8_values(
            vm.qtest.pipeline([*put, *reads, f"outl {CONFIG_ADDRESS_PORT:#x} {baseline.cf8:#x}"])[len(put) : -1]
        )
        _compare({b: values[CONFIG_DWORDS * k : CONFIG_DWORDS * (k + 1)] for k, b in enumerate(bdfs)}, baseline)


def _compare(back: dict[Bdf, list[int]], baseline: Baseline, only: Container[tuple[Bdf, int]] | None = None) -> None:
    for b, values in back.items():
        want = baseline.config[b]
        bad = [4 * i for i, (g, w) in enumerate(zip(values, want, strict=True)) if g != w]
        bad = [off for off in bad if only is None or (b, off) in only]
        if bad:
            off = bad[0]
            raise ResetFailed(
                f"PCI config of {b} at {off:#04x} reads {values[off // 4] & 0xFFFF_FFFF:#010x} after the write-back "
                f"(after start: {want[off // 4]:#010x}; {len(bad)} dword(s) differ)"
            )


def _zero_ram_commands(vm: Machine, *, skip: bool = False) -> tuple[list[str], Callable[[Sequence[str]], None]]:
    """The commands of :func:`zero_used_ram` and the check of their replies."""
    allocations = vm.memory.allocations
    top = max((a.addr + a.size for a in allocations), default=RAM_START)
    top = min((top + ZERO_SLACK + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE, vm.memory.end)
    commands = [] if skip else [f"memset {RAM_START:#x} {top - RAM_START:#x} 0x0", f"memset 0x0 {LOW_RAM_END:#x} 0x0"]

    def check(replies: Sequence[str]) -> None:
        for a, reply in zip(allocations, replies[len(commands) :], strict=True):
            if any(base64.b64decode(reply)):
                raise ResetFailed(f"guest RAM of {a.tag or 'an allocation'} at {a.addr:#x} is not zero after the reset")

    return [*commands, *(_b64read(a.addr, a.size) for a in allocations)], check


def zero_used_ram(vm: Machine, *, skip: bool = False) -> None:
    """Zero what the example's guest memory use may have touched (see the module docstring),
    then read back what the allocator handed out: all zero (else ResetFailed)."""
    commands, check = _zero_ram_commands(vm, skip=skip)
    check(vm.qtest.pipeline(commands))
