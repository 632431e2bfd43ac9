"""What the fuzzer aims at: a profile per device (its queues, each with a valid request, and the
check that the device serves one) and the :class:`~.actions.Target` of a started driver (its
register windows, rings, config address and MSI-X table).

Data-driven: add a profile to :data:`DEVICES` to fuzz another device.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends import NetBackend, SerialBackend
from ..errors import QtestVirtioError
from ..pci.config import Cf8Access
from ..transport import LegacyTransport, ModernTransport
from ..virtqueue import PackedVirtqueue, SplitVirtqueue
from ..vm import Machine
from .actions import Request, Target, Window

#: The id of the device under fuzz in the example's machine.
DEVICE_ID = "fuzz0"


def _rng_check(vm: Machine, driver: Any, timeout: float) -> None:
    data = driver.read(16, timeout=timeout)
    if len(data) != 16:
        raise QtestVirtioError(f"virtio-rng returned {len(data)} bytes for 16")


def _blk_check(vm: Machine, driver: Any, timeout: float) -> None:
    data = driver.read(0, 1, timeout=timeout)
    if len(data) != 512:
        raise QtestVirtioError(f"virtio-blk read returned {len(data)} bytes for one sector")


_CHECK_FRAME = bytes.fromhex("020000000001020000000002") + b"\x88\xb5" + b"qtest-virtio fuzz check".ljust(46, b".")


def _net_check(vm: Machine, driver: Any, timeout: float) -> None:
    """A frame transmitted reaches the socket backend (earlier frames of the abuse skipped)."""
    host = vm.backend(DEVICE_ID)
    assert isinstance(host, NetBackend)
    while host.pending():  # the abuse's frames: a peer that never reads stalls the transmit path
        host.receive(timeout=timeout)
    driver.send(_CHECK_FRAME, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.receive(timeout=max(deadline - time.monotonic(), 0.01)) == _CHECK_FRAME:
            return
    raise QtestVirtioError("virtio-net: the transmitted check frame never reached the backend")


def _console_check(vm: Machine, driver: Any, timeout: float) -> None:
    """Bytes written to port 0 reach the chardev behind it."""
    backend = vm.backend(DEVICE_ID)
    assert isinstance(backend, SerialBackend)
    end = backend["console"]
    # The abuse's bytes first: a chardev whose peer never reads stays full (1-byte writes fill
    # a socket's buffer after a few hundred), and what the port is given then is not delivered.
    end.read_available(timeout=0.05)
    driver.write(b"qtest-virtio fuzz check\n", 0, timeout=timeout)
    seen = b""
    deadline = time.monotonic() + timeout
    while b"fuzz check" not in seen:
        if time.monotonic() > deadline:
            raise QtestVirtioError(f"virtio-console: port 0 bytes never reached the chardev (got {seen[-64:]!r})")
        seen += end.read_available(timeout=0.05)


def _scsi_check(vm: Machine, driver: Any, timeout: float) -> None:
    from ..devices.scsi import InquiryData, cdb_inquiry

    result = driver.checked(cdb_inquiry(96), data_in_len=96, timeout=timeout)
    inquiry = InquiryData.parse(result.data)
    if not inquiry.vendor:
        raise QtestVirtioError(f"virtio-scsi INQUIRY came back empty: {inquiry!r}")


def _balloon_check(vm: Machine, driver: Any, timeout: float) -> None:
    driver.inflate(1, timeout=timeout)
    driver.deflate(1, timeout=timeout)


_NET_TX: Request = ((12 + len(_CHECK_FRAME), False, bytes(12) + _CHECK_FRAME),)
#: VIRTIO_NET_CTRL_RX / VIRTIO_NET_CTRL_RX_PROMISC on, then the ack byte (virtio 1.2 §5.1.6.5).
_NET_CTRL: Request = ((2, False, b"\x00\x00"), (1, False, b"\x01"), (1, True, b""))
#: VIRTIO_CONSOLE_PORT_READY for port 0 (virtio 1.2 §5.3.6.2).
_CONSOLE_CONTROL: Request = ((8, False, struct.pack("<IHH", 0, 3, 1)),)
#: TEST UNIT READY to target 0 LUN 0: virtio_scsi_req_cmd (cdb_size 32), then its response.
_SCSI_CMD: Request = ((51, False, bytes([1, 0, 0x40, 0]) + bytes(47)), (108, True, b""))
#: VIRTIO_SCSI_T_TMF / LOGICAL_UNIT_RESET, then the response byte (virtio 1.2 §5.6.6.2).
_SCSI_TMF: Request = ((24, False, struct.pack("<II", 0, 5) + bytes([1, 0, 0x40, 0]) + bytes(12)), (1, True, b""))


@dataclass(frozen=True)
class DeviceProfile:
    """A device the fuzzer knows: how to check it serves a valid request, and the queues it
    aims at, each with a valid request's buffers (length, device-writable, contents) that
    ResetInFlight, IdReuse and MisshapenRequest build on."""

    name: str
    check: Callable[[Machine, Any, float], None]
    queues: dict[int, Request]
    props: tuple[tuple[str, str], ...] = ()

    @property
    def default_queue(self) -> int:
        return next(iter(self.queues))


#: Devices, data-driven: add a profile to fuzz another device. The first queue is the default.
DEVICES: dict[str, DeviceProfile] = {
    "virtio-rng-pci": DeviceProfile("virtio-rng-pci", _rng_check, {0: ((64, True, b""),)}),
    "virtio-blk-pci": DeviceProfile(
        "virtio-blk-pci",
        _blk_check,
        {0: ((16, False, struct.pack("<IIQ", 0, 0, 0)), (512, True, b""), (1, True, b""))},
    ),
    "virtio-net-pci": DeviceProfile("virtio-net-pci", _net_check, {1: _NET_TX, 2: _NET_CTRL}),
    "virtio-serial-pci": DeviceProfile(
        "virtio-serial-pci", _console_check, {1: ((8, False, b"fuzzdata"),), 3: _CONSOLE_CONTROL}
    ),
    "virtio-scsi-pci": DeviceProfile("virtio-scsi-pci", _scsi_check, {2: _SCSI_CMD, 0: _SCSI_TMF}),
    "virtio-balloon-pci": DeviceProfile(
        "virtio-balloon-pci", _balloon_check, {0: ((4, False, bytes(4)),), 2: ((10, False, bytes(10)),)}
    ),
}


def make_target(vm: Machine, driver: Any, device: DeviceProfile, queue: int) -> Target:
    """The target of the driver's device: windows from its transport, the queue's rings, the
    function's config address, pci_cfg capability and MSI-X table, and a zeroed scratch area
    from the guest allocator."""
    tr = driver.transport
    fn = driver.fn
    windows: list[Window] = []

    def bar_window(name: str, index: int, offset: int, length: int) -> None:
        bar = fn.bar(index)
        if bar.address is not None:
            windows.append(Window(name, bar.is_io, bar.address + offset, max(length, 1)))

    mult = 4
    if isinstance(tr, ModernTransport):
        for name, cap in (("common", tr.common_cap), ("notify", tr.notify_cap), ("isr", tr.isr_cap)):
            bar_window(name, cap.bar, cap.offset, cap.length)
        if tr.device_cap is not None:
            bar_window("device", tr.device_cap.bar, tr.device_cap.offset, tr.device_cap.length)
        mult = tr.notify_cap.notify_off_multiplier
    legacy_bar = next((b for b in fn.bars if b.index == 0 and b.is_io), None)
    if legacy_bar is not None:
        bar_window("legacy", 0, 0, legacy_bar.size)
    if queue >= len(driver.queues):
        raise QtestVirtioError(f"{device.name}: queue {queue} is not set up (the driver has {len(driver.queues)})")
    vq = driver.queues[queue]
    if isinstance(vq, PackedVirtqueue):
        desc, avail, used = vq.ring, vq.driver_event, vq.device_event
    else:
        assert isinstance(vq, SplitVirtqueue)
        desc, avail, used = vq.desc, vq.avail, vq.used
    msix = driver.msix
    scratch_size = 0x10000
    scratch = vm.memory.alloc(scratch_size, 4096, tag="fuzz scratch", zero=True)
    return Target(
        device=device.name,
        mode=driver.mode,
        legacy=isinstance(tr, LegacyTransport),
        windows=tuple(windows),
        num_queues=len(driver.queues),
        msix_table=driver.msix.table_size if driver.msix is not None else 0,
        packed=isinstance(vq, PackedVirtqueue),
        queue_size=vq.size,
        desc=desc,
        avail=avail,
        used=used,
        ram_start=vm.memory.start,
        ram_end=vm.memory.end,
        scratch=scratch,
        scratch_size=scratch_size,
        notify_multiplier=mult,
        queue=queue,
        avail_idx=vq.next_avail if isinstance(vq, PackedVirtqueue) else 0,
        wrap=vq.avail_wrap if isinstance(vq, PackedVirtqueue) else 1,
        request=device.queues[queue],
        config_address=Cf8Access.address(fn.bdf_addr, 0),
        pci_cfg_cap=tr.pci_cfg_cap.cap_offset if isinstance(tr, ModernTransport) and tr.pci_cfg_cap else 0,
        msix_table_addr=_bar_addr(fn, msix.table_bar, msix.table_offset) if msix else 0,
        msix_pba_addr=_bar_addr(fn, msix.pba_bar, msix.pba_offset) if msix else 0,
    )


def _bar_addr(fn: Any, index: int, offset: int) -> int:
    address = fn.bar(index).address
    return 0 if address is None else int(address) + offset
