"""virtio-rng (entropy device, virtio 1.2 §5.4): its identity and its (empty) encoding.

The device has no device-specific feature bits (§5.4.3) and no configuration (§5.4.4); a
request is one device-writable buffer the device fills with entropy (§5.4.6).
"""

from __future__ import annotations

#: Virtio device ID of the entropy device (virtio 1.2 §5).
DEVICE_ID = 4
#: Feature bits (§5.4.3): none.
FEATURE_BITS: dict[int, str] = {}
