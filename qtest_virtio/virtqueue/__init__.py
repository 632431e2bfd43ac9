"""Virtqueues: split (§2.7) and packed (§2.8) rings behind one interface."""

from __future__ import annotations

from ..memory import GuestMemory
from .base import Buf, QueueTransport, Request, UsedElem, Virtqueue, VirtqueueError, VirtqueueTimeout
from .packed import PackedVirtqueue
from .split import SplitVirtqueue

__all__ = [
    "Buf",
    "PackedVirtqueue",
    "QueueTransport",
    "Request",
    "SplitVirtqueue",
    "UsedElem",
    "Virtqueue",
    "VirtqueueError",
    "VirtqueueTimeout",
    "make_virtqueue",
]


def make_virtqueue(
    transport: QueueTransport,
    memory: GuestMemory,
    index: int,
    size: int,
    *,
    packed: bool,
    event_idx: bool,
    indirect: bool,
    in_order: bool = False,
    name: str = "",
) -> Virtqueue:
    """The ring layout the negotiated features call for, set up and enabled."""
    cls = PackedVirtqueue if packed else SplitVirtqueue
    vq = cls(transport, memory, index, size, event_idx=event_idx, indirect=indirect, in_order=in_order, name=name)
    vq.setup()
    return vq
