"""Hostile driver (issue 7): a few hypothesis examples per device x transport x ring, each on a
fresh machine. QEMU must survive, keep answering qtest, and serve a valid request after a device
reset. The long campaign is ``qtest-virtio fuzz --seconds N``; here the budget is tiny so the
ordinary suite stays fast. A failure message names the reproducer written to the test's tmp dir.

A failure that is a known bug of the QEMU under test (its signature is in a reproducer under
``scenarios/reproducers/`` whose deviation-table entry is live on this QEMU's version) is an
expected failure naming that file, so the smoke test stays red only for what is new.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from qtest_virtio import modes
from qtest_virtio.binary import QemuBinary
from qtest_virtio.deviations import Deviation

pytest.importorskip("hypothesis", reason="the fuzz scenarios need hypothesis (pip install hypothesis)")

from qtest_virtio.fuzz import (
    DEVICES,
    FuzzConfig,
    FuzzReport,
    fuzz_target,
    known_signatures,
    signature,
    write_reproducer,
)
from qtest_virtio.reproducer import load, replay

REPRODUCERS = str(Path(__file__).resolve().parent.parent / "reproducers")

#: hypothesis examples per (device, transport, ring): a smoke budget, not a campaign.
EXAMPLES = 5
TARGETS = [
    (device, mode, ring)
    for device in DEVICES
    for mode in modes.ALL_MODES
    for ring in ("split", "packed")
    if not (ring == "packed" and modes.USES_LEGACY_LAYOUT[mode])
]


#: Examples per device with live migration and hot-unplug among the actions (each migration is
#: one more QEMU), and the seed whose first examples draw both.
MIGRATE_EXAMPLES = 4
MIGRATE_SEED = 4
#: One transport mode and ring per device, in turn, so the migrating targets cover all of them
#: at the cost of one target per device; starting at transitional-modern split puts the packed
#: rings on virtio-net and virtio-serial, away from blk's and scsi's known packed livelocks.
MODE_RINGS = list(dict.fromkeys((mode, ring) for _, mode, ring in TARGETS))
_TURNS = itertools.islice(itertools.cycle(MODE_RINGS), 2, None)
MIGRATE_TARGETS = [(device, *mode_ring) for device, mode_ring in zip(DEVICES, _TURNS, strict=False)]


@pytest.mark.parametrize(("device", "mode", "ring"), TARGETS, ids=["-".join(t) for t in TARGETS])
def test_hostile_driver(
    request: pytest.FixtureRequest,
    qemu_binary: QemuBinary,
    deviation_table: dict[str, Deviation],
    tmp_path: Path,
    device: str,
    mode: str,
    ring: str,
) -> None:
    report = _campaign(request, qemu_binary, deviation_table, tmp_path, FuzzConfig(device, mode, ring), EXAMPLES)
    assert report.examples == EXAMPLES


@pytest.mark.parametrize(("device", "mode", "ring"), MIGRATE_TARGETS, ids=["-".join(t) for t in MIGRATE_TARGETS])
def test_hostile_driver_across_migration_and_unplug(
    request: pytest.FixtureRequest,
    qemu_binary: QemuBinary,
    deviation_table: dict[str, Deviation],
    tmp_path: Path,
    device: str,
    mode: str,
    ring: str,
) -> None:
    """Issue 15: the hostile driver's machine live-migrates mid-sequence (``fuzz --migrate``) and
    its device is hot-unplugged (``fuzz --unplug``; it sits in a hot-plug slot). The source must
    survive saving whatever state the driver left (virtio_save), the destination loading it
    (virtio_load: a clean refusal is allowed, the source then runs on) and the actions after it;
    an unplug must end in DEVICE_DELETED (QEMU frees the device, virtio_device_unrealize), and
    after a reset, or a re-plug, the device serves a valid request."""
    config = FuzzConfig(device, mode, ring, migrate=True, unplug=True)
    report = _campaign(request, qemu_binary, deviation_table, tmp_path, config, MIGRATE_EXAMPLES, MIGRATE_SEED)
    assert report.examples == MIGRATE_EXAMPLES
    tried = report.migrations + sum(n for o, n in report.observations.items() if o.startswith("migration refused"))
    assert tried >= 1, f"no example migrated: {report.observations}"
    undone = [o for o in report.observations if o.startswith("unplug did not complete")]
    assert report.unplugs >= 1 and not undone, (report.unplugs, undone)


def _campaign(
    request: pytest.FixtureRequest,
    qemu_binary: QemuBinary,
    deviation_table: dict[str, Deviation],
    tmp_path: Path,
    config: FuzzConfig,
    examples: int,
    seed: int = 0,
) -> FuzzReport:
    """A seeded run on ``config`` (on the binary under test): a known bug of this QEMU is an
    xfail naming its reproducer, anything else that fails fails the test with the reproducer
    written to ``tmp_path``."""
    known = known_signatures(REPRODUCERS, qemu_binary.version, deviation_table)
    config = replace(config, qemu=qemu_binary.path)
    report = fuzz_target(config, max_examples=examples, seed=seed, shrink_seconds=30.0, known=known)
    if report.failure is not None and signature(report.failure) in known:
        found = signature(report.failure)
        stem = Path(known[found]).stem
        status = deviation_table[stem].status(qemu_binary.version).value
        request.node.user_properties += [("deviation", stem), ("deviation_status", status)]
        pytest.xfail(f"known QEMU bug ({stem}.qtest): {found}")
    if report.failure is not None:
        path = write_reproducer(report.failure, str(tmp_path), seed=seed)
        verdict = replay(load(path), qemu=qemu_binary.path, timeout=config.hang_timeout)
        pytest.fail(
            f"{report.failure.summary()}\nreproducer: {path} (replay: {verdict.outcome})\n"
            f"actions: {report.failure.actions!r}\nQEMU stderr:\n{report.failure.stderr_tail}",
            pytrace=False,
        )
    return report
