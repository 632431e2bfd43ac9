"""Write batches and the recording socket of the qtest client (see :mod:`.client`)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

from .grammar import Command


class _Sender(Protocol):
    """The two ways ``QtestClient`` takes a batch: posted inside ``posting``, else pipelined."""

    @property
    def posting_now(self) -> bool: ...
    def post_many(self, commands: Sequence[str]) -> None: ...
    def pipeline(self, commands: Sequence[str]) -> list[str]: ...


class CommandBatch:
    """Writes queued, validated like the client's own methods, and sent in order in one
    pipelined exchange by :meth:`flush`.

    QEMU processes them in order, so "descriptors, then avail entry, then avail idx" keeps
    virtio's publish rule (virtio 1.2 §2.7.13) without a round trip per write.
    """

    def __init__(self, client: _Sender) -> None:
        self.client = client
        self.commands: list[str] = []

    def __len__(self) -> int:
        return len(self.commands)

    def writeb(self, addr: int, value: int) -> None:
        self.commands.append(Command.build("writeb", addr, value).encode())

    def writew(self, addr: int, value: int) -> None:
        self.commands.append(Command.build("writew", addr, value).encode())

    def writel(self, addr: int, value: int) -> None:
        self.commands.append(Command.build("writel", addr, value).encode())

    def writeq(self, addr: int, value: int) -> None:
        self.commands.append(Command.build("writeq", addr, value).encode())

    def memwrite(self, addr: int, data: bytes) -> None:
        """A small buffer as one ``b64write`` (large ones belong in ``QtestClient.memwrite``)."""
        if data:
            self.commands.append(Command.build("b64write", addr, len(data), data).encode())

    def flush(self) -> None:
        if self.commands:
            commands, self.commands = self.commands, []
            if self.client.posting_now:
                self.client.post_many(commands)
            else:
                self.client.pipeline(commands)


class RecordingSocket(socket.socket):
    """A socket that appends a copy of whatever it sends to ``sink`` (see ``QtestClient.record``)."""

    def __init__(self, sock: socket.socket, sink: list[bytes]) -> None:
        timeout = sock.gettimeout()
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.settimeout(timeout)
        self._sink = sink

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        n = super().send(data, flags)
        self._sink.append(bytes(memoryview(data).cast("B")[:n]))
        return n

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        super().sendall(data, flags)
        self._sink.append(bytes(memoryview(data).cast("B")))
