# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""The virtio_device marker's placement kwargs, through pytester: ``iothread=True`` (an
``-object iothread`` and the device's ``iothread`` property) and ``pcie_root_port=True`` (the
device behind a q35 ``pcie-root-port``); their skips and usage errors; the pure check."""

from __future__ import annotations

import pytest
from pytest_qtest_virtio.params import virtio_params

from qtest_virtio import modes
from qtest_virtio.app.options import OptionError

pytest_plugins = ["pytester"]
INNER = ["-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:cacheprovider", "-p", "no:xdist"]

PLACED = """
import pytest

@pytest.mark.virtio_device("virtio-blk-pci", transports=["modern"], rings=("split",), backend="null", iothread=True)
def test_iothread(virtio_device, qemu):
    ids = [t["id"] for t in qemu.qmp.cmd("query-iothreads")]
    assert ids == ["io0"]
    path = f"/machine/peripheral/{virtio_device.dev_id}"
    assert qemu.qmp.cmd("qom-get", path=path, property="iothread") == "/objects/io0"
    assert virtio_device.read(0, 1) == bytes(512)

@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"], rings=("split",), pcie_root_port=True)
def test_root_port(virtio_device, qemu):
    assert virtio_device.fn.bdf_addr.bus == 1
    port = qemu.pci.find(vendor_id=0x1B36, device_id=0x000C)
    assert port.secondary_bus == 1
    assert len(virtio_device.request(8)) > 0

@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"], rings=("split",), iothread=True)
def test_no_iothread_property(virtio_device):
    pass
"""


def test_placement_kwargs_must_be_bools() -> None:
    for key in ("iothread", "pcie_root_port"):
        with pytest.raises(OptionError, match=f"virtio_device\\({key}='yes'\\) takes True or False"):
            virtio_params(
                "virtio-rng-pci",
                selected_modes=(modes.MODERN,),
                option_flags={},
                option_refuse=frozenset(),
                marker_kwargs={key: "yes"},
            )
    params = virtio_params(
        "virtio-rng-pci",
        selected_modes=(modes.MODERN,),
        option_flags={},
        option_refuse=frozenset(),
        marker_kwargs={"iothread": True, "rings": ("split",)},
    )
    assert [p.id for p in params] == ["virtio-rng-pci-modern"]
    assert dict(params[0].extra) == {"iothread": True}


def test_iothread_and_root_port_place_the_device(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile(test_placed=PLACED)
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "-rs")
    res.assert_outcomes(passed=2, skipped=1)
    res.stdout.fnmatch_lines(["*virtio-rng-pci has no property 'iothread'*"])


def test_root_port_skips_on_pc(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile(test_placed=PLACED)
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--qemu-machine=pc", "-rs", "-k", "root_port")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*pcie_root_port needs the q35 machine (PCI Express), not pc*"])


def test_non_bool_placement_is_a_usage_error(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile(
        """
import pytest
@pytest.mark.virtio_device("virtio-blk-pci", iothread="io0")
def test_x(virtio_device):
    pass
"""
    )
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}")
    assert res.ret == pytest.ExitCode.INTERRUPTED  # a collection error, as for any bad marker
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(["*test_x: virtio_device(iothread='io0') takes True or False*"])
