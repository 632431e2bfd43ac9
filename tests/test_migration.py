"""Machine.migrate_to and the ``migrate`` fixture, against real QEMU: what carries over (guest
RAM, PCI state, the driver objects, shared images, IRQ interception), what is refused before
anything moves (MigrationUnsupported, by name), what QEMU refuses (MigrationError, with the
feature named and both sides' stderr), and that no process or directory outlives either side.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest
from conftest import EXE, qmp_object

from qtest_virtio import Machine, MachineSpec, MigrationError, MigrationUnsupported
from qtest_virtio.binary import QemuBinary
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.rng.driver import VirtioRng
from qtest_virtio.introspect import device_view

RAM = 0x300000


def _spec(binary: QemuBinary, machine: str = "q35", **props: str) -> MachineSpec:
    spec = MachineSpec(qemu=binary.path, machine=machine)
    spec.add_virtio("virtio-blk-pci", props, id="blk0", mode="modern")
    return spec


def _qemu_pids() -> set[int]:
    """QEMU processes this test process started (other engineers' QEMUs run beside us)."""
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    exe = f.read().split(b"\0")[0]
            except (OSError, IndexError, ValueError):
                continue
            if ppid == os.getpid() and b"qemu-system" in exe:
                out.add(int(pid))
    return out


def test_guest_ram_pci_and_the_driver_carry_over(qemu_binary: QemuBinary) -> None:
    """After migrate_to, the same QtestClient object talks to the destination: guest RAM written
    on the source reads back there, the driver's rings go on without re-initialising, the source
    is gone with its directory, and the destination runs as the source did."""
    with Machine(_spec(qemu_binary)) as vm:
        blk = vm.virtio("blk0", VirtioBlk)
        client = vm.qtest
        vm.qtest.memwrite(RAM, b"migrated RAM")
        blk.write(3, b"S" * 512)
        src_dir, src_pid = vm.workdir, vm.pid
        dest = vm.migrate_to()
        with dest:
            assert dest.qtest is client and dest.pid != src_pid
            assert not vm.alive and not os.path.exists(src_dir)
            assert client.memread(RAM, 12) == b"migrated RAM"
            assert qmp_object(dest, "query-status")["status"] == "running"
            assert "DRIVER_OK" in device_view(dest, "blk0").status
            assert blk.read(3, 1) == b"S" * 512  # no re-initialisation: the same rings
            assert dest.pci is not None and dest.memory is blk.memory


def test_images_are_one_file_that_outlives_the_source(qemu_binary: QemuBinary) -> None:
    """The destination's image is a hard link to the source's: what the guest wrote on either
    side is in the file the driver's backend handle names, also after the source is gone."""
    with Machine(_spec(qemu_binary)) as vm:
        blk = vm.virtio("blk0", VirtioBlk)
        blk.write(0, b"1" * 512)
        old = blk.image.path
        with vm.migrate_to() as dest:
            new = blk.image.path
            assert new != old and os.path.dirname(new) == dest.workdir
            assert os.stat(new).st_nlink == 1  # the source's name went with its directory
            blk.write(1, b"2" * 512)
            assert blk.image.read(0, 1024) == b"1" * 512 + b"2" * 512


def test_intercepted_irqs_follow_the_migration(qemu_binary: QemuBinary) -> None:
    """A driver on INTx intercepted the IOAPIC on the source; the destination is intercepted too.
    The interrupt the source left pending is still in the ISR there (device state); QEMU's qtest
    server starts its line table low on the destination, and so does the client; once the ISR
    read acknowledges it, the next request's interrupt is reported by the destination."""
    spec = MachineSpec(qemu=qemu_binary.path)
    spec.add_virtio("virtio-rng-pci", id="rng0", mode="legacy", vectors=0)
    with Machine(spec) as vm:
        rng = vm.virtio("rng0", VirtioRng, interrupts="intx")
        assert rng.intx is not None and len(rng.request(8)) == 8
        gsi = rng.intx.gsi
        vm.qtest.poll_irqs(0.2)
        assert vm.qtest.irq_levels.get(gsi), "the request's interrupt is pending, unacknowledged"
        with vm.migrate_to() as dest:
            assert not dest.qtest.get_irq(gsi)
            assert rng.transport.read_isr() & 1, "the pending interrupt carried over in the ISR"
            assert len(rng.request(8)) == 8
            dest.qtest.poll_irqs(0.5)
            assert (gsi, True) in dest.qtest.irq_events


def test_keep_source_leaves_it_postmigrate(qemu_binary: QemuBinary) -> None:
    with Machine(_spec(qemu_binary)) as vm:
        vm.virtio("blk0", VirtioBlk)
        with vm.migrate_to(keep_source=True) as dest:
            assert vm.alive and dest.alive
            assert qmp_object(vm, "query-status")["status"] == "postmigrate"


def test_what_cannot_migrate_is_refused_before_anything_starts(qemu_binary: QemuBinary) -> None:
    """A device missing on the destination, one of another model, one more, a machine type
    the destination lacks: MigrationUnsupported naming it, and no destination QEMU started."""
    with Machine(_spec(qemu_binary)) as vm:
        vm.virtio("blk0", VirtioBlk)
        pids = _qemu_pids()
        bare = MachineSpec(qemu=qemu_binary.path)
        with pytest.raises(MigrationUnsupported, match=r"destination spec has no device 'blk0'.*spec.clone"):
            vm.migrate_to(bare)
        other = MachineSpec(qemu=qemu_binary.path)
        other.add_virtio("virtio-rng-pci", id="blk0", mode="modern")
        with pytest.raises(MigrationUnsupported, match="virtio-blk-pci on the source but a virtio-rng-pci"):
            vm.migrate_to(other)
        more = vm.spec.clone()
        more.add_virtio("virtio-rng-pci", id="rng9")
        with pytest.raises(MigrationUnsupported, match="devices the source lacks: rng9"):
            vm.migrate_to(more)
        with pytest.raises(MigrationUnsupported, match=r"machine type 'pc-q35-1\.0' is not in QEMU"):
            vm.migrate_to(vm.spec.clone(machine="pc-q35-1.0"))
        assert _qemu_pids() <= pids
        assert vm.alive and qmp_object(vm, "query-status")["status"] == "running"


def test_a_refused_migration_names_the_feature_and_the_source_runs_on(qemu_binary: QemuBinary) -> None:
    """The destination's device does not offer EVENT_IDX, which the driver negotiated:
    virtio_load refuses it. The error names the feature, quotes the destination's stderr and
    QMP's view; the destination is torn down; the source runs on and serves requests."""
    with Machine(_spec(qemu_binary)) as vm:
        blk = vm.virtio("blk0", VirtioBlk)
        assert "EVENT_IDX" in blk.negotiated
        dest_spec = vm.spec.clone()
        dest_spec.device("blk0").props["event_idx"] = "off"
        pids = _qemu_pids()
        with pytest.raises(MigrationError) as info:
            vm.migrate_to(dest_spec)
        first = str(info.value).splitlines()[0]
        assert first.startswith(f"EVENT_IDX is not migratable to QEMU {qemu_binary.version_string} (q35): blk0")
        assert "Features 0x" in info.value.destination_stderr
        assert "destination QEMU stderr (tail):" in str(info.value)
        assert _qemu_pids() <= pids
        assert qmp_object(vm, "query-status")["status"] == "running"
        blk.write(5, b"5" * 512)
        assert blk.read(5, 1) == b"5" * 512


@pytest.fixture
def two_versions(provided_qemu: Callable[[str], QemuBinary]) -> tuple[QemuBinary, QemuBinary]:
    return provided_qemu("system"), provided_qemu("debian-10.0")


@pytest.mark.parametrize("direction", ["7.2->10.0", "10.0->7.2"])
def test_across_versions_on_a_7_2_machine_type(two_versions: tuple[QemuBinary, QemuBinary], direction: str) -> None:
    """7.2.22 <-> 10.0.2 with pc-q35-7.2 on both sides, split and packed: the data and the
    negotiated features survive, and the destination is the other version."""
    old, new = two_versions
    src, dst = (old, new) if direction.startswith("7.2") else (new, old)
    for packed in ("off", "on"):
        with Machine(_spec(src, "pc-q35-7.2", packed=packed)) as vm:
            blk = vm.virtio("blk0", VirtioBlk)
            blk.write(9, b"v" * 512)
            with vm.migrate_to(vm.spec.clone(qemu=dst.path)) as dest:
                assert dest.binary.version == dst.version
                assert blk.read(9, 1) == b"v" * 512
                assert set(blk.negotiated) <= device_view(dest, "blk0").guest_features


def test_a_property_or_alias_the_other_version_lacks_is_named(two_versions: tuple[QemuBinary, QemuBinary]) -> None:
    """10.0's virtio-blk-pci has ``in_order``, 7.2's has not; and ``q35`` is pc-q35-10.0 on one
    and pc-q35-7.2 on the other: both refused by name, with the fix."""
    old, new = two_versions
    with Machine(_spec(new, "pc-q35-7.2", in_order="on")) as vm:
        vm.virtio("blk0", VirtioBlk)
        with pytest.raises(MigrationUnsupported, match=r"in_order=on is not migratable to QEMU 7\.2\.22"):
            vm.migrate_to(vm.spec.clone(qemu=old.path))
    with Machine(_spec(new)) as vm, pytest.raises(MigrationUnsupported, match=r"--qemu-machine pc-q35-7\.2"):
        vm.migrate_to(vm.spec.clone(qemu=old.path))


def test_migrate_fixture_through_pytester(pytester: pytest.Pytester, qemu_binary: QemuBinary) -> None:
    """The fixture migrates the virtio_device test's machine, twice; the driver carries over;
    a --migrate-to that names no QEMU fails the test with that reason."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.virtio_device("virtio-blk-pci", transports=["modern"], rings=["split"], refuse_each=False)
        def test_twice(virtio_device, migrate, qemu):
            virtio_device.write(0, b"x" * 512)
            first = migrate()
            second = migrate()
            assert not qemu.alive and not first.alive and second.alive
            assert virtio_device.read(0, 1) == b"x" * 512
        """
    )
    pytester.runpytest("--qemu", qemu_binary.path, "-p", "no:cacheprovider").assert_outcomes(passed=1)
    res = pytester.runpytest("--qemu", qemu_binary.path, "--migrate-to", "/nonexistent/qemu", "-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*--migrate-to / $QEMU_MIGRATE_TO:*nonexistent*"])


def test_cli_runs_the_migration_scenarios_across_versions(two_versions: tuple[QemuBinary, QemuBinary]) -> None:
    """``qtest-virtio run --migrate-to B --machine pc-q35-7.2`` names the destination and passes;
    an unversioned machine type across versions skips every case with the fix; a machine type
    that is no name at all is a usage error (128)."""
    old, new = two_versions
    assert EXE is not None, "the qtest-virtio console script is not installed"
    target = os.path.join(os.path.dirname(__file__), "..", "scenarios", "migration", "test_blk.py")
    base = [EXE, "run", target, "--qemu", old.path, "--migrate-to", new.path, "-n", "1"]
    tail = ["--", "-k", "idle", "-rs"]
    res = subprocess.run(
        [*base, "--machine", "pc-q35-7.2", *tail], capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"migration scenarios migrate to: {new.identity}" in res.stdout
    res = subprocess.run([*base, *tail], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 125, res.stdout + res.stderr
    assert "--qemu-machine pc-q35-7.2" in res.stdout
    bad = subprocess.run(
        [EXE, "run", target, "--machine", "q35-7.2"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 128 and "invalid choice: 'q35-7.2'" in bad.stderr


def test_readme_migration_example_passes(pytester: pytest.Pytester, qemu_binary: QemuBinary) -> None:
    """The README's "Testing migration" example, as written, passes (so it cannot rot)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    start = readme.index("# test_my_migration.py")
    pytester.makepyfile(test_my_migration=readme[start : readme.index("```", start)])
    res = pytester.runpytest("--qemu", qemu_binary.path, "--virtio-transport", "modern", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=2)


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_a_hot_plugged_device_migrates_and_unplugs_on_the_destination(qemu_binary: QemuBinary, machine: str) -> None:
    """A device plugged after start is on the destination's command line in the same slot (the
    vmstate instance is its PCI address); there it still unplugs and re-plugs under its id."""
    spec = MachineSpec(qemu=qemu_binary.path, machine=machine)
    spec.add_virtio("virtio-blk-pci", id="blk0", mode="modern", hotplug=True)
    with Machine(spec) as vm:
        vm.plug("blk0")
        blk = vm.virtio("blk0", VirtioBlk)
        blk.write(2, b"h" * 512)
        before = vm.pci_address("blk0")
        with vm.migrate_to() as dest:
            assert dest.pci_address("blk0") == before
            assert blk.read(2, 1) == b"h" * 512
            dest.unplug("blk0")
            assert dest.pci_address("blk0") is None
            dest.plug("blk0")
            again = dest.virtio("blk0", VirtioBlk)
            assert again.read(2, 1) == b"h" * 512
