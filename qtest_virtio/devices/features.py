"""Device-specific feature bits, named as the virtio spec names them without the device prefix
(virtio 1.2 §5.1.3 net, §5.2.3 block, §5.3.3 console, §5.4.3 entropy, §5.5.3 balloon,
§5.6.3 scsi). Keyed by virtio device ID."""

from __future__ import annotations

DEVICE_FEATURE_BITS: dict[int, dict[int, str]] = {
    1: {  # net
        0: "CSUM",
        1: "GUEST_CSUM",
        2: "CTRL_GUEST_OFFLOADS",
        3: "MTU",
        5: "MAC",
        6: "GSO",  # legacy only
        7: "GUEST_TSO4",
        8: "GUEST_TSO6",
        9: "GUEST_ECN",
        10: "GUEST_UFO",
        11: "HOST_TSO4",
        12: "HOST_TSO6",
        13: "HOST_ECN",
        14: "HOST_UFO",
        15: "MRG_RXBUF",
        16: "STATUS",
        17: "CTRL_VQ",
        18: "CTRL_RX",
        19: "CTRL_VLAN",
        20: "CTRL_RX_EXTRA",
        21: "GUEST_ANNOUNCE",
        22: "MQ",
        23: "CTRL_MAC_ADDR",
        50: "DEVICE_STATS",
        51: "HASH_TUNNEL",
        52: "VQ_NOTF_COAL",
        53: "NOTF_COAL",
        54: "GUEST_USO4",
        55: "GUEST_USO6",
        56: "HOST_USO",
        57: "HASH_REPORT",
        59: "GUEST_HDRLEN",
        60: "RSS",
        61: "RSC_EXT",
        62: "STANDBY",
        63: "SPEED_DUPLEX",
    },
    2: {  # block
        0: "BARRIER",  # legacy only
        1: "SIZE_MAX",
        2: "SEG_MAX",
        4: "GEOMETRY",
        5: "RO",
        6: "BLK_SIZE",
        7: "SCSI",  # legacy only
        9: "FLUSH",
        10: "TOPOLOGY",
        11: "CONFIG_WCE",
        12: "MQ",
        13: "DISCARD",
        14: "WRITE_ZEROES",
        15: "LIFETIME",
        16: "SECURE_ERASE",
    },
    3: {0: "SIZE", 1: "MULTIPORT", 2: "EMERG_WRITE"},  # console
    4: {},  # entropy: no device features
    5: {  # balloon
        0: "MUST_TELL_HOST",
        1: "STATS_VQ",
        2: "DEFLATE_ON_OOM",
        3: "FREE_PAGE_HINT",
        4: "PAGE_POISON",
        5: "PAGE_REPORTING",
    },
    8: {0: "INOUT", 1: "HOTPLUG", 2: "CHANGE", 3: "T10_PI"},  # scsi
}
