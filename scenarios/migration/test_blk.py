"""virtio-blk across a live migration: the driver keeps its rings, the destination continues
them (virtio 1.2 §2.7, §5.2; QEMU's docs/devel/migration: device state and guest RAM move, the
guest does not re-initialise).

Each scenario migrates with the ``migrate`` fixture (to ``--migrate-to``, else the same binary)
and then checks a full round trip and QEMU's own view of the device against the driver's.
"""

from __future__ import annotations

import os

import pytest
from pytest_qtest_virtio.migration import Migrate

from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.blk.encoding import BlkReqType, BlkRequest, BlkStatus

from ._support import assert_view_matches

pytestmark = pytest.mark.virtio_device("virtio-blk-pci", refuse_each=False)


def test_idle_device_migrates(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """A device at DRIVER_OK with nothing in flight: on the destination the same rings serve
    a write and a read, the data is in the (shared) image, and QEMU's view is the driver's."""
    data = os.urandom(1024)
    virtio_device.write(8, data)
    dest = migrate()
    assert_view_matches(dest, virtio_device)
    assert virtio_device.read(8, 2) == data
    more = os.urandom(512)
    virtio_device.write(100, more)
    assert virtio_device.image.read(100 * 512, 512) == more


def test_available_requests_complete_on_the_destination(virtio_device: VirtioBlk, migrate: Migrate) -> None:
    """Requests made available but not notified before migration are the destination's to
    serve: after a notify there they complete, with the used length of a read (data + status)."""
    data = os.urandom(512)
    virtio_device.image.write(64 * 512, data)
    vq = virtio_device.queues[0]
    req = BlkRequest(BlkReqType.IN, 64, data_in_len=512)
    pending = virtio_device.submit(req, kick=False)
    dest = migrate()
    assert_view_matches(dest, virtio_device, in_flight=1)
    vq.kick(force=True)
    done = virtio_device.complete(pending)
    assert done.status is BlkStatus.OK and done.data == data
    assert done.used_len == 512 + 1
