"""More than one QEMU: each binary scripts/qemu.sh provides is told apart by trial, named in the
output with its version and accelerator, and driven the same way (issue 11)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
from conftest import EXE

from qtest_virtio import MachineSpec, known_flags
from qtest_virtio.binary import QEMU_SH, QemuBinary
from qtest_virtio.devices import registry
from qtest_virtio.vm import Machine

ProvidedQemu = Callable[[str], QemuBinary]


def _source_version(name: str) -> tuple[int, ...]:
    """The upstream release scripts/qemu.sh builds for ``name`` (its NEWEST line for src-newest)."""
    out = subprocess.run(["bash", str(QEMU_SH), "version", name], capture_output=True, text=True, check=True)
    return tuple(int(x) for x in out.stdout.strip().split("."))


#: name -> (version prefix, has the qtest accelerator)
EXPECTED = {
    "system": ((7, 2), False),
    "debian-10.0": ((10, 0), False),
    "src-newest": (_source_version("src-newest")[:2], True),
}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert EXE, "qtest-virtio console script not installed (pip install -e .)"
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerator_is_detected_by_trial(provided_qemu: ProvidedQemu, name: str) -> None:
    binary = provided_qemu(name)
    version, qtest_accel = EXPECTED[name]
    assert binary.version[:2] == version
    # Upstream hides qtest from -accel help; the trial finds it all the same.
    assert "qtest" not in binary.accelerators
    assert binary.has_qtest_accel is qtest_accel
    with Machine(MachineSpec(qemu=binary.path)) as vm:
        accel = vm.argv[vm.argv.index("-accel") + 1]
        assert accel == ("qtest" if qtest_accel else "tcg")
        assert ("-S" in vm.argv) is not qtest_accel
        # The virtual clock exists exactly where the qtest accelerator does.
        if qtest_accel:
            now = vm.qtest.clock_step(1_000_000)
            assert vm.qtest.clock_step(1_000) == now + 1_000
        else:
            from qtest_virtio.errors import ClockUnavailable

            with pytest.raises(ClockUnavailable):
                vm.qtest.clock_step(1_000)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_probe_names_binary_version_and_accelerator(provided_qemu: ProvidedQemu, name: str) -> None:
    binary = provided_qemu(name)
    res = run_cli("probe", "--qemu", binary.path, "--device", "virtio-rng-pci")
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    version = ".".join(map(str, binary.version))
    if EXPECTED[name][1]:
        assert first == f"# QEMU {version} ({binary.path}), accelerator: qtest"
    else:
        assert first == f"# QEMU {version} ({binary.path}), accelerator: tcg (-S; no qtest accelerator in this build)"


def test_run_summary_starts_with_the_binary(provided_qemu: ProvidedQemu) -> None:
    binary = provided_qemu("src-newest")
    res = run_cli("run", "scenarios/rng/test_rng.py", "--qemu", binary.path, "--transport", "modern", "-n", "1")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    version = ".".join(map(str, binary.version))
    identity = f"QEMU {version} ({binary.path}), accelerator: qtest"
    lines = res.stdout.splitlines()
    assert lines[0] == identity  # said before the run starts
    title = lines.index(identity, 1)  # and again as the summary's first line
    assert lines[title + 1].startswith("device ") and lines[title - 1] == ""


@pytest.mark.parametrize("name", ["system", "debian-10.0", "src-newest"])
def test_known_flags_table_matches_the_binary(provided_qemu: ProvidedQemu, name: str) -> None:
    """known_flags.py was measured on these binaries: a stale table fails here (regenerate it with
    scripts/flag_table.py)."""
    binary = provided_qemu(name)
    version = ".".join(map(str, binary.version))
    assert version in known_flags.MEASURED_ON
    have: set[str] = set()
    for device in registry.drivers():
        have |= set(binary.device_properties(device))
    table = {flag for flag, versions in known_flags.PROPERTIES.items() if version in versions}
    assert table == have, f"run scripts/flag_table.py: differs in {sorted(table ^ have)}"


def test_flag_of_a_newer_version_is_untestable_here(provided_qemu: ProvidedQemu) -> None:
    """in_order (VIRTIO_F_IN_ORDER) came with 10.0: on 7.2 a bisect step must say 125, with the
    versions that have it, before any QEMU starts; on 10.0 the same command runs."""
    old, new = provided_qemu("system"), provided_qemu("debian-10.0")
    target = ["scenarios/rng/test_rng.py", "--transport", "modern", "-n", "1", "--flags", "in_order=on"]
    res = run_cli("run", *target, "--qemu", old.path)
    assert res.returncode == 125, res.stdout[-2000:] + res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"qtest-virtio: cannot test here: flag 'in_order' is not in QEMU 7.2.22 ({old.path}); "
        "it is in QEMU 10.0.2, 10.2.2"
    )
    res = run_cli("run", *target, "--qemu", new.path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert " passed" in res.stdout and "in_order=on" in res.stdout


@pytest.mark.parametrize("name", ["system", "src-newest"])
def test_flag_no_version_has_is_a_usage_error(provided_qemu: ProvidedQemu, name: str) -> None:
    binary = provided_qemu(name)
    res = run_cli("run", "scenarios/rng", "--qemu", binary.path, "--flags", "in_ordr=on")
    assert res.returncode == 128
    assert res.stderr.strip() == "qtest-virtio: error: --flags: unknown flag 'in_ordr'; did you mean in_order?"


@pytest.mark.parametrize("name", ["system", "src-newest"])
def test_virtual_clock_marker_skips_without_the_clock(
    pytester: pytest.Pytester, provided_qemu: ProvidedQemu, name: str
) -> None:
    """``@pytest.mark.virtual_clock`` runs where the build has the qtest accelerator and is a skip
    naming the binary elsewhere, decided before QEMU starts."""
    binary = provided_qemu(name)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.virtual_clock
        def test_steps(machine_factory):
            vm = machine_factory()
            start = vm.qtest.clock_step(1)
            assert vm.qtest.clock_step(5_000) == start + 5_000
        """
    )
    result = pytester.runpytest_subprocess(f"--qemu={binary.path}", "-rs", "-p", "no:cacheprovider")
    if binary.has_qtest_accel:
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(
            [f"*virtual clock not available on this build (no qtest accelerator): QEMU 7.2.22 ({binary.path})*"]
        )
