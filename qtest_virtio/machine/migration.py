"""Live migration of one started machine to a new QEMU process (QEMU's docs/devel/migration).

The destination starts from a spec with the same devices, waiting with ``-incoming defer``; the
stream goes over a Unix socket in the destination's private directory; both sides report
progress as QMP ``MIGRATION`` events (capability ``events``). Images are shared storage: the
destination's image is a hard link to the source's, so what the guest wrote is there. Every other
backend (net socket, chardevs, rng FIFO, tap) is made afresh, as on a new host.

What can be decided before any state moves is: the destination has every device and every
property the source sets, and a cross-version migration names a versioned machine type (``q35``
is an alias that moves with each release). Those raise :class:`MigrationUnsupported`; a migration
QEMU refuses raises :class:`MigrationError` with QMP's ``error-desc`` and both stderr tails.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..backends import Handle, ImageBackend
from ..binary import GENERIC_DEVICE_OPTIONS, QemuBinary
from ..errors import MigrationError, MigrationUnsupported
from .spec import MachineSpec

if TYPE_CHECKING:  # qemu.qmp is imported where QMP is used (a migration always uses it)
    from qemu.qmp.legacy import QEMUMonitorProtocol


class QemuMachine(Protocol):
    """What a migration needs of each side (machine.py's QemuMachine, which imports this
    module: a protocol keeps the import one way)."""

    spec: MachineSpec
    binary: QemuBinary
    workdir: str

    @property
    def qmp(self) -> QEMUMonitorProtocol: ...
    @property
    def alive(self) -> bool: ...
    def backend_handles(self) -> dict[str, Handle]: ...
    def wait_event(self, name: str, timeout: float = 5.0, **match: object) -> dict[str, Any] | None: ...
    def wait_exit(self, timeout: float) -> int | None: ...
    def stderr_text(self) -> str: ...
    def stderr_tail(self, lines: int = 20) -> str: ...
    def command_line(self) -> str: ...


#: Statuses after which a side's migration is over (QAPI MigrationStatus).
_DONE = frozenset({"completed"})
_FAILED = frozenset({"failed", "cancelled"})
_SOCKET = "migration.sock"
#: Properties the harness adds or that only place the device; compared by value, never by name.
_PLACEMENT = frozenset({"id", "bus", "addr"})


def check_destination(source: QemuMachine, spec: MachineSpec, binary: QemuBinary) -> None:
    """Refuse, by name, what cannot migrate: a device or property the destination lacks, or an
    alias machine type across versions (:class:`MigrationUnsupported`)."""
    to = f"QEMU {binary.version_string} ({binary.path})"
    have = {d.id: d for d in spec.devices}
    for dev in source.spec.devices:
        other = have.pop(dev.id, None)
        if other is None:
            raise MigrationUnsupported(
                f"the destination spec has no device {dev.id!r} ({dev.driver}): migration needs the same "
                "devices on both sides (build it with spec.clone())"
            )
        if other.driver != dev.driver:
            raise MigrationUnsupported(
                f"device {dev.id!r} is a {dev.driver} on the source but a {other.driver} on the destination"
            )
        known = binary.device_properties(dev.driver)
        missing = [k for k in other.props if k not in known and k not in GENERIC_DEVICE_OPTIONS | _PLACEMENT]
        if missing:
            key = missing[0]
            raise MigrationUnsupported(
                f"{key}={other.props[key]} is not migratable to {to}: its {dev.driver} has no property {key!r}"
            )
    if have:
        raise MigrationUnsupported(
            f"the destination spec has devices the source lacks: {', '.join(sorted(have))}; a migration "
            "moves the same devices"
        )
    src_type = source.binary.resolve_machine(source.spec.machine)
    dst_type = binary.resolve_machine(spec.machine)
    if dst_type not in binary.machines:
        raise MigrationUnsupported(
            f"machine type {spec.machine!r} is not in {to}: pass a versioned type both QEMUs have"
        )
    if src_type != dst_type:
        raise MigrationUnsupported(
            f"the source runs machine type {src_type} and the destination {dst_type} "
            f"({source.spec.machine!r} -> {spec.machine!r}): a migration needs the same versioned "
            f"machine type on both sides, e.g. --qemu-machine {_common(source.binary, binary, src_type, dst_type)}"
        )


def _common(a: QemuBinary, b: QemuBinary, *types: str) -> str:
    """The first of ``types`` both binaries have (the older one, as a rule)."""
    return next((t for t in sorted(types) if t in a.machines and t in b.machines), sorted(types)[0])


def shared_images(source: QemuMachine) -> dict[str, str]:
    """Image files in the source's private directory, by device id: the destination links them
    (images the user named by path are opened by path on both sides)."""
    out: dict[str, str] = {}
    for dev_id, handle in source.backend_handles().items():
        if isinstance(handle, ImageBackend) and os.path.dirname(handle.path) == source.workdir:
            out[dev_id] = handle.path
    return out


def _status(event: Mapping[str, Any]) -> str:
    return str(event.get("status", ""))


def _side_error(stderr: str) -> str:
    """The destination's own complaint: its last lines naming what it could not load."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    picked = [line for line in lines if re.search(r"error|fail|unsupported|invalid|mismatch", line, re.I)]
    return "; ".join(picked[-3:])


#: Properties whose value is state or a read-out, not configuration.
_NOT_CONFIG = frozenset({"guest-stats", "guest-stats-polling-interval", "x-pcie-lnksta-dllla"})


def property_differences(source: QemuMachine, dest: QemuMachine, limit: int = 8) -> list[str]:
    """``dev.prop: source-value -> destination-value`` for each property both QEMUs' devices
    have and read differently (``qom-get``): across versions on one machine type, a compat
    property a release forgot shows here. Only asked across binaries (a clone of one binary's
    spec has none); a property one side cannot read is left out."""
    from qemu.qmp import QMPError

    if source.binary.path == dest.binary.path:
        return []
    out: list[str] = []
    for dev in source.spec.devices:
        shared = set(source.binary.device_properties(dev.driver)) & set(dest.binary.device_properties(dev.driver))
        for prop in sorted(shared - _NOT_CONFIG):
            values = []
            for vm in (source, dest):
                try:
                    values.append(vm.qmp.cmd("qom-get", path=f"/machine/peripheral/{dev.id}", property=prop))
                except QMPError:
                    break
            if len(values) == 2 and values[0] != values[1]:
                out.append(f"{dev.id}.{prop}: {values[0]!r} -> {values[1]!r}")
                if len(out) >= limit:
                    return out
    return out


def run(source: QemuMachine, dest: QemuMachine, timeout: float) -> None:
    """Migrate ``source``'s state into ``dest`` (started with ``-incoming defer``) and wait until
    both sides say completed. Raises MigrationError on failure or timeout; across binaries the
    error lists the device properties that read differently on the two sides."""
    differences = property_differences(source, dest)
    try:
        _run(source, dest, timeout)
    except MigrationError as exc:
        if differences:
            exc.differences = differences
            exc.summary += f"; properties that differ (source -> destination): {', '.join(differences)}"
            exc.args = (exc.render(),)
        raise


def _run(source: QemuMachine, dest: QemuMachine, timeout: float) -> None:
    from qemu.qmp import QMPError

    uri = f"unix:{os.path.join(dest.workdir, _SOCKET)}"
    caps = [{"capability": "events", "state": True}]
    for vm in (source, dest):
        vm.qmp.cmd("migrate-set-capabilities", capabilities=caps)
    dest.qmp.cmd("migrate-incoming", uri=uri)
    source.qmp.cmd("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    sent = _wait_end(source, deadline)
    if sent != "completed":
        info = source.qmp.cmd("query-migrate") if source.alive else {}
        desc = str(info.get("error-desc", "")) if isinstance(info, dict) else ""
        if sent is None and source.alive:
            with contextlib.suppress(QMPError):
                source.qmp.cmd("migrate_cancel")
        why = desc or (f"status {sent}" if sent else f"not finished within {timeout:g} s")
        raise failure(source, dest, why, desc)
    loaded = _wait_end(dest, deadline)
    if loaded != "completed":
        if loaded is None and dest.alive:
            why = f"the destination did not finish loading within {timeout:g} s"
        else:
            why = "the destination could not load the state"
        raise failure(source, dest, why, "")


def _wait_end(vm: QemuMachine, deadline: float) -> str | None:
    """How ``vm``'s side of the migration ended (``completed``, ``failed``, ``cancelled``), from
    its MIGRATION events; ``failed`` as soon as the process is gone (a destination that cannot
    load exits), None at the deadline. Between events, ``query-migrate`` is asked too, so an
    end whose event was not seen costs a tenth of a second, not the timeout."""
    from qemu.qmp import QMPError

    while (remaining := deadline - time.monotonic()) > 0:
        event = vm.wait_event("MIGRATION", min(remaining, 0.1), status=lambda s: s in _DONE | _FAILED)
        if event is not None:
            return _status(event["data"])
        if not vm.alive:
            return "failed"
        try:
            info = vm.qmp.cmd("query-migrate")
        except QMPError:
            return "failed"
        if isinstance(info, dict) and _status(info) in _DONE | _FAILED:
            return _status(info)
    return None


def failure(source: QemuMachine, dest: QemuMachine, why: str, desc: str) -> MigrationError:
    """One error for a failed migration: why, what the destination said, both stderr tails."""
    dest.wait_exit(2.0)  # a destination that could not load exits: let its last words arrive
    said = _side_error(dest.stderr_text())
    summary = (
        f"migration from QEMU {source.binary.version_string} to {dest.binary.version_string} "
        f"({dest.spec.machine}) failed: {why}" + (f"; destination: {said}" if said else "")
    )
    return MigrationError(
        summary,
        error_desc=desc,
        source_stderr=source.stderr_tail(),
        destination_stderr=dest.stderr_tail(),
        command_lines=[source.command_line(), dest.command_line()],
        destination=f"QEMU {dest.binary.version_string} ({dest.spec.machine})",
    )
