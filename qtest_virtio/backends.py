"""Real QEMU backends for the devices a test drives, with the host-side end the test holds
(part of the machine layer: it only shapes the command line and owns host resources).

- virtio-blk: a scratch raw image in the private workdir (``ImageBackend``: read and write it
  from the host), ``null`` (null-co, read-zeroes), or the path of an existing image;
- virtio-scsi: the same image behind a ``scsi-hd`` on the controller's bus;
- virtio-net: ``-netdev socket`` on one end of a socketpair; the test holds the other
  (``NetBackend``: QEMU's stream framing, a 4-byte big-endian length before each frame); or,
  with ``backend="tap"`` (``"tap,queues=N"`` for multiqueue), a tap interface with a virtio-net
  header that we create and hand to QEMU, seen from the host through a packet socket
  (``TapBackend``: offloads, multiqueue, RSS and hash reports need a peer with a vnet header);
- virtio-serial: a ``virtconsole`` and a ``virtserialport``, each on a socketpair chardev
  (``SerialBackend``: one ``ChardevEnd`` per port);
- virtio-rng: ``rng-random`` on a FIFO the test writes (``RngFifo``), with ``backend="fifo"``;
  the default is QEMU's builtin generator.

File descriptors reach QEMU through ``pass_fds``; a reproducer command line cannot carry them,
so there the same devices get backends that need nothing from us (null-co, null chardev, and
for the socket netdev a pair of unix datagram netdevs whose far end stops reading, so that a
transmit can be held as on the socketpair nobody reads; ``hubport`` before QEMU 7.2, which has
no ``dgram``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import select
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import QtestVirtioError

FRAME_LEN = struct.Struct(">I")


class BackendError(QtestVirtioError):
    """The host side of a backend timed out or saw malformed data."""


class Handle(Protocol):
    def close(self) -> None: ...


@dataclass
class Backend:
    """What a device's backend adds to the command line, and what the test holds."""

    args: list[str] = field(default_factory=list)
    repro_args: list[str] = field(default_factory=list)
    #: Properties that wire the backend into the ``-device``.
    wiring: dict[str, str] = field(default_factory=dict)
    #: ``-device`` options that must follow the device (ports, disks on its bus).
    devices: list[str] = field(default_factory=list)
    repro_devices: list[str] = field(default_factory=list)
    #: Our copies of the fds QEMU inherits; closed in the parent once QEMU runs.
    child_fds: list[int] = field(default_factory=list)
    handle: Handle | None = None


def _escape(value: str) -> str:
    return value.replace(",", ",,")


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            raise BackendError(f"timed out waiting for {n - len(data)} more bytes from QEMU")
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BackendError("QEMU closed its end of the backend socket")
        data += chunk
    return data


def _no_barrier() -> None:
    pass


class HostEnd:
    """The test's end of a backend. Before it touches the backend, the driver's posted qtest
    writes must have reached QEMU (a notify still queued would leave a frame unsent): the
    machine sets ``barrier`` to its qtest client's ``sync``."""

    barrier: Callable[[], None] = staticmethod(_no_barrier)

    def set_barrier(self, barrier: Callable[[], None]) -> None:
        self.barrier = barrier


class ImageBackend(HostEnd):
    """A raw image file on the host; the test can read and write what the guest sees."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size

    def read(self, offset: int, size: int) -> bytes:
        self.barrier()
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def write(self, offset: int, data: bytes) -> None:
        self.barrier()
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def close(self) -> None:
        pass


#: The errno a blkdebug fault returns, by name (Linux's numbers: QEMU hands -errno on as is).
FAULT_ERRNOS = {"EPERM": 1, "EIO": 5, "ENOSPC": 28, "EDQUOT": 122}
#: The I/O kinds blkdebug can fail (QAPI BlkdebugIOType, QEMU 4.1 and later).
FAULT_IOTYPES = ("read", "write", "write-zeroes", "discard", "flush")


@dataclass(frozen=True)
class BlockFault:
    """One blkdebug ``inject-error`` rule: I/O of ``iotype`` that touches ``sector`` (any
    sector when None) fails with ``errno``; with ``once`` only the first such request fails, so
    that a retry succeeds (block/blkdebug.c ``rule_check`` drops a once-rule when it fires).

    Written in a backend kind as ``IOTYPE[@SECTOR][:ERRNO][:once]`` (``write@2048:once``,
    ``read@64:ENOSPC``). The rule is armed when the node opens (blkdebug event ``none``)."""

    iotype: str
    sector: int | None = None
    errno: str = "EIO"
    once: bool = False

    @classmethod
    def parse(cls, text: str) -> BlockFault:
        head, *opts = text.split(":")
        iotype, _, sector = head.partition("@")
        err, once = "EIO", False
        for opt in opts:
            if opt == "once":
                once = True
            elif opt in FAULT_ERRNOS:
                err = opt
            else:
                known = ", ".join(FAULT_ERRNOS)
                raise BackendError(f"blkdebug fault {text!r}: {opt!r} is neither 'once' nor an errno ({known})")
        if iotype not in FAULT_IOTYPES:
            raise BackendError(f"blkdebug fault {text!r}: I/O type {iotype!r} is not one of {', '.join(FAULT_IOTYPES)}")
        if sector and not sector.isdigit():
            raise BackendError(f"blkdebug fault {text!r}: write the sector after '@' as a number")
        return cls(iotype, int(sector) if sector else None, err, once)

    def __str__(self) -> str:
        where = "" if self.sector is None else f"@{self.sector}"
        return f"{self.iotype}{where}:{self.errno}" + (":once" if self.once else "")

    def options(self, index: int) -> str:
        """The rule as blkdebug's ``inject-error.N.*`` options."""
        key = f"inject-error.{index}"
        opts = [f"{key}.event=none", f"{key}.iotype={self.iotype}", f"{key}.errno={FAULT_ERRNOS[self.errno]}"]
        if self.sector is not None:
            opts.append(f"{key}.sector={self.sector}")
        if self.once:
            opts.append(f"{key}.once=on")
        return ",".join(opts)


def blkdebug_kind(*faults: BlockFault | str) -> str:
    """The backend kind of a raw image behind blkdebug with these faults, for ``backend=`` of
    ``add_virtio`` and of the ``virtio_device`` marker: ``blkdebug,write@2048:once,...``."""
    return ",".join(["blkdebug", *(str(f) for f in faults)])


class FaultyImage(ImageBackend):
    """An image behind blkdebug: the test holds the file and knows the faults QEMU injects."""

    def __init__(self, path: str, size: int, faults: tuple[BlockFault, ...]) -> None:
        super().__init__(path, size)
        self.faults = faults


class NetBackend(HostEnd):
    """The host end of a ``-netdev socket`` stream: frames in and out of the guest's NIC."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, frame: bytes) -> None:
        """Inject a frame; it arrives on the NIC's receive queue."""
        self.barrier()
        self.sock.sendall(FRAME_LEN.pack(len(frame)) + frame)

    def receive(self, timeout: float = 5.0) -> bytes:
        """The next frame the guest transmitted."""
        self.barrier()
        deadline = time.monotonic() + timeout
        (length,) = FRAME_LEN.unpack(_recv_exact(self.sock, 4, deadline))
        if length > 1 << 20:
            raise BackendError(f"frame length {length} from QEMU is not plausible")
        return _recv_exact(self.sock, length, deadline)

    def pending(self, timeout: float = 0.0) -> bool:
        self.barrier()
        return bool(select.select([self.sock], [], [], timeout)[0])

    def close(self) -> None:
        self.sock.close()


class BackendUnavailable(BackendError):
    """This host cannot provide the backend (a tap without root or /dev/net/tun): a test that
    needs it cannot run here, which is not a failure of QEMU."""


#: Linux's tun/tap and packet-socket constants (linux/if_tun.h, linux/if_packet.h, linux/if.h).
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
ETH_P_ALL, SOL_PACKET, PACKET_VNET_HDR, PACKET_OUTGOING = 0x0003, 263, 15, 4
#: struct virtio_net_hdr (virtio 1.2 §5.1.6, without num_buffers): what the kernel puts before a
#: frame on a packet socket with PACKET_VNET_HDR, and takes before one we send.
VNET_HDR = struct.Struct("<BBHHHH")
_tap_names = itertools.count()


def _tap_name() -> str:
    """An interface name no other test process of this host uses at the same time (<= 15 chars)."""
    return f"qtv{os.getpid() % 1000000}t{next(_tap_names) % 1000}"


class TapBackend(HostEnd):
    """A tap interface QEMU reads and writes through the fds we hand it, one per queue pair.

    The host side is a packet socket bound to the interface with PACKET_VNET_HDR: every frame
    the guest transmits arrives with the virtio-net header QEMU gave the kernel, and a frame we
    send carries the header we give (GSO, checksum offload). IPv6 is off on the interface, so the
    kernel itself sends nothing there; the frames we inject are not read back as ours.
    """

    def __init__(self, queues: int = 1) -> None:
        if not os.path.exists("/dev/net/tun"):
            raise BackendUnavailable("a tap backend needs /dev/net/tun (modprobe tun)")
        self.name = _tap_name()
        self.queues = queues
        self.fds: list[int] = []
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR)
                self.fds.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), flags))
        except PermissionError as exc:
            self.close()
            raise BackendUnavailable(f"a tap backend needs root (CAP_NET_ADMIN): {exc}") from None
        except OSError:
            self.close()
            raise
        ipv6 = f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6"
        if os.path.exists(ipv6):
            with open(ipv6, "w") as f:
                f.write("1")
        self._set_up()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.bind((self.name, ETH_P_ALL))

    def hand_over(self) -> list[int]:
        """The queue fds, for QEMU to inherit: from now on the launch plan closes our copies
        (once QEMU runs, or when it fails to), so the interface lives as long as QEMU does."""
        fds, self.fds = self.fds, []
        self.queues = len(fds)
        return fds

    def _set_up(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
            ifr = struct.pack("16sH", self.name.encode(), 0)
            (current,) = struct.unpack_from("H", fcntl.ioctl(ctl, SIOCGIFFLAGS, ifr), 16)
            fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH", self.name.encode(), current | IFF_UP))

    def send(self, frame: bytes, header: bytes = bytes(VNET_HDR.size)) -> None:
        """Inject a frame (after its virtio-net header); it arrives on one of QEMU's queues."""
        self.barrier()
        self.sock.send(header + frame)

    def receive_with_header(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """(virtio-net header, frame) of the next frame the guest transmitted."""
        self.barrier()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise BackendError(f"no frame from the guest on {self.name} within {timeout} s")
            data, address = self.sock.recvfrom(1 << 17)
            if address[2] == PACKET_OUTGOING:  # one we injected ourselves
                continue
            return data[: VNET_HDR.size], data[VNET_HDR.size :]

    def receive(self, timeout: float = 5.0) -> bytes:
        """The next frame the guest transmitted."""
        return self.receive_with_header(timeout)[1]

    def pending(self, timeout: float = 0.0) -> bool:
        self.barrier()
        return bool(select.select([self.sock], [], [], timeout)[0])

    def close(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            self.sock.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _tap_queues(kind: str) -> int:
    """``tap`` -> 1, ``tap,queues=4`` -> 4."""
    _, _, option = kind.partition(",")
    key, _, value = option.partition("=")
    if option and (key != "queues" or not value.isdigit() or not 1 <= int(value) <= 16):
        raise BackendError(f"backend {kind!r}: write tap or tap,queues=N (N from 1 to 16)")
    return int(value) if option else 1


class ChardevEnd(HostEnd):
    """The host end of one chardev: bytes to and from a virtio-serial port."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name

    def write(self, data: bytes) -> None:
        self.barrier()
        self.sock.sendall(data)

    def read(self, n: int, timeout: float = 5.0) -> bytes:
        self.barrier()
        return _recv_exact(self.sock, n, time.monotonic() + timeout)

    def read_available(self, timeout: float = 0.2, *, quiet: float = 0.05) -> bytes:
        """What arrives within ``timeout``, read on until ``quiet`` seconds pass with nothing
        more (0: only what is already there after the first bytes)."""
        self.barrier()
        out = b""
        while select.select([self.sock], [], [], timeout)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            out += chunk
            timeout = quiet
        return out

    def close(self) -> None:
        self.sock.close()


class SerialBackend:
    """The ports of a virtio-serial controller: ``console`` (port 0) and ``port1``."""

    def __init__(self, ports: dict[str, ChardevEnd]) -> None:
        self.ports = ports

    def __getitem__(self, name: str) -> ChardevEnd:
        return self.ports[name]

    def set_barrier(self, barrier: Callable[[], None]) -> None:
        for port in self.ports.values():
            port.set_barrier(barrier)

    def close(self) -> None:
        for p in self.ports.values():
            p.close()


class RngFifo(HostEnd):
    """A FIFO behind ``rng-random``: the bytes the test writes are the device's entropy.

    Held open read-write, so QEMU's reads wait (EAGAIN) instead of seeing end-of-file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def write(self, data: bytes) -> None:
        self.barrier()
        view = memoryview(data)
        deadline = time.monotonic() + 5
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendError("the rng FIFO stays full: QEMU is not reading it") from None
                time.sleep(0.001)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _socketpair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return ours, theirs


def _image(
    dev_id: str, kind: str, size: int, workdir: str, share: str | None = None
) -> tuple[str, str, ImageBackend | None]:
    """(blockdev option, reproducer blockdev option, handle) for an image-kind backend:
    ``null``, ``image`` (``image,read-only=on`` opens it read-only), ``blkdebug,FAULT,...``
    (:class:`BlockFault`: the image behind blkdebug), or the path of an existing image.
    ``share``: a migration source's image file, which this one is a hard link to (one inode:
    the data the guest wrote carries over, and it outlives the source's directory)."""
    node = f"{dev_id}-backend"
    if kind == "null":
        opt = f"driver=null-co,node-name={node},read-zeroes=on,size={size}"
        return opt, opt, None
    name, *options = kind.split(",")
    if name == "blkdebug":
        faults = tuple(BlockFault.parse(text) for text in options)
        path = _scratch_image(dev_id, size, workdir, share)
        rules = "".join(f",{fault.options(i)}" for i, fault in enumerate(faults))
        opt = f"driver=blkdebug,node-name={node},image.driver=file,image.filename={_escape(path)}{rules}"
        repro = f"driver=blkdebug,node-name={node},image.driver=null-co,image.read-zeroes=on,image.size={size}{rules}"
        return opt, repro, FaultyImage(path, size, faults)
    if name == "image":
        if options not in ([], ["read-only=on"]):
            raise BackendError(f"backend {kind!r}: write image or image,read-only=on")
        read_only = ",read-only=on" if options else ""
        path = _scratch_image(dev_id, size, workdir, share)
        repro = f"driver=raw,node-name={node}{read_only},file.driver=null-co,file.read-zeroes=on,file.size={size}"
        opt = f"driver=raw,node-name={node}{read_only},file.driver=file,file.filename={_escape(path)}"
        return opt, repro, ImageBackend(path, size)
    # the path of an existing image, which outlives the test
    path = kind
    size = os.path.getsize(path)
    opt = f"driver=raw,node-name={node},file.driver=file,file.filename={_escape(path)}"
    return opt, opt, ImageBackend(path, size)


def _blk_backend(dev_id: str, kind: str, size: int, workdir: str, share: str | None) -> Backend:
    """virtio-blk's drive (an image kind, see :func:`_image`). An IOThread is no backend: the
    plugin's ``virtio_device(iothread=True)`` adds the object and the device's property."""
    opt, repro, handle = _image(dev_id, kind, size, workdir, share)
    return Backend(["-blockdev", opt], ["-blockdev", repro], {"drive": f"{dev_id}-backend"}, handle=handle)


def _scratch_image(dev_id: str, size: int, workdir: str, share: str | None = None) -> str:
    """A sparse file of ``size`` bytes in the machine's private directory, or a hard link to
    ``share`` there (see :func:`_image`)."""
    path = os.path.join(workdir, f"{dev_id}.img")
    if share is not None:
        try:
            os.link(share, path)
        except OSError as exc:
            raise BackendError(f"cannot share image {share} with the migration destination: {exc}") from exc
        return path
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def held_transmit_netdev(netdev: str) -> list[str]:
    """A reproducer's stand-in for the socket netdev on a socketpair: a unix datagram netdev
    ``netdev`` whose peer, another datagram netdev on a hub with no other port, stops reading at
    its first frame; the NIC's sends then fail with EAGAIN and QEMU holds the transmit
    (virtio-net's async_tx), as it does when the harness does not read the socketpair. A
    ``hubport`` never holds one, so finds that need a held transmit survived replay there. The
    socket paths are relative: replay runs QEMU in its own work directory."""
    sink, nic = f"{netdev}.sink", f"{netdev}.nic"
    hub = zlib.crc32(netdev.encode()) % 10_000 + 1  # one hub per netdev; hubid 0 is left alone
    return [
        "-netdev",
        f"dgram,id={netdev}-sink,local.type=unix,local.path={sink},remote.type=unix,remote.path={nic}",
        "-netdev",
        f"hubport,id={netdev}-sinkport,hubid={hub},netdev={netdev}-sink",
        "-netdev",
        f"dgram,id={netdev},local.type=unix,local.path={nic},remote.type=unix,remote.path={sink}",
    ]


def make_backend(
    driver: str,
    dev_id: str,
    props: dict[str, str],
    kind: str | None,
    size: int,
    workdir: str,
    share: str | None = None,
    *,
    dgram: bool = True,
) -> Backend:
    """The backend ``driver`` needs, unless the user wired one in by property. ``share``: the
    image file of the same device on a migration source (images are shared storage; every
    other backend is made afresh, as a new host would). ``dgram``: QEMU has ``-netdev dgram``
    (7.2 on), for the socket netdev's reproducer stand-in."""
    base = driver.removesuffix("-transitional").removesuffix("-non-transitional")
    if base == "virtio-blk-pci" and "drive" not in props:
        return _blk_backend(dev_id, kind or "image", size, workdir, share)
    if base == "virtio-scsi-pci" and kind != "none":
        opt, repro, handle = _image(dev_id, kind or "image", size, workdir, share)
        disk = f"scsi-hd,bus={dev_id}.0,drive={dev_id}-backend,id={dev_id}-hd,channel=0,scsi-id=0,lun=0"
        return Backend(["-blockdev", opt], ["-blockdev", repro], devices=[disk], repro_devices=[disk], handle=handle)
    if base == "virtio-net-pci" and "netdev" not in props and kind and kind.split(",")[0] == "tap":
        tap = TapBackend(_tap_queues(kind))
        netdev = f"{dev_id}-netdev"
        fds = tap.hand_over()
        for fd in fds:
            os.set_inheritable(fd, True)
        joined = ":".join(map(str, fds))
        option = f"tap,id={netdev},fd={joined}" if len(fds) == 1 else f"tap,id={netdev},fds={joined}"
        return Backend(
            ["-netdev", f"{option},vhost=off"],
            ["-netdev", f"hubport,id={netdev},hubid=0"],
            {"netdev": netdev},
            child_fds=fds,
            handle=tap,
        )
    if base == "virtio-net-pci" and "netdev" not in props:
        ours, theirs = _socketpair()
        netdev = f"{dev_id}-netdev"
        return Backend(
            ["-netdev", f"socket,id={netdev},fd={theirs.fileno()}"],
            held_transmit_netdev(netdev) if dgram else ["-netdev", f"hubport,id={netdev},hubid=0"],
            {"netdev": netdev},
            child_fds=[_detach(theirs)],
            handle=NetBackend(ours),
        )
    if base == "virtio-serial-pci" and kind != "none":
        backend = Backend()
        ports = {}
        for port, (model, name) in {
            "console": ("virtconsole", "org.qtest.console"),
            "port1": ("virtserialport", "org.qtest.port1"),
        }.items():
            ours, theirs = _socketpair()
            chardev = f"{dev_id}-{port}"
            backend.args += ["-chardev", f"socket,id={chardev},fd={theirs.fileno()}"]
            backend.repro_args += ["-chardev", f"null,id={chardev}"]
            dev = f"{model},bus={dev_id}.0,chardev={chardev},name={name},id={chardev}-port"
            backend.devices.append(dev)
            backend.repro_devices.append(dev)
            backend.child_fds.append(_detach(theirs))
            ports[port] = ChardevEnd(ours, name)
        backend.handle = SerialBackend(ports)
        return backend
    if base == "virtio-rng-pci" and kind == "fifo" and "rng" not in props:
        path = os.path.join(workdir, f"{dev_id}.fifo")
        os.mkfifo(path, 0o600)
        obj = f"{dev_id}-rng"
        return Backend(
            ["-object", f"rng-random,id={obj},filename={_escape(path)}"],
            ["-object", f"rng-builtin,id={obj}"],
            {"rng": obj},
            handle=RngFifo(path),
        )
    return Backend()


def _detach(sock: socket.socket) -> int:
    """Keep the fd number for the child; the socket object lets go of it without closing."""
    return sock.detach()
