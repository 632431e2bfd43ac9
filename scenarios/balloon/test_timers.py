"""virtio-balloon regression scenarios on QEMU's statistics polling timer
(``guest-stats-polling-interval``), which runs on the virtual clock: with the qtest accelerator it
moves only when the test steps it, so the period can be checked exactly. Debian's builds have no
such clock and skip these (marker ``virtual_clock``).

QEMU asks for statistics by using the statsq buffer it holds (virtio 1.2 §5.5.6.3) when the timer
fires, and re-arms the timer for one interval when the driver's answer arrives
(hw/virtio/virtio-balloon.c ``balloon_stats_poll_cb``, ``virtio_balloon_receive_stats``).
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine
from qtest_virtio.devices.balloon.driver import VirtioBalloon
from qtest_virtio.devices.balloon.encoding import StatTag

pytestmark = [pytest.mark.virtio_device("virtio-balloon-pci"), pytest.mark.virtual_clock]

INTERVAL_S = 2
SECOND_NS = 1_000_000_000
#: Virtual time short of a whole interval, so the timer must not have fired yet.
EARLY_NS = INTERVAL_S * SECOND_NS - 1_000_000


def _set_interval(qemu: Machine, dev_id: str, seconds: int) -> None:
    path = f"/machine/peripheral/{dev_id}"
    qemu.qmp.cmd("qom-set", path=path, property="guest-stats-polling-interval", value=seconds)


def _wait_guest_stats(qemu: Machine, dev_id: str, want: dict[str, int], timeout: float = 2.0) -> dict[str, int]:
    """guest-stats once the device has read the answer (a notification it handles on its own time)."""
    deadline = time.monotonic() + timeout
    while True:
        result = qemu.qmp.cmd("qom-get", path=f"/machine/peripheral/{dev_id}", property="guest-stats")
        assert isinstance(result, dict), f"guest-stats is {result!r}"
        stats: dict[str, int] = result["stats"]
        if all(stats.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return stats


def _need_stats(bal: VirtioBalloon) -> None:
    if not bal.has("STATS_VQ"):
        pytest.skip("STATS_VQ not negotiated in this run")


def test_statistics_are_requested_once_per_interval(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """Setting the interval asks at once; after each answer the next request comes exactly one
    interval of virtual time later, not a millisecond sooner, and carries the answer's values
    into guest-stats."""
    bal = virtio_device
    _need_stats(bal)
    _set_interval(qemu, bal.dev_id, INTERVAL_S)
    bal.wait_stats_request(timeout=2)
    assert bal.stats_requests == 1
    for round_ in (1, 2, 3):
        free = round_ * 0x10_0000
        bal.stats = [(StatTag.MEMTOT, bal.memory.end), (StatTag.MEMFREE, free)]  # the next answer's values
        qemu.qtest.clock_step(EARLY_NS)
        assert not bal.poll_stats(), f"round {round_}: statistics requested before {INTERVAL_S} s of virtual time"
        qemu.qtest.clock_step(SECOND_NS * INTERVAL_S - EARLY_NS)
        assert bal.poll_stats(), f"round {round_}: no request after {INTERVAL_S} s of virtual time"
        assert bal.stats_requests == 1 + round_
        stats = _wait_guest_stats(qemu, bal.dev_id, {"stat-free-memory": free})
        assert stats["stat-free-memory"] == free
        assert stats["stat-total-memory"] == bal.memory.end


def test_interval_zero_stops_the_requests(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """guest-stats-polling-interval 0 destroys the timer: however much virtual time passes, the
    device keeps the buffer; a new interval asks at once again."""
    bal = virtio_device
    _need_stats(bal)
    _set_interval(qemu, bal.dev_id, INTERVAL_S)
    bal.wait_stats_request(timeout=2)
    _set_interval(qemu, bal.dev_id, 0)
    qemu.qtest.clock_step(10 * INTERVAL_S * SECOND_NS)
    assert not bal.poll_stats(), "a request came with polling turned off"
    _set_interval(qemu, bal.dev_id, INTERVAL_S)
    bal.wait_stats_request(timeout=2)
    assert bal.stats_requests == 2
