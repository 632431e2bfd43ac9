"""Register layouts as data: fields by name, bit fields, bound register blocks (pure logic)."""

from __future__ import annotations

import itertools

import pytest

from qtest_virtio.pci import regs
from qtest_virtio.registers import BitLayout, Bits, Field, Layout, RegisterBlock
from qtest_virtio.transport import layout


def test_layouts_match_the_spec_offsets() -> None:
    # virtio 1.2 §4.1.4.3 and §4.1.4.10; PCI 3.0 §6.1
    assert (layout.COMMON_CFG.queue_select.offset, layout.COMMON_CFG.queue_select.width) == (0x16, 2)
    assert layout.COMMON_CFG.queue_desc.offset == 0x20 and layout.COMMON_CFG.queue_desc.width == 8
    assert layout.COMMON_CFG.queue_reset.offset == 0x3A
    assert layout.LEGACY_CFG.isr_status.offset == 0x13
    assert layout.LEGACY_DEVICE_CFG_OFFSET_MSIX - layout.LEGACY_DEVICE_CFG_OFFSET == 4
    assert regs.TYPE0_HEADER.capabilities_ptr.offset == 0x34
    assert regs.TYPE1_HEADER.secondary_bus.offset == 0x19


def test_layouts_do_not_overlap() -> None:
    for lay in (layout.COMMON_CFG, layout.LEGACY_CFG, regs.TYPE0_HEADER, regs.MSIX_CAP, layout.VIRTIO_PCI_NOTIFY_CAP):
        fields = list(lay)
        for a, b in itertools.pairwise(fields):
            assert a.end <= b.offset, f"{lay.name}: {a.name} overlaps {b.name}"


def test_layout_errors() -> None:
    with pytest.raises(ValueError, match="width"):
        Field(0, 3)
    with pytest.raises(TypeError, match="duplicate"):

        class Twice(Layout, struct="twice"):
            a = Field(0, 1)
            b = Field(1, 1, name="a")

    with pytest.raises(TypeError, match="shadows"):

        class Shadow(Layout, struct="shadow"):
            size = Field(0, 1)  # type: ignore[assignment]  # the shadowing this test expects refused

    with pytest.raises(KeyError):
        _ = layout.COMMON_CFG["nope"]


def test_fields_take_their_attribute_name_and_inherit() -> None:
    class Head(Layout, struct="head"):
        kind = Field(0, 1)
        geometry_heads = Field(1, 1, name="geometry.heads")

    class Longer(Head, struct="longer", size=8):
        tail = Field(4, 4, requires="TAIL")

    lay = Longer()
    assert [f.name for f in lay] == ["kind", "geometry.heads", "tail"]
    assert lay.tail.requires == "TAIL" and lay.kind.requires is None
    assert (Head.name, Head.size, lay.name, lay.size) == ("head", 2, "longer", 8)
    assert lay.pack(kind=1, tail=0x01020304) == bytes([1, 0, 0, 0, 4, 3, 2, 1])
    assert lay.unpack(bytes(range(8))) == {"kind": 0, "geometry.heads": 1, "tail": 0x07060504}
    assert lay.at(4) is lay.tail and lay.at(3) is None
    assert "tail" in lay and lay.kind in lay and Head().kind in lay


def test_struct_of_a_packed_layout() -> None:
    from qtest_virtio.virtqueue.layout import PACKED_DESC, SPLIT_DESC, USED_ELEM

    assert SPLIT_DESC.struct.format == PACKED_DESC.struct.format == "<QIHH"
    assert USED_ELEM.struct.size == 8
    with pytest.raises(TypeError, match="gap"):
        _ = layout.VIRTIO_PCI_CAP.struct  # a gap at bytes 6-7


def test_bits() -> None:
    b = Bits(0, 11, name="table_size")
    assert b.mask == 0x7FF and b.get(0x8003) == 3
    assert regs.MSIX_CONTROL.enable.set(0, 1) == 0x8000
    with pytest.raises(ValueError):
        b.set(0, 1 << 11)

    class S(BitLayout, register="s"):
        A = Bits(0)
        B = Bits(2)
        W = Bits(4, 2)

    bl = S()
    assert bl.names_set(0b101) == ["A", "B"]
    assert bl.decode(0b110000) == {"A": 0, "B": 0, "W": 3}


def test_register_block_reads_and_writes_by_field() -> None:
    space = bytearray(0x40)

    def read(off: int, width: int) -> int:
        return int.from_bytes(space[off : off + width], "little")

    def write(off: int, width: int, value: int) -> None:
        space[off : off + width] = value.to_bytes(width, "little")

    blk = RegisterBlock(layout.COMMON_CFG, read, write)
    blk.write(layout.COMMON_CFG.queue_select, 0x1234)
    assert space[0x16:0x18] == b"\x34\x12"
    assert blk.read(layout.COMMON_CFG.queue_select) == 0x1234
    with pytest.raises(ValueError, match="does not fit"):
        blk.write(layout.COMMON_CFG.device_status, 0x100)
    with pytest.raises(ValueError, match="not in common_cfg"):
        blk.read(layout.LEGACY_CFG.queue_select)  # same name, another layout's offset
    assert blk.dump()["queue_select"] == 0x1234


def test_feature_names() -> None:
    assert layout.feature_names((1 << 32) | (1 << 29) | (1 << 3)) == ["bit 3", "EVENT_IDX", "VERSION_1"]
    assert layout.feature_names(1 << 3, {3: "MTU"}) == ["MTU"]
    assert layout.virtio_device_type(0x1042) == 2
    assert layout.virtio_device_type(0x1001, 2) == 2
    assert layout.virtio_device_type(0x8086) is None
