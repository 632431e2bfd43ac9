"""Hot-plug and hot-unplug of each virtio device, driven as a guest and its firmware would
(qtest_virtio/pci/hotplug.py): on q35 behind a ``pcie-root-port`` with native PCI Express
hot-plug (PCIe 4.0 §6.7; QEMU hw/pci/pcie.c ``pcie_cap_slot_*``), on pc through PIIX4's ACPI
hot-plug registers (hw/acpi/pcihp.c). The ``virtio_device(..., hotplug=True)`` fixture plugs the
device after start and initialises it to DRIVER_OK; ``qemu.unplug`` / ``qemu.plug`` do the rest.

Regression scenarios: the virtio spec says nothing of hot-plug, so what they assert is QEMU's
implemented behaviour. A device is gone when ``DEVICE_DELETED`` came, QMP ``query-pci`` no
longer lists it and its config space reads as no function (vendor id 0xffff). Its backend
(``-blockdev``, ``-netdev``, ``-chardev``, ``-object``) is the machine's, not the device's,
so it survives ``device_del`` and a re-plug under the same id is wired to it again
(qdev-monitor.c; hw/block/virtio-blk.c ``blockdev_mark_auto_del`` only deletes ``-drive``s).

What happens to requests in flight at unplug is each device's unrealize: virtio-blk drains its
BlockBackend first (``virtio_blk_device_unrealize``: ``blk_drain``, which lets throttled
requests go), so held reads complete with their data; virtio-scsi's disk is unrealized first
(``scsi_qdev_unrealize`` → ``scsi_device_purge_requests``), which cancels them (ABORTED,
``virtio_scsi_request_cancelled``) and drains the disk, so one whose I/O the drain finishes
first completes GOOD; the other devices delete their queues
(``virtio_del_queue``) with the buffers the driver made available unused.
"""

from __future__ import annotations

import array
import fcntl
import termios
import time
from typing import Any

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import NetBackend, RngFifo, SerialBackend
from qtest_virtio.devices.balloon.driver import VirtioBalloon
from qtest_virtio.devices.base import VirtioDriver
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.blk.encoding import SECTOR_SIZE, BlkReqType, BlkRequest, BlkStatus
from qtest_virtio.devices.console.driver import VirtioConsole
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import ethernet_frame
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.devices.scsi.driver import VirtioScsi
from qtest_virtio.devices.scsi.encoding import Op, ScsiResponse, cdb_rw10
from qtest_virtio.pci import PciFunction
from qtest_virtio.testing import alloc_bufs, pattern
from qtest_virtio.transport.layout import STATUS
from qtest_virtio.virtqueue import Virtqueue

#: How long a request made available must stay unused for the test to call it held.
HELD = 0.05
#: A frame from a peer MAC to the device's default one (QEMU's 52:54:00:12:34:56).
PEER_MAC = "02:00:00:00:00:01"
DEVICE_MAC = "52:54:00:12:34:56"
#: IPv4 Experimental ethertype (IEEE 802 local experimental 1).
ETHERTYPE = 0x88B5
#: virtio-scsi: a READ(10) this large fills the 4 KiB/s throttle bucket (about 16 s): the next waits.
HELD_BLOCKS = 128
READ_BPS = 4096
DRIVER_OK = STATUS.DRIVER_OK.mask


def _marker(device: str, **kw: Any) -> pytest.MarkDecorator:
    return pytest.mark.virtio_device(device, hotplug=True, refuse_each=False, **kw)


def _quiet(qemu: Machine, seconds: float = HELD) -> None:
    """Give QEMU's main loop turns (each qtest command is one) for what it would do anyway."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        qemu.qtest.readl(0)


def _unused(vq: Virtqueue) -> bool:
    return vq.poll_used() is None


def _fifo_bytes(fifo: RngFifo) -> int:
    """Bytes written to the FIFO that nobody has read yet (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fifo.fd, termios.FIONREAD, buf)
    return buf[0]


def assert_gone(qemu: Machine, dev_id: str, fn: PciFunction) -> None:
    """The device is deleted: query-pci has no such id and its function reads as absent."""
    assert qemu.pci_address(dev_id) is None, f"query-pci still lists {dev_id} after DEVICE_DELETED"
    vendor = qemu.pci.config.read(fn.bdf_addr, 0, 2)
    assert vendor == 0xFFFF, f"{fn.bdf} still answers config reads (vendor id {vendor:#06x}) after the unplug"
    assert fn not in qemu.pci.devices(), f"{fn.bdf} is still enumerated after the rescan"
    assert qemu.alive, "QEMU exited during the unplug"


class HotplugScenarios:
    """The scenarios every device runs; a subclass per device sets the marker and says what a
    round trip and requests in flight are for it."""

    def round_trip(self, drv: Any, qemu: Machine) -> None:
        raise NotImplementedError

    def hold_requests(self, drv: Any, qemu: Machine) -> Any:
        """Requests made available that the device has not used (and will not use by itself
        within the unplug); returns what :meth:`check_held` needs."""
        raise NotImplementedError

    def check_held(self, drv: Any, qemu: Machine, held: Any) -> None:
        """After DEVICE_DELETED: what QEMU's unrealize did with them."""
        raise NotImplementedError

    def after_unplug(self, drv: Any, qemu: Machine) -> None:
        """After the in-flight unplug, the host end of the backend the device left behind acts
        (a frame, entropy, console input): QEMU takes it without the device, and survives."""

    # -- the scenarios --------------------------------------------------------------------

    def test_plug_unplug_at_rest_and_replug(self, virtio_device: VirtioDriver, qemu: Machine) -> None:
        """A hot-plugged device initialises to DRIVER_OK (the fixture) and serves a round trip;
        on q35 it sits behind the hot-plug root port the spec added for it. Unplugged at rest
        it is gone after DEVICE_DELETED; plugged again under the same id, on the same backend,
        the new device initialises from reset and serves a round trip again."""
        drv = virtio_device
        assert drv.check_status() & DRIVER_OK, "DRIVER_OK is not set after initialisation"
        port = qemu.pci.bridge_of(drv.fn)
        if "q35" in qemu.spec.machine:
            assert port is not None and port.reserved is not None, "not behind a hot-plug root port"
        else:
            assert port is None, "on pc the device is plugged into the root bus"
        self.round_trip(drv, qemu)
        fn = drv.fn
        qemu.unplug(drv.dev_id)
        assert_gone(qemu, drv.dev_id, fn)
        again_fn = qemu.plug(drv.dev_id)
        assert again_fn.bdf_addr == fn.bdf_addr and again_fn is not fn
        again = qemu.virtio(drv.dev_id, type(drv), interrupts=drv.interrupts.value)
        assert again.fn is again_fn
        self.round_trip(again, qemu)

    def test_unplug_with_requests_in_flight(self, virtio_device: VirtioDriver, qemu: Machine) -> None:
        """Requests the device holds when it is unplugged: QEMU does not crash, completes or
        drops them as its unrealize does (module docstring), and deletes the device."""
        drv = virtio_device
        held = self.hold_requests(drv, qemu)
        fn = drv.fn
        qemu.unplug(drv.dev_id)
        assert_gone(qemu, drv.dev_id, fn)
        self.check_held(drv, qemu, held)
        self.after_unplug(drv, qemu)
        assert qemu.alive

    def test_device_del_racing_a_reset(self, virtio_device: VirtioDriver, qemu: Machine) -> None:
        """The driver writes status 0 while an unplug is under way: first between
        ``device_del`` and the guest's eject / slot power-off (the reset completes, status
        reads 0), then, on the device plugged again, after them (a write to a function that
        is gone). QEMU survives both and deletes the device each time."""
        drv = virtio_device
        fn = drv.fn
        qemu.request_unplug(drv.dev_id)
        drv.transport.reset()
        assert drv.transport.get_status() == 0
        qemu.finish_unplug(drv.dev_id)
        assert_gone(qemu, drv.dev_id, fn)
        qemu.plug(drv.dev_id)
        again = qemu.virtio(drv.dev_id, type(drv), interrupts=drv.interrupts.value)
        fn = again.fn
        qemu.request_unplug(drv.dev_id)
        qemu.finish_unplug(drv.dev_id)
        again.transport.set_status(0)
        assert_gone(qemu, drv.dev_id, fn)


# -- the devices ------------------------------------------------------------------------------


@_marker("virtio-blk-pci")
class TestBlk(HotplugScenarios):
    def round_trip(self, drv: VirtioBlk, qemu: Machine) -> None:
        data = pattern(4 * SECTOR_SIZE, seed=15)
        drv.write(8, data)
        assert drv.read(8, 4) == data
        assert drv.image.read(8 * SECTOR_SIZE, len(data)) == data, "the write did not reach the image"

    def hold_requests(self, drv: VirtioBlk, qemu: Machine) -> Any:
        data = pattern(8 * SECTOR_SIZE, seed=7)
        drv.image.write(0, data)
        qemu.throttle_reads(drv.dev_id, 1)
        drv.read(0, 1)  # spends the throttle's budget: the next reads wait
        held = [drv.submit(BlkRequest(BlkReqType.IN, 2 * i, data_in_len=2 * SECTOR_SIZE)) for i in range(3)]
        _quiet(qemu)
        assert _unused(drv.queues[0]), "a throttled read completed at once: nothing is held"
        return held, data

    def check_held(self, drv: VirtioBlk, qemu: Machine, held: Any) -> None:
        pending, data = held
        for i, p in enumerate(pending):  # blk_drain before the queues are deleted: they complete
            resp = drv.complete(p, timeout=2.0)
            assert resp.status is BlkStatus.OK, f"held read {i} completed with {resp.status.name}"
            assert resp.data == data[2 * i * SECTOR_SIZE : (2 * i + 2) * SECTOR_SIZE]
            assert resp.used_len == 2 * SECTOR_SIZE + 1


@_marker("virtio-scsi-pci")
class TestScsi(HotplugScenarios):
    def round_trip(self, drv: VirtioScsi, qemu: Machine) -> None:
        drv.wait_ready()
        assert drv.inquiry().vendor.strip() == "QEMU"
        data = pattern(2 * 512, seed=5)
        drv.write10(4, data)
        assert drv.read10(4, 2) == data

    def hold_requests(self, drv: VirtioScsi, qemu: Machine) -> Any:
        drv.wait_ready()
        data = pattern(3 * 8 * 512 + HELD_BLOCKS * 512, seed=11)
        drv.image.write(0, data)
        limits = {"bps": 0, "bps_rd": READ_BPS, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
        qemu.qmp.cmd("block_set_io_throttle", id=f"{drv.dev_id}-hd", **limits)
        assert drv.command(cdb_rw10(Op.READ_10, 0, HELD_BLOCKS), data_in_len=HELD_BLOCKS * 512).good
        held = [
            drv.submit(cdb_rw10(Op.READ_10, 8 * i, HELD_BLOCKS), data_in_len=HELD_BLOCKS * 512, tag=i + 1)
            for i in (1, 2)
        ]
        _quiet(qemu)
        assert all(_unused(vq) for vq in drv.request_queues), "a throttled READ completed at once"
        return held, data

    def check_held(self, drv: VirtioScsi, qemu: Machine, held: Any) -> None:
        """The disk goes first: its requests are cancelled (ABORTED) and the drain lets the
        throttled I/O go, so a READ whose I/O finishes before its cancellation is handled
        completes GOOD with its data (scsi_device_purge_requests runs both). None is lost."""
        pending, data = held
        for i, p in zip((1, 2), pending, strict=True):
            result = drv.complete(p, timeout=2.0)
            assert result.response in (ScsiResponse.ABORTED, ScsiResponse.OK), f"READ {i}: {result.response.name}"
            if result.response is ScsiResponse.OK:
                assert result.good and result.data == data[8 * i * 512 : (8 * i + HELD_BLOCKS) * 512]


@_marker("virtio-net-pci")
class TestNet(HotplugScenarios):
    def round_trip(self, drv: VirtioNet, qemu: Machine) -> None:
        host = qemu.backend(drv.dev_id, NetBackend)
        out = ethernet_frame(PEER_MAC, DEVICE_MAC, ETHERTYPE, b"hotplug out")
        drv.send(out)
        assert host.receive(timeout=2) == out
        back = ethernet_frame(DEVICE_MAC, PEER_MAC, ETHERTYPE, b"hotplug in")
        host.send(back)
        assert drv.receive(timeout=2) == back

    def hold_requests(self, drv: VirtioNet, qemu: Machine) -> Any:
        _quiet(qemu)  # the receive buffers the driver posted at DRIVER_OK wait for frames
        assert _unused(drv.queues[0]), "a receive buffer was used without a frame"

    def check_held(self, drv: VirtioNet, qemu: Machine, held: Any) -> None:
        assert _unused(drv.queues[0]), "an unplugged device returned receive buffers"

    def after_unplug(self, drv: VirtioNet, qemu: Machine) -> None:
        # The netdev has no peer now: a frame from the host goes nowhere.
        qemu.backend(drv.dev_id, NetBackend).send(ethernet_frame(DEVICE_MAC, PEER_MAC, ETHERTYPE, b"late"))
        _quiet(qemu)
        assert _unused(drv.queues[0])


@_marker("virtio-rng-pci", backend="fifo")
class TestRng(HotplugScenarios):
    @pytest.mark.regression("hotplug-rng-unplug-pending-entropy")
    def test_unplug_with_requests_in_flight(self, virtio_device: VirtioDriver, qemu: Machine) -> None:
        """As for every device, and then: entropy written after the unplug is not read for the
        gone device (QEMU crashes where a request of it was left in the backend)."""
        super().test_unplug_with_requests_in_flight(virtio_device, qemu)

    def round_trip(self, drv: VirtioRng, qemu: Machine) -> None:
        data = pattern(32, seed=9)
        qemu.backend(drv.dev_id, RngFifo).write(data)
        assert drv.read(len(data)) == data

    def hold_requests(self, drv: VirtioRng, qemu: Machine) -> Any:
        vq = drv.queues[0]
        token = vq.add(alloc_bufs(drv.memory, [16], fill=0))
        vq.kick(force=True)
        _quiet(qemu)  # the FIFO is empty: the request waits for entropy
        assert _unused(vq), "a request completed with nothing in the FIFO"
        return token

    def check_held(self, drv: VirtioRng, qemu: Machine, held: Any) -> None:
        assert _unused(drv.queues[0]), "the unplugged device used the waiting request"

    def after_unplug(self, drv: VirtioRng, qemu: Machine) -> None:
        """Entropy arriving after the device went away stays in the FIFO: nothing of the device
        may still be waiting for it in the backend (``rng-random`` reads only while a request
        is queued, backends/rng-random.c). A request left there is served into freed memory."""
        fifo = qemu.backend(drv.dev_id, RngFifo)
        late = pattern(64, seed=1)
        fifo.write(late)
        _quiet(qemu, 0.2)  # a QEMU that crashes on it fails here, in the test
        left = _fifo_bytes(fifo)
        assert left == len(late), (
            f"QEMU read {len(late) - left} bytes of entropy for the unplugged device: a request of it "
            "was left queued in the rng backend (and its callback runs on the freed device)"
        )
        assert _unused(drv.queues[0])


@_marker("virtio-serial-pci")
class TestConsole(HotplugScenarios):
    def round_trip(self, drv: VirtioConsole, qemu: Machine) -> None:
        end = qemu.backend(drv.dev_id, SerialBackend)["console"]
        drv.write(b"ping", 0)
        assert end.read(4) == b"ping"
        end.write(b"pong")
        assert drv.read(4, 0) == b"pong"

    def hold_requests(self, drv: VirtioConsole, qemu: Machine) -> Any:
        _quiet(qemu)  # port 0's receive buffers wait for the host to write
        rxq = drv.queues[drv.rx_queue(0)]
        assert _unused(rxq), "a receive buffer was used without data"
        return rxq

    def check_held(self, drv: VirtioConsole, qemu: Machine, held: Any) -> None:
        assert _unused(held), "the unplugged device used a receive buffer"

    def after_unplug(self, drv: VirtioConsole, qemu: Machine) -> None:
        qemu.backend(drv.dev_id, SerialBackend)["console"].write(b"late")  # no frontend to take it
        _quiet(qemu)


@_marker("virtio-balloon-pci", interrupts="isr")  # INTx behind a root port is not routed (pci/intx.py)
class TestBalloon(HotplugScenarios):
    def round_trip(self, drv: VirtioBalloon, qemu: Machine) -> None:
        ram = qemu.spec.memory_bytes
        qemu.qmp.cmd("balloon", value=ram - 4 * 4096)
        assert drv.num_pages == 4
        drv.inflate(4)
        info = qemu.qmp.cmd("query-balloon")
        assert isinstance(info, dict) and info["actual"] == ram - 4 * 4096

    def hold_requests(self, drv: VirtioBalloon, qemu: Machine) -> Any:
        if not drv.has("STATS_VQ"):
            pytest.skip("no STATS_VQ: the balloon holds no buffer between requests")
        statsq = drv.queues[2]
        _quiet(qemu)  # the stats buffer posted at DRIVER_OK stays with the device until polled
        assert _unused(statsq)
        return statsq

    def check_held(self, drv: VirtioBalloon, qemu: Machine, held: Any) -> None:
        assert _unused(held), "the unplugged device returned the stats buffer"
