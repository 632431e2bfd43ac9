"""virtio-rng (entropy device, virtio 1.2 §5.4): one queue of device-writable buffers."""

from __future__ import annotations

from ..base import VirtioDriver
from . import encoding


class VirtioRng(VirtioDriver):
    DEVICE_TYPE = encoding.DEVICE_ID
    FEATURE_BITS = encoding.FEATURE_BITS
    QUEUES = 1

    def request(self, size: int, *, indirect: bool | None = None, timeout: float = 5.0) -> bytes:
        """One request of ``size`` bytes; returns what the device filled (the used length)."""
        length, (data,) = self.queues[0].complete(self.queues[0].submit([], [size], indirect=indirect), timeout)
        return data[:length]

    def read(self, n: int, *, chunk: int = 4096, timeout: float = 5.0) -> bytes:
        """Exactly ``n`` bytes of entropy, in as many requests as the device needs (§5.4.6:
        the device may fill less than the buffer)."""
        out = bytearray()
        while len(out) < n:
            out += self.request(min(chunk, n - len(out)), timeout=timeout)
        return bytes(out)
