"""Per-test state the plugin's fixtures share (kept apart so fixture modules can import it)."""

from __future__ import annotations

import pytest

from qtest_virtio import Machine
from qtest_virtio.machine import QemuMachine

#: Every machine a test started (teardown stops them; failure reports quote them).
MACHINES_KEY = pytest.StashKey[list[QemuMachine]]()
#: The machine the ``virtio_device`` fixture's driver talks to now (after a migration, the
#: destination).
VIRTIO_MACHINE_KEY = pytest.StashKey[Machine]()
