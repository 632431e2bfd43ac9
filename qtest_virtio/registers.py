"""Register layouts as typed data: each register is declared once, as a class attribute named as the
spec names it, so ``COMMON_CFG.queue_select`` is checked by mypy and a misspelt register fails it.

This module is pure data plumbing used by the PCI, virtio and device layers; it knows no transport.
A :class:`Layout` subclass declares :class:`Field` s (byte offset, width); a :class:`BitLayout`
subclass declares :class:`Bits` inside one register. A :class:`RegisterBlock` binds a layout to an
accessor pair, so code reads ``block.read(COMMON_CFG.queue_select)`` and never an anonymous offset::

    class CommonCfg(Layout, struct="virtio_pci_common_cfg", size=0x3C):
        device_feature_select = Field(0x00, 4)
        ...
    COMMON_CFG = CommonCfg()

Names that are not identifiers in the spec (``geometry.cylinders``) are given with ``name=``; the
dynamic lookup ``layout["geometry.cylinders"]`` is for user-typed names only (the shell).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True)
class Field:
    """One register: byte offset inside its block and width in bytes (1, 2, 4 or 8).

    ``requires`` names the feature that makes the field exist (virtio 1.2 §2.5: device-specific
    configuration fields "exist" only with their feature), None when it always does."""

    offset: int
    width: int
    doc: str = ""
    name: str = ""
    requires: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.width not in _STRUCT_CODES:
            raise ValueError(f"register {self.name or self.offset}: width {self.width} is not 1, 2, 4 or 8")

    def __set_name__(self, owner: type, attr: str) -> None:
        if not self.name:
            object.__setattr__(self, "name", attr)

    @property
    def end(self) -> int:
        return self.offset + self.width

    def get(self, data: bytes | bytearray | memoryview) -> int:
        """This field's little-endian value inside ``data`` (the layout's bytes)."""
        return int.from_bytes(data[self.offset : self.end], "little")


T = TypeVar("T", "Field", "Bits")


def _declared(cls: type, kind: type[T], inherited: dict[str, T], base: type) -> dict[str, T]:
    """The ``kind`` class attributes of ``cls`` by spec name, after the ones it inherits; a name
    that shadows the base class's own attributes or repeats one is a declaration error."""
    found = dict(inherited)
    for attr, value in vars(cls).items():
        if isinstance(value, kind):
            if hasattr(base, attr):
                raise TypeError(f"{cls.__name__}.{attr}: the name shadows a {base.__name__} attribute")
            if value.name in found:
                raise TypeError(f"{cls.__name__}: duplicate name {value.name!r}")
            found[value.name] = value
    return found


class Layout:
    """An ordered set of registers, declared as :class:`Field` class attributes of a subclass.

    Subclasses inherit their bases' fields (``VirtioPciNotifyCap(VirtioPciCap)``); the class
    keywords give the spec's struct name and the size (default: the end of the last field)."""

    name: ClassVar[str] = ""
    size: ClassVar[int] = 0
    _fields: ClassVar[dict[str, Field]] = {}

    def __init_subclass__(cls, *, struct: str = "", size: int | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = fields = _declared(cls, Field, cls._fields, Layout)
        cls.name = struct or cls.name or cls.__name__
        ends = [f.end for f in fields.values()]
        cls.size = size if size is not None else max(ends, default=0)

    def __getitem__(self, name: str) -> Field:
        return self._fields[name]

    def get(self, name: str) -> Field | None:
        return self._fields.get(name)

    def __iter__(self) -> Iterator[Field]:
        return iter(sorted(self._fields.values(), key=lambda f: f.offset))

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, Field):
            return self._fields.get(item.name) == item
        return item in self._fields

    def at(self, offset: int) -> Field | None:
        """The register that starts at ``offset``, if any (for decoding raw accesses)."""
        return next((f for f in self._fields.values() if f.offset == offset), None)

    def pack(self, values: Mapping[str, int] | None = None, /, **kw: int) -> bytes:
        """The little-endian bytes of the layout with the given fields by name (others zero)."""
        out = bytearray(self.size)
        for name, value in {**(values or {}), **kw}.items():
            f = self[name]
            out[f.offset : f.end] = value.to_bytes(f.width, "little")
        return bytes(out)

    def unpack(self, data: bytes | bytearray | memoryview) -> dict[str, int]:
        """Every field that ``data`` covers, by name, in offset order."""
        return {f.name: f.get(data) for f in self if f.end <= len(data)}

    @property
    def struct(self) -> struct.Struct:
        """A ``struct.Struct`` of the whole layout, for layouts whose fields tile it with no gap
        (ring descriptors): one definition of the wire shape, not a hand-written format string."""
        fmt, at = "<", 0
        for f in self:
            if f.offset != at:
                raise TypeError(f"{self.name}: gap or overlap at offset {at}, not a packed struct")
            fmt += _STRUCT_CODES[f.width]
            at = f.end
        if at != self.size:
            raise TypeError(f"{self.name}: fields end at {at}, size is {self.size}")
        return struct.Struct(fmt)

    def __repr__(self) -> str:
        return f"<layout {self.name}: {len(self._fields)} registers>"


@dataclass(frozen=True)
class Bits:
    """A bit field inside a register: ``shift`` and ``width`` in bits."""

    shift: int
    width: int = 1
    name: str = ""

    def __set_name__(self, owner: type, attr: str) -> None:
        if not self.name:
            object.__setattr__(self, "name", attr)

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
    """The named bit fields of one register, declared as :class:`Bits` class attributes."""

    name: ClassVar[str] = ""
    _bits: ClassVar[dict[str, Bits]] = {}

    def __init_subclass__(cls, *, register: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._bits = _declared(cls, Bits, cls._bits, BitLayout)
        cls.name = register or cls.name or cls.__name__

    def __iter__(self) -> Iterator[Bits]:
        return iter(self._bits.values())

    def __getitem__(self, name: str) -> Bits:
        return self._bits[name]

    def __contains__(self, name: object) -> bool:
        return name in self._bits

    def decode(self, value: int) -> dict[str, int]:
        return {b.name: b.get(value) for b in self._bits.values()}

    def names_set(self, value: int) -> list[str]:
        """Names of the one-bit fields that are set in ``value``."""
        return [b.name for b in self._bits.values() if b.width == 1 and b.get(value)]

    def __repr__(self) -> str:
        return f"<bits of {self.name}: {', '.join(self._bits)}>"


ReadFn = Callable[[int, int], int]
WriteFn = Callable[[int, int, int], None]
L = TypeVar("L", bound=Layout)
L_co = TypeVar("L_co", bound=Layout, covariant=True)


class RegisterBlock(Generic[L_co]):
    """A layout bound to accessors ``read(offset, width)`` / ``write(offset, width, value)``.

    Only the layout's own fields are accepted: a field of another layout is a bug, not an offset."""

    def __init__(self, layout: L_co, read: ReadFn, write: WriteFn) -> None:
        self.layout = layout
        self._read = read
        self._write = write

    def _check(self, reg: Field) -> Field:
        if not isinstance(reg, Field):
            raise TypeError(f"{self.layout.name}: registers are Fields of the layout, not {reg!r}")
        if reg not in self.layout:
            raise ValueError(f"register {reg.name} is not in {self.layout.name}")
        return reg

    def read(self, reg: Field) -> int:
        f = self._check(reg)
        return self._read(f.offset, f.width)

    def write(self, reg: Field, value: int) -> None:
        f = self._check(reg)
        if value < 0 or value >> (8 * f.width):
            raise ValueError(f"{self.layout.name}.{f.name}: {value:#x} does not fit in {f.width} bytes")
        self._write(f.offset, f.width, value)

    def dump(self) -> Mapping[str, int]:
        """Every register by name, in offset order (for reports and the shell)."""
        return {f.name: self.read(f) for f in self.layout}
