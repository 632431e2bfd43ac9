"""Known QEMU deviations from the virtio spec, as data keyed by the QEMU version measured on.

One table (:data:`DEVIATIONS`) is the single place that says where QEMU does otherwise than a
scenario or a reproducer expects. Each entry names the scenario (its conformance id) or the
reproducer (its file stem), says what QEMU does, the strength of the requirement and its section
(virtio 1.2 cs01 numbering), the first version it was seen on, the version it is fixed in where
known, the versions it was verified on and, where it only holds for some runs, that condition.

What an entry means on a given binary is :meth:`Deviation.status`: verified there (the
scenario is a strict xfail), fixed or not yet there (it claims nothing: the scenario must pass),
or unverified (a version in between, e.g. a developer's 10.1.50 tree: a non-strict xfail whose
pass says "possibly fixed"). The pytest plugin and ``qtest-virtio fuzz --known`` read it; this
module knows nothing of pytest.

An extra table file (JSON, :func:`load_table`) given with ``--deviations FILE`` or
``$QTEST_VIRTIO_DEVIATIONS`` adds entries or replaces entries of the same id: a developer
records what they measured on their own tree without editing the package.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

Version = tuple[int, int, int]

#: Environment variable naming an extra table file (same format as :func:`load_table` reads).
TABLE_ENV = "QTEST_VIRTIO_DEVIATIONS"

QEMU_7_2_22: Version = (7, 2, 22)
QEMU_10_0_2: Version = (10, 0, 2)
QEMU_10_2_2: Version = (10, 2, 2)
#: The versions every entry below was checked on (Debian 7.2.22; Debian's 10.0.2 backport and
#: the 10.0.2 source build; the 10.2.2 source build), 2026-12-01.
CHECKED = (QEMU_7_2_22, QEMU_10_0_2, QEMU_10_2_2)

MODERN_LAYOUTS = frozenset({"transitional-modern", "modern"})
LEGACY_LAYOUTS = frozenset({"legacy", "transitional-legacy"})


class Strength(Enum):
    """How strongly the spec asks for what QEMU does not do (RFC 2119 keywords, or none)."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    NOTE = "note"
    DESCRIPTIVE = "descriptive text"

    def lead(self, section: str) -> str:
        """The reason's opening words: "deviates" is kept for a MUST (issue 11)."""
        return {
            Strength.MUST: f"QEMU deviates from the MUST of §{section}",
            Strength.SHOULD: f"QEMU does not follow the SHOULD of §{section}",
            Strength.NOTE: f"QEMU does not do what the note of §{section} asks of a device",
            Strength.DESCRIPTIVE: f"QEMU does otherwise than the text of §{section} describes",
        }[self]


class Status(Enum):
    """What an entry claims on one QEMU version."""

    VERIFIED = "verified"  # measured on this very version: a strict xfail
    UNVERIFIED = "unverified"  # between what was measured: a non-strict xfail
    FIXED = "fixed"  # at or past fixed_in: claims nothing
    NOT_YET = "not yet"  # before it appeared (verified absent there): claims nothing

    @property
    def live(self) -> bool:
        """Whether the deviation is expected on this version (strictly or not)."""
        return self in (Status.VERIFIED, Status.UNVERIFIED)


@dataclass(frozen=True)
class Condition:
    """The runs a deviation holds for; an empty field matches every run."""

    transports: frozenset[str] = frozenset()
    rings: frozenset[str] = frozenset()
    flags: tuple[tuple[str, str], ...] = ()  # device properties the run must have, as written
    refused: frozenset[str] = frozenset()  # features the run must refuse on the driver side

    def matches(
        self,
        *,
        transport: str = "",
        ring: str = "",
        flags: Mapping[str, str] | None = None,
        refused: Iterable[str] = (),
    ) -> bool:
        have = flags or {}
        return (
            (not self.transports or transport in self.transports)
            and (not self.rings or ring in self.rings)
            and all(have.get(k) == v for k, v in self.flags)
            and self.refused <= set(refused)
        )


ANY_RUN = Condition()
#: The binaries a deviation's versions can be about (see Deviation.side).
SIDES = ("qemu", "destination")


@dataclass(frozen=True)
class Deviation:
    """One known deviation: where, what QEMU does, how strong the requirement, which versions."""

    id: str  # a scenario's conformance id, or a reproducer's file stem
    does: str  # what QEMU does, in a clause that follows the reason's lead
    strength: Strength
    section: str  # virtio 1.2 cs01 numbering, without the "§"
    first_seen: Version
    verified_on: tuple[Version, ...]
    fixed_in: Version | None = None  # the first version checked that no longer does it
    absent_on: tuple[Version, ...] = ()  # older versions checked free of it (a later change)
    when: Condition = field(default=ANY_RUN)
    #: Whose version the entry is about: "qemu" (the binary under test; a migration's source)
    #: or "destination" (a migration's destination, --migrate-to: a bug in the load code).
    side: str = "qemu"

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"deviation {self.id}: side {self.side!r}; use one of {', '.join(SIDES)}")

    @property
    def reason(self) -> str:
        return f"{self.strength.lead(self.section)}: {self.does}"

    def status(self, version: Version) -> Status:
        if self.fixed_in is not None and version >= self.fixed_in:
            return Status.FIXED
        if version in self.verified_on:
            return Status.VERIFIED
        if version < self.first_seen and self.absent_on and version <= max(self.absent_on):
            return Status.NOT_YET
        return Status.UNVERIFIED

    def describe(self, version: Version) -> str:
        """The reason with what the table knows about ``version`` (an xfail's reason)."""
        seen = ", ".join(format_version(v) for v in self.verified_on)
        if self.status(version) is Status.VERIFIED:
            return f"{self.reason} [deviation {self.id}, verified on {seen}]"
        fixed = f"; fixed in {format_version(self.fixed_in)}" if self.fixed_in else ""
        return f"{self.reason} [deviation {self.id}, not verified on {format_version(version)}; seen on {seen}{fixed}]"


def format_version(version: Version) -> str:
    return ".".join(map(str, version))


def parse_version(text: str) -> Version:
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a QEMU version MAJOR.MINOR.MICRO (e.g. 10.0.2)")
    return int(m[1]), int(m[2]), int(m[3])


def _fuzz_crash(does: str, stem: str, **kw: Any) -> Deviation:
    """A reproducer found by fuzzing that still kills or hangs QEMU: a device that meets a
    broken driver SHOULD enter an error state (DEVICE_NEEDS_RESET, §2.1.2), not abort or spin."""
    kw.setdefault("verified_on", CHECKED)
    return Deviation(stem, does, Strength.SHOULD, "2.1.2", QEMU_7_2_22, **kw)


#: The table. Verified versions and fixed-in are what was measured on the binaries of
#: ``CHECKED`` (each scenario and reproducer run on each, failure messages compared).
DEVIATIONS: tuple[Deviation, ...] = (
    # -- scenarios: virtqueues and the PCI transport -----------------------------------------
    Deviation(
        "vq-direct-then-indirect-descriptor",
        "it only looks for INDIRECT on a chain's head; a direct descriptor chained to an indirect one "
        "makes it report 'Incorrect order for descriptors' and mark the device broken",
        Strength.MUST, "2.7.5.3.2", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "pci-large-queue-select-size-zero",
        "a queue_select of 1024 or more (VIRTIO_QUEUE_MAX) is not kept: the previous queue stays "
        "selected, and queue_size reads that queue's size",
        Strength.DESCRIPTIVE, "4.1.4.3", QEMU_7_2_22, CHECKED, when=Condition(transports=MODERN_LAYOUTS),
    ),
    Deviation(
        "pci-unoffered-feature-fails-features-ok",
        "driver_feature reads back a bit the device never offered, yet FEATURES_OK is accepted, so "
        "the driver believes in a feature set the device does not run",
        Strength.NOTE, "4.1.4.3.1", QEMU_7_2_22, CHECKED, when=Condition(transports=MODERN_LAYOUTS),
    ),
    # -- virtio-blk --------------------------------------------------------------------------
    Deviation(
        "blk-ioerr-used-length",
        "a read that fails with IOERR is pushed with the whole device-writable length (data + status) "
        "as used length, though only the status byte was written",
        Strength.MUST, "2.7.8.2", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "blk-writeback-zero-without-flush",
        "with CONFIG_WCE accepted and FLUSH declined, writeback stays 1 (virtio_blk_set_status only "
        "derives the cache mode from FLUSH when CONFIG_WCE is absent)",
        Strength.MUST, "5.2.5.2", QEMU_7_2_22, CHECKED, when=Condition(transports=MODERN_LAYOUTS),
    ),
    Deviation(
        "blk-get-id-used-length",
        "GET_ID writes only the string and its NUL but reports the whole buffer (21 bytes) as used; "
        "the padding after the NUL is never written",
        Strength.MUST, "2.7.8.2", QEMU_7_2_22, CHECKED,
    ),
    # -- virtio-net --------------------------------------------------------------------------
    Deviation(
        "net-rx-num-buffers-one",
        "with VERSION_1 and without MRG_RXBUF it never writes num_buffers (the field keeps what the "
        "buffer held)",
        Strength.MUST, "5.1.6.4.1", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "net-rx-mtu-limit",
        "host_mtu is only advertised; received frames longer than mtu + 14 are delivered with "
        "gso_type NONE",
        Strength.MUST, "5.1.4.1", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "net-feature-dependencies-offered",
        "with ctrl_vq=off it still offers CTRL_RX, CTRL_RX_EXTRA, CTRL_VLAN, GUEST_ANNOUNCE and "
        "CTRL_MAC_ADDR, which all require CTRL_VQ",
        Strength.MUST, "2.2.2", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "net-vlan-filter",
        "after any device reset every VLAN passes, also once CTRL_VLAN is negotiated: "
        "virtio_net_reset() clears the table, then virtio_reset()'s set_features(0) fills it, and "
        "negotiating CTRL_VLAN no longer clears it (7.2 and 10.2.2 do, in set_features)",
        Strength.SHOULD, "5.1.6.5.3", QEMU_10_0_2, (QEMU_10_0_2,),
        fixed_in=QEMU_10_2_2, absent_on=(QEMU_7_2_22,),
    ),
    # -- virtio-scsi -------------------------------------------------------------------------
    Deviation(
        "scsi-report-luns-wlun",
        "virtio-scsi does not implement the REPORT LUNS well-known logical unit; a LUN field "
        "starting with 0xC1 gets VIRTIO_SCSI_S_BAD_TARGET",
        Strength.SHOULD, "5.6.6.1", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "scsi-write-used-length",
        "the used length of a command with data out counts the data-out bytes "
        "(virtio_scsi_complete_req pushes qsgl.size + the response size whatever the direction)",
        Strength.MUST, "2.7.8.2", QEMU_7_2_22, CHECKED,
    ),
    # -- virtio-serial -----------------------------------------------------------------------
    Deviation(
        "console-port-name-no-nul",
        "PORT_NAME's name is followed by a NUL byte, counted in the used length",
        Strength.DESCRIPTIVE, "5.3.6.2", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "console-control-used-length-fits",
        "a control message longer than the receive buffer is truncated but its full length is "
        "reported as the used length",
        Strength.MUST, "2.7.8.2", QEMU_7_2_22, CHECKED,
    ),
    # -- virtio-balloon ----------------------------------------------------------------------
    Deviation(
        "balloon-legacy-actual-whole-value",
        "a legacy byte write of actual takes effect at once (query-balloon and BALLOON_CHANGE see the "
        "partial value)",
        Strength.SHOULD, "5.5.6.2.1", QEMU_7_2_22, CHECKED, when=Condition(transports=LEGACY_LAYOUTS),
    ),
    Deviation(
        "balloon-legacy-first-stats-ignored",
        "the statistics in the first statsq buffer are taken on the legacy interface too",
        Strength.SHOULD, "5.5.6.3.3", QEMU_7_2_22, CHECKED, when=Condition(transports=LEGACY_LAYOUTS),
    ),
    # -- reproducers (scenarios/reproducers/*.qtest, found by fuzzing) --------------------------
    _fuzz_crash(
        "it aborts when a live queue's size is rewritten after DRIVER_OK and the queue is then used",
        "virtio-queue-size-rewritten-while-live-assert",
        verified_on=(QEMU_7_2_22,), fixed_in=QEMU_10_0_2,
    ),
    _fuzz_crash(
        "it aborts on a zero-length INDIRECT descriptor in a packed ring",
        "virtio-packed-zero-length-indirect-assert",
    ),
    _fuzz_crash(
        "it aborts when a live packed queue is re-enabled with a smaller size, then used and reset",
        "virtio-balloon-packed-live-queue-shrunk-assert",
    ),
    _fuzz_crash(
        "it aborts on features renegotiated without a reset while the ring is packed",
        "virtio-blk-packed-renegotiated-features-assert",
    ),
    _fuzz_crash(
        "it livelocks on a packed virtio-blk chain with its writable buffers first",
        "virtio-blk-packed-writable-first-livelock",
    ),
    _fuzz_crash(
        "it livelocks on a malformed packed virtio-blk chain (a zero-length head)",
        "virtio-blk-packed-zero-length-chain-livelock",
    ),
    _fuzz_crash(
        "it livelocks on a zero-length packed virtio-rng descriptor",
        "virtio-rng-packed-zero-length-livelock",
    ),
    _fuzz_crash(
        "it livelocks on a packed virtio-scsi chain with its writable buffers first",
        "virtio-scsi-packed-writable-first-livelock",
    ),
    _fuzz_crash(
        "it aborts when the driver resets a virtio-net transmit queue while the backend holds one of its "
        "transmits (virtio-net's async_tx)",
        "virtio-net-queue-reset-async-tx-assert",
    ),
    _fuzz_crash(
        "it takes a virtio-balloon inflate buffer of any length whole, in the main loop, discarding a page "
        "per PFN and answering nothing meanwhile: 192 MiB of PFNs (50 million, for a 256 MiB guest) stall "
        "it past the reproducer's 3 s",
        "virtio-balloon-inflate-unbounded-pfns-stall",
    ),
    # -- virtio-net receive segment coalescing (scenarios/net/test_rsc.py, on a tap) -------------
    Deviation(
        "net-rsc-gso-fields",
        "a coalesced packet (gso_type TCPV4/TCPV6) has flags RSC_INFO alone, without NEEDS_CSUM, and "
        "its gso_size stays what the backend's header held (0), not the MSS (virtio_net_rsc_drain_seg)",
        Strength.MUST, "5.1.6.4.1", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "net-rsc-ecn-not-coalesced",
        "without GUEST_ECN it coalesces a segment with CWR into a TCPV4/TCPV6 packet: "
        "virtio_net_rsc_tcp_ctrl_check masks the TCP flags to their low six bits before it looks for "
        "ECE and CWR",
        Strength.SHOULD, "5.1.6.4.1", QEMU_7_2_22, CHECKED,
    ),
    # -- issue 14, scsibal: virtio-scsi TMFs with a command in flight -----------------------------
    Deviation(
        "scsi-tmf-abort-completes-commands",
        "ABORT TASK, ABORT TASK SET and CLEAR TASK SET with a command in flight deadlock the main "
        "loop: virtio_scsi_do_tmf_aio_context holds the LUN's requests_lock while "
        "scsi_req_cancel_async -> scsi_req_dequeue takes it again, so neither the command nor the "
        "TMF is ever completed and QEMU stops answering",
        Strength.MUST, "5.6.6.2", QEMU_10_0_2, (QEMU_10_0_2,),
        fixed_in=QEMU_10_2_2, absent_on=(QEMU_7_2_22,),
    ),
    # -- virtio-net: control tables and data-path corners (issue 14) -------------------------
    Deviation(
        "net-link-down-drop",
        "on a packed ring, the transmit chains it drops while the link is down "
        "(virtqueue_packed_drop_all) are pushed without being counted in flight, so the queue's "
        "in-use count wraps to 2^32-1 and device notifications stay disabled: the next chain made "
        "available while the link is down is never used, and once the link is back, popping a "
        "chain fails with 'Virtqueue size exceeded' and marks the device broken",
        Strength.DESCRIPTIVE, "5.1.6.2", QEMU_7_2_22, CHECKED, when=Condition(rings=frozenset({"packed"})),
    ),
    Deviation(
        "net-tx-short-header-needs-reset",
        "it aborts (util/iov.c iov_copy: Assertion `offset == 0') on a transmit chain shorter than "
        "virtio_net_hdr instead of failing the device (10.0 checks the length first: "
        "'virtio-net header is invalid')",
        Strength.SHOULD, "2.1.2", QEMU_7_2_22, (QEMU_7_2_22,), fixed_in=QEMU_10_0_2,
    ),
    Deviation(
        "net-tx-queue-reset-backend-busy",
        "it aborts (flush_or_purge_queued_packets: Assertion `!async_tx.elem') when transmitq1 is "
        "reset while the backend still holds one of its frames: purging that frame completes it "
        "(virtio_net_tx_complete), which pops and sends the next chain before the queue is reset",
        Strength.MUST, "2.6.1.1.1", QEMU_7_2_22, CHECKED,
    ),
    # -- virtio-net on a tap: multiqueue, RSS, hash reports, offloads (issue 14, nettap) -------
    Deviation(
        "net-hash-none-after-reset",
        "a hash (or RSS) config survives a device reset: virtio_net_reset() does not disable RSS, so "
        "the first packet after the reset still carries the old hash_value and hash_report",
        Strength.DESCRIPTIVE, "5.1.6.5.6.4", QEMU_7_2_22, (QEMU_7_2_22,), fixed_in=QEMU_10_0_2,
    ),
    # -- issue 15, migblk: virtio-blk, virtio-scsi, virtio-rng across a live migration --------
    Deviation(
        "mig-used-event-not-reached-quiet",
        "after a migration the destination notifies the first buffer it uses whatever used_event says: "
        "virtio_load sets signalled_used_valid to false, so virtio_split_should_notify returns true "
        "once without looking at used_event (same binary both ways, and across 7.2 and 10.0)",
        Strength.SHOULD, "2.7.7.2", QEMU_7_2_22, CHECKED, when=Condition(rings=frozenset({"split"})),
    ),
    Deviation(
        "mig-blk-writeback-survives",
        "the cache mode the driver chose through writeback is not migrated: the destination's "
        "block backend runs the mode of its command line (write-cache), and writeback reads that "
        "mode, with no configuration change notification (same binary, and across 7.2 and 10.0)",
        Strength.DESCRIPTIVE, "5.2.5", QEMU_7_2_22, CHECKED,
    ),
    Deviation(
        "mig-blk-held-request-completes",
        "on a packed ring a request held by werror=stop does not survive a migration: "
        "qemu_put_virtqueue_element writes the element's ndescs before the element, "
        "qemu_get_virtqueue_element reads it after, so the destination maps garbage, says "
        "'virtio: unexpected memory split' and the migration fails (same binary)",
        Strength.DESCRIPTIVE, "2.8", QEMU_7_2_22, CHECKED, when=Condition(rings=frozenset({"packed"})),
    ),
    # -- issue 15, hotplug: hot-unplug with requests in flight ---------------------------------
    Deviation(
        "hotplug-rng-unplug-pending-entropy",
        "a virtio-rng unplugged while a request waits for entropy (an empty rng-random FIFO) leaves "
        "that request queued in the backend (virtio_rng_device_unrealize cancels nothing): entropy "
        "written later is read for it and chr_read runs on the freed device ('Region caches not "
        "initialized', then SIGSEGV in most runs)",
        Strength.SHOULD, "2.1.2", QEMU_7_2_22, CHECKED,
    ),
    # -- issue 15, mignet: net, console and balloon across a live migration ---------------------
    # Keyed on the --qemu (source) version unless side="destination"; the used_event one of these
    # devices is mig-used-event-not-reached-quiet above (one virtqueue rule, one entry).
    Deviation(
        "mig-net-vlan-table",
        "a 7.2 destination drops the migrated VLAN filter table: virtio_load calls set_features after "
        "loading the device state, and 7.2's virtio_net_set_features clears the table whenever "
        "CTRL_VLAN is negotiated, so tagged frames of an id the driver added are dropped (a 10.0 "
        "destination keeps it: 7.2 -> 10.0 passes, 10.0 -> 7.2 fails)",
        Strength.MUST, "5.1.6.5.3", QEMU_7_2_22, (QEMU_7_2_22,), fixed_in=QEMU_10_0_2, side="destination",
    ),
    Deviation(
        "mig-console-held-element",
        "on a packed ring a migration with a popped element in the stream fails to load ('virtio: "
        "error trying to map MMIO memory'): qemu_put_virtqueue_element writes ndescs before the "
        "element and qemu_get_virtqueue_element reads it after, so the destination maps garbage "
        "addresses (a throttled port's output here; any device saving an element alike)",
        Strength.DESCRIPTIVE, "5.3.6", QEMU_7_2_22, CHECKED, when=Condition(rings=frozenset({"packed"})),
    ),
    Deviation(
        "mig-net-held-tx-frame",
        "a transmit chain popped for a blocked backend is never used after a migration: stopping the "
        "VM purges the queued frame (net_vm_change_state_handler), whose completion pops the next "
        "chain into async_tx.elem, which virtio-net's migration state does not carry, so on the "
        "destination that chain counts as in use forever and its frame is never sent",
        Strength.DESCRIPTIVE, "5.1.6.2", QEMU_7_2_22, CHECKED,
    ),
)  # fmt: skip


class TableError(ValueError):
    """An extra deviation table that cannot be read: names the file and the entry."""


def _entry(raw: Mapping[str, Any], where: str) -> Deviation:
    required = {"id", "does", "strength", "section", "first_seen", "verified_on"}
    known = required | {"fixed_in", "absent_on", "when", "side"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TableError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = sorted(required - set(raw))
    if missing:
        raise TableError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        strengths = {s.value: s for s in Strength}
        if raw["strength"] not in strengths:
            raise TableError(f"{where}: strength {raw['strength']!r}; use one of {', '.join(strengths)}")
        when = raw.get("when") or {}
        return Deviation(
            id=str(raw["id"]),
            does=str(raw["does"]),
            strength=strengths[raw["strength"]],
            section=str(raw["section"]).lstrip("§"),
            first_seen=parse_version(raw["first_seen"]),
            verified_on=tuple(parse_version(v) for v in raw["verified_on"]),
            fixed_in=parse_version(raw["fixed_in"]) if raw.get("fixed_in") else None,
            absent_on=tuple(parse_version(v) for v in raw.get("absent_on", ())),
            when=Condition(
                transports=frozenset(when.get("transports", ())),
                rings=frozenset(when.get("rings", ())),
                flags=tuple(sorted((str(k), str(v)) for k, v in when.get("flags", {}).items())),
                refused=frozenset(when.get("refused", ())),
            ),
            side=str(raw.get("side", "qemu")),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, TableError):
            raise
        raise TableError(f"{where}: {exc}") from None


def load_table(path: str) -> list[Deviation]:
    """Entries from a JSON file: a list of objects with the fields of :class:`Deviation`,
    versions written "10.1.50", ``strength`` one of MUST / SHOULD / note / descriptive text,
    ``when`` an object with optional ``transports``, ``rings``, ``refused`` lists and ``flags``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise TableError(f"deviation table {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise TableError(f"deviation table {path}: not JSON: {exc}") from None
    if not isinstance(data, list):
        raise TableError(f"deviation table {path}: expected a JSON list of entries")
    return [_entry(raw, f"deviation table {path}, entry {n}") for n, raw in enumerate(data)]


def table(extra: str | None = None) -> dict[str, Deviation]:
    """The table by id: the built-in entries, then those of ``extra`` (or ``$QTEST_VIRTIO_DEVIATIONS``),
    which replace built-in entries of the same id."""
    out = {d.id: d for d in DEVIATIONS}
    path = extra or os.environ.get(TABLE_ENV) or None
    if path:
        out.update((d.id, d) for d in load_table(path))
    return out
