"""The device registry (no QEMU): one DeviceInfo per device folder, every table derived from it,
and the generic config reader's rules (virtio 1.2 §2.5)."""

from __future__ import annotations

import pytest

import qtest_virtio
from qtest_virtio import vm
from qtest_virtio.devices import registry
from qtest_virtio.devices.base import DriverError, VirtioDriver, existing_fields, field_exists
from qtest_virtio.devices.blk.encoding import BLK_CONFIG
from qtest_virtio.devices.net.encoding import NET_CONFIG
from qtest_virtio.errors import QtestError
from qtest_virtio.modes import Interrupts
from qtest_virtio.transport import layout

QEMU_SRC = "/root/.cache/qtest-virtio/src-10.2.2/hw/virtio"


def test_one_registration_per_package() -> None:
    devices = registry.devices()
    assert [info.name for info in devices.values()] == list(registry.PACKAGES)
    assert list(devices) == [
        "virtio-blk-pci",
        "virtio-net-pci",
        "virtio-rng-pci",
        "virtio-serial-pci",
        "virtio-balloon-pci",
        "virtio-scsi-pci",
    ]
    for info in devices.values():
        assert issubclass(info.driver, VirtioDriver) and info.driver.__module__.endswith(f".{info.name}.driver")
        assert info.device_id == info.driver.DEVICE_TYPE and info.device_id in layout.DEVICE_TYPES
        assert info.models == (info.model, f"{info.model}-transitional", f"{info.model}-non-transitional")
        # a driver implements only features its device defines, and refusals are checked against them
        assert set(info.feature_bits.values()) >= info.driver.FEATURES
        if info.config is not None:
            for f in info.config:
                for feature in (f.requires or "").split("|") if f.requires else ():
                    assert feature in info.feature_bits.values(), (info.name, f.name, feature)


def test_every_table_is_derived() -> None:
    assert {model: info.driver for model, info in registry.devices().items()} == registry.drivers()
    assert registry.feature_bits()[2][9] == "FLUSH" and registry.feature_bits()[4] == {}
    assert set(registry.config_layouts()) == {1, 2, 3, 5, 8}  # virtio-rng has no config (§5.4.4)
    assert registry.config_layouts()[2] is BLK_CONFIG
    assert qtest_virtio.VirtioScsi is registry.devices()["virtio-scsi-pci"].driver
    with pytest.raises(AttributeError):
        qtest_virtio.VirtioGpu  # noqa: B018


def test_lookup_takes_variants_and_names_the_fix() -> None:
    # (before the registry, "-non-transitional" lost only "-transitional" and was not found)
    assert registry.lookup("virtio-net-pci-non-transitional").model == "virtio-net-pci"
    assert vm.driver_class("virtio-serial-pci-transitional").__name__ == "VirtioConsole"
    with pytest.raises(registry.UnknownDevice, match=r"no driver for 'virtio-blk-pcx'; did you mean 'virtio-blk-pci'"):
        registry.lookup("virtio-blk-pcx")
    with pytest.raises(KeyError):  # still a lookup error for callers that catch KeyError
        registry.lookup("e1000")
    assert issubclass(registry.UnknownDevice, qtest_virtio.QtestVirtioError)
    assert registry.by_id(8) is registry.devices()["virtio-scsi-pci"] and registry.by_id(16) is None


@pytest.mark.parametrize("model", [info.model for info in registry.devices().values()])
def test_qemu_builds_the_transitional_variants(model: str) -> None:
    """The -transitional / -non-transitional names exist in QEMU's sources (hw/virtio)."""
    import glob
    import pathlib

    sources = "".join(pathlib.Path(p).read_text() for p in glob.glob(f"{QEMU_SRC}/*-pci.c"))
    if not sources:
        pytest.skip(f"QEMU sources not unpacked at {QEMU_SRC}")
    assert f'"{model}-transitional"' in sources and f'"{model}-non-transitional"' in sources


def test_fuzz_profiles_are_valid_requests() -> None:
    """Each profile's first queue is its default and every request ends device-writable where the
    device answers (a status, an ack, a response), or is all device-readable (tx, inflate)."""
    for info in registry.devices().values():
        fuzz = info.fuzz
        assert fuzz.default_queue == next(iter(fuzz.queues)) and callable(fuzz.check)
        for request in fuzz.queues.values():
            writable = [w for _, w, _ in request]
            assert writable == sorted(writable), f"{info.name}: a device-readable buffer after a writable one"
            for length, is_writable, data in request:
                assert length > 0 and (data == b"" if is_writable else len(data) == length)
    blk = registry.devices()["virtio-blk-pci"].fuzz.queues[0]
    assert blk[0][2] == bytes(16) and [b[0] for b in blk] == [16, 512, 1]  # VIRTIO_BLK_T_IN of sector 0


def test_fields_exist_with_one_of_their_features() -> None:
    assert field_exists(BLK_CONFIG.capacity, set())
    assert not field_exists(BLK_CONFIG.num_queues, {"SEG_MAX"}) and field_exists(BLK_CONFIG.num_queues, {"MQ"})
    assert field_exists(NET_CONFIG.max_virtqueue_pairs, {"RSS"}) and field_exists(
        NET_CONFIG.max_virtqueue_pairs, {"MQ"}
    )
    assert [f.name for f in existing_fields(NET_CONFIG, {"MAC"})] == [f"mac[{i}]" for i in range(6)]


class _NoFunction:
    bdf = "00:09.0"

    def __getattr__(self, name: str) -> object:
        raise QtestError(name, "construction touched the device")


def test_construction_does_no_io() -> None:
    """A driver records its arguments; the transport appears with initialize() (here: never)."""
    for info in registry.devices().values():
        drv = info.driver(_NoFunction(), "modern", None, interrupts="auto")
        assert not drv.initialized and drv.interrupts is Interrupts.AUTO and drv.mode == "modern"
        with pytest.raises(DriverError, match="not initialised yet; call initialize"):
            drv.transport  # noqa: B018
        drv.close()  # nothing allocated, nothing to do
    with pytest.raises(ValueError, match="interrupts must be"):
        registry.devices()["virtio-rng-pci"].driver(_NoFunction(), "modern", None, interrupts="msi")
    with pytest.raises(ValueError, match="unknown transport mode"):
        registry.devices()["virtio-rng-pci"].driver(_NoFunction(), "legacy-ish", None)
