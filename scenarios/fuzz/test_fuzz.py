"""Hostile driver (issue 7): a few hypothesis examples per device x transport x ring, each on a
fresh machine. QEMU must survive, keep answering qtest, and serve a valid request after a device
reset. The long campaign is ``qtest-virtio fuzz --seconds N``; here the budget is tiny so the
ordinary suite stays fast. A failure message names the reproducer written to the test's tmp dir.

A failure that is a known bug of the QEMU under test (its signature is in a reproducer under
``scenarios/reproducers/`` whose deviation-table entry is live on this QEMU's version) is an
expected failure naming that file, so the smoke test stays red only for what is new.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qtest_virtio import modes
from qtest_virtio.binary import QemuBinary
from qtest_virtio.deviations import Deviation

pytest.importorskip("hypothesis", reason="the fuzz scenarios need hypothesis (pip install hypothesis)")

from qtest_virtio.fuzz import (
    DEVICES,
    FuzzConfig,
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
    known = known_signatures(REPRODUCERS, qemu_binary.version, deviation_table)
    config = FuzzConfig(device, mode, ring, qemu=qemu_binary.path)
    report = fuzz_target(config, max_examples=EXAMPLES, seed=0, shrink_seconds=30.0, known=known)
    if report.failure is not None and signature(report.failure) in known:
        found = signature(report.failure)
        stem = Path(known[found]).stem
        status = deviation_table[stem].status(qemu_binary.version).value
        request.node.user_properties += [("deviation", stem), ("deviation_status", status)]
        pytest.xfail(f"known QEMU bug ({stem}.qtest): {found}")
    if report.failure is not None:
        path = write_reproducer(report.failure, str(tmp_path), seed=0)
        verdict = replay(load(path), qemu=qemu_binary.path, timeout=config.hang_timeout)
        pytest.fail(
            f"{report.failure.summary()}\nreproducer: {path} (replay: {verdict.outcome})\n"
            f"actions: {report.failure.actions!r}\nQEMU stderr:\n{report.failure.stderr_tail}",
            pytrace=False,
        )
    assert report.examples == EXAMPLES
