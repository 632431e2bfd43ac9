"""virtio-blk: request encoding and decoding (no QEMU), then the driver against real QEMU on
every transport mode, split and packed rings (virtio 1.2 §5.2)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from qtest_virtio import Machine, modes
from qtest_virtio.devices.base import VirtioDriver, existing_fields, read_config
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.blk.encoding import (
    BLK_CONFIG,
    MERGED,
    SEPARATE,
    BlkConfig,
    BlkError,
    BlkProtocolError,
    BlkReqType,
    BlkRequest,
    BlkRequestError,
    BlkStatus,
    Framing,
    decode_id,
    decode_response,
    encode_dwz_segment,
    encode_header,
    parse_status,
)
from qtest_virtio.transport import Negotiated, TransportError, VirtioTransport
from qtest_virtio.virtqueue import PackedVirtqueue, Request, SplitVirtqueue

IMAGE = 64 << 20  # MachineSpec's default scratch image


# -- encoding and decoding, no QEMU -----------------------------------------------------------------


def test_header_layout() -> None:
    """struct virtio_blk_req header: le32 type, le32 reserved, le64 sector (§5.2.6)."""
    hdr = encode_header(BlkReqType.OUT, 0x0102030405060708, reserved=7)
    assert hdr == bytes([1, 0, 0, 0, 7, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1])
    assert encode_header(BlkReqType.GET_ID) == bytes([8]) + bytes(15)
    assert BlkRequest(BlkReqType.IN, 5).header() == encode_header(0, 5)


def test_discard_write_zeroes_segment() -> None:
    seg = encode_dwz_segment(0x10, 8)
    assert seg == (0x10).to_bytes(8, "little") + (8).to_bytes(4, "little") + bytes(4)
    assert encode_dwz_segment(1, 2, unmap=True)[12:] == b"\x01\0\0\0"
    assert encode_dwz_segment(1, 2, flags=0x8000_0002)[12:] == b"\x02\0\0\x80"


def test_pack_and_unpack_by_field_name() -> None:
    data = BLK_CONFIG.pack({"capacity": 1 << 40, "seg_max": 254, "writeback": 1})
    assert len(data) == BLK_CONFIG.size
    values = BLK_CONFIG.unpack(data)
    assert values["capacity"] == 1 << 40 and values["seg_max"] == 254 and values["writeback"] == 1
    assert values["size_max"] == 0
    assert "max_discard_sectors" not in BLK_CONFIG.unpack(data[:36])  # past the data given


def test_framing_layouts() -> None:
    write = BlkRequest(BlkReqType.OUT, 3, data_out=bytes(range(256)) * 6)  # 1536 bytes
    read = BlkRequest(BlkReqType.IN, 3, data_in_len=1024)
    hdr = write.header()

    assert SEPARATE.layout(write) == ([hdr, write.data_out], [1])
    assert SEPARATE.layout(read) == ([read.header()], [1024, 1])
    out, ins = Framing(segment_size=512).layout(write)
    assert out == [hdr, write.data_out[:512], write.data_out[512:1024], write.data_out[1024:]] and ins == [1]
    assert Framing(segment_size=300).layout(read)[1] == [300, 300, 300, 124, 1]
    assert Framing(split_header=True).layout(read) == ([read.header()[:8], read.header()[8:]], [1024, 1])
    assert MERGED.layout(write) == ([hdr + write.data_out], [1])
    assert MERGED.layout(read) == ([read.header()], [1025])

    assert Framing(segment_size=512).data_segments(write) == 3
    assert Framing(segment_size=100).data_segments(read) == 11
    assert MERGED.data_segments(read) == 1 and SEPARATE.data_segments(BlkRequest(BlkReqType.FLUSH)) == 0
    assert MERGED.needs_any_layout and Framing(split_header=True).needs_any_layout
    assert not Framing(segment_size=8).needs_any_layout
    with pytest.raises(ValueError, match="positive"):
        Framing(segment_size=0)
    with pytest.raises(ValueError, match="excludes"):
        Framing(merge=True, segment_size=512)


def test_status_and_response_decoding() -> None:
    assert parse_status(0, "x") is BlkStatus.OK and parse_status(2, "x") is BlkStatus.UNSUPP
    with pytest.raises(BlkProtocolError, match=r"blk0 queue 1 request 7: unknown status byte 0x07"):
        parse_status(7, "blk0 queue 1 request 7")

    read = BlkRequest(BlkReqType.IN, 0, data_in_len=4)
    resp = decode_response(read, [b"ab", b"cd", b"\x01"], 5, where="w", queue=1, token=9)
    assert (resp.status, resp.data, resp.used_len, resp.queue, resp.token) == (BlkStatus.IOERR, b"abcd", 5, 1, 9)
    assert not resp.ok
    merged = decode_response(read, [b"abcd\x00"], 5, where="w")
    assert merged.ok and merged.data == b"abcd"
    with pytest.raises(BlkProtocolError, match="w: unknown status byte 0xff"):
        decode_response(read, [b"abcd\xff"], 5, where="w")
    with pytest.raises(BlkProtocolError, match="3 device-writable bytes, expected 5"):
        decode_response(read, [b"abc"], 3, where="w")


def test_device_id_string() -> None:
    """NUL-padded ASCII up to 20 bytes, no terminator at 20 (§5.2.6)."""
    assert decode_id(b"abc\0" + bytes(16)) == "abc"
    assert decode_id(b"A" * 20) == "A" * 20
    assert decode_id(bytes(20)) == ""


def test_request_describe() -> None:
    assert BlkRequest(BlkReqType.IN, 9, data_in_len=512).describe() == "IN sector 9 (0 bytes out, 512 in)"
    assert BlkRequest(0x55).describe() == "type 0x55 sector 0"
    assert BlkRequest(BlkReqType.FLUSH | 0x8000_0000).describe().startswith("FLUSH")


def test_config_fields_follow_features() -> None:
    """Only capacity (and the padding unused0 beside it) exist without features (§5.2.4)."""

    def names(features: set[str]) -> list[str]:
        return [f.name for f in existing_fields(BLK_CONFIG, features)]

    assert names(set()) == ["capacity", "unused0"]
    assert names({"MQ", "SEG_MAX", "GEOMETRY", "EVENT_IDX"}) == [
        "capacity",
        "seg_max",
        "geometry.cylinders",
        "geometry.heads",
        "geometry.sectors",
        "unused0",
        "num_queues",
    ]
    assert "unused1[0]" in names({"WRITE_ZEROES"}) and "max_secure_erase_seg" in names({"SECURE_ERASE"})
    cfg = BlkConfig.from_fields(
        {"capacity": 8, "geometry.cylinders": 2, "geometry.heads": 3, "geometry.sectors": 4, "num_queues": 2}
    )
    assert cfg.capacity == 8 and cfg.num_queues == 2 and cfg.geometry is not None and cfg.geometry.heads == 3
    assert cfg.topology is None and cfg.seg_max is None and cfg.raw["num_queues"] == 2


class FakeConfigTransport:
    """Config space as bytes, with a generation counter that moves ``bumps`` times: only the
    accessors read_config uses (the batch one is the transports' default, read by read), so it
    is passed where a VirtioTransport is typed."""

    config_read_many = VirtioTransport.config_read_many

    def __init__(self, data: bytes, bumps: int) -> None:
        self.data, self.bumps, self.generation = data, bumps, 0
        self.reads: list[tuple[int, int]] = []

    def config_generation(self) -> int:
        if self.bumps:
            self.bumps -= 1
            self.generation += 1
        return self.generation

    def config_read(self, offset: int, width: int) -> int:
        assert width in (1, 2, 4), "64-bit fields are read as two 32-bit halves"
        self.reads.append((offset, width))
        return int.from_bytes(self.data[offset : offset + width], "little")


def test_config_snapshot_rereads_while_generation_moves() -> None:
    data = BLK_CONFIG.pack({"capacity": 0x1_2345_6789, "blk_size": 4096})
    t = FakeConfigTransport(data, bumps=2)
    fields = [BLK_CONFIG.capacity, BLK_CONFIG.blk_size]
    assert read_config(t, BLK_CONFIG, fields) == {"capacity": 0x1_2345_6789, "blk_size": 4096}  # type: ignore[arg-type]  # fake
    assert t.reads.count((0, 4)) >= 2 and (4, 4) in t.reads  # capacity in halves, re-read
    with pytest.raises(TransportError, match="never settled"):
        read_config(FakeConfigTransport(data, bumps=10**6), BLK_CONFIG, [BLK_CONFIG.capacity])  # type: ignore[arg-type]  # fake


class FakeQueue:
    """A request queue whose device answers every request with a fixed status byte."""

    def __init__(self, status: int) -> None:
        self.status = status

    def submit(self, out: list[bytes], in_sizes: list[int], indirect: bool | None = None, kick: bool = True) -> Request:
        self.in_sizes = in_sizes
        return Request(41, [], [])

    def complete(self, request: Request, timeout: float = 5.0) -> tuple[int, list[bytes]]:
        data = [bytes(n) for n in self.in_sizes]
        data[-1] = bytes([self.status])
        return sum(self.in_sizes), data


def fake_blk(status: int) -> VirtioBlk:
    """A driver constructed without a device: construction does no I/O (only initialize() does)."""
    blk = VirtioBlk(SimpleNamespace(bdf="00:07.0"), "modern", None)  # type: ignore[arg-type]  # no device: construction does no I/O
    assert not blk.initialized
    blk.dev_id = "blk7"
    blk.queues = [FakeQueue(0), FakeQueue(status)]  # type: ignore[list-item]  # fakes answering with status
    blk.negotiated = Negotiated(offered=1 << 32, accepted=1 << 32, refused=0, names=frozenset({"VERSION_1"}))
    return blk


def test_unknown_status_byte_names_device_queue_and_request() -> None:
    with pytest.raises(BlkProtocolError) as info:
        fake_blk(0x42).read(16, 1, queue=1)
    msg = str(info.value)
    assert "VirtioBlk blk7 (modern)" in msg and "queue 1" in msg and "request 41 (IN sector 16" in msg
    assert "unknown status byte 0x42" in msg
    with pytest.raises(BlkRequestError, match=r"queue 1, request 41 \(OUT sector 2.*status UNSUPP") as err:
        fake_blk(BlkStatus.UNSUPP).write(2, bytes(512), queue=1)
    assert err.value.status is BlkStatus.UNSUPP


# -- against QEMU ------------------------------------------------------------------------------------


@pytest.mark.virtio_device("virtio-blk-pci", flags={"serial": "QTEST-0123456789ABCD"})
def test_read_write_round_trip(virtio_device: VirtioDriver, qemu: Machine, request: pytest.FixtureRequest) -> None:
    assert isinstance(virtio_device, VirtioBlk)
    blk, vm = virtio_device, qemu
    packed = request.node.callspec.params["virtio_device"].ring == "packed"  # the plugin's parametrisation
    assert isinstance(blk.queues[0], PackedVirtqueue if packed else SplitVirtqueue)
    assert blk.backend is vm.backend(blk.dev_id) and blk.image.path.endswith(f"{blk.dev_id}.img")

    cfg = blk.config()
    assert cfg.capacity == IMAGE // 512 == blk.capacity
    assert cfg.seg_max == 254 and cfg.blk_size == 512 and cfg.geometry is not None and cfg.writeback in (0, 1)
    assert cfg.num_queues is None and cfg.size_max is None  # MQ and SIZE_MAX not offered here

    data = os.urandom(1536)
    blk.write(100, data)
    assert blk.image.read(100 * 512, 1536) == data  # on the host, through the raw image
    assert blk.read(100, 3) == data
    host = os.urandom(512)
    blk.image.write(7 * 512, host)
    assert blk.read(7, 1) == host  # what the host wrote, the guest reads
    assert blk.read(blk.capacity - 1, 1) == bytes(512)
    blk.flush()
    assert blk.get_id() == "QTEST-0123456789ABCD"  # 20 characters: no terminator

    # Used lengths: a read covers the data and the status byte, a write just the status.
    resp = blk.execute(BlkRequest(BlkReqType.IN, 100, data_in_len=1024))
    assert resp.ok and resp.used_len == 1025 and resp.data == data[:1024]
    assert blk.execute(BlkRequest(BlkReqType.OUT, 100, data_out=data[:512])).used_len == 1
    blk.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-blk-pci")
def test_framings_and_indirect(virtio_device: VirtioDriver, qemu: Machine) -> None:
    assert isinstance(virtio_device, VirtioBlk)
    blk, vm, mode = virtio_device, qemu, virtio_device.mode
    data = os.urandom(2048)
    any_layout = blk.has("VERSION_1") or blk.has("ANY_LAYOUT")
    assert any_layout == (mode != modes.LEGACY)  # QEMU's legacy-only device drops ANY_LAYOUT
    framings = [SEPARATE, Framing(segment_size=512), Framing(segment_size=100)]
    if any_layout:
        framings += [MERGED, Framing(split_header=True), Framing(split_header=True, segment_size=700)]
    for i, framing in enumerate(framings):
        for indirect in (False, True):
            sector = 16 * i + (8 if indirect else 0)
            w = blk.execute(BlkRequest(BlkReqType.OUT, sector, data_out=data), framing=framing, indirect=indirect)
            assert w.ok, (framing, indirect)
            assert blk.image.read(sector * 512, 2048) == data
            r = blk.execute(BlkRequest(BlkReqType.IN, sector, data_in_len=2048), framing=framing, indirect=indirect)
            assert r.ok and r.data == data and r.used_len == 2049, (framing, indirect)
    if not any_layout:
        with pytest.raises(BlkError, match="needs VERSION_1 or ANY_LAYOUT"):
            blk.execute(BlkRequest(BlkReqType.IN, 0, data_in_len=512), framing=MERGED)
    blk.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-blk-pci", rings=["split"])
def test_status_codes(virtio_device: VirtioDriver) -> None:
    assert isinstance(virtio_device, VirtioBlk)
    blk, mode = virtio_device, virtio_device.mode
    cap = blk.capacity
    assert blk.execute(BlkRequest(BlkReqType.IN, cap, data_in_len=512)).status is BlkStatus.IOERR
    assert blk.execute(BlkRequest(BlkReqType.OUT, cap - 1, data_out=bytes(1024))).status is BlkStatus.IOERR
    assert blk.execute(BlkRequest(0x55)).status is BlkStatus.UNSUPP
    assert blk.execute(BlkRequest(BlkReqType.GET_LIFETIME, data_in_len=8)).status is BlkStatus.UNSUPP  # no LIFETIME
    with pytest.raises(
        BlkRequestError, match=rf"VirtioBlk {blk.dev_id} \({mode}\): queue 0, request \d+ \(IN sector {cap}"
    ) as e:
        blk.read(cap, 1)
    assert e.value.status is BlkStatus.IOERR
    assert blk.read(0, 1) == bytes(512)  # the device carries on after errors
    with pytest.raises(ValueError, match="multiple of 512"):
        blk.write(0, b"short")
    with pytest.raises(BlkError, match="no request queue 1"):
        blk.read(0, 1, queue=1)


@pytest.mark.virtio_device("virtio-blk-pci", rings=["split"])
def test_discard_and_write_zeroes(virtio_device: VirtioDriver, qemu: Machine) -> None:
    assert isinstance(virtio_device, VirtioBlk)
    blk, vm = virtio_device, qemu
    cfg = blk.config()
    assert cfg.max_discard_seg == 1 and cfg.max_write_zeroes_seg == 1 and cfg.max_write_zeroes_sectors
    pattern = b"\xa5" * 4096
    blk.write(0, pattern)
    blk.write_zeroes(1, 2)
    blk.write_zeroes(5, 1, unmap=True)
    expected = pattern[:512] + bytes(1024) + pattern[:1024] + bytes(512) + pattern[:1024]
    assert blk.image.read(0, 4096) == expected and blk.read(0, 8) == expected
    blk.discard(0, 8)  # the device MAY deallocate; either way the request succeeds
    assert blk.read(0, 8) in (expected, bytes(4096))
    bad_flag = BlkRequest(BlkReqType.DISCARD, data_out=encode_dwz_segment(0, 1, unmap=True))
    assert blk.execute(bad_flag).status is BlkStatus.UNSUPP
    blk.close()
    vm.memory.check_leaks()


@pytest.mark.virtio_device("virtio-blk-pci", flags={"num-queues": "3"})
def test_multiqueue(virtio_device: VirtioDriver, qemu: Machine) -> None:
    assert isinstance(virtio_device, VirtioBlk)
    blk, vm = virtio_device, qemu
    assert blk.has("MQ") and blk.config().num_queues == 3 and len(blk.queues) == 3
    # One request outstanding on every queue at once; each completes on its own queue.
    pending = [blk.submit(BlkRequest(BlkReqType.OUT, 8 * q, data_out=bytes([q + 1]) * 512), queue=q) for q in range(3)]
    for q, p in enumerate(pending):
        resp = blk.complete(p)
        assert resp.ok and resp.queue == q
    queues = blk.round_robin()
    for q in range(3):
        assert blk.read(8 * q, 1, queue=next(queues)) == bytes([q + 1]) * 512
    assert blk.image.read(8 * 512, 1) == b"\x02"
    refused = vm.virtio(blk.dev_id, VirtioBlk, refuse={"MQ"})
    assert not refused.has("MQ") and len(refused.queues) == 1 and refused.config().num_queues is None


@pytest.mark.virtio_device(
    "virtio-blk-pci", transports=[modes.LEGACY, modes.MODERN], rings=["split"], refuse={"INDIRECT_DESC"}, backend="null"
)
def test_seg_max_and_null_backend(virtio_device: VirtioDriver) -> None:
    assert isinstance(virtio_device, VirtioBlk)
    blk = virtio_device
    with pytest.raises(BlkError, match="not an image"):
        blk.image  # noqa: B018
    seg_max = blk.config().seg_max
    assert seg_max == blk.queues[0].size - 2
    framing = Framing(segment_size=512)
    resp = blk.execute(BlkRequest(BlkReqType.IN, 0, data_in_len=seg_max * 512), framing=framing)
    assert resp.ok and resp.data == bytes(seg_max * 512)  # null-co with read-zeroes
    with pytest.raises(BlkError, match=f"{seg_max + 1} data segments exceed seg_max {seg_max}"):
        blk.execute(BlkRequest(BlkReqType.IN, 0, data_in_len=(seg_max + 1) * 512), framing=framing)
    blk.write(0, b"\x11" * 512)  # null-co forgets what it is given
    assert blk.read(0, 1) == bytes(512)


@pytest.mark.virtio_device("virtio-blk-pci", rings=["split"])
def test_writeback_and_refused_features(virtio_device: VirtioDriver, qemu: Machine) -> None:
    assert isinstance(virtio_device, VirtioBlk)
    blk, vm = virtio_device, qemu
    for value in (0, 1):
        blk.set_writeback(bool(value))
        assert blk.config().writeback == value
    bare = vm.virtio(blk.dev_id, VirtioBlk, refuse={"FLUSH", "CONFIG_WCE", "DISCARD", "WRITE_ZEROES", "SEG_MAX"})
    cfg = bare.config()
    assert cfg.writeback is None and cfg.max_discard_sectors is None and cfg.seg_max is None
    with pytest.raises(BlkError, match="needs FLUSH"):
        bare.flush()
    with pytest.raises(BlkError, match="needs DISCARD"):
        bare.discard(0, 1)
    with pytest.raises(BlkError, match="needs WRITE_ZEROES"):
        bare.write_zeroes(0, 1)
    with pytest.raises(BlkError, match="CONFIG_WCE"):
        bare.set_writeback(False)
    bare.write(0, b"\x22" * 512)  # plain I/O needs none of them
    assert bare.read(0, 1) == b"\x22" * 512
