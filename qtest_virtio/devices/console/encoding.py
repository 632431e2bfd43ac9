"""virtio-console (virtio 1.2 §5.3): the encoding of the config and the control messages
(struct virtio_console_control, §5.3.6.2), and the control queues' indices (§5.3.2).

Control messages and data are little-endian; the legacy interface uses the guest's native
endianness (§5.3.6.3), which is little-endian on x86, so one encoding serves every mode.
Pure data and functions (no I/O): unit-testable without QEMU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from ...errors import QtestVirtioError
from ...registers import Field, Layout

#: Virtio device ID of the console device (virtio 1.2 §5).
DEVICE_ID = 3
#: Feature bits (§5.3.3), named without the VIRTIO_CONSOLE_F_ prefix.
FEATURE_BITS: dict[int, str] = {0: "SIZE", 1: "MULTIPORT", 2: "EMERG_WRITE"}


#: struct virtio_console_config (§5.3.4; order as in virtio 1.2 and QEMU/Linux headers).
class ConsoleConfigLayout(Layout, struct="virtio_console_config"):
    cols = Field(0, 2, "console width", requires="SIZE")
    rows = Field(2, 2, "console height", requires="SIZE")
    max_nr_ports = Field(4, 4, "ports the device supports", requires="MULTIPORT")
    emerg_wr = Field(8, 4, "emergency write: the low byte is output", requires="EMERG_WRITE")


CONSOLE_CONFIG = ConsoleConfigLayout()


#: struct virtio_console_control (§5.3.6.2): the header of every control message.
class ConsoleControlLayout(Layout, struct="virtio_console_control"):
    id = Field(0, 4, "port number")
    event = Field(4, 2)
    value = Field(6, 2)


CONSOLE_CONTROL = ConsoleControlLayout()


#: struct virtio_console_resize (§5.3.6.2): follows a RESIZE header.
class ConsoleResizeLayout(Layout, struct="virtio_console_resize"):
    cols = Field(0, 2)
    rows = Field(2, 2)


CONSOLE_RESIZE = ConsoleResizeLayout()

#: Queue indices of the control pair (§5.3.2).
CONTROL_RECEIVEQ = 2
CONTROL_TRANSMITQ = 3


class ControlEvent(IntEnum):
    """virtio_console_control.event values (§5.3.6.2)."""

    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


#: Events only the device sends; a driver receiving another one has been sent garbage.
DEVICE_EVENTS = frozenset(
    {
        ControlEvent.DEVICE_ADD,
        ControlEvent.DEVICE_REMOVE,
        ControlEvent.CONSOLE_PORT,
        ControlEvent.RESIZE,
        ControlEvent.PORT_OPEN,
        ControlEvent.PORT_NAME,
    }
)


class ConsoleError(QtestVirtioError):
    """The console device sent something the spec does not allow, or a port misbehaved."""


class ConsoleTimeout(ConsoleError):
    """Fewer bytes arrived on a port than asked for within the timeout."""


@dataclass(frozen=True)
class ControlMessage:
    """One control message: the header fields, and what follows the header (PORT_NAME's name,
    RESIZE's size)."""

    id: int
    event: int
    value: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        return CONSOLE_CONTROL.pack(id=self.id, event=self.event, value=self.value) + self.payload

    @classmethod
    def decode(cls, data: bytes, where: str = "control message") -> ControlMessage:
        """Parse a message; ``where`` names device, queue and descriptor in the error."""
        if len(data) < CONSOLE_CONTROL.size:
            raise ConsoleError(
                f"{where}: {len(data)} bytes is shorter than the {CONSOLE_CONTROL.size}-byte "
                f"struct virtio_console_control (§5.3.6.2): {data.hex()}"
            )
        return cls(
            CONSOLE_CONTROL.id.get(data),
            CONSOLE_CONTROL.event.get(data),
            CONSOLE_CONTROL.value.get(data),
            bytes(data[CONSOLE_CONTROL.size :]),
        )

    @property
    def event_name(self) -> str:
        try:
            return ControlEvent(self.event).name
        except ValueError:
            return f"unknown event {self.event}"

    @property
    def name(self) -> str:
        """PORT_NAME's UTF-8 name (§5.3.6.2: no NUL terminator; one is tolerated here)."""
        return self.payload.removesuffix(b"\0").decode("utf-8", errors="replace")

    @property
    def resize(self) -> tuple[int, int]:
        """RESIZE's (cols, rows)."""
        return CONSOLE_RESIZE.cols.get(self.payload), CONSOLE_RESIZE.rows.get(self.payload)

    def __str__(self) -> str:
        extra = f" payload={self.payload!r}" if self.payload else ""
        return f"{self.event_name}(id={self.id}, value={self.value}{extra})"


@dataclass(frozen=True)
class ConsoleConfig:
    """struct virtio_console_config, by field name (§5.3.4); None where the field does not
    exist (its feature was not negotiated)."""

    cols: int | None = None
    rows: int | None = None
    max_nr_ports: int | None = None
    emerg_wr: int | None = None

    @classmethod
    def from_fields(cls, values: Mapping[str, int]) -> ConsoleConfig:
        return cls(**{f.name: values.get(f.name) for f in CONSOLE_CONFIG})

    @classmethod
    def decode(cls, data: bytes) -> ConsoleConfig:
        """Every field the bytes cover (a config dump)."""
        return cls.from_fields(CONSOLE_CONFIG.unpack(data))
