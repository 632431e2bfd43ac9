"""The ``migrate`` fixture: live-migrate the test's machine, drivers and all, mid-test.

A QEMU developer's migration test reads as the guest sees it::

    def test_write_survives(virtio_device: VirtioBlk, migrate: Migrate) -> None:
        virtio_device.write(0, data)
        dest = migrate()                       # a new QEMU; the driver now talks to it
        assert virtio_device.read(0, 1) == data

The destination binary is ``--migrate-to`` (env ``QEMU_MIGRATE_TO``), else the test's own; the
machine type is the test's. A migration that cannot be attempted here (a property or a machine
type the destination lacks) skips with the reason; one QEMU refuses fails the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from qtest_virtio import Machine
from qtest_virtio.binary import QemuBinary, QemuNotFound
from qtest_virtio.errors import MigrationUnsupported

from .stash import MACHINES_KEY, VIRTIO_MACHINE_KEY

Migrate = Callable[..., Machine]
MIGRATE_ENV = "QEMU_MIGRATE_TO"


def destination_qemu(config: pytest.Config) -> str | None:
    """The ``--migrate-to`` binary (or $QEMU_MIGRATE_TO); None: the source's own."""
    return config.getoption("--migrate-to") or os.environ.get(MIGRATE_ENV) or None


@pytest.fixture
def migrate(request: pytest.FixtureRequest) -> Migrate:
    """``migrate(vm=None, *, qemu=None, machine=None, keep_source=False) -> Machine``: migrate
    ``vm`` (default: the machine the test drives now, the ``qemu`` fixture's or the last
    destination) to a new QEMU and return it; the ``virtio_device`` driver carries over."""

    def do(
        vm: Machine | None = None, *, qemu: str | None = None, machine: str | None = None, keep_source: bool = False
    ) -> Machine:
        if vm is None:
            vm = request.node.stash.get(VIRTIO_MACHINE_KEY, None) or request.getfixturevalue("qemu")
        assert vm is not None
        target = qemu or destination_qemu(request.config) or vm.binary.path
        try:
            target = QemuBinary.get(target).path
        except QemuNotFound as exc:  # a path the user named: their mistake, not a skip
            pytest.fail(f"--migrate-to / ${MIGRATE_ENV}: {exc}", pytrace=False)
        spec = vm.spec.clone(qemu=target, machine=machine)
        try:
            dest = vm.migrate_to(spec, keep_source=keep_source)
        except MigrationUnsupported as exc:
            pytest.skip(f"cannot migrate here: {exc}")
        request.node.stash[MACHINES_KEY].append(dest)
        request.node.stash[VIRTIO_MACHINE_KEY] = dest
        return dest

    return do
