"""The virtio function as a PCI / PCI Express function (virtio 1.2 §4.1, PCIe 4.0 §6.6.2 and
§7.5.3, PCI PM 1.2 §3.2): placed behind a q35 ``pcie-root-port`` it is a PCI Express endpoint
with its capabilities (PM, optional AER and ATS), a Function Level Reset resets the virtio
device, and the command register's Bus Master Enable gates the device's DMA.

Regression scenarios (the virtio spec leaves PCI Express to the PCI specifications): what they
assert is the PCI Express behaviour QEMU implements for virtio-pci (hw/virtio/virtio-pci.c
virtio_pci_realize, virtio_write_config), on both rings as the rest of the suite; QEMU makes the
function Express only where modern is on
(virtio_pci_dc_realize), so the legacy-only build is checked for the opposite.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from qtest_virtio import Machine, MachineSpec, QemuCrashed, QemuStartError, modes
from qtest_virtio.backends import NetBackend
from qtest_virtio.binary import QemuBinary, UnknownFlag
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import ethernet_frame
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view, queue_view
from qtest_virtio.pci import PciFunction, regs
from qtest_virtio.pci.bus import Capability
from qtest_virtio.registers import Layout, RegisterBlock
from qtest_virtio.testing import alloc_bufs
from qtest_virtio.transport import FeaturesRejected, ModernTransport, layout
from qtest_virtio.transport.pcimap import VirtioPciMap
from qtest_virtio.virtqueue import SplitVirtqueue

pytestmark = pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, pcie_root_port=True)

MODERN_LAYOUT = modes.MODERN_LAYOUT_MODES
SHORT = 2.0
QUIET_WINDOW = 0.02
PCIE_ENDPOINT = 0x0
DRIVER_OK = layout.STATUS.DRIVER_OK.mask
PEER_MAC = "02:00:00:00:00:01"
#: The plugin's machine_factory fixture: starts a Machine from a MachineSpec.
MachineFactory = Callable[[MachineSpec], Machine]
ENTROPY_DEVICE_ID = 4
MODERN_RNG_ID = layout.MODERN_ID_BASE + ENTROPY_DEVICE_ID
TRANSITIONAL_RNG_ID = next(pci_id for pci_id, t in layout.TRANSITIONAL_DEVICE_TYPES.items() if t == ENTROPY_DEVICE_ID)


def quiet(vm: Machine, seconds: float = QUIET_WINDOW) -> None:
    """Give the device's main loop a few turns (each qtest command is one) to do anything."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        vm.qtest.readl(0)


def cap_block(fn: PciFunction, cap: Capability, layout_: Layout) -> RegisterBlock[Layout]:
    return RegisterBlock(
        layout_,
        lambda off, w: fn.read_config(cap.offset + off, w),
        lambda off, w, v: fn.write_config(cap.offset + off, w, v),
    )


def pcie_cap(fn: PciFunction) -> RegisterBlock[Layout]:
    cap = fn.find_capability(regs.CAP_ID_PCIE)
    assert cap is not None, f"{fn.bdf} has no PCI Express capability"
    return cap_block(fn, cap, regs.PCIE_CAP)


def ext_cap(fn: PciFunction, cap_id: int) -> Capability | None:
    return next((c for c in fn.extended_capabilities() if c.id == cap_id), None)


def refusal(qemu_binary: QemuBinary, spec: MachineSpec) -> str:
    """QEMU's message when it refuses ``spec`` at start (before or just after the qtest socket
    is up: both happen); fails the test if QEMU starts."""
    spec.qemu = qemu_binary.path
    vm = Machine(spec)
    try:
        vm.start()
    except QemuStartError as exc:
        return f"{exc}\n{exc.stderr}"
    except QemuCrashed as exc:
        return f"{exc}\n{exc.stderr_tail}"
    finally:
        vm.shutdown(check=False)
    pytest.fail(f"QEMU started: {vm.command_line()}")


def post_unnotified(drv: VirtioRng) -> int:
    vq = drv.queues[0]
    token = vq.add(alloc_bufs(drv.memory, [16], fill=0), indirect=False)
    vq.flush()
    return token


# -- placement --------------------------------------------------------------------------------------


def test_placement_behind_a_root_port(virtio_device: VirtioRng) -> None:
    """Behind a root port the function sits on the port's secondary bus. Where modern is on it
    is a PCI Express Endpoint (capability version 2) with a Power Management capability that
    says PCI PM 1.2 (PMC version 3); the legacy-only build stays a conventional function (no
    PCI Express capability). Either way requests complete through the bridge."""
    drv = virtio_device
    fn = drv.fn
    assert fn.bdf_addr.bus != 0
    express = fn.find_capability(regs.CAP_ID_PCIE)
    if drv.mode == modes.LEGACY:
        assert express is None, "a legacy-only virtio function became PCI Express"
    else:
        caps = regs.PCIE_CAPS.decode(pcie_cap(fn).read(regs.PCIE_CAP.pcie_capabilities))
        assert (caps["port_type"], caps["version"]) == (PCIE_ENDPOINT, 2)
        pm = fn.find_capability(regs.CAP_ID_PM)
        assert pm is not None, "no Power Management capability"
        assert regs.PMC.version.get(cap_block(fn, pm, regs.PM_CAP).read(regs.PM_CAP.pmc)) == 3
        ids = {c.id for c in fn.extended_capabilities()}
        assert not ids & {regs.EXT_CAP_ID_AER, regs.EXT_CAP_ID_ATS}, "AER/ATS present without aer=on/ats=on"
    for _ in range(3):
        assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device(
    "virtio-rng-pci",
    refuse_each=False,
    pcie_root_port=True,
    transports=MODERN_LAYOUT,
    flags={"aer": "on", "ats": "on"},
)
def test_aer_and_ats_capabilities(virtio_device: VirtioRng) -> None:
    """``aer=on`` and ``ats=on`` add the Advanced Error Reporting and Address Translation
    Services extended capabilities. ATS Control's Enable bit and Smallest Translation Unit
    are read-write (PCIe 4.0 §10.5.1.3) and read back as written; the read-only ATS
    Capability register ignores a write; the device keeps working with ATS on and off."""
    drv = virtio_device
    fn = drv.fn
    aer = ext_cap(fn, regs.EXT_CAP_ID_AER)
    ats = ext_cap(fn, regs.EXT_CAP_ID_ATS)
    assert aer is not None, "aer=on but no AER capability"
    assert ats is not None, "ats=on but no ATS capability"
    block = cap_block(fn, ats, regs.ATS_CAP)
    ctrl = regs.ATS_CONTROL
    assert not ctrl.enable.get(block.read(regs.ATS_CAP.ats_control)), "ATS enabled out of reset"
    capability = block.read(regs.ATS_CAP.ats_capability)
    block.write(regs.ATS_CAP.ats_capability, capability ^ 0xFFFF)
    assert block.read(regs.ATS_CAP.ats_capability) == capability
    for stu in (0, 5):
        value = ctrl.smallest_translation_unit.set(ctrl.enable.set(0, 1), stu)
        block.write(regs.ATS_CAP.ats_control, value)
        assert block.read(regs.ATS_CAP.ats_control) == value
        assert len(drv.request(8, timeout=SHORT)) > 0
    block.write(regs.ATS_CAP.ats_control, 0)
    assert block.read(regs.ATS_CAP.ats_control) == 0
    assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device(
    "virtio-net-pci",
    refuse_each=False,
    pcie_root_port=True,
    transports=MODERN_LAYOUT,
    flags={"ats": "on"},
)
def test_ats_enable_on_a_device_with_an_iotlb_hook(virtio_device: VirtioNet, qemu: Machine) -> None:
    """virtio-net is the device type whose ATS Control write reaches a device hook (the vhost
    IOTLB notifiers, idle without vhost): Enable reads back set and clear, and frames injected
    on the backend are received in between."""
    net = virtio_device
    ats = ext_cap(net.fn, regs.EXT_CAP_ID_ATS)
    assert ats is not None
    block = cap_block(net.fn, ats, regs.ATS_CAP)
    host = qemu.backend(net.dev_id, NetBackend)
    for seed, on in ((1, 1), (2, 0)):
        block.write(regs.ATS_CAP.ats_control, regs.ATS_CONTROL.enable.set(0, on))
        assert regs.ATS_CONTROL.enable.get(block.read(regs.ATS_CAP.ats_control)) == on
        frame = ethernet_frame(net.mac, PEER_MAC, 0x88B5, bytes((seed + i) & 0xFF for i in range(64)))
        host.send(frame)
        assert net.receive(timeout=SHORT) == frame


# -- Function Level Reset (PCIe 4.0 §6.6.2) --------------------------------------------------------


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, pcie_root_port=True, transports=MODERN_LAYOUT)
def test_function_level_reset_resets_the_device(virtio_device: VirtioRng, qemu: Machine) -> None:
    """The endpoint advertises Function Level Reset (Device Capabilities bit 28); writing
    Initiate FLR resets the function (PCIe 4.0 §6.6.2): the header comes back unprogrammed
    (no decode, no bus mastering), MSI-X is off, and the virtio device is reset: device_status
    0, the queue disabled and unmapped, QEMU's view empty. A driver that programs the function
    again runs it as before."""
    drv = virtio_device
    fn = drv.fn
    express = pcie_cap(fn)
    devcap = express.read(regs.PCIE_CAP.device_capabilities)
    assert regs.PCIE_DEVCAP.function_level_reset_capability.get(devcap), "no FLR capability"
    assert len(drv.request(8, timeout=SHORT)) > 0
    assert drv.msix is not None and drv.msix.enabled
    control = express.read(regs.PCIE_CAP.device_control)
    express.write(regs.PCIE_CAP.device_control, regs.PCIE_DEVCTL.initiate_function_level_reset.set(control, 1))
    command = fn.config.read(regs.TYPE0_HEADER.command)
    assert not command & (regs.COMMAND.memory_space.mask | regs.COMMAND.bus_master.mask)
    assert not drv.msix.enabled
    assert not device_view(qemu, drv.dev_id).status
    assert queue_view(qemu, drv.dev_id, 0).desc == 0
    fn.restore()
    t = drv.transport
    assert isinstance(t, ModernTransport)
    assert t.get_status() == 0
    t.select_queue(0)
    assert t.common.read(layout.COMMON_CFG.queue_enable) == 0
    assert t.common.read(layout.COMMON_CFG.queue_msix_vector) == layout.VIRTIO_MSI_NO_VECTOR
    drv.initialize()
    assert len(drv.request(8, timeout=SHORT)) > 0


# -- Bus Master Enable (PCI 3.0 §6.2.2) -------------------------------------------------------------


def test_bus_master_off_stops_the_device(virtio_device: VirtioRng, qemu: Machine) -> None:
    """With Bus Master Enable cleared a function may not issue memory requests (PCI 3.0 §6.2.2,
    the command register). QEMU disables the device and drops DRIVER_OK from device_status
    (virtio_write_config): a chain made available and notified stays unused, QEMU takes
    nothing from the ring, and with the bit set again the device stays stopped until the
    driver sets DRIVER_OK again; then the chain completes on the next notification."""
    drv = virtio_device
    fn, t = drv.fn, drv.transport
    vq = drv.queues[0]
    assert len(drv.request(8, timeout=SHORT)) > 0
    running = t.get_status()
    assert running & DRIVER_OK
    fn.enable(bus_master=False)
    assert "bus_master" not in fn.command_flags
    assert t.get_status() == running & ~DRIVER_OK
    assert device_view(qemu, drv.dev_id).raw["disabled"] is True
    token = post_unnotified(drv)
    vq.kick(force=True)
    quiet(qemu)
    assert vq.poll_used() is None
    if isinstance(vq, SplitVirtqueue):  # QEMU's split index: the new chain is still ahead of it
        assert queue_view(qemu, drv.dev_id, 0).last_avail_idx == (vq.avail_idx - 1) & 0xFFFF
    fn.enable(bus_master=True)
    assert device_view(qemu, drv.dev_id).raw["disabled"] is False
    vq.kick(force=True)
    quiet(qemu)
    assert vq.poll_used() is None, "the device ran without DRIVER_OK"
    t.add_status(DRIVER_OK)
    vq.kick(force=True)
    assert vq.wait_for(token, timeout=SHORT).length > 0


# -- what QEMU chooses when the command line does not (virtio_pci_realize) ----------------------------


def test_disable_legacy_auto_follows_the_placement(machine_factory: MachineFactory) -> None:
    """With disable-legacy left at ``auto`` QEMU builds a modern-only device behind a PCI
    Express port (device ID 0x1040 + 4, revision 1, no legacy I/O BAR) and a transitional one
    on q35's root bus (device ID 0x1005, legacy I/O BAR 0). Not parametrised over modes: the
    point is the mode QEMU picks when the harness does not pick one."""
    spec = MachineSpec(machine="q35")
    spec.add_device("pcie-root-port", id="rp0", chassis=1, slot=1)
    spec.add_device("virtio-rng-pci", id="behind", bus="rp0")
    spec.add_device("virtio-rng-pci", id="root")
    vm = machine_factory(spec)
    behind, root = vm.pci_function("behind"), vm.pci_function("root")
    assert (behind.device_id, behind.revision_id) == (MODERN_RNG_ID, 1)
    assert behind.find_capability(regs.CAP_ID_PCIE) is not None
    assert not any(b.is_io for b in behind.bars), "a modern-only device has a legacy I/O BAR"
    assert root.device_id == TRANSITIONAL_RNG_ID
    assert root.bar(0).is_io
    for dev_id, mode in (("behind", modes.MODERN), ("root", modes.TRANSITIONAL_MODERN)):
        assert len(vm.virtio(dev_id, VirtioRng, mode=mode).request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device(
    "virtio-rng-pci",
    refuse_each=False,
    pcie_root_port=True,
    transports=MODERN_LAYOUT,
    flags={"x-pcie-pm-no-soft-reset": "on"},
)
def test_pm_no_soft_reset_and_power_state(virtio_device: VirtioRng) -> None:
    """``x-pcie-pm-no-soft-reset=on`` sets PMCSR's No_Soft_Reset bit (PCI PM 1.2 §3.2.4);
    PowerState is read-write (x-pcie-pm-init): D3hot and D0 read back as written, and the
    device serves requests again in D0."""
    drv = virtio_device
    fn = drv.fn
    pm = fn.find_capability(regs.CAP_ID_PM)
    assert pm is not None
    block = cap_block(fn, pm, regs.PM_CAP)
    pmcsr = block.read(regs.PM_CAP.pmcsr)
    assert regs.PMCSR.no_soft_reset.get(pmcsr) == 1
    assert regs.PMCSR.power_state.get(pmcsr) == regs.PM_STATE_D0
    for state in (regs.PM_STATE_D3HOT, regs.PM_STATE_D0):
        block.write(regs.PM_CAP.pmcsr, regs.PMCSR.power_state.set(pmcsr, state))
        assert regs.PMCSR.power_state.get(block.read(regs.PM_CAP.pmcsr)) == state
    assert len(drv.request(8, timeout=SHORT)) > 0


@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=False, flags={"vectors": "4096"})
def test_too_many_vectors_leaves_the_function_without_msix(virtio_device: VirtioRng, qemu: Machine) -> None:
    """An MSI-X table has at most 2048 entries (PCI 3.0 §6.8.2.3, Table Size is 11 bits): asked
    for 4096 vectors, QEMU warns and builds the function without MSI-X, and the driver runs it
    on INTx / ISR status."""
    drv = virtio_device
    assert drv.fn.find_capability(regs.CAP_ID_MSIX) is None
    assert drv.msix is None
    assert "unable to init msix vectors to 4096" in qemu.stderr_tail()
    assert len(drv.request(8, timeout=SHORT)) > 0


# -- VIRTIO_F_ACCESS_PLATFORM (virtio 1.2 §6.1, §6.2) ------------------------------------------------


class PlatformRng(VirtioRng):
    """A virtio-rng driver that accepts VIRTIO_F_ACCESS_PLATFORM (here no IOMMU translates:
    the addresses it gives are guest-physical, as for any driver)."""

    FEATURES = VirtioRng.FEATURES | {"ACCESS_PLATFORM"}


def test_access_platform_needs_the_modern_only_device(qemu_binary: QemuBinary) -> None:
    """``iommu_platform=on`` (VIRTIO_F_ACCESS_PLATFORM) exists only without the legacy
    interface: QEMU refuses a transitional or legacy device with it, naming the reason."""
    for mode in (modes.TRANSITIONAL_MODERN, modes.LEGACY):
        spec = MachineSpec(machine="q35")
        spec.add_virtio("virtio-rng-pci", mode=mode, iommu_platform="on")
        assert "VIRTIO_F_IOMMU_PLATFORM was supported by neither legacy" in refusal(qemu_binary, spec), mode


def test_access_platform_must_be_accepted(machine_factory: MachineFactory) -> None:
    """With ``iommu_platform=on`` the device offers VIRTIO_F_ACCESS_PLATFORM; a device MAY fail
    to operate if the driver does not accept it (§6.2), and QEMU does: FEATURES_OK does not
    stick for a feature set without it. A driver that accepts it gets FEATURES_OK and, with
    no IOMMU in the platform, its guest-physical buffers are used as they are. Modern mode
    only: the feature cannot exist with the legacy interface (the scenario above)."""
    spec = MachineSpec(machine="q35")
    spec.add_virtio("virtio-rng-pci", mode=modes.MODERN, id="plat", iommu_platform="on")
    vm = machine_factory(spec)
    with pytest.raises(FeaturesRejected):
        vm.virtio("plat", VirtioRng)
    drv = vm.virtio("plat", PlatformRng)
    assert "ACCESS_PLATFORM" in drv.negotiated
    assert len(drv.request(8, timeout=SHORT)) > 0


def test_a_device_needs_one_layout(qemu_binary: QemuBinary) -> None:
    """QEMU refuses a virtio-pci device with both the legacy and the modern interface disabled,
    naming both properties (virtio_pci_realize): there would be nothing for a driver to bind."""
    spec = MachineSpec(machine="q35")
    spec.add_device("virtio-rng-pci", {"disable-legacy": "on", "disable-modern": "on"})
    message = refusal(qemu_binary, spec)
    assert "neither modern nor legacy mode is enabled" in message
    assert "disable-modern or disable-legacy" in message


# -- a shared memory region (§4.1.4.7) -----------------------------------------------------------------

GPU_HOSTMEM = 64 << 20
GPU_SHM_ID_HOST_VISIBLE = 1  # VIRTIO_GPU_SHM_ID_HOST_VISIBLE: virtio-gpu host visible memory (virtio 1.2 §5.7)


@pytest.mark.conformance("pci-shm-cap-within-bar", spec="4.1.4.7.1")
def test_shared_memory_capability(qemu_binary: QemuBinary, machine_factory: MachineFactory) -> None:
    """A device with a shared memory region describes it with a VIRTIO_PCI_CAP_SHARED_MEMORY_CFG
    capability (struct virtio_pci_cap64): the region given by offset/offset_hi and
    length/length_hi MUST lie within the BAR cap.bar names, and cap.id MUST be unique for the
    device. Driven on virtio-gpu-pci with ``hostmem`` (no driver: only the function is read),
    whose modern structures then move to another BAR than the region's."""
    try:
        qemu_binary.check_properties("virtio-gpu-pci", ["hostmem"])
    except UnknownFlag as exc:
        pytest.skip(f"{qemu_binary.path} cannot run this: {exc}")
    spec = MachineSpec(machine="q35")
    spec.add_device("virtio-gpu-pci", id="gpu", hostmem=str(GPU_HOSTMEM))
    vm = machine_factory(spec)
    fn = vm.pci_function("gpu")
    vmap = VirtioPciMap.of(fn)
    shm = [c for c in vmap.caps if c.cfg_type == layout.CFG_TYPE_SHARED_MEMORY]
    assert len(shm) == 1, "virtio-gpu with hostmem presents one shared memory region"
    ids = [c.id for c in shm]
    assert len(set(ids)) == len(ids)
    cap = shm[0]
    assert cap.cap_len >= layout.VIRTIO_PCI_CAP64.size
    raw = b"".join(fn.read_config(cap.cap_offset + at, 4).to_bytes(4, "little") for at in range(0, 24, 4))
    fields = layout.VIRTIO_PCI_CAP64.unpack(raw)
    offset = fields["offset_hi"] << 32 | fields["offset"]
    length = fields["length_hi"] << 32 | fields["length"]
    assert (cap.id, length) == (GPU_SHM_ID_HOST_VISIBLE, GPU_HOSTMEM)
    assert offset + length <= fn.bar(cap.bar).size, f"region {offset:#x}+{length:#x} past BAR{cap.bar}"
    assert vmap.common is not None and vmap.common.bar != cap.bar
