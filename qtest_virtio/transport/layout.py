"""virtio-pci register layouts and names, as data (virtio 1.2 §4.1.4 and §2, §6).

Both register layouts of virtio-pci are declared here once: the modern vendor capabilities
(common, notify, ISR, device and PCI-cfg-access windows) and the legacy I/O BAR.
"""

from __future__ import annotations

from ..registers import BitLayout, Bits, Field, Layout

VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: Transitional device IDs are 0x1000..0x103F; modern ones 0x1040 + virtio device ID (§4.1.2).
TRANSITIONAL_ID_RANGE = range(0x1000, 0x1040)
MODERN_ID_BASE = 0x1040
MODERN_ID_RANGE = range(MODERN_ID_BASE, 0x1080)


#: struct virtio_pci_cap, virtio 1.2 §4.1.4.
class VirtioPciCapLayout(Layout, struct="virtio_pci_cap", size=16):
    cap_vndr = Field(0, 1)
    cap_next = Field(1, 1)
    cap_len = Field(2, 1)
    cfg_type = Field(3, 1)
    bar = Field(4, 1)
    id = Field(5, 1)
    offset = Field(8, 4)
    length = Field(12, 4)


VIRTIO_PCI_CAP = VirtioPciCapLayout()


#: struct virtio_pci_notify_cap adds the multiplier, §4.1.4.4.
class VirtioPciNotifyCapLayout(VirtioPciCapLayout, struct="virtio_pci_notify_cap", size=20):
    notify_off_multiplier = Field(16, 4)


VIRTIO_PCI_NOTIFY_CAP = VirtioPciNotifyCapLayout()


#: struct virtio_pci_cfg_cap adds a data window onto any BAR, §4.1.4.9.
class VirtioPciCfgCapLayout(VirtioPciCapLayout, struct="virtio_pci_cfg_cap", size=20):
    pci_cfg_data = Field(16, 4)


VIRTIO_PCI_CFG_CAP = VirtioPciCfgCapLayout()


#: struct virtio_pci_cap64 (shared memory regions) adds the high halves, §4.1.4.7.
class VirtioPciCap64Layout(VirtioPciCapLayout, struct="virtio_pci_cap64", size=24):
    offset_hi = Field(16, 4)
    length_hi = Field(20, 4)


VIRTIO_PCI_CAP64 = VirtioPciCap64Layout()

CFG_TYPE_COMMON = 1
CFG_TYPE_NOTIFY = 2
CFG_TYPE_ISR = 3
CFG_TYPE_DEVICE = 4
CFG_TYPE_PCI = 5
CFG_TYPE_SHARED_MEMORY = 8
CFG_TYPE_VENDOR = 9
CFG_TYPE_NAMES = {
    CFG_TYPE_COMMON: "common_cfg",
    CFG_TYPE_NOTIFY: "notify_cfg",
    CFG_TYPE_ISR: "isr_cfg",
    CFG_TYPE_DEVICE: "device_cfg",
    CFG_TYPE_PCI: "pci_cfg",
    CFG_TYPE_SHARED_MEMORY: "shared_memory_cfg",
    CFG_TYPE_VENDOR: "vendor_cfg",
}


#: struct virtio_pci_common_cfg, virtio 1.2 §4.1.4.3 (queue_notify_data, queue_reset: 1.2).
class CommonCfgLayout(Layout, struct="common_cfg", size=0x3C):
    device_feature_select = Field(0x00, 4)
    device_feature = Field(0x04, 4)
    driver_feature_select = Field(0x08, 4)
    driver_feature = Field(0x0C, 4)
    config_msix_vector = Field(0x10, 2)
    num_queues = Field(0x12, 2)
    device_status = Field(0x14, 1)
    config_generation = Field(0x15, 1)
    queue_select = Field(0x16, 2)
    queue_size = Field(0x18, 2)
    queue_msix_vector = Field(0x1A, 2)
    queue_enable = Field(0x1C, 2)
    queue_notify_off = Field(0x1E, 2)
    queue_desc = Field(0x20, 8)
    queue_driver = Field(0x28, 8)
    queue_device = Field(0x30, 8)
    queue_notify_data = Field(0x38, 2)
    queue_reset = Field(0x3A, 2)


COMMON_CFG = CommonCfgLayout()


#: The legacy I/O BAR header, virtio 1.2 §4.1.4.10; with MSI-X enabled two vector registers
#: follow and the device-specific config moves from 0x14 to 0x18.
class LegacyCfgLayout(Layout, struct="legacy_cfg", size=0x18):
    device_features = Field(0x00, 4)
    driver_features = Field(0x04, 4)
    queue_address = Field(0x08, 4)
    queue_size = Field(0x0C, 2)
    queue_select = Field(0x0E, 2)
    queue_notify = Field(0x10, 2)
    device_status = Field(0x12, 1)
    isr_status = Field(0x13, 1)
    config_msix_vector = Field(0x14, 2)
    queue_msix_vector = Field(0x16, 2)


LEGACY_CFG = LegacyCfgLayout()
LEGACY_DEVICE_CFG_OFFSET = 0x14
LEGACY_DEVICE_CFG_OFFSET_MSIX = 0x18
#: Legacy queue addresses are page frame numbers of 4096-byte pages (§4.1.4.10).
LEGACY_QUEUE_ALIGN_SHIFT = 12


#: ISR status bits, §4.1.4.5.
class IsrBits(BitLayout, register="isr"):
    queue_interrupt = Bits(0)
    config_change = Bits(1)


ISR = IsrBits()


#: Device status bits, §2.1.
class StatusBits(BitLayout, register="device_status"):
    ACKNOWLEDGE = Bits(0)
    DRIVER = Bits(1)
    DRIVER_OK = Bits(2)
    FEATURES_OK = Bits(3)
    DEVICE_NEEDS_RESET = Bits(6)
    FAILED = Bits(7)


STATUS = StatusBits()

VIRTIO_MSI_NO_VECTOR = 0xFFFF

#: Reserved (device-independent) feature bits, §6, named without the VIRTIO_F_ prefix.
FEATURE_BITS: dict[int, str] = {
    24: "NOTIFY_ON_EMPTY",
    27: "ANY_LAYOUT",
    28: "INDIRECT_DESC",
    29: "EVENT_IDX",
    30: "BAD_FEATURE",
    32: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    35: "IN_ORDER",
    36: "ORDER_PLATFORM",
    37: "SR_IOV",
    38: "NOTIFICATION_DATA",
    39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
}

#: Virtio device IDs, §5 (virtio 1.2 and QEMU 10.2's virtio_ids.h): the spec's whole table, so a
#: newly driven device needs no line here (the drivers are registered in devices/registry.py).
DEVICE_TYPES: dict[int, str] = {
    1: "net",
    2: "block",
    3: "console",
    4: "entropy",
    5: "balloon",
    6: "iomem",
    7: "rpmsg",
    8: "scsi",
    9: "9p",
    10: "mac80211-wlan",
    11: "rproc-serial",
    12: "caif",
    13: "memory-balloon",
    16: "gpu",
    17: "clock",
    18: "input",
    19: "vsock",
    20: "crypto",
    21: "signal-dist",
    22: "pstore",
    23: "iommu",
    24: "mem",
    25: "sound",
    26: "fs",
    27: "pmem",
    28: "rpmb",
    29: "mac80211-hwsim",
    30: "video-encoder",
    31: "video-decoder",
    32: "scmi",
    33: "nitro-sec-mod",
    34: "i2c-adapter",
    35: "watchdog",
    36: "can",
    37: "dmabuf",
    38: "param-serv",
    39: "audio-policy",
    40: "bt",
    41: "gpio",
    45: "spi",
}
#: Transitional PCI device IDs, §4.1.2.3.
TRANSITIONAL_DEVICE_TYPES: dict[int, int] = {
    0x1000: 1,
    0x1001: 2,
    0x1002: 5,
    0x1003: 3,
    0x1004: 8,
    0x1005: 4,
    0x1009: 9,
}


def virtio_device_type(pci_device_id: int, subsystem_id: int | None = None) -> int | None:
    """The virtio device ID of a virtio-pci function (None if it is not one)."""
    if pci_device_id in MODERN_ID_RANGE:
        return pci_device_id - MODERN_ID_BASE
    if pci_device_id in TRANSITIONAL_ID_RANGE:
        # Legacy drivers identify the type by the subsystem ID (§4.1.2.3).
        return subsystem_id if subsystem_id else TRANSITIONAL_DEVICE_TYPES.get(pci_device_id)
    return None


def feature_names(bits: int, device_bits: dict[int, str] | None = None) -> list[str]:
    """Names of the set bits, device-specific names first, unknown ones as ``bit N``."""
    names = []
    table = {**(device_bits or {}), **FEATURE_BITS}
    for n in range(64):
        if bits >> n & 1:
            names.append(table.get(n, f"bit {n}"))
    return names
