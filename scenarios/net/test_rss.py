"""virtio-net conformance, receive-side scaling and hash reports (virtio 1.2 §5.1.6.4.3,
§5.1.6.4.4, §5.1.6.5.6.4, §5.1.6.5.7) on a tap backend with four queues (``rss=on``,
``hash=on``, ``mq=on``).

The test computes the Toeplitz hash itself, from the spec's definition of the hash input and
the key it configured (:mod:`qtest_virtio.devices.net.rss`), and from it the receive queue the
indirection table names and the hash value and type the device must report. Frames are
injected one at a time and each is waited for, so the kernel's per-queue tap fds cannot
reorder what is asserted. QEMU steers in software (``virtio_net_process_rss``) or, where the
build has eBPF and no hash is reported, through an eBPF program on the tap: the queue must be
the same either way.

RSS and HASH_REPORT are feature bits 60 and 57: only the modern register layout can negotiate
them, so these scenarios run on the two modes that drive it.
"""

from __future__ import annotations

import pytest

from qtest_virtio import Machine
from qtest_virtio.backends import TapBackend
from qtest_virtio.devices.net.driver import VirtioNet
from qtest_virtio.devices.net.encoding import CTRL_COMMANDS, Ack, NetCtrlError, ethernet_frame
from qtest_virtio.devices.net.packets import Flow, IpProto, ip_frame
from qtest_virtio.devices.net.rss import HashConfig, HashReport, HashType, RssConfig, packet_hash

from ._support import need

PAIRS = 4
MODERN = ("transitional-modern", "modern")


def rss_device(accept: tuple[str, ...] = ("RSS",), queue_pairs: int = PAIRS) -> pytest.MarkDecorator:
    """The marker of an RSS scenario: a 4-queue tap, ``mq``, ``rss`` and ``hash`` on, the driver
    accepting ``accept`` when offered with ``queue_pairs`` set up. Of the refusal runs only
    MRG_RXBUF's changes what is checked (hash_value and hash_report follow num_buffers in the
    header the device writes); refusing CTRL_VQ, MQ or RING_RESET only skips."""
    return pytest.mark.virtio_device(
        "virtio-net-pci",
        transports=MODERN,
        backend=f"tap,queues={PAIRS}",
        flags={"mq": "on", "rss": "on", "hash": "on"},
        accept=accept,
        queue_pairs=queue_pairs,
        refuse_each=["MRG_RXBUF"],
    )


pytestmark = rss_device()

PEER = "02:00:00:00:00:01"
ALL_BUT_EX = HashType.IPv4 | HashType.TCPv4 | HashType.UDPv4 | HashType.IPv6 | HashType.TCPv6 | HashType.UDPv6
#: Another key than the default, so a device that ignored the configured key shows.
KEY = bytes(range(7, 7 + 40 * 3, 3))


def _frames(net: VirtioNet) -> list[bytes]:
    """IPv4 and IPv6 frames over TCP and UDP, with varied addresses and ports, and one that is
    not IP (which no hash type covers)."""
    out = []
    for i in range(6):
        proto = IpProto.TCP if i % 2 else IpProto.UDP
        out.append(
            ip_frame(
                Flow(f"10.{i}.0.1", "10.0.0.2", 1024 + 97 * i, 80, proto),
                bytes([i]) * 32,
                dst_mac=net.mac,
                src_mac=PEER,
            )
        )
        out.append(
            ip_frame(
                Flow(f"fd00::{i}:1", "fd00::2", 2048 + 89 * i, 443, proto),
                bytes([i]) * 32,
                dst_mac=net.mac,
                src_mac=PEER,
            )
        )
    out.append(ethernet_frame(net.mac, PEER, 0x88B5, bytes(48)))
    return out


def _receive(qemu: Machine, net: VirtioNet, frame: bytes) -> tuple[int, int | None, int | None]:
    """Inject one frame; (receive queue, hash_report, hash_value) it arrived with."""
    qemu.backend(net.dev_id, TapBackend).send(frame)
    pair, packet = net.receive_any(timeout=2)
    assert packet.frame == frame, f"receiveq{pair + 1} delivered another frame than the one injected"
    return pair, packet.header.hash_report, packet.header.hash_value


def _rss(net: VirtioNet, *accept: str) -> VirtioNet:
    """The driver (RSS and ``accept`` accepted, the marker's): skip where one is not negotiated."""
    need(net, "CTRL_VQ", "RSS", *accept)
    config = net.config()
    assert config.rss_max_key_size is not None and config.rss_max_key_size >= len(KEY)
    assert config.rss_max_indirection_table_length is not None
    assert config.supported_hash_types is not None and config.supported_hash_types & ALL_BUT_EX == ALL_BUT_EX
    return net


def _table(net: VirtioNet) -> tuple[int, ...]:
    """An indirection table as long as the device allows, no entry equal to its neighbour."""
    length = net.config().rss_max_indirection_table_length or 128
    return tuple((3 * i + 1) % PAIRS for i in range(length))


@pytest.mark.conformance("net-rss-steering", spec="5.1.6.5.7.3")
def test_rss_steers_by_toeplitz_hash_and_indirection_table(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With RSS configured the device MUST determine a packet's receive queue from the hash of
    the enabled hash types (Toeplitz, the configured key) masked into the indirection table,
    and put a packet it calculated no hash for on unclassified_queue (MUST). Checked for every
    hash type family, then again with only IPv4 addresses hashed."""
    net = _rss(virtio_device)
    config = RssConfig(ALL_BUT_EX, _table(net), KEY, unclassified_queue=2, max_tx_vq=PAIRS)
    net.set_rss(config)
    frames = _frames(net)
    landed = [_receive(qemu, net, f)[0] for f in frames]
    assert landed == [config.queue_for(f) for f in frames]
    assert landed[-1] == 2, "the non-IP frame goes to unclassified_queue"
    assert len(set(landed)) > 1
    addresses_only = RssConfig(HashType.IPv4, (0, 1, 2, 3), KEY, unclassified_queue=3, max_tx_vq=PAIRS)
    net.set_rss(addresses_only)
    for frame in frames:
        assert _receive(qemu, net, frame)[0] == addresses_only.queue_for(frame)


@pytest.mark.conformance("net-rss-config-malformed", spec="5.1.6.5.7.2")
def test_malformed_rss_config_is_refused(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A driver MUST use a power-of-two table no longer than rss_max_indirection_table_length and
    MUST NOT send RSS_CONFIG without RSS negotiated; QEMU answers a config that breaks those
    rules, or names a queue or key size it does not have, with VIRTIO_NET_ERR, and a valid
    config is acked after them (regression)."""
    net = _rss(virtio_device)
    longest = net.config().rss_max_indirection_table_length or 128
    key_max = net.config().rss_max_key_size or 40
    table = _table(net)
    bad = {
        "table longer than the maximum": RssConfig(ALL_BUT_EX, (0,) * (2 * longest), KEY, max_tx_vq=PAIRS),
        "table length not a power of two": RssConfig(ALL_BUT_EX, (0, 1, 2), KEY, max_tx_vq=PAIRS),
        "unclassified_queue beyond the pairs": RssConfig(
            ALL_BUT_EX, table, KEY, unclassified_queue=PAIRS, max_tx_vq=PAIRS
        ),
        "max_tx_vq 0": RssConfig(ALL_BUT_EX, table, KEY, max_tx_vq=0),
        "max_tx_vq beyond the pairs": RssConfig(ALL_BUT_EX, table, KEY, max_tx_vq=PAIRS + 1),
        "key longer than rss_max_key_size": RssConfig(ALL_BUT_EX, table, bytes(key_max + 1), max_tx_vq=PAIRS),
        "hash types without a key": RssConfig(ALL_BUT_EX, table, b"", max_tx_vq=PAIRS),
    }
    rss_config = CTRL_COMMANDS["MQ_RSS_CONFIG"]
    good = RssConfig(ALL_BUT_EX, table, KEY, unclassified_queue=1, max_tx_vq=PAIRS)
    for what, config in bad.items():
        assert net.ctrl_raw(rss_config.class_code, rss_config.code, config.encode()) == Ack.ERR, what
    for cut in (7, 9, 8 + 2 * len(table), len(good.encode()) - 1):
        assert net.ctrl_raw(rss_config.class_code, rss_config.code, good.encode()[:cut]) == Ack.ERR, f"{cut} bytes"
    net.set_rss(good)
    frame = _frames(net)[0]
    assert _receive(qemu, net, frame)[0] == good.queue_for(frame)


@pytest.mark.conformance("net-rss-config-needs-rss", spec="5.1.6.5.7.2")
@rss_device(accept=())
def test_rss_config_without_rss_is_refused(virtio_device: VirtioNet, qemu: Machine) -> None:
    """A driver MUST NOT send VIRTIO_NET_CTRL_MQ_RSS_CONFIG without RSS negotiated (nor
    HASH_CONFIG without HASH_REPORT); QEMU answers either with VIRTIO_NET_ERR and keeps
    receiving on receiveq1 (regression). The default driver accepts neither feature."""
    net = virtio_device
    need(net, "CTRL_VQ", "MQ")
    assert len(net.rxqs) == PAIRS
    assert not net.has("RSS") and not net.has("HASH_REPORT")
    with pytest.raises(NetCtrlError):
        net.ctrl("MQ_RSS_CONFIG", RssConfig(ALL_BUT_EX, _table(net), KEY, max_tx_vq=PAIRS).encode(), force=True)
    with pytest.raises(NetCtrlError):
        net.ctrl("MQ_HASH_CONFIG", HashConfig(ALL_BUT_EX, KEY).encode(), force=True)
    for frame in _frames(net):
        assert _receive(qemu, net, frame)[0] == 0


@rss_device(accept=("HASH_REPORT",), queue_pairs=1)
@pytest.mark.conformance("net-hash-report", spec="5.1.6.4.4")
def test_hash_report_gives_the_spec_hash(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With HASH_REPORT negotiated the device reports no hash until one is configured
    (VIRTIO_NET_HASH_REPORT_NONE: all types start disabled, §5.1.6.5.6.4); after
    VIRTIO_NET_CTRL_MQ_HASH_CONFIG it fills hash_report with the type it calculated and
    hash_value with the Toeplitz hash of the spec's input under the configured key, and
    reports NONE where no enabled type applies (§5.1.6.4.4)."""
    net = virtio_device
    need(net, "CTRL_VQ", "HASH_REPORT")
    assert net.header_size == 20
    frames = _frames(net)
    assert _receive(qemu, net, frames[0])[1:] == (HashReport.NONE, 0)
    for types in (ALL_BUT_EX, HashType.IPv4 | HashType.IPv6, HashType.TCPv4 | HashType.UDPv6):
        net.set_hash_config(HashConfig(types, KEY))
        for frame in frames:
            report, value = packet_hash(frame, types, KEY)
            assert _receive(qemu, net, frame) == (0, report, value), f"hash types {types!r}"
    net.set_hash_config(HashConfig(0, b""))  # no types, no key: hashing off again
    assert _receive(qemu, net, frames[1])[1:] == (HashReport.NONE, 0)


@rss_device(accept=("RSS", "HASH_REPORT"))
@pytest.mark.conformance("net-rss-hash-report", spec="5.1.6.4.4")
def test_rss_with_hash_report_steers_and_reports(virtio_device: VirtioNet, qemu: Machine) -> None:
    """With RSS and HASH_REPORT both negotiated, RSS_CONFIG sets the hash for both: each packet
    lands on the queue its hash selects and carries that hash and its type (§5.1.6.4.3: the
    device uses the RSS config's hash types and key when RSS is negotiated)."""
    net = _rss(virtio_device, "HASH_REPORT")
    config = RssConfig(ALL_BUT_EX, _table(net), KEY, unclassified_queue=3, max_tx_vq=PAIRS)
    net.set_rss(config)
    for frame in _frames(net):
        report, value = packet_hash(frame, config.hash_types, KEY)
        assert _receive(qemu, net, frame) == (config.queue_for(frame), report, value)


@rss_device(accept=("HASH_REPORT",), queue_pairs=1)
@pytest.mark.conformance("net-hash-none-after-reset", spec="5.1.6.5.6.4")
def test_reset_forgets_the_hash_config(virtio_device: VirtioNet, qemu: Machine) -> None:
    """Initially the device has all hash types disabled and reports only
    VIRTIO_NET_HASH_REPORT_NONE; a device reset returns it there, so a hash config set before a
    reset reports nothing after it (descriptive text, §5.1.6.5.6.4; QEMU 7.2 keeps the config
    across the reset)."""
    net = virtio_device
    need(net, "CTRL_VQ", "HASH_REPORT")
    frame = _frames(net)[0]
    net.set_hash_config(HashConfig(ALL_BUT_EX, KEY))
    assert _receive(qemu, net, frame)[1:] == packet_hash(frame, ALL_BUT_EX, KEY)
    net.restart()
    assert _receive(qemu, net, frame)[1:] == (HashReport.NONE, 0)


@rss_device(accept=("RSS", "HASH_REPORT"))
@pytest.mark.conformance("net-rss-reset-queue-drops", spec="5.1.6.5.7.3")
def test_rss_drops_packets_for_a_queue_being_reset(virtio_device: VirtioNet, qemu: Machine) -> None:
    """If the destination receive queue is being reset the device MUST drop the packet: with
    every hashed packet steered to receiveq2 and that queue reset, a packet for it arrives
    nowhere, not later on the re-enabled queue either, while unclassified packets still reach
    receiveq1 (MUST). QEMU stops reading the tap queue paired with a reset receive queue, so
    the frames used are ones the kernel puts on other tap queues: found first under automatic
    steering, where a frame lands on the receive queue of its tap queue. HASH_REPORT is
    negotiated too, so QEMU steers in software on every build."""
    net = _rss(virtio_device, "HASH_REPORT")
    need(net, "RING_RESET", "MQ")
    net.set_queue_pairs(PAIRS)
    candidates = _frames(net)
    entry = [_receive(qemu, net, f)[0] for f in candidates]
    config = RssConfig(HashType.IPv4, (1,), KEY, unclassified_queue=0, max_tx_vq=PAIRS)
    hashed = [f for f, q in zip(candidates, entry, strict=True) if q != 1 and config.queue_for(f) == 1]
    others = [f for f, q in zip(candidates, entry, strict=True) if q != 1 and config.queue_for(f) == 0]
    if not hashed or not others:
        pytest.skip(f"the kernel put the candidate frames on tap queues {entry}: none left to steer around queue 1")
    net.set_rss(config)
    assert _receive(qemu, net, hashed[0])[0] == 1
    net.reset_queue(2)  # receiveq2
    qemu.backend(net.dev_id, TapBackend).send(hashed[0])
    assert _receive(qemu, net, others[0])[0] == 0, "a packet for a queue not being reset"
    net.reenable_queue(2)
    assert _receive(qemu, net, others[0])[0] == 0
    assert all(not net.drain(pair=p) for p in range(PAIRS)), "the packet for the queue being reset was delivered"
    assert _receive(qemu, net, hashed[0])[0] == 1
