"""Register layouts as data: each register is declared once (name, offset, width) and read by name.

This module is pure data plumbing used by the PCI and virtio layers; it knows no transport.
A :class:`Layout` is a named, ordered set of :class:`Field` s; a :class:`Bits` names the bit
fields inside one register. A :class:`RegisterBlock` binds a layout to an accessor pair so
that code reads ``block.read(COMMON_CFG.queue_select)`` and never an anonymous offset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    """One register: byte offset inside its block and width in bytes (1, 2, 4 or 8)."""

    name: str
    offset: int
    width: int
    doc: str = ""

    def __post_init__(self) -> None:
        if self.width not in (1, 2, 4, 8):
            raise ValueError(f"register {self.name}: width {self.width} is not 1, 2, 4 or 8")

    @property
    def end(self) -> int:
        return self.offset + self.width


class Layout:
    """An ordered, named set of registers; attribute access returns the :class:`Field`."""

    def __init__(self, name: str, fields: list[Field], size: int | None = None) -> None:
        self.name = name
        self._fields = {f.name: f for f in fields}
        if len(self._fields) != len(fields):
            raise ValueError(f"layout {name}: duplicate register names")
        self.size = size if size is not None else max(f.end for f in fields)

    def __getattr__(self, name: str) -> Field:
        try:
            return self.__dict__["_fields"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(f"layout {self.__dict__.get('name')} has no register {name!r}") from None

    def __getitem__(self, name: str) -> Field:
        return self._fields[name]

    def __iter__(self) -> Iterator[Field]:
        return iter(sorted(self._fields.values(), key=lambda f: f.offset))

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def at(self, offset: int) -> Field | None:
        """The register that starts at ``offset``, if any (for decoding raw accesses)."""
        for f in self._fields.values():
            if f.offset == offset:
                return f
        return None

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, {len(self._fields)} registers)"


@dataclass(frozen=True)
class Bits:
    """A bit field inside a register: ``shift`` and ``width`` in bits."""

    name: str
    shift: int
    width: int = 1

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.shift

    def get(self, value: int) -> int:
        return (value & self.mask) >> self.shift

    def set(self, value: int, field_value: int) -> int:
        if field_value >> self.width:
            raise ValueError(f"{self.name}: {field_value:#x} does not fit in {self.width} bits")
        return (value & ~self.mask) | (field_value << self.shift)


class BitLayout:
    """The named bit fields of one register; decodes a value into ``{name: field value}``."""

    def __init__(self, name: str, bits: list[Bits]) -> None:
        self.name = name
        self._bits = {b.name: b for b in bits}

    def __getattr__(self, name: str) -> Bits:
        try:
            return self.__dict__["_bits"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(f"{self.__dict__.get('name')} has no bit field {name!r}") from None

    def __iter__(self) -> Iterator[Bits]:
        return iter(self._bits.values())

    def decode(self, value: int) -> dict[str, int]:
        return {b.name: b.get(value) for b in self._bits.values()}

    def names_set(self, value: int) -> list[str]:
        """Names of the one-bit fields that are set in ``value``."""
        return [b.name for b in self._bits.values() if b.width == 1 and b.get(value)]


ReadFn = Callable[[int, int], int]
WriteFn = Callable[[int, int, int], None]


class RegisterBlock:
    """A layout bound to accessors ``read(offset, width)`` / ``write(offset, width, value)``."""

    def __init__(self, layout: Layout, read: ReadFn, write: WriteFn) -> None:
        self.layout = layout
        self._read = read
        self._write = write

    def _field(self, reg: Field | str) -> Field:
        return self.layout[reg] if isinstance(reg, str) else reg

    def read(self, reg: Field | str) -> int:
        f = self._field(reg)
        return self._read(f.offset, f.width)

    def write(self, reg: Field | str, value: int) -> None:
        f = self._field(reg)
        if value < 0 or value >> (8 * f.width):
            raise ValueError(f"{self.layout.name}.{f.name}: {value:#x} does not fit in {f.width} bytes")
        self._write(f.offset, f.width, value)

    def dump(self) -> Mapping[str, int]:
        """Every register by name, in offset order (for reports and the shell)."""
        return {f.name: self.read(f) for f in self.layout}
