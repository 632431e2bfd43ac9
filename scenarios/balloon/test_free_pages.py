"""virtio-balloon free page reporting and free page hinting (virtio 1.2 §5.5.6.7, §5.5.6.5).

Reporting (``free-page-reporting=on``): the driver hands free pages to the device on the
reporting_vq and may reuse them once the device has used the chain. QEMU discards their
backing memory (``ram_block_discard_range``), so without PAGE_POISON a reported page reads back
as zeros, and with a non-zero ``poison_val`` it is left alone (virtio_balloon_handle_report).

Hinting (``free-page-hint=on``, which QEMU only accepts with an ``iothread``; the marker cannot
add the ``-object iothread``, so these scenarios build the machine with ``machine_factory`` over
the same modes and rings): QEMU starts a round only from its precopy notifier, i.e. during a
migration of a running VM. Here the VM migrates to ``exec:cat > /dev/null`` at a bandwidth low
enough that the first pass over RAM outlasts the scenario, and ``migrate_cancel`` ends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from qtest_virtio import Machine, MachineSpec, modes
from qtest_virtio.devices.balloon.driver import VirtioBalloon
from qtest_virtio.devices.balloon.encoding import CMD_ID_DONE, CMD_ID_STOP, PAGE_SIZE

REPORTING = {"free-page-reporting": "on"}
#: Of the refusals only PAGE_POISON changes what reporting does with the pages.
pytestmark = pytest.mark.virtio_device("virtio-balloon-pci", flags=REPORTING, refuse_each=["PAGE_POISON"])

#: Reserved command IDs; every other value starts a round of hinting (§5.5.6.5).
RESERVED_CMD_IDS = (CMD_ID_STOP, CMD_ID_DONE)
IOTHREAD = "balloon-io"
#: Bytes per second the migration may send: the first pass over 256 MiB of RAM takes minutes.
MIGRATE_BANDWIDTH = 4096
PATTERN = bytes(range(256)) * (PAGE_SIZE // 256)


def _pages(bal: VirtioBalloon, count: int, fill: bytes) -> list[int]:
    addrs = [bal.memory.alloc(PAGE_SIZE, PAGE_SIZE, tag="free page") for _ in range(count)]
    for addr in addrs:
        bal.memory.write(addr, fill)
    return addrs


@pytest.mark.virtio_device("virtio-balloon-pci", flags=REPORTING, refuse={"PAGE_POISON"}, refuse_each=False)
@pytest.mark.virtio_requires("PAGE_REPORTING")
@pytest.mark.conformance("balloon-reporting-acknowledged", spec="5.5.6.7")
def test_reported_pages_are_acknowledged(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """The device acknowledges a report by using the reporting_vq descriptor (§5.5.6.7 step 3),
    writing nothing into the pages as buffer data (used length 0); without PAGE_POISON it MAY
    modify them first (§5.5.6.7.2), and QEMU discards them: they read back as zeros, while a
    page next to them that was not reported keeps its content."""
    bal = virtio_device
    assert not bal.has("PAGE_POISON")
    pages = _pages(bal, 4, PATTERN)
    kept = _pages(bal, 1, PATTERN)
    assert bal.report_free_pages(pages) == 0
    for addr in pages:
        assert bal.memory.read(addr, PAGE_SIZE) == bytes(PAGE_SIZE), f"reported page {addr:#x} not discarded"
    assert bal.memory.read(kept[0], PAGE_SIZE) == PATTERN
    assert bal.report_free_pages(pages[:1]) == 0  # the pages may be reported again once reused


@pytest.mark.virtio_requires("PAGE_REPORTING", "PAGE_POISON")
@pytest.mark.conformance("balloon-reporting-keeps-poison", spec="5.5.6.7.2")
def test_reported_pages_keep_their_poison_value(virtio_device: VirtioBalloon, qemu: Machine) -> None:
    """With PAGE_POISON negotiated the device MUST NOT modify the content of a reported page to
    a value other than poison_val (§5.5.6.7.2): pages the driver filled with a non-zero
    poison_val before reporting them (§5.5.6.7.1) still hold it after the acknowledgement."""
    bal = virtio_device
    bal.reset()
    bal.poison_val = 0x5AA5_C33C
    bal.initialize()  # poison_val is written before DRIVER_OK (§5.5.5)
    poison = bal.poison_val.to_bytes(4, "little") * (PAGE_SIZE // 4)
    pages = _pages(bal, 3, poison)
    assert bal.report_free_pages(pages) == 0
    for addr in pages:
        assert bal.memory.read(addr, PAGE_SIZE) == poison, f"reported page {addr:#x} changed"


# -- free page hinting ---------------------------------------------------------------------------

MODEL = "virtio-balloon-pci"
#: The modes and rings the plugin's marker would give, with its test ids.
HINT_PARAMS = [pytest.param(m.value, "split", id=f"{MODEL}-{m.value}") for m in modes.ALL_MODES] + [
    pytest.param(m.value, "packed", id=f"{MODEL}-{m.value}-packed=on") for m in modes.MODERN_LAYOUT_MODES
]
RecordProperty = Callable[[str, object], None]


def _hinting_balloon(
    machine_factory: Callable[..., Machine], record_property: RecordProperty, mode: str, ring: str
) -> tuple[Machine, VirtioBalloon]:
    """A running machine with a virtio-balloon-pci offering FREE_PAGE_HINT (on an iothread), its
    driver at DRIVER_OK with the feature negotiated. The run summary files the test under the
    device, mode and ring, as it files the marker's tests."""
    packed = {"packed": "on"} if ring == "packed" else {}
    for key, value in (("virtio_device", MODEL), ("virtio_transport", mode), ("virtio_ring", ring)):
        record_property(key, value)
    record_property("virtio_id_flags", ",".join(f"{k}={v}" for k, v in packed.items()))
    spec = MachineSpec(extra_args=["-object", f"iothread,id={IOTHREAD}"])
    dev = spec.add_virtio(MODEL, {"free-page-hint": "on", "iothread": IOTHREAD, **packed}, mode=mode)
    vm = machine_factory(spec)
    vm.resume()  # hinting starts only while the VM runs, and QEMU blocks its iothread otherwise
    bal = vm.virtio(dev.id, VirtioBalloon)
    assert bal.has("FREE_PAGE_HINT")
    return vm, bal


def _migrate(vm: Machine) -> None:
    vm.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": MIGRATE_BANDWIDTH})
    vm.qmp.cmd("migrate", uri="exec:cat > /dev/null")


def _cancel(vm: Machine) -> None:
    vm.qmp.cmd("migrate_cancel")
    deadline = time.monotonic() + 5.0
    while True:
        info = vm.qmp.cmd("query-migrate")
        assert isinstance(info, dict)
        if info.get("status") == "cancelled":
            return
        assert time.monotonic() < deadline, f"migration not cancelled within 5 s: {info.get('status')}"
        time.sleep(0.01)


def _wait_cmd_id(bal: VirtioBalloon, accept: Callable[[int], bool], what: str) -> int:
    """Poll free_page_hint_cmd_id (each change also comes with a config change notification)."""
    deadline = time.monotonic() + 5.0
    while not accept(cmd_id := bal.free_page_hint_cmd_id):
        assert time.monotonic() < deadline, f"free_page_hint_cmd_id is {cmd_id:#x} after 5 s, waiting for {what}"
        time.sleep(0.005)
    return cmd_id


@pytest.mark.parametrize(("mode", "ring"), HINT_PARAMS)
@pytest.mark.conformance("balloon-hint-round", spec="5.5.6.5.2")
def test_free_page_hint_round(
    machine_factory: Callable[..., Machine], record_property: RecordProperty, mode: str, ring: str
) -> None:
    """A round of free page hinting (§5.5.6.5): the device starts it by putting a non-reserved
    command ID in free_page_hint_cmd_id; the driver sends that ID, hints pages as input buffers
    and ends with CMD_ID_STOP, and the device uses every buffer. When the device no longer needs
    the hinted pages (the migration is cancelled) it MUST report CMD_ID_DONE, and it MUST NOT
    modify their content after that (§5.5.6.5.2): they still hold what the driver wrote."""
    vm, bal = _hinting_balloon(machine_factory, record_property, mode, ring)
    pages = _pages(bal, 4, PATTERN)
    _migrate(vm)
    cmd_id = _wait_cmd_id(bal, lambda v: v not in RESERVED_CMD_IDS, "a command ID")
    bal.send_cmd_id(cmd_id)
    bal.hint_free_pages(pages)
    bal.stop_hinting()
    _cancel(vm)
    assert _wait_cmd_id(bal, lambda v: v == CMD_ID_DONE, "CMD_ID_DONE") == CMD_ID_DONE
    for addr in pages:
        assert bal.memory.read(addr, PAGE_SIZE) == PATTERN, f"hinted page {addr:#x} changed after DONE"


@pytest.mark.parametrize(("mode", "ring"), HINT_PARAMS)
@pytest.mark.conformance("balloon-hint-cmd-id-not-reused", spec="5.5.6.5.2")
def test_command_id_not_reused_before_stop(
    machine_factory: Callable[..., Machine], record_property: RecordProperty, mode: str, ring: str
) -> None:
    """The device MUST NOT reuse a command ID until it has received an output buffer containing
    CMD_ID_STOP from the driver (§5.5.6.5.2): a round the driver joins but never stops, ended by
    the device (DONE), is followed by a round with another command ID."""
    vm, bal = _hinting_balloon(machine_factory, record_property, mode, ring)
    _migrate(vm)
    first = _wait_cmd_id(bal, lambda v: v not in RESERVED_CMD_IDS, "a command ID")
    bal.send_cmd_id(first)
    bal.hint_free_pages(_pages(bal, 2, PATTERN))
    _cancel(vm)
    _wait_cmd_id(bal, lambda v: v == CMD_ID_DONE, "CMD_ID_DONE")
    _migrate(vm)
    second = _wait_cmd_id(bal, lambda v: v not in RESERVED_CMD_IDS, "a new command ID")
    assert second != first, f"command ID {first:#x} reused without a STOP from the driver"
    _cancel(vm)
