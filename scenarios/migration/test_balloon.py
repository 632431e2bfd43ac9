"""virtio-balloon across a live migration: the target and ``actual``, the queues and the statsq
buffer the device holds carry over (virtio 1.2 §5.5; QEMU's docs/devel/migration: device state
and guest RAM move, the guest does not re-initialise).

QEMU moves num_pages and actual (hw/virtio/virtio-balloon.c ``vmstate_virtio_balloon_device``);
the statistics polling interval is the host's setting, not device state, so the destination's is
set there. QEMU's virtio-balloon-pci has no MSI-X: a notification is the ISR's queue bit. The
machine has ``-m 256M``; ``balloon value=<bytes>`` asks for (RAM - value) / 4096 pages in the
balloon and ``query-balloon`` answers RAM - actual * 4096. Each scenario ends with a request
round trip and QEMU's own view of the device against the driver's (``assert_view_matches``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio import Machine
from qtest_virtio.devices.balloon.driver import VirtioBalloon
from qtest_virtio.devices.balloon.encoding import INFLATEQ, PAGE_SIZE, StatTag, encode_pfns
from qtest_virtio.introspect import device_view, queue_view

from ._notify import notified, quiet, suppression_holds_across, wait_notified, wait_used_idx_moves
from ._support import assert_view_matches

pytestmark = pytest.mark.virtio_device("virtio-balloon-pci", refuse_each=False)

UNSET = (1 << 64) - 1  # what QEMU shows for a statistic the last buffer did not carry


def _set_target(vm: Machine, pages: int) -> None:
    """QMP ``balloon``: the guest should shrink by ``pages`` pages."""
    vm.qmp.cmd("balloon", value=int(vm.spec.memory_bytes) - pages * PAGE_SIZE)


def _balloon_pages(vm: Machine) -> int:
    """The balloon size QEMU reports (query-balloon's actual is the guest size in bytes)."""
    info = vm.qmp.cmd("query-balloon")
    assert isinstance(info, dict), f"query-balloon returned {info!r}"
    return (int(vm.spec.memory_bytes) - int(info["actual"])) // PAGE_SIZE


def _guest_stats(vm: Machine, bal: VirtioBalloon) -> dict[str, int]:
    result = vm.qmp.cmd("qom-get", path=f"/machine/peripheral/{bal.dev_id}", property="guest-stats")
    assert isinstance(result, dict), f"guest-stats is {result!r}"
    return {k: v for k, v in result["stats"].items() if v != UNSET}


def _poll_stats_every_second(vm: Machine, bal: VirtioBalloon) -> None:
    """Set the host's statistics polling interval; QEMU asks at once, then every second."""
    vm.qmp.cmd("qom-set", path=f"/machine/peripheral/{bal.dev_id}", property="guest-stats-polling-interval", value=1)


def round_trip(vm: Machine, bal: VirtioBalloon) -> None:
    """Two pages in and out of the balloon, ``actual`` following, seen by the host."""
    held = len(bal.pages)
    bal.inflate(2)
    assert bal.actual == held + 2 and _balloon_pages(vm) == held + 2
    bal.deflate(2)
    assert bal.actual == held and _balloon_pages(vm) == held


def held(bal: VirtioBalloon) -> int:
    """Chains the device holds taken and unused: the statsq buffer, with STATS_VQ (§5.5.6.3)."""
    return 1 if bal.has("STATS_VQ") else 0


# -- config: target and actual -------------------------------------------------------------


def test_target_and_actual_carry_over(virtio_device: VirtioBalloon, qemu: Machine, migrate: Migrate) -> None:
    """The target the host set with QMP ``balloon`` (num_pages) and the ``actual`` the driver
    wrote after inflating to it read the same on the destination, whose host sees the balloon at
    that size (query-balloon); a new target there is followed as on the source (§5.5.6)."""
    bal = virtio_device
    _set_target(qemu, 24)
    assert bal.num_pages == 24
    assert bal.follow_target() == 24
    assert bal.actual == 24 and _balloon_pages(qemu) == 24
    dest = migrate()
    assert_view_matches(dest, bal, in_flight=held(bal))
    config = bal.config()
    assert (config.num_pages, config.actual) == (24, 24)
    assert _balloon_pages(dest) == 24
    _set_target(dest, 10)
    assert bal.num_pages == 10
    assert bal.follow_target() == 10
    assert bal.actual == 10 and _balloon_pages(dest) == 10
    round_trip(dest, bal)


def test_available_inflate_request_completes_on_the_destination(
    virtio_device: VirtioBalloon, qemu: Machine, migrate: Migrate
) -> None:
    """An inflate request made available (published, not notified) before the migration is the
    destination's: after a notification there it is used with length 0 (device-readable only,
    §2.7.8.2), and the page is the balloon's once the driver updates actual."""
    bal = virtio_device
    page = bal.memory.alloc(PAGE_SIZE, PAGE_SIZE, tag="balloon page in flight")
    vq = bal.queues[INFLATEQ]
    pending = vq.submit([encode_pfns([page])], [], kick=False)
    vq.flush()
    dest = migrate()
    assert_view_matches(dest, bal, in_flight=1 + held(bal))
    vq.kick(force=True)
    assert vq.complete(pending, timeout=2)[0] == 0
    bal.pages.append(page)
    bal.set_actual()
    assert _balloon_pages(dest) == 1
    round_trip(dest, bal)


def test_used_request_not_yet_consumed_is_popped_on_the_destination(
    virtio_device: VirtioBalloon, qemu: Machine, migrate: Migrate
) -> None:
    """An inflate request the source used and the driver has not taken yet: on the destination
    the driver finds its used entry in guest RAM, with length 0; the next requests work."""
    bal = virtio_device
    page = bal.memory.alloc(PAGE_SIZE, PAGE_SIZE, tag="balloon page used before migration")
    vq = bal.queues[INFLATEQ]
    before = queue_view(qemu, bal.dev_id, INFLATEQ).used_idx
    pending = vq.submit([encode_pfns([page])], [])
    wait_used_idx_moves(qemu, bal.dev_id, INFLATEQ, before)
    dest = migrate()
    assert_view_matches(dest, bal, in_flight=held(bal))
    assert vq.complete(pending, timeout=2)[0] == 0
    bal.pages.append(page)
    bal.set_actual()
    assert _balloon_pages(dest) == 1
    round_trip(dest, bal)


# -- the statistics queue ------------------------------------------------------------------


@pytest.mark.virtio_requires("STATS_VQ")
def test_held_stats_buffer_serves_the_destination(
    virtio_device: VirtioBalloon, qemu: Machine, migrate: Migrate
) -> None:
    """Regression (virtio_balloon_set_status re-pops with virtqueue_rewind the statsq buffer the
    source held): after a statistics exchange on the source the device holds the driver's fresh
    buffer (§5.5.6.3: the driver keeps one available); on the destination a polling interval makes
    the device use that very buffer (a request for statistics), and the driver's answer reaches
    the destination's host (guest-stats)."""
    bal = virtio_device
    bal.reset()
    bal.stats = [(StatTag.MEMFREE, 0x1000), (StatTag.MAJFLT, 1)]
    bal.initialize()
    bal.stats = [(StatTag.MEMFREE, 0x2000), (StatTag.MAJFLT, 2)]
    _poll_stats_every_second(qemu, bal)
    bal.wait_stats_request(timeout=2)  # answered with the 0x2000 buffer, which the device takes
    _wait_stats(qemu, bal, {"stat-free-memory": 0x2000, "stat-major-faults": 2})
    requests = bal.stats_requests
    bal.stats = [(StatTag.MEMFREE, 0x3000), (StatTag.MAJFLT, 3)]
    dest = migrate()
    assert_view_matches(dest, bal, in_flight=1)
    _poll_stats_every_second(dest, bal)
    bal.wait_stats_request(timeout=3)  # raises unless the buffer used is the one held
    assert bal.stats_requests == requests + 1
    _wait_stats(dest, bal, {"stat-free-memory": 0x3000, "stat-major-faults": 3})
    round_trip(dest, bal)


def _wait_stats(vm: Machine, bal: VirtioBalloon, want: dict[str, int], timeout: float = 2.0) -> None:
    """guest-stats shows ``want`` (the device consumes a buffer when it takes it, asynchronously)."""
    deadline = time.monotonic() + timeout
    while (got := _guest_stats(vm, bal)) != want:
        assert time.monotonic() < deadline, f"guest-stats {got}, expected {want}"
        time.sleep(0.005)


# -- features and notification suppression -------------------------------------------------


def _inflater(bal: VirtioBalloon) -> Callable[[Machine], None]:
    """``produce`` for the suppression checks: one page into the balloon (inflateq used once)."""

    def produce(vm: Machine) -> None:
        del vm
        bal.inflate(1, update_actual=False)

    return produce


def test_renegotiated_features_are_the_destinations(
    virtio_device: VirtioBalloon, qemu: Machine, migrate: Migrate
) -> None:
    """After a reset and a new negotiation without EVENT_IDX (and INDIRECT_DESC), the
    destination's guest features are the new set, and it behaves by it: the inflateq is not
    notified while the driver suppresses notifications the way it does without EVENT_IDX
    (NO_INTERRUPT, §2.7.7.2; packed: driver event flags, §2.8.10), and is once they are on."""
    bal = virtio_device
    if "EVENT_IDX" not in bal.negotiated:
        pytest.skip("EVENT_IDX not negotiated in this run")
    dropped = {"EVENT_IDX"} | ({"INDIRECT_DESC"} & set(bal.negotiated))
    bal.refused_names |= dropped
    bal.initialize()
    assert not dropped & set(bal.negotiated)
    round_trip(qemu, bal)
    dest = migrate()
    view = device_view(dest, bal.dev_id)
    assert not dropped & view.guest_features, f"the destination still holds {sorted(dropped & view.guest_features)}"
    assert_view_matches(dest, bal, in_flight=held(bal))
    vq = bal.queues[INFLATEQ]
    vq.set_interrupts(False)
    notified(bal, INFLATEQ)
    _inflater(bal)(dest)
    quiet(dest)
    assert not notified(bal, INFLATEQ), "a notification despite suppression, after renegotiation"
    vq.set_interrupts(True)
    _inflater(bal)(dest)
    assert wait_notified(bal, INFLATEQ), "no notification once suppression was lifted"
    round_trip(dest, bal)


@pytest.mark.conformance("mig-used-event-not-reached-quiet", spec="2.7.7.2")
@pytest.mark.virtio_device("virtio-balloon-pci", refuse_each=False, rings=("split",))
@pytest.mark.virtio_requires("EVENT_IDX")
def test_used_event_suppression_holds_on_the_destination(
    virtio_device: VirtioBalloon, qemu: Machine, migrate: Migrate
) -> None:
    """With EVENT_IDX, used_event kept one behind the inflateq's used index: used entries before
    the index used_event names SHOULD NOT be notified, on the destination as on the source (the
    device has notified before; used_event is in the migrated RAM). Then used_event reached
    MUST notify (the ISR's queue bit: no MSI-X here)."""
    bal = virtio_device
    vq = bal.queues[INFLATEQ]
    suppression_holds_across(qemu, bal, vq, migrate, _inflater(bal), in_flight=held(bal))


@pytest.mark.conformance("mig-balloon-packed-event-disable", spec="2.8.10")
@pytest.mark.virtio_device("virtio-balloon-pci", refuse_each=False, rings=("packed",))
def test_packed_event_disable_holds_on_the_destination(
    virtio_device: VirtioBalloon, qemu: Machine, migrate: Migrate
) -> None:
    """Packed ring, the inflateq's driver event flags RING_EVENT_FLAGS_DISABLE: no notification
    on the destination as on the source; ENABLE again: one. Level: the meaning of the event
    suppression structure (§2.8.10, no MUST keyword)."""
    bal = virtio_device
    vq = bal.queues[INFLATEQ]
    suppression_holds_across(qemu, bal, vq, migrate, _inflater(bal), in_flight=held(bal))
