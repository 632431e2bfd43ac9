"""virtio-pci transport conformance (virtio 1.2 §4.1, with §2.2, §2.4 and §6 where the PCI
registers are how the rule is observed): identification, the capability structures, the common
configuration registers, ISR and INTx, MSI-X vector mapping and the PCI configuration access
window.

Most scenarios drive virtio-rng, the simplest device; the ones about device-specific
configuration or several queues use virtio-blk. A scenario that only looks at registers runs
on split rings only (the ring layout does not change the transport's registers).
"""

from __future__ import annotations

import time

import pytest

from qtest_virtio import Machine, modes
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view
from qtest_virtio.pci import PciFunction
from qtest_virtio.pci import regs as pci_regs
from qtest_virtio.registers import Layout, RegisterBlock
from qtest_virtio.transport import LegacyTransport, ModernTransport, VirtioTransport, layout
from qtest_virtio.transport.layout import (
    CFG_TYPE_COMMON,
    CFG_TYPE_DEVICE,
    CFG_TYPE_NOTIFY,
    CFG_TYPE_PCI,
    CFG_TYPE_SHARED_MEMORY,
    COMMON_CFG,
    ISR,
    MODERN_ID_BASE,
    STATUS,
    TRANSITIONAL_DEVICE_TYPES,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP,
    VIRTIO_PCI_CFG_CAP,
    VIRTIO_PCI_NOTIFY_CAP,
    VIRTIO_PCI_VENDOR_ID,
)

pytestmark = pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))

MODERN_LAYOUT = modes.MODERN_LAYOUT_MODES
LEGACY_LAYOUT = modes.LEGACY_LAYOUT_MODES
ENTROPY_DEVICE_ID = 4
VERSION_1 = 32
NOTIFICATION_DATA = 38
#: virtio_pci_cap is followed by extra data for these types (§4.1.4.4, §4.1.4.7, §4.1.4.9).
CAP_MIN_LEN = {
    CFG_TYPE_NOTIFY: VIRTIO_PCI_NOTIFY_CAP.size,
    CFG_TYPE_PCI: VIRTIO_PCI_CFG_CAP.size,
    CFG_TYPE_SHARED_MEMORY: VIRTIO_PCI_CAP.size + 8,
}
#: How long "nothing happens" is watched (the device's work runs in QEMU's main loop).
QUIET_WINDOW = 0.02
IMAGE_BYTES = 64 << 20  # the scratch image MachineSpec gives virtio-blk


def modern(drv: VirtioDriver) -> ModernTransport:
    t = drv.transport
    assert isinstance(t, ModernTransport), f"{t} does not drive the modern layout"
    return t


def legacy(drv: VirtioDriver) -> LegacyTransport:
    t = drv.transport
    assert isinstance(t, LegacyTransport), f"{t} does not drive the legacy layout"
    return t


def queue_regs(t: VirtioTransport) -> RegisterBlock[Layout]:
    """The register block that holds queue_select / queue_size in this layout."""
    if isinstance(t, LegacyTransport):
        return t.regs
    assert isinstance(t, ModernTransport), f"{t} drives neither the legacy nor the modern layout"
    return t.common


def common_in_bar(t: ModernTransport) -> tuple[int, int]:
    """(BAR, offset) of the common configuration structure: where a pci_cfg window access
    aimed at it goes (§4.1.4.9)."""
    common = t.map.common
    assert common is not None and common.bar is not None, f"{t}: no common configuration in a BAR"
    return common.bar, common.offset


def read_vectors(t: VirtioTransport, queue: int) -> tuple[int, int]:
    """(config_msix_vector, queue_msix_vector of ``queue``) as the device presents them."""
    block = queue_regs(t)
    block.write(block.layout["queue_select"], queue)
    return block.read(block.layout["config_msix_vector"]), block.read(block.layout["queue_msix_vector"])


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give the device's main loop a few turns (each qtest command is one) to do anything."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vm.qtest.readl(0)


def cap_len(fn: PciFunction, cap_offset: int) -> int:
    return fn.read_config(cap_offset + VIRTIO_PCI_CAP.cap_len.offset, 1)


# -- identification (§4.1.2) -------------------------------------------------------------------


@pytest.mark.conformance("pci-vendor-and-device-id", spec="4.1.2.1")
def test_vendor_and_device_id(virtio_device: VirtioRng) -> None:
    """The function carries the virtio vendor ID, and a device ID that is either 0x1040 plus
    the virtio device ID or the transitional ID listed for that device type (MUST)."""
    fn = virtio_device.fn
    transitional = {t: pci_id for pci_id, t in TRANSITIONAL_DEVICE_TYPES.items()}
    assert fn.vendor_id == VIRTIO_PCI_VENDOR_ID
    assert fn.device_id in (MODERN_ID_BASE + ENTROPY_DEVICE_ID, transitional[ENTROPY_DEVICE_ID])


@pytest.mark.conformance("pci-transitional-identity", spec="4.1.2.3")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=[*LEGACY_LAYOUT, modes.TRANSITIONAL_MODERN])
def test_transitional_identity(virtio_device: VirtioRng) -> None:
    """A device a legacy driver may bind (transitional, and here also the legacy-only build)
    has revision 0, a device ID in 0x1000-0x103f and the virtio device ID as its subsystem
    device ID (MUST)."""
    fn = virtio_device.fn
    assert fn.revision_id == 0
    assert fn.device_id in range(0x1000, 0x1040)
    assert fn.config.read(pci_regs.TYPE0_HEADER.subsystem_id) == ENTROPY_DEVICE_ID


@pytest.mark.conformance("pci-non-transitional-identity", spec="4.1.2.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=[modes.MODERN])
def test_non_transitional_identity(virtio_device: VirtioRng) -> None:
    """A modern-only device keeps legacy drivers away: device ID 0x1040-0x107f, revision 1 or
    more, subsystem device ID 0x40 or more (SHOULD: asserted, as a legacy driver binding a
    modern-only device would misbehave, and QEMU does all three)."""
    fn = virtio_device.fn
    assert fn.device_id in range(0x1040, 0x1080)
    assert fn.revision_id >= 1
    assert fn.config.read(pci_regs.TYPE0_HEADER.subsystem_id) >= 0x40


# -- capability structures (§4.1.4) ------------------------------------------------------------


@pytest.mark.conformance("pci-cap-len-covers-structure", spec="4.1.4.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_capability_length_covers_the_structure(virtio_device: VirtioRng) -> None:
    """Every virtio vendor capability's cap_len includes the whole virtio_pci_cap and the extra
    data its type adds (the notify multiplier, the PCI cfg data window) (MUST)."""
    t = modern(virtio_device)
    assert t.map.caps, "no virtio vendor capability"
    for cap in t.map.caps:
        length = cap_len(t.fn, cap.cap_offset)
        assert length >= CAP_MIN_LEN.get(cap.cfg_type, VIRTIO_PCI_CAP.size), (
            f"capability at {cap.cap_offset:#x} (cfg_type {cap.cfg_type}) has cap_len {length}"
        )


@pytest.mark.conformance("pci-common-cfg-capability", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_common_cfg_capability(virtio_device: VirtioRng) -> None:
    """There is at least one common configuration capability, and its offset in the BAR is
    4-byte aligned (MUST)."""
    t = modern(virtio_device)
    common = [c for c in t.map.caps if c.cfg_type == CFG_TYPE_COMMON]
    assert common
    for cap in common:
        assert cap.offset % 4 == 0, f"common cfg at BAR{cap.bar}+{cap.offset:#x}"
        assert cap.length >= COMMON_CFG.queue_device.end


@pytest.mark.conformance("pci-notify-capability-layout", spec="4.1.4.4.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_notify_capability_layout(virtio_device: VirtioRng) -> None:
    """There is at least one notification capability; without NOTIFICATION_DATA its offset is
    2-byte aligned and notify_off_multiplier is 0 or an even power of two (MUST)."""
    t = modern(virtio_device)
    assert not t.device_features() >> NOTIFICATION_DATA & 1, "NOTIFICATION_DATA rules are not checked here"
    notify = [c for c in t.map.caps if c.cfg_type == CFG_TYPE_NOTIFY]
    assert notify
    for cap in notify:
        mult = cap.notify_off_multiplier
        assert cap.offset % 2 == 0
        assert mult == 0 or (mult & (mult - 1) == 0 and mult % 2 == 0), f"notify_off_multiplier {mult}"


@pytest.mark.conformance("pci-notify-offsets-within-capability", spec="4.1.4.4.1")
@pytest.mark.virtio_device(
    "virtio-blk-pci", rings=("split",), transports=MODERN_LAYOUT, backend="null", flags={"num-queues": "4"}
)
def test_notify_offsets_stay_within_the_capability(virtio_device: VirtioBlk) -> None:
    """For every queue, cap.length >= queue_notify_off * notify_off_multiplier + 2: each queue's
    notification address lies inside the notification structure (MUST)."""
    t = modern(virtio_device)
    assert t.num_queues() == 4
    for q in range(t.num_queues()):
        t.select_queue(q)
        off = t.common.read(layout.COMMON_CFG.queue_notify_off)
        assert t.notify_window.length >= off * t.map.notify_off_multiplier + 2, f"queue {q}"


@pytest.mark.conformance("pci-device-cfg-capability", spec="4.1.4.6.1")
@pytest.mark.virtio_device("virtio-blk-pci", rings=("split",), transports=MODERN_LAYOUT, backend="null")
def test_device_cfg_capability(virtio_device: VirtioBlk) -> None:
    """A device type with device-specific configuration (block) presents a device cfg
    capability, at a 4-byte aligned offset (MUST)."""
    t = modern(virtio_device)
    device = [c for c in t.map.caps if c.cfg_type == CFG_TYPE_DEVICE]
    assert device
    for cap in device:
        assert cap.offset % 4 == 0
        assert cap.length >= 8  # at least the capacity field


# -- common configuration (§4.1.4.3) -----------------------------------------------------------


@pytest.mark.conformance("pci-reset-reads-zero", spec="4.1.4.3.1")
def test_device_reset_reads_back_zero(virtio_device: VirtioRng, qemu: Machine) -> None:
    """Writing 0 to device_status resets the device, which then presents 0 there (MUST; the
    legacy layout's status register does the same)."""
    t = virtio_device.transport
    assert t.get_status() & STATUS.DRIVER_OK.mask
    t.set_status(0)
    deadline = time.monotonic() + 1.0
    while (status := t.get_status()) != 0:
        assert time.monotonic() < deadline, f"device_status stays {status:#x} after writing 0"
    assert not device_view(qemu, virtio_device.dev_id).status


@pytest.mark.conformance("pci-reset-clears-queue-enable", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_device_reset_clears_queue_enable(virtio_device: VirtioRng) -> None:
    """After a device reset, queue_enable reads 0 (MUST)."""
    t = modern(virtio_device)
    assert t.queue_enabled(0)
    t.reset()
    t.select_queue(0)
    assert t.common.read(layout.COMMON_CFG.queue_enable) == 0


@pytest.mark.conformance("pci-absent-queue-size-zero", spec="4.1.4.3.1")
def test_absent_queue_reads_size_zero(virtio_device: VirtioRng) -> None:
    """With queue_select naming a queue the device does not have, queue_size reads 0 (MUST).
    virtio-rng has one queue; 1, 2 and 1023 (QEMU's last queue slot) are all absent."""
    block = queue_regs(virtio_device.transport)
    for queue in (1, 2, 1023):
        block.write(block.layout["queue_select"], queue)
        assert block.read(block.layout["queue_size"]) == 0, f"queue {queue}"


@pytest.mark.conformance("pci-large-queue-select-size-zero", spec="4.1.4.3")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_large_queue_select_reads_size_zero(virtio_device: VirtioRng) -> None:
    """queue_select is a 16-bit read-write field of the common configuration (§4.1.4.3, the
    structure's definition: descriptive, no MUST keeps a value past the device's queues). A
    device that keeps any value there names an unavailable queue, whose queue_size then MUST
    read 0 (§4.1.4.3.1). One that drops the write leaves the previous queue selected, and a
    driver's further queue writes land on it."""
    block = modern(virtio_device).common
    for queue in (1024, 0x8000, 0xFFFF):
        block.write(COMMON_CFG.queue_select, 0)
        block.write(COMMON_CFG.queue_select, queue)
        assert block.read(COMMON_CFG.queue_select) == queue, (
            f"queue_select {queue:#x} reads back {block.read(COMMON_CFG.queue_select):#x}"
        )
        assert block.read(COMMON_CFG.queue_size) == 0, f"queue_select {queue:#x}"


@pytest.mark.conformance("pci-queue-size-power-of-two", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-blk-pci", rings=("split",), backend="null", flags={"num-queues": "3"})
def test_queue_size_is_zero_or_a_power_of_two(virtio_device: VirtioBlk) -> None:
    """Without RING_PACKED, every queue's queue_size is 0 or a power of two (MUST)."""
    t = virtio_device.transport
    if "RING_PACKED" in virtio_device.negotiated:
        pytest.skip("the rule is for split rings; this run negotiated RING_PACKED")
    block = queue_regs(t)
    for queue in range(4):
        block.write(block.layout["queue_select"], queue)
        size = block.read(block.layout["queue_size"])
        assert size & (size - 1) == 0, f"queue {queue} size {size}"


@pytest.mark.conformance("pci-queue-size-driver-writable", spec="4.1.4.3")
@pytest.mark.virtio_device("virtio-rng-pci", transports=MODERN_LAYOUT, queue_size=2)
def test_driver_can_shrink_the_queue(virtio_device: VirtioRng) -> None:
    """On the modern layout queue_size is read-write: the driver may write a smaller power of
    two, the device reads it back and runs the queue at that size (field definition)."""
    t = modern(virtio_device)
    t.select_queue(0)
    assert t.common.read(layout.COMMON_CFG.queue_size) == 2
    assert virtio_device.queues[0].size == 2
    for _ in range(5):  # more than twice round the two-entry ring
        assert len(virtio_device.request(8, timeout=1.0)) == 8


@pytest.mark.conformance("pci-legacy-queue-size-read-only", spec="4.1.4.10")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=LEGACY_LAYOUT)
def test_legacy_queue_size_is_read_only(virtio_device: VirtioRng) -> None:
    """In the legacy register layout queue_size is read-only: a driver's write does not change
    it (the table of §4.1.4.10 marks it R)."""
    t = legacy(virtio_device)
    t.regs.write(layout.LEGACY_CFG.queue_select, 0)
    size = t.regs.read(layout.LEGACY_CFG.queue_size)
    for value in (size // 2, size * 2, 0):
        t.regs.write(layout.LEGACY_CFG.queue_size, value)
        assert t.regs.read(layout.LEGACY_CFG.queue_size) == size


@pytest.mark.conformance("pci-feature-select-past-64-reads-zero", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_device_feature_past_bit_63_reads_zero(virtio_device: VirtioRng) -> None:
    """device_feature shows the offered bits from device_feature_select * 32 on, for any select
    the driver writes: no feature is defined past bit 63, so selects 2 and up read 0 (MUST)."""
    t = modern(virtio_device)
    for select in (2, 3, 0x80, 0xFFFF_FFFF):
        t.common.write(layout.COMMON_CFG.device_feature_select, select)
        assert t.common.read(layout.COMMON_CFG.device_feature) == 0, f"device_feature_select {select:#x}"


@pytest.mark.conformance("pci-driver-features-read-back", spec="4.1.4.3.1")
def test_driver_features_read_back(virtio_device: VirtioRng) -> None:
    """The device presents the valid feature bits the driver wrote to driver_feature (MUST;
    the legacy layout's 32-bit driver features register likewise)."""
    negotiated = virtio_device.negotiated
    assert negotiated.accepted & ~negotiated.offered == 0
    assert virtio_device.transport.driver_features() == negotiated.accepted


@pytest.mark.conformance("pci-offers-version-1", spec="6.2")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_modern_layout_offers_version_1(virtio_device: VirtioRng) -> None:
    """A device driven through the modern layout offers VIRTIO_F_VERSION_1 (MUST)."""
    t = modern(virtio_device)
    t.common.write(layout.COMMON_CFG.device_feature_select, 1)
    assert t.common.read(layout.COMMON_CFG.device_feature) >> (VERSION_1 - 32) & 1


@pytest.mark.conformance("pci-unoffered-feature-fails-features-ok", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_unoffered_feature_is_refused_at_features_ok(virtio_device: VirtioRng, qemu: Machine) -> None:
    """A device may ignore driver_feature writes of bits it never offered (presenting 0), or
    mirror them, "but it will still have to check them when the driver sets FEATURES_OK" (the
    note of §4.1.4.3.1). So a device that reads an unoffered bit back must not accept
    FEATURES_OK for that set; one that drops the bit may. Level: the note's words."""
    t = modern(virtio_device)
    t.reset()
    t.add_status(STATUS.ACKNOWLEDGE.mask | STATUS.DRIVER.mask)
    offered = t.device_features()
    unoffered = 1 << next(b for b in (35, 63, 62) if not offered >> b & 1)  # IN_ORDER where not offered
    t.set_driver_features(offered | unoffered)
    mirrored = bool(t.driver_features() & unoffered)
    t.add_status(STATUS.FEATURES_OK.mask)
    if not mirrored:
        return  # the write was ignored, as the note allows: there is nothing left to check
    assert not t.get_status() & STATUS.FEATURES_OK.mask, (
        f"driver_feature reads back bit {unoffered.bit_length() - 1}, never offered, and FEATURES_OK stuck; "
        f"QEMU runs with {sorted(device_view(qemu, virtio_device.dev_id).guest_features)}"
    )


@pytest.mark.conformance("pci-queue-reset-reads-zero-when-enabled", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-rng-pci", transports=MODERN_LAYOUT, flags={"queue_reset": "on"})
@pytest.mark.virtio_requires("RING_RESET")
def test_queue_reset_reads_zero_on_an_enabled_queue(virtio_device: VirtioRng) -> None:
    """With RING_RESET negotiated, queue_reset reads 0 once the queue is enabled (MUST)."""
    t = modern(virtio_device)
    t.select_queue(0)
    assert t.common.read(layout.COMMON_CFG.queue_enable) == 1
    assert t.common.read(layout.COMMON_CFG.queue_reset) == 0


@pytest.mark.conformance("pci-queue-reset-completes-disabled", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-rng-pci", transports=MODERN_LAYOUT, flags={"queue_reset": "on"})
@pytest.mark.virtio_requires("RING_RESET")
def test_queue_reset_completes_with_the_queue_disabled(virtio_device: VirtioRng) -> None:
    """Writing 1 to queue_reset resets the queue; when the reset is done, both queue_reset and
    queue_enable read 0 (MUST)."""
    t = modern(virtio_device)
    t.select_queue(0)
    t.common.write(layout.COMMON_CFG.queue_reset, 1)
    for _ in range(1000):
        if t.common.read(layout.COMMON_CFG.queue_reset) == 0:
            break
    assert t.common.read(layout.COMMON_CFG.queue_reset) == 0, "queue reset never completed"
    assert t.common.read(layout.COMMON_CFG.queue_enable) == 0


# -- ISR status and INTx (§4.1.4.5) ------------------------------------------------------------


@pytest.mark.conformance("pci-isr-cleared-by-read", spec="4.1.4.5.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), interrupts="isr")
def test_isr_is_cleared_by_reading_it(virtio_device: VirtioRng) -> None:
    """With MSI-X off, a used buffer sets the ISR queue bit; the driver's read returns it and
    resets ISR status to 0 (MUST)."""
    t = virtio_device.transport
    assert t.read_isr() == 0
    virtio_device.request(8)
    assert t.read_isr() & ISR.queue_interrupt.mask
    assert t.read_isr() == 0


@pytest.mark.conformance("pci-isr-mirrored-in-pci-status", spec="4.1.4.5.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), interrupts="isr")
def test_pci_interrupt_status_follows_isr(virtio_device: VirtioRng) -> None:
    """With MSI-X off, the Interrupt Status bit of the PCI Status register is the OR of the ISR
    bits: clear while ISR is 0, set after a used buffer, clear again once ISR is read (MUST)."""
    fn = virtio_device.fn

    def interrupt_status() -> bool:
        return bool(pci_regs.STATUS.interrupt_status.get(fn.config.read(pci_regs.TYPE0_HEADER.status)))

    t = virtio_device.transport
    assert t.read_isr() == 0
    assert not interrupt_status()
    virtio_device.request(8)
    assert interrupt_status()
    assert t.read_isr() != 0
    assert not interrupt_status()


@pytest.mark.conformance("pci-isr-set-before-intx", spec="4.1.4.5.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), interrupts="intx")
def test_isr_queue_bit_is_set_when_intx_fires(virtio_device: VirtioRng) -> None:
    """With MSI-X off, the device sets the ISR queue bit before it raises INTx for a used
    buffer, so a driver that sees the line up and reads ISR finds the reason (MUST)."""
    intx = virtio_device.intx
    assert intx is not None and not intx.level()
    virtio_device.request(8)
    intx.wait(True, timeout=2.0)
    assert virtio_device.transport.read_isr() & ISR.queue_interrupt.mask
    intx.wait(False, timeout=2.0)  # and the read deasserted it


# -- MSI-X vectors (§4.1.5.1.2, §4.1.5.3) ------------------------------------------------------


@pytest.mark.conformance("pci-msix-any-valid-vector", spec="4.1.5.1.2.1")
def test_every_valid_vector_can_be_mapped(virtio_device: VirtioRng) -> None:
    """Configuration changes and the queue can each be mapped to any vector of the MSI-X table,
    and reading the vector register returns the mapping (MUST)."""
    t, msix = virtio_device.transport, virtio_device.msix
    assert msix is not None
    for vector in range(msix.table_size):
        assert t.set_config_vector(vector) == vector
        assert t.set_queue_vector(0, vector) == vector


@pytest.mark.conformance("pci-msix-failed-mapping-reads-no-vector", spec="4.1.5.1.2.1")
def test_vector_outside_the_table_reads_no_vector(virtio_device: VirtioRng) -> None:
    """A mapping the device cannot honour (a vector past its MSI-X table) is reported by reading
    back NO_VECTOR (MUST)."""
    t, msix = virtio_device.transport, virtio_device.msix
    assert msix is not None
    for vector in (msix.table_size, msix.table_size + 5, 0x7FF):
        assert t.set_queue_vector(0, vector) == VIRTIO_MSI_NO_VECTOR
        assert t.set_config_vector(vector) == VIRTIO_MSI_NO_VECTOR


@pytest.mark.conformance("pci-msix-unmapped-after-reset", spec="4.1.5.1.2.1")
def test_reset_unmaps_every_vector(virtio_device: VirtioRng) -> None:
    """After a device reset, the configuration-change event and every queue are unmapped:
    their vector registers read NO_VECTOR (MUST)."""
    t = virtio_device.transport
    assert read_vectors(t, 0)[0] == 0  # the driver mapped configuration changes to vector 0
    t.reset()
    assert read_vectors(t, 0) == (VIRTIO_MSI_NO_VECTOR, VIRTIO_MSI_NO_VECTOR)


@pytest.mark.conformance("pci-no-vector-no-interrupt", spec="4.1.5.3.1")
def test_queue_on_no_vector_raises_nothing(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With MSI-X enabled and the queue's vector NO_VECTOR, a used buffer delivers no
    interrupt for that queue (MUST)."""
    t, msix = virtio_device.transport, virtio_device.msix
    assert msix is not None
    assert t.set_queue_vector(0, VIRTIO_MSI_NO_VECTOR) == VIRTIO_MSI_NO_VECTOR
    for _ in range(3):
        assert len(virtio_device.request(8)) == 8
    quiet(qemu)
    assert not [v for v in msix.mailboxes if msix.fired(v)]


# -- PCI configuration access capability (§4.1.4.9) --------------------------------------------


@pytest.mark.conformance("pci-cfg-access-reads-bar", spec="4.1.4.9.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_pci_cfg_window_reads_what_the_bar_holds(virtio_device: VirtioRng) -> None:
    """A read of pci_cfg_data performs a read of cap.length bytes at cap.offset in BAR cap.bar:
    1-, 2- and 4-byte common configuration fields read the same through it as through the BAR
    (MUST)."""
    t = modern(virtio_device)
    assert t.map.pci_cfg is not None
    bar, base = common_in_bar(t)
    t.common.write(layout.COMMON_CFG.device_feature_select, 1)
    t.select_queue(0)
    c = COMMON_CFG
    for field in (c.device_status, c.num_queues, c.queue_size, c.queue_msix_vector, c.device_feature):
        via_cfg = t.pci_cfg_read(bar, base + field.offset, field.width)
        assert via_cfg == t.common.read(field), field.name


@pytest.mark.conformance("pci-cfg-access-writes-bar", spec="4.1.4.9.1")
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_pci_cfg_window_writes_reach_the_bar(virtio_device: VirtioRng) -> None:
    """A write of pci_cfg_data performs a write of cap.length bytes at cap.offset in BAR
    cap.bar: registers written through the window read back through the BAR (MUST)."""
    t = modern(virtio_device)
    bar, base = common_in_bar(t)
    t.pci_cfg_write(bar, base + COMMON_CFG.device_feature_select.offset, 4, 1)
    assert t.common.read(layout.COMMON_CFG.device_feature_select) == 1
    t.pci_cfg_write(bar, base + COMMON_CFG.queue_select.offset, 2, 0)
    t.pci_cfg_write(bar, base + COMMON_CFG.queue_msix_vector.offset, 2, 0)
    assert t.common.read(layout.COMMON_CFG.queue_msix_vector) == 0
    t.pci_cfg_write(bar, base + COMMON_CFG.config_msix_vector.offset, 2, 1)
    assert t.common.read(layout.COMMON_CFG.config_msix_vector) == 1


# -- device-specific configuration (§4.1.3, §4.1.4.3, §4.1.4.10) --------------------------------


def _resize(qemu: Machine, drv: VirtioDriver, size: int) -> None:
    qemu.qmp.cmd("block_resize", **{"node-name": f"{drv.dev_id}-backend", "size": size})


@pytest.mark.conformance("pci-config-generation-changes", spec="4.1.4.3.1")
@pytest.mark.virtio_device("virtio-blk-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_config_generation_changes_with_the_config(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """After the driver reads a configuration field that changed since it last read the
    configuration, config_generation reads a different value (MUST); while nothing changes it
    stays put."""
    t = modern(virtio_device)
    before = t.config_generation()
    assert t.config_read(0, 8) == IMAGE_BYTES // 512
    assert t.config_generation() == before
    _resize(qemu, virtio_device, 2 * IMAGE_BYTES)
    assert t.config_read(0, 8) == 2 * IMAGE_BYTES // 512
    assert t.config_generation() != before


@pytest.mark.conformance("pci-64bit-config-halves", spec="4.1.3.2")
@pytest.mark.virtio_device("virtio-blk-pci", rings=("split",), transports=MODERN_LAYOUT)
def test_64bit_config_field_halves_read_independently(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """A 64-bit configuration field (virtio-blk's capacity) can be read as its low and high
    32-bit halves independently, in either order (MUST)."""
    t = modern(virtio_device)
    size = (5 << 32) + (3 << 20)  # a capacity with bits in both halves: 20 GiB + 3 MiB
    _resize(qemu, virtio_device, size)
    sectors = size // 512
    high_first = t.config_read(4, 4) << 32 | t.config_read(0, 4)
    low_first = t.config_read(0, 4) | t.config_read(4, 4) << 32
    assert high_first == low_first == sectors


@pytest.mark.conformance("pci-legacy-config-any-width", spec="4.1.4.10")
@pytest.mark.virtio_device("virtio-blk-pci", rings=("split",), transports=LEGACY_LAYOUT)
def test_legacy_device_config_reads_the_same_at_any_width(virtio_device: VirtioBlk) -> None:
    """Through the legacy interface the driver may read device-specific configuration with any
    access width, and gets the same bytes as with the natural widths (MUST)."""
    t = legacy(virtio_device)
    natural = (t.config_read(0, 4) | t.config_read(4, 4) << 32).to_bytes(8, "little")
    natural += t.config_read(8, 4).to_bytes(4, "little") + t.config_read(12, 4).to_bytes(4, "little")
    for width in (1, 2, 4):
        got = b"".join(t.config_read(off, width).to_bytes(width, "little") for off in range(0, 16, width))
        assert got == natural, f"{width}-byte reads"


@pytest.mark.conformance("pci-config-change-sets-isr", spec="4.1.4.5.1")
@pytest.mark.virtio_device("virtio-blk-pci", rings=("split",), interrupts="isr")
def test_config_change_sets_the_isr_config_bit(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device sets the Device Configuration Interrupt bit in ISR status before it sends a
    configuration change notification (MUST): with MSI-X off, the bit is there once the new
    configuration is visible."""
    t = virtio_device.transport
    assert t.read_isr() == 0
    _resize(qemu, virtio_device, 2 * IMAGE_BYTES)
    deadline = time.monotonic() + 2.0
    while not (isr := t.read_isr()) & ISR.config_change.mask:
        assert time.monotonic() < deadline, f"ISR {isr:#x} after the capacity changed"


@pytest.mark.conformance("pci-config-no-vector-no-interrupt", spec="4.1.5.4.1")
@pytest.mark.virtio_device("virtio-blk-pci", rings=("split",))
def test_config_change_on_no_vector_raises_nothing(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """With MSI-X enabled and config_msix_vector NO_VECTOR, a configuration change delivers no
    interrupt (MUST)."""
    t, msix = virtio_device.transport, virtio_device.msix
    assert msix is not None
    assert t.set_config_vector(VIRTIO_MSI_NO_VECTOR) == VIRTIO_MSI_NO_VECTOR
    _resize(qemu, virtio_device, 2 * IMAGE_BYTES)
    assert t.config_read(0, 8) == 2 * IMAGE_BYTES // 512
    quiet(qemu)
    assert not [v for v in msix.mailboxes if msix.fired(v)]
