"""virtio-blk conformance (virtio 1.2 §5.2): the block device's device-side requirements that a
driver can check.

The default backend is a raw image in the machine's private directory; the test reads and writes
it from the host (``virtio_device.image``), so what the device claims to have stored is checked
where it is stored. Requests are made with the driver's request API; where a rule is about bytes
the device writes, the buffers are laid out by hand and pre-filled with a pattern so that
untouched bytes stand out.
"""

from __future__ import annotations

import os

import pytest

from qtest_virtio import Machine, modes
from qtest_virtio.devices.blk.driver import VirtioBlk
from qtest_virtio.devices.blk.encoding import (
    BLK_CONFIG,
    ID_BYTES,
    MERGED,
    SEPARATE,
    BlkReqType,
    BlkRequest,
    BlkStatus,
    Framing,
    encode_dwz_segment,
    encode_header,
)
from qtest_virtio.testing import alloc_bufs
from qtest_virtio.transport import feature_bit
from qtest_virtio.virtqueue import Buf

pytestmark = pytest.mark.virtio_device("virtio-blk-pci")

#: Layouts where the used length is a rule: legacy drivers SHOULD ignore it (§5.2.6.3).
PATTERN = 0xEE
SERIAL = "QTEST-BLK-SERIAL-01"


def _chain(qemu: Machine, header: bytes, writable: list[int]) -> tuple[list[Buf], list[int]]:
    """A request laid out by hand: the header, then device-writable buffers pre-filled with
    PATTERN (data buffers, then the status byte last)."""
    hdr = qemu.memory.alloc(len(header), tag="blk scenario header")
    qemu.memory.write(hdr, header)
    bufs = [Buf(hdr, len(header)), *alloc_bufs(qemu.memory, writable, fill=PATTERN, tag="blk scenario in")]
    return bufs, [b.addr for b in bufs]


def _run(virtio_device: VirtioBlk, qemu: Machine, bufs: list[Buf]) -> int:
    """Make the chain available on queue 0, wait for it, return the used length."""
    vq = virtio_device.queues[0]
    token = vq.add(bufs)
    vq.kick()
    return vq.wait_for(token).length


def _free(qemu: Machine, addrs: list[int]) -> None:
    for addr in addrs:
        qemu.memory.free(addr)


@pytest.mark.conformance("blk-capacity-matches-backend", spec="5.2.4")
def test_capacity_is_backend_size_in_sectors(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """capacity is the device size in 512-byte sectors: the image's size / 512, and reading the
    last sector works while the one past it does not (§5.2.4)."""
    image = virtio_device.image
    cap = virtio_device.config().capacity
    assert cap == image.size // 512 == os.path.getsize(image.path) // 512
    assert virtio_device.execute(BlkRequest(BlkReqType.IN, cap - 1, data_in_len=512)).status is BlkStatus.OK


@pytest.mark.conformance("blk-write-read-round-trip", spec="5.2.6")
def test_write_then_read_returns_the_data_and_the_image_holds_it(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """A VIRTIO_BLK_T_OUT writes data at sector*512 of the device, a VIRTIO_BLK_T_IN returns it
    (§5.2.6): the host image holds the bytes written, and bytes the host puts there read back."""
    image = virtio_device.image
    data = os.urandom(3 * 512)
    virtio_device.write(1000, data)
    assert image.read(1000 * 512, len(data)) == data
    assert virtio_device.read(1000, 3) == data
    host = os.urandom(512)
    image.write(2000 * 512, host)
    assert virtio_device.read(2000, 1) == host


@pytest.mark.virtio_device("virtio-blk-pci", transports=modes.MODERN_LAYOUT_MODES)
@pytest.mark.conformance("blk-read-used-length", spec="2.7.8.2")
def test_read_used_length_covers_data_and_status(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device writes at least the used length's worth of bytes from the first writable buffer
    (MUST, §2.7.8.2) and the driver may rely on nothing past it (§2.7.8.1): a successful read's
    used length covers the data and the status byte, and those bytes were written."""
    data = os.urandom(1024)
    virtio_device.image.write(64 * 512, data)
    bufs, addrs = _chain(qemu, encode_header(BlkReqType.IN, 64), [1024, 1])
    used = _run(virtio_device, qemu, bufs)
    assert used == 1024 + 1
    assert qemu.memory.read(addrs[1], 1024) == data
    assert qemu.memory.read(addrs[2], 1) == bytes([BlkStatus.OK])
    _free(qemu, addrs)


@pytest.mark.virtio_device("virtio-blk-pci", transports=modes.MODERN_LAYOUT_MODES)
@pytest.mark.conformance("blk-ioerr-used-length", spec="2.7.8.2")
def test_failed_read_used_length_counts_only_written_bytes(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST write at least len bytes before it returns a buffer (§2.7.8.2): a read past
    the capacity writes only the status byte (IOERR), so a used length above 1 must come with
    the data buffer written too (it is pre-filled with a pattern to tell)."""
    cap = virtio_device.config().capacity
    bufs, addrs = _chain(qemu, encode_header(BlkReqType.IN, cap), [512, 1])
    used = _run(virtio_device, qemu, bufs)
    assert qemu.memory.read(addrs[2], 1) == bytes([BlkStatus.IOERR])
    data_untouched = qemu.memory.read(addrs[1], 512) == bytes([PATTERN]) * 512
    _free(qemu, addrs)
    assert used <= 1 or not data_untouched, f"used length {used}, but the 512 data bytes were never written"


@pytest.mark.conformance("blk-unsupported-request-unsupp", spec="5.2.6")
def test_unsupported_request_types_get_unsupp(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The status is VIRTIO_BLK_S_UNSUPP for a request the device does not support (§5.2.6): an
    undefined type, and GET_LIFETIME / SECURE_ERASE when their features are not offered."""
    offered = virtio_device.negotiated.offered
    types = [0x55, 0x3F]
    if not offered >> feature_bit("LIFETIME", virtio_device.device_bits) & 1:
        types.append(BlkReqType.GET_LIFETIME)
    if not offered >> feature_bit("SECURE_ERASE", virtio_device.device_bits) & 1:
        types.append(BlkReqType.SECURE_ERASE)
    for req_type in types:
        data_in = 8 if req_type == BlkReqType.GET_LIFETIME else 0
        resp = virtio_device.execute(BlkRequest(req_type, data_in_len=data_in))
        assert resp.status is BlkStatus.UNSUPP, f"type {req_type:#x}: {resp.status.name}"
    assert virtio_device.read(0, 1) == bytes(512)  # and the device keeps working


@pytest.mark.conformance("blk-read-past-capacity-ioerr", spec="5.2.6")
def test_request_past_capacity_gets_ioerr(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """VIRTIO_BLK_S_IOERR reports a device or driver error (§5.2.6): a read or write that starts
    at, or runs past, the capacity fails, and a write that fails stores nothing."""
    image = virtio_device.image
    cap = virtio_device.config().capacity
    assert virtio_device.execute(BlkRequest(BlkReqType.IN, cap, data_in_len=512)).status is BlkStatus.IOERR
    assert virtio_device.execute(BlkRequest(BlkReqType.IN, cap - 1, data_in_len=1024)).status is BlkStatus.IOERR
    tail = image.read((cap - 1) * 512, 512)
    straddling = BlkRequest(BlkReqType.OUT, cap - 1, data_out=b"\x5a" * 1024)
    assert virtio_device.execute(straddling).status is BlkStatus.IOERR
    assert image.read((cap - 1) * 512, 512) == tail


@pytest.mark.virtio_requires("FLUSH")
@pytest.mark.conformance("blk-flush-completes-ok", spec="5.2.6.2")
def test_flush_completes_with_ok(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """With VIRTIO_BLK_F_FLUSH negotiated, a VIRTIO_BLK_T_FLUSH after completed writes completes
    with OK (§5.2.6.2: the writes are then stable), and the image holds the writes."""
    data = os.urandom(512)
    virtio_device.write(77, data)
    resp = virtio_device.execute(BlkRequest(BlkReqType.FLUSH))
    assert resp.status is BlkStatus.OK and resp.used_len <= 1
    assert virtio_device.image.read(77 * 512, 512) == data


@pytest.mark.conformance("blk-flush-offered-with-config-wce", spec="5.2.5.2")
def test_config_wce_comes_with_flush(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """Devices SHOULD always offer VIRTIO_BLK_F_FLUSH, and MUST offer it if they offer
    VIRTIO_BLK_F_CONFIG_WCE (§5.2.5.2)."""
    offered = virtio_device.negotiated.offered
    bits = virtio_device.device_bits
    assert offered >> feature_bit("FLUSH", bits) & 1, "FLUSH is not offered (SHOULD)"
    if offered >> feature_bit("CONFIG_WCE", bits) & 1:
        assert offered >> feature_bit("FLUSH", bits) & 1


@pytest.mark.virtio_requires("CONFIG_WCE")
@pytest.mark.virtio_device("virtio-blk-pci", refuse={"FLUSH"}, transports=modes.MODERN_LAYOUT_MODES)
@pytest.mark.conformance("blk-writeback-zero-without-flush", spec="5.2.5.2")
def test_writeback_is_zero_when_flush_is_not_negotiated(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """If VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not, the device MUST
    initialize writeback to 0 (§5.2.5.2): read once the features are final, and after
    DRIVER_OK. Modern layouts only: through the legacy interface the device MUST NOT change
    writeback because of the driver's feature bits (§5.2.5.3), which is the opposite claim."""
    assert virtio_device.has("CONFIG_WCE") and not virtio_device.has("FLUSH")
    assert virtio_device.initial_config.writeback == 0
    assert virtio_device.config().writeback == 0


@pytest.mark.virtio_requires("SEG_MAX")
@pytest.mark.conformance("blk-seg-max-honoured", spec="5.2.4")
def test_request_with_seg_max_segments_succeeds(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """seg_max is the maximum number of segments in a request (§5.2.4): a read and a write of
    exactly seg_max data buffers (each within size_max when that is offered) succeed."""
    cfg = virtio_device.config()
    seg_max = cfg.seg_max
    assert seg_max is not None, "SEG_MAX negotiated, but the config has no seg_max"
    assert 1 <= seg_max <= virtio_device.queues[0].size
    seg = min(512, cfg.size_max) if cfg.size_max else 512
    framing = Framing(segment_size=seg)
    data = os.urandom(seg * seg_max)
    assert framing.data_segments(BlkRequest(BlkReqType.OUT, data_out=data)) == seg_max
    sector = 4096
    assert virtio_device.execute(BlkRequest(BlkReqType.OUT, sector, data_out=data), framing=framing).ok
    resp = virtio_device.execute(BlkRequest(BlkReqType.IN, sector, data_in_len=len(data)), framing=framing)
    assert resp.ok and resp.data == data
    assert virtio_device.image.read(sector * 512, len(data)) == data


@pytest.mark.virtio_device("virtio-blk-pci", transports=modes.MODERN_LAYOUT_MODES)
@pytest.mark.conformance("blk-config-generation-stable", spec="4.1.4.3.1")
def test_config_generation_is_stable_while_nothing_changes(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device changes config_generation only when a config field changed (§4.1.4.3.1, §2.5):
    reads of the whole config with nothing changing see one generation and the same values."""
    transport = virtio_device.transport
    names = [f.name for f in BLK_CONFIG if f.end <= 57]
    gen = transport.config_generation()
    first = virtio_device.read_config(names)
    for _ in range(3):
        assert virtio_device.read_config(names) == first
        assert transport.config_generation() == gen
    virtio_device.read(0, 1)
    virtio_device.write(0, bytes(512))  # I/O does not change the config either
    assert transport.config_generation() == gen and virtio_device.read_config(names) == first


@pytest.mark.conformance("blk-config-unused0-zero", spec="5.2.5.2")
def test_config_padding_unused0_is_zero(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST initialize the padding byte unused0 to 0 (§5.2.5.2)."""
    assert virtio_device.read_config(["unused0"]) == {"unused0": 0}


@pytest.mark.virtio_requires("SECURE_ERASE")
@pytest.mark.conformance("blk-config-unused1-zero", spec="5.2.5.2")
def test_config_padding_unused1_is_zero(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST initialize the padding bytes unused1 to 0 (§5.2.5.2). They pad the config
    up to max_secure_erase_sectors, so they exist only when SECURE_ERASE is offered (a field
    exists where its feature says so, §2.5); without it they lie past the device's config space
    (QEMU's ends after write_zeroes_may_unmap and reads 0xff there), which no MUST covers."""
    values = virtio_device.read_config(["unused1[0]", "unused1[1]", "unused1[2]"])
    assert list(values.values()) == [0, 0, 0]


@pytest.mark.virtio_device("virtio-blk-pci", flags={"serial": SERIAL})
@pytest.mark.conformance("blk-get-id-returns-serial", spec="5.2.6")
def test_get_id_returns_the_serial(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """VIRTIO_BLK_T_GET_ID fetches the device ID string, NUL-padded ASCII of up to 20 bytes
    (§5.2.6): the serial QEMU was given, terminated by a NUL since it is shorter than 20."""
    resp = virtio_device.execute(BlkRequest(BlkReqType.GET_ID, data_in_len=ID_BYTES))
    assert resp.ok
    assert resp.data[: len(SERIAL) + 1] == SERIAL.encode() + b"\0"
    assert virtio_device.get_id() == SERIAL


@pytest.mark.virtio_device("virtio-blk-pci", flags={"serial": "0123456789ABCDEFGHIJ"})
@pytest.mark.conformance("blk-get-id-20-bytes-unterminated", spec="5.2.6")
def test_get_id_of_20_bytes_has_no_terminator(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """If the device ID string is 20 bytes long there is no NUL terminator (§5.2.6)."""
    resp = virtio_device.execute(BlkRequest(BlkReqType.GET_ID, data_in_len=ID_BYTES))
    assert resp.ok and resp.data == b"0123456789ABCDEFGHIJ"


@pytest.mark.virtio_device("virtio-blk-pci", flags={"serial": "abc"}, transports=modes.MODERN_LAYOUT_MODES)
@pytest.mark.conformance("blk-get-id-used-length", spec="2.7.8.2")
def test_get_id_used_length_counts_written_bytes(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST write at least the used length's worth of bytes (§2.7.8.2): a GET_ID
    reported as 21 bytes used has its 20-byte ID written in full, NUL-padded (§5.2.6)."""
    bufs, addrs = _chain(qemu, encode_header(BlkReqType.GET_ID), [ID_BYTES, 1])
    used = _run(virtio_device, qemu, bufs)
    written = qemu.memory.read(addrs[1], ID_BYTES)
    _free(qemu, addrs)
    assert written[:4] == b"abc\0"
    untouched = written.count(bytes([PATTERN]))
    assert used <= ID_BYTES + 1 - untouched, f"used length {used}, {untouched} ID bytes never written: {written!r}"


@pytest.mark.virtio_requires("WRITE_ZEROES")
@pytest.mark.conformance("blk-write-zeroes-reads-zero", spec="5.2.6.2")
def test_write_zeroes_range_reads_back_zero(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """After a write zeroes command completes, reads of its range MUST return zeroes, whether
    unmap was set or clear (§5.2.6.2); the host image holds zeroes there, the rest is intact."""
    image = virtio_device.image
    pattern = os.urandom(8 * 512)
    virtio_device.write(300, pattern)
    virtio_device.write_zeroes(301, 2)
    virtio_device.write_zeroes(304, 3, unmap=True)
    expected = pattern[:512] + bytes(1024) + pattern[1536:2048] + bytes(1536) + pattern[3584:]
    assert virtio_device.read(300, 8) == expected
    assert image.read(300 * 512, 8 * 512) == expected


@pytest.mark.virtio_requires("DISCARD")
@pytest.mark.conformance("blk-discard-unmap-flag-unsupp", spec="5.2.6.2")
def test_discard_with_unmap_flag_gets_unsupp(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST set the status to VIRTIO_BLK_S_UNSUPP for discard commands if the unmap
    flag is set (§5.2.6.2); the same discard without the flag succeeds."""
    image = virtio_device.image
    data = os.urandom(512)
    virtio_device.write(500, data)
    bad = BlkRequest(BlkReqType.DISCARD, data_out=encode_dwz_segment(500, 1, unmap=True))
    assert virtio_device.execute(bad).status is BlkStatus.UNSUPP
    assert image.read(500 * 512, 512) == data
    good = BlkRequest(BlkReqType.DISCARD, data_out=encode_dwz_segment(500, 1))
    assert virtio_device.execute(good).status is BlkStatus.OK


@pytest.mark.virtio_requires("DISCARD")
@pytest.mark.conformance("blk-discard-unknown-flag-unsupp", spec="5.2.6.2")
def test_discard_with_unknown_flag_gets_unsupp(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST set the status to VIRTIO_BLK_S_UNSUPP for discard commands if any
    unknown flag is set (§5.2.6.2)."""
    for flags in (1 << 1, 1 << 31):
        req = BlkRequest(BlkReqType.DISCARD, data_out=encode_dwz_segment(8, 1, flags=flags))
        assert virtio_device.execute(req).status is BlkStatus.UNSUPP, f"flags {flags:#x}"


@pytest.mark.virtio_requires("WRITE_ZEROES")
@pytest.mark.conformance("blk-write-zeroes-unknown-flag-unsupp", spec="5.2.6.2")
def test_write_zeroes_with_unknown_flag_gets_unsupp(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST set the status to VIRTIO_BLK_S_UNSUPP for write zeroes commands if any
    unknown flag is set (§5.2.6.2), and then leaves the data alone."""
    image = virtio_device.image
    data = os.urandom(512)
    virtio_device.write(600, data)
    for flags in (1 << 1, 1 | 1 << 7):
        req = BlkRequest(BlkReqType.WRITE_ZEROES, data_out=encode_dwz_segment(600, 1, flags=flags))
        assert virtio_device.execute(req).status is BlkStatus.UNSUPP, f"flags {flags:#x}"
    assert image.read(600 * 512, 512) == data


@pytest.mark.conformance("blk-any-descriptor-layout", spec="2.7.4.1")
def test_requests_in_any_descriptor_layout(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """The device MUST NOT make assumptions about the particular arrangement of descriptors
    (§2.7.4.1) once VERSION_1 or ANY_LAYOUT is negotiated: header and data in one buffer, data
    and status in one buffer, the header split over two, the data over many all work."""
    if not (virtio_device.has("VERSION_1") or virtio_device.has("ANY_LAYOUT")):
        pytest.skip("neither VERSION_1 nor ANY_LAYOUT negotiated: the legacy framing rules apply")
    image = virtio_device.image
    layouts = [SEPARATE, MERGED, Framing(split_header=True), Framing(split_header=True, segment_size=96)]
    for i, framing in enumerate(layouts):
        sector = 700 + 4 * i
        data = os.urandom(1024)
        assert virtio_device.execute(BlkRequest(BlkReqType.OUT, sector, data_out=data), framing=framing).ok
        assert image.read(sector * 512, 1024) == data, framing
        resp = virtio_device.execute(BlkRequest(BlkReqType.IN, sector, data_in_len=1024), framing=framing)
        assert resp.ok and resp.data == data, framing


@pytest.mark.virtio_requires("MQ")
@pytest.mark.virtio_device("virtio-blk-pci", flags={"num-queues": "4"})
@pytest.mark.conformance("blk-multiqueue-every-queue-serves", spec="5.2.2")
def test_every_request_queue_serves_requests(virtio_device: VirtioBlk, qemu: Machine) -> None:
    """With VIRTIO_BLK_F_MQ the device has num_queues request queues (§5.2.2, §5.2.4): the config
    says 4 (the num-queues property) and a request on each queue is used on that queue."""
    assert virtio_device.config().num_queues == 4 and len(virtio_device.queues) == 4
    image = virtio_device.image
    pending = [
        virtio_device.submit(BlkRequest(BlkReqType.OUT, 900 + q, data_out=bytes([0x30 + q]) * 512), queue=q)
        for q in range(4)
    ]
    for q, p in enumerate(pending):
        resp = virtio_device.complete(p)
        assert resp.ok and resp.queue == q
        assert image.read((900 + q) * 512, 512) == bytes([0x30 + q]) * 512
    for q in range(4):
        assert virtio_device.read(900 + (3 - q), 1, queue=q) == bytes([0x33 - q]) * 512
