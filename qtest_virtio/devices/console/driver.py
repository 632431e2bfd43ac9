"""The virtio-console driver (virtio 1.2 §5.3): ports, the multiport handshake, data both ways.

Queues (§5.3.2): 0/1 are port 0's receiveq/transmitq, 2/3 the control receiveq/transmitq, and
port N (N >= 1) uses 2N+2 / 2N+3. Without MULTIPORT only port 0 exists and there is no control
queue. The handshake (§5.3.5, §5.3.6.2): the driver sends DEVICE_READY, the device answers with
DEVICE_ADD per port, the driver answers each with PORT_READY, and the device follows with
CONSOLE_PORT (for console ports), PORT_NAME and PORT_OPEN (host side connected). The driver opens
a port with PORT_OPEN value 1; for a console port it must (§5.3.6.2.2). The control messages and
the config are in :mod:`.encoding`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ...memory import GuestMemory
from ...pci import PciFunction
from ...virtqueue import Buf, UsedElem, Virtqueue
from ..base import VirtioDriver
from . import encoding
from .encoding import (
    CONSOLE_CONFIG,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    DEVICE_EVENTS,
    ConsoleConfig,
    ConsoleError,
    ConsoleTimeout,
    ControlEvent,
    ControlMessage,
)


@dataclass
class Port:
    """What the driver knows of one port."""

    id: int
    name: str | None = None
    console: bool = False
    host_open: bool = False
    guest_open: bool = False
    #: (cols, rows) from the last RESIZE message for this port.
    size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Received:
    """A control message as it arrived: the message, the used length, the buffer size, and
    how many messages the driver had sent by then (its place in ``sent_log``)."""

    message: ControlMessage
    used_length: int
    buffer_size: int
    after_sent: int = 0


@dataclass
class _RxPool:
    """Receive buffers of one queue, re-posted as soon as the device has used them."""

    vq: Virtqueue
    size: int
    addrs: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)


class VirtioConsole(VirtioDriver):
    """A virtio-console driver (§5.3): ports, the multiport handshake, data both ways."""

    DEVICE_TYPE = encoding.DEVICE_ID
    CONFIG_LAYOUT = CONSOLE_CONFIG
    FEATURE_BITS = encoding.FEATURE_BITS
    FEATURES = frozenset({"MULTIPORT", "EMERG_WRITE"})
    QUEUES = 2

    #: Receive buffers per port and their size; control receive buffers and their size
    #: (Linux posts page-sized buffers; a PORT_NAME carries the name after the header).
    RX_BUFFERS = 4
    RX_BUFFER_SIZE = 4096
    CONTROL_BUFFERS = 16
    CONTROL_BUFFER_SIZE = 4096
    #: Largest buffer one write() puts in a transmitq descriptor.
    TX_CHUNK = 65536

    def __init__(
        self,
        fn: PciFunction,
        mode: str,
        memory: GuestMemory,
        *,
        open_ports: bool | Iterable[int] = True,
        nr_ports: int | None = None,
        handshake: bool = True,
        **kwargs: Any,
    ) -> None:
        """``open_ports``: open every announced port (True), none but the console ports (False),
        or the listed ids. ``nr_ports``: set up queues for this many ports only (default
        ``max_nr_ports``). ``handshake=False`` stops after DRIVER_OK (queues ready, nothing
        sent) for tests that drive the control queue themselves."""
        self.open_ports = open_ports
        self.nr_ports = nr_ports
        self.handshake = handshake
        #: The config as read between FEATURES_OK and DRIVER_OK (§3.1.1 step 7).
        self.initial_config = ConsoleConfig()
        self.port_table: dict[int, Port] = {}
        #: Every control message received / sent, in order.
        self.control_log: list[Received] = []
        self.sent_log: list[ControlMessage] = []
        self._pools: dict[int, _RxPool] = {}
        self._outbox: list[ControlMessage] = []
        super().__init__(fn, mode, memory, **kwargs)

    # -- initialization -------------------------------------------------------------------

    @property
    def multiport(self) -> bool:
        return self.has("MULTIPORT")

    def config(self) -> ConsoleConfig:
        """struct virtio_console_config as the negotiated features make it exist (§5.3.4)."""
        return ConsoleConfig.from_fields(self.read_config())

    @property
    def max_nr_ports(self) -> int:
        """Ports the device supports: ``max_nr_ports`` with MULTIPORT, else port 0 alone."""
        return (self.initial_config.max_nr_ports or 0) if self.multiport else 1

    def setup_device(self) -> None:
        """Read the config; with MULTIPORT, queues for ``max_nr_ports`` ports (§5.3.5 step 3)."""
        self.initial_config = self.config()
        if self.multiport:
            if self.max_nr_ports < 1:
                raise ConsoleError(f"{self}: MULTIPORT negotiated but max_nr_ports is {self.max_nr_ports}")
            ports = self.max_nr_ports if self.nr_ports is None else min(self.nr_ports, self.max_nr_ports)
            self.QUEUES = 2 * ports + 2
        else:
            self.QUEUES = 2

    def create_queue(self, index: int) -> Virtqueue:
        vq = super().create_queue(index)
        vq.name = f"{type(self).__name__} {self.queue_role(index)} (queue {index})"
        return vq

    @staticmethod
    def queue_role(index: int) -> str:
        """The spec's name of a queue (§5.3.2)."""
        if index == CONTROL_RECEIVEQ:
            return "control receiveq"
        if index == CONTROL_TRANSMITQ:
            return "control transmitq"
        port = 0 if index < 2 else (index - 2) // 2
        return f"{'transmitq' if index % 2 else 'receiveq'}(port{port})"

    @staticmethod
    def rx_queue(port: int) -> int:
        return 0 if port == 0 else 2 * port + 2

    @staticmethod
    def tx_queue(port: int) -> int:
        return 1 if port == 0 else 2 * port + 3

    def initialize(self) -> None:
        """§3.1.1 to DRIVER_OK, then the port setup of §5.3.5: without MULTIPORT, port 0 gets
        its receive buffers; with it, control buffers, DEVICE_READY and the port handshake."""
        self._free_buffers()
        self.port_table = {}
        self.control_log = []
        self.sent_log = []
        super().initialize()
        if not self.multiport:
            self.port_table[0] = Port(0, console=True, host_open=True, guest_open=True)
            self._post_rx(0)
            return
        self._fill(CONTROL_RECEIVEQ, self.CONTROL_BUFFERS, self.CONTROL_BUFFER_SIZE)
        if self.handshake:
            self.send_control(ControlMessage(0, ControlEvent.DEVICE_READY, 1))
            self.poll_control()
            self._open_requested()

    def _open_requested(self) -> None:
        want = self.open_ports
        wanted = set() if isinstance(want, bool) else set(want)
        for pid, port in sorted(self.port_table.items()):
            if not port.guest_open and (want is True or pid in wanted):
                self.open_port(pid)

    # -- buffers --------------------------------------------------------------------------

    def _fill(self, queue: int, count: int, size: int) -> _RxPool:
        """Post ``count`` device-writable buffers of ``size`` bytes on ``queue`` and kick."""
        vq = self._queue(queue)
        pool = self._pools.setdefault(queue, _RxPool(vq, size))
        count = min(count, vq.size)
        for _ in range(count):
            addr = self.memory.alloc(size, 16, tag=f"{vq.name} buffer")
            pool.addrs.append(addr)
            vq.add([Buf(addr, size, writable=True)])
        vq.kick()
        return pool

    def _queue(self, index: int) -> Virtqueue:
        if index >= len(self.queues):
            raise ConsoleError(
                f"{self}: queue {index} ({self.queue_role(index)}) was not set up "
                f"({len(self.queues)} queues: MULTIPORT {'on' if self.multiport else 'off'}, nr_ports={self.nr_ports})"
            )
        return self.queues[index]

    def _post_rx(self, port: int) -> None:
        if self.rx_queue(port) not in self._pools:
            self._fill(self.rx_queue(port), self.RX_BUFFERS, self.RX_BUFFER_SIZE)

    def _free_buffers(self) -> None:
        for pool in self._pools.values():
            for addr in pool.addrs:
                self.memory.free(addr)
        self._pools = {}

    def reset(self) -> None:
        """Device reset; the receive buffers go back to the allocator with the rings."""
        super().reset()
        self._free_buffers()

    def _take_used(self, queue: int) -> list[tuple[UsedElem, bytes]]:
        """Every buffer the device has used on a receive queue, with its data (the first
        used-length bytes), each re-posted at once; one kick for the lot."""
        pool = self._pools.get(queue)
        if pool is None:
            return []
        out = []
        while (elem := pool.vq.poll_used()) is not None:
            buf = elem.bufs[0]
            data = self.memory.read(buf.addr, elem.length) if elem.length else b""
            out.append((elem, data))
            pool.vq.add([buf])
        if out:
            pool.vq.kick()
        return out

    # -- control queue --------------------------------------------------------------------

    def send_control(self, msg: ControlMessage, timeout: float = 5.0) -> None:
        """Send one control message and wait until the device has used it; then handle the
        messages it produced (QEMU answers while it processes the transmitq)."""
        if not self.multiport:
            raise ConsoleError(f"{self}: no control queue without MULTIPORT (message {msg})")
        self.sent_log.append(msg)
        self._queue(CONTROL_TRANSMITQ).exchange([msg.encode()], [])

    def poll_control(self) -> list[ControlMessage]:
        """Handle every control message the device has sent, and send the answers they call
        for (PORT_READY for DEVICE_ADD, PORT_OPEN for CONSOLE_PORT) until quiet."""
        handled: list[ControlMessage] = []
        if not self.multiport:
            return handled
        while True:
            for elem, data in self._take_used(CONTROL_RECEIVEQ):
                where = f"{self}: control receiveq (queue {CONTROL_RECEIVEQ}) descriptor {elem.id}"
                msg = ControlMessage.decode(data, where)
                self.control_log.append(Received(msg, elem.length, elem.bufs[0].length, len(self.sent_log)))
                self._handle(msg, where)
                handled.append(msg)
            if not self._outbox:
                return handled
            msg = self._outbox.pop(0)
            if msg.event == ControlEvent.PORT_OPEN and msg.value:
                self._post_rx(msg.id)
            self.send_control(msg)

    def _port(self, msg: ControlMessage, where: str) -> Port:
        port = self.port_table.get(msg.id)
        if port is None:
            raise ConsoleError(f"{where}: {msg} names port {msg.id}, which the device never added (DEVICE_ADD)")
        return port

    def _handle(self, msg: ControlMessage, where: str) -> None:
        """Apply one device message to the port table (§5.3.6.2)."""
        if msg.event not in DEVICE_EVENTS:
            raise ConsoleError(f"{where}: {msg} is not a device-to-driver control event (§5.3.6.2)")
        if msg.event == ControlEvent.DEVICE_ADD:
            if msg.id in self.port_table:
                raise ConsoleError(f"{where}: {msg} adds port {msg.id}, which already exists (§5.3.6.2.1)")
            if msg.id >= self.max_nr_ports:
                raise ConsoleError(
                    f"{where}: {msg} adds port {msg.id}, not below max_nr_ports={self.max_nr_ports} (§5.3.6.2.1)"
                )
            ok = self.tx_queue(msg.id) < len(self.queues)
            self.port_table[msg.id] = Port(msg.id)
            self._outbox.append(ControlMessage(msg.id, ControlEvent.PORT_READY, int(ok)))
            return
        port = self._port(msg, where)
        if msg.event == ControlEvent.DEVICE_REMOVE:
            del self.port_table[msg.id]  # its receive buffers stay posted until a reset
        elif msg.event == ControlEvent.CONSOLE_PORT:
            port.console = True
            if not port.guest_open:  # §5.3.6.2.2: MUST answer with PORT_OPEN, value 1
                port.guest_open = True
                self._outbox.append(ControlMessage(msg.id, ControlEvent.PORT_OPEN, 1))
        elif msg.event == ControlEvent.PORT_NAME:
            port.name = msg.name
        elif msg.event == ControlEvent.PORT_OPEN:
            port.host_open = bool(msg.value)
        elif msg.event == ControlEvent.RESIZE:
            port.size = msg.resize

    def open_port(self, port: int, open_: bool = True) -> None:
        """Tell the device the guest side of ``port`` is open (or closed): PORT_OPEN."""
        p = self.port_table.get(port)
        if p is None:
            raise ConsoleError(f"{self}: port {port} was not announced (ports: {sorted(self.port_table)})")
        if not self.multiport:
            return
        if open_:
            self._post_rx(port)
        p.guest_open = open_
        self.send_control(ControlMessage(port, ControlEvent.PORT_OPEN, int(open_)))
        self.poll_control()

    @property
    def ports(self) -> dict[int, Port]:
        """Port id -> :class:`Port`, after handling any control messages that arrived."""
        self.poll_control()
        return self.port_table

    # -- data -----------------------------------------------------------------------------

    def _data_port(self, port: int) -> Port:
        p = self.port_table.get(port)
        if p is None:
            if self.multiport:
                self.poll_control()
                p = self.port_table.get(port)
            if p is None:
                raise ConsoleError(f"{self}: port {port} was not announced (ports: {sorted(self.port_table)})")
        return p

    def write(self, data: bytes, port: int = 0, *, timeout: float = 5.0) -> None:
        """Send ``data`` on the port's transmitq; returns once the device has used every
        buffer (§5.3.6 step 1). The device writes nothing back into a transmit buffer."""
        self._data_port(port)
        vq = self._queue(self.tx_queue(port))
        requests = [vq.submit([data[i : i + self.TX_CHUNK]], []) for i in range(0, len(data), self.TX_CHUNK)]
        for req in requests:
            vq.complete(req, timeout)

    def read_chunk(self, port: int = 0, *, timeout: float = 5.0) -> bytes:
        """The contents of the next receive buffer the device uses on the port (its used
        length of bytes), past whatever :meth:`read` has already buffered."""
        self._data_port(port)
        pool = self._pools.get(self.rx_queue(port))
        if pool is None:
            raise ConsoleError(f"{self}: port {port} is not open on the guest side (no receive buffers)")
        vq = pool.vq
        elem = vq.wait_used(timeout)
        buf = elem.bufs[0]
        data = self.memory.read(buf.addr, elem.length) if elem.length else b""
        vq.add([buf])
        vq.kick()
        return data

    def read_available(self, port: int = 0) -> bytes:
        """Whatever the device has put in the port's receive buffers so far."""
        self._data_port(port)
        pool = self._pools.get(self.rx_queue(port))
        if pool is None:
            return b""
        for _, data in self._take_used(self.rx_queue(port)):
            pool.data += data
        out = bytes(pool.data)
        pool.data.clear()
        return out

    def read(self, n: int, port: int = 0, *, timeout: float = 5.0) -> bytes:
        """Exactly ``n`` bytes from the port's receiveq (the host wrote them), or ConsoleTimeout."""
        self._data_port(port)
        pool = self._pools.get(self.rx_queue(port))
        if pool is None:
            raise ConsoleError(f"{self}: port {port} is not open on the guest side (no receive buffers)")
        deadline = time.monotonic() + timeout
        while len(pool.data) < n:
            got = self._take_used(self.rx_queue(port))
            for _, data in got:
                pool.data += data
            if not got and time.monotonic() > deadline:
                raise ConsoleTimeout(
                    f"{self}: port {port}: {len(pool.data)} of {n} bytes within {timeout:g} s "
                    f"(so far {bytes(pool.data[:64])!r}); {pool.vq.describe_state()}"
                )
        out = bytes(pool.data[:n])
        del pool.data[:n]
        return out

    def emergency_write(self, char: int) -> None:
        """Write ``emerg_wr`` (EMERG_WRITE, §5.3.4): the device outputs its low byte; allowed
        at any time, even before initialization (§5.3.5.1)."""
        self.write_config(CONSOLE_CONFIG.emerg_wr, char)
