#!/usr/bin/env python3
"""Speed of the qtest client against raw baselines, in interleaved rounds (benchmarks/rounds.py).

- per-op latency: ``readl`` through QtestClient vs a bare blocking-socket loop on the same
  socket and QEMU;
- bulk write and read (16 MiB): ``memwrite``/``memread`` vs the best raw pipelined transfer
  (32 KiB ``b64write`` lines, 256 KiB ``b64read`` ones), again on the same socket;
- start-to-ready of a Machine (QEMU up, qtest answered, QMP negotiated) vs a bare QEMU
  process started with the same argv and answering its first qtest command.

Each figure is the median of the per-round ratios client/raw (both costs: time per op, per
transfer, per start) with its spread; the absolute figures (us, MB/s, ms) are the medians of
the rounds. Targets (issue 2): per-op within 1.3x of raw, start-up within 1.1x; the bulk
ratios have none (their targets are absolute: writes >= 80 MB/s, reads >= 200 MB/s).
``--chunks`` sweeps raw chunk sizes (how WRITE_CHUNK and READ_CHUNK were chosen).
"""

from __future__ import annotations

import argparse
import base64
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import rounds

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.binary import QemuBinary
from qtest_virtio.machine import build_argv
from qtest_virtio.qtest import QtestClient

BASE = 0x1000000
WRITE_CHUNK = 32768
READ_CHUNK = 262144


class Bare:
    """QEMU started by hand with the Machine's argv: the baseline for everything else."""

    def __init__(self, spec: MachineSpec) -> None:
        self.workdir = tempfile.mkdtemp(prefix="qtest-virtio-bench-")
        self.plan = build_argv(spec, QemuBinary.get(spec.qemu), self.workdir)
        listeners = {}
        for name in ("qtest", "qmp"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(os.path.join(self.workdir, f"{name}.sock"))
            s.listen(1)
            listeners[name] = s
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.plan.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=self.plan.pass_fds,
        )
        self.qtest = listeners["qtest"].accept()[0]
        self.qmp = listeners["qmp"].accept()[0]
        self.qtest.sendall(b"endianness\n")
        self.readline()
        self.ready = time.perf_counter() - t0
        for s in listeners.values():
            s.close()

    def readline(self) -> bytes:
        buf = b""
        while not buf.endswith(b"\n"):
            buf += self.qtest.recv(4096)
        return buf

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.qtest.close()
        self.qmp.close()
        self.plan.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def raw_socket(q: QtestClient) -> socket.socket:
    """The client's own socket, for a raw baseline on the very same connection and QEMU."""
    return q._sock  # the baseline shares the very connection being measured


def raw_pipelined(sock: socket.socket, payload: bytes, replies: int) -> bytes:
    """Send ``payload`` while reading ``replies`` lines (select, as the client does); returns them."""
    sock.setblocking(False)
    view, sent, buf, seen = memoryview(payload), 0, bytearray(), 0
    try:
        while seen < replies:
            r, w, _ = select.select([sock], [sock] if sent < len(view) else [], [], 30)
            if not r and not w:
                raise RuntimeError("QEMU stopped answering")
            if w:
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    pass
            if r:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("QEMU went away")
                seen += chunk.count(b"\n")
                buf += chunk
    finally:
        sock.setblocking(True)
    return bytes(buf)


def raw_write(sock: socket.socket, data: bytes, chunk: int) -> float:
    """Seconds for a pipelined transfer of ``data``, encoding included (as the client's is)."""
    t = time.perf_counter()
    payload = b"".join(
        b"b64write %#x %#x %s\n" % (BASE + o, len(data[o : o + chunk]), base64.b64encode(data[o : o + chunk]))
        for o in range(0, len(data), chunk)
    )
    raw_pipelined(sock, payload, -(-len(data) // chunk))
    return time.perf_counter() - t


def raw_read(sock: socket.socket, size: int, chunk: int) -> float:
    t = time.perf_counter()
    payload = b"".join(b"b64read %#x %#x\n" % (BASE + o, min(chunk, size - o)) for o in range(0, size, chunk))
    replies = raw_pipelined(sock, payload, -(-size // chunk))
    data = b"".join(base64.b64decode(line[3:]) for line in replies.split(b"\n")[:-1])
    dt = time.perf_counter() - t
    if len(data) != size:
        raise RuntimeError(f"raw read returned {len(data)} bytes, not {size}")
    return dt


def raw_readl_loop(sock: socket.socket, n: int) -> float:
    """``n`` readl round trips on a plain blocking socket, as a hand-written loop would do them;
    returns seconds per op."""
    t = time.perf_counter()
    for _ in range(n):
        sock.sendall(b"readl 0x100000\n")
        buf = b""
        while not buf.endswith(b"\n"):
            buf += sock.recv(4096)
    return (time.perf_counter() - t) / n


def spec_of(qemu: str | None) -> MachineSpec:
    s = MachineSpec(qemu=qemu, machine="q35", memory="256M")
    s.add_virtio("virtio-blk-pci", mode="transitional-modern", backend="null")
    return s


def sweep_chunks(sock: socket.socket, data: bytes) -> None:
    size = len(data)
    for chunk in (4096, 16384, 32768, 65536, 262144, 1 << 20):
        print(f"raw write chunk {chunk:>8}: {size / 1e6 / raw_write(sock, data, chunk):7.1f} MB/s")
    for chunk in (65536, 262144, 1 << 20, 4 << 20):
        print(f"raw read  chunk {chunk:>8}: {size / 1e6 / raw_read(sock, size, chunk):7.1f} MB/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rounds.add_arguments(ap, repeats=5)
    ap.add_argument("--ops", type=int, default=400, help="readl ops per batch (default 400)")
    ap.add_argument("--bulk-mib", type=int, default=16, help="bulk transfer size in MiB (default 16)")
    ap.add_argument("--starts", type=int, default=1, help="starts per batch (default 1)")
    ap.add_argument("--chunks", action="store_true", help="also sweep raw chunk sizes")
    args = ap.parse_args()
    rounds.check_rounds(args.rounds, args.repeats)
    repeats: int = args.repeats
    ops: int = args.ops
    load = rounds.Load()
    binary = QemuBinary.get(args.qemu)
    _ = binary.has_qtest_accel  # probe once, outside every timed region
    size = args.bulk_mib << 20
    data = os.urandom(size)
    figures: list[rounds.Figure] = []

    with Machine(spec_of(args.qemu)) as vm:
        q = vm.qtest
        sock = raw_socket(q)
        if args.chunks:
            sweep_chunks(sock, data)
            q.timeout = q.timeout  # back to the client's timeout mode

        def raw_readl() -> float:
            sock.settimeout(None)  # a plain blocking socket
            try:
                return raw_readl_loop(sock, ops)
            finally:
                q.timeout = q.timeout

        def client_readl() -> float:
            t = time.perf_counter()
            for _ in range(ops):
                q.readl(0x100000)
            return (time.perf_counter() - t) / ops

        figures.append(
            rounds.measure(
                "readl latency (client/raw)",
                raw_readl,
                client_readl,
                args.rounds,
                target=1.30,
                unit="s/op",
                repeats=repeats,
            )
        )

        def raw_readl_timeout_mode() -> float:
            q.timeout = q.timeout  # the client's own socket mode: poll() before each send and recv
            return raw_readl_loop(sock, ops)

        figures.append(
            rounds.measure(
                "readl, socket in timeout mode (raw/raw blocking)",
                raw_readl,
                raw_readl_timeout_mode,
                args.rounds,
                unit="s/op",
                repeats=repeats,
            )
        )

        def raw_w() -> float:
            try:
                return raw_write(sock, data, WRITE_CHUNK)
            finally:
                q.timeout = q.timeout

        def client_w() -> float:
            t = time.perf_counter()
            q.memwrite(BASE, data)
            return time.perf_counter() - t

        figures.append(
            rounds.measure(f"{args.bulk_mib} MiB write (client/raw)", raw_w, client_w, args.rounds, repeats=repeats)
        )

        def raw_r() -> float:
            try:
                return raw_read(sock, size, READ_CHUNK)
            finally:
                q.timeout = q.timeout

        def client_r() -> float:
            t = time.perf_counter()
            got = q.memread(BASE, size)
            dt = time.perf_counter() - t
            if got != data:
                raise RuntimeError("memread returned other bytes than memwrite wrote")
            return dt

        figures.append(
            rounds.measure(f"{args.bulk_mib} MiB read (client/raw)", raw_r, client_r, args.rounds, repeats=repeats)
        )

    starts: int = args.starts

    def bare_starts() -> float:
        total = 0.0
        for _ in range(starts):
            b = Bare(spec_of(args.qemu))
            b.close()
            total += b.ready
        return total / starts

    def machine_starts() -> float:
        total = 0.0
        for _ in range(starts):
            t = time.perf_counter()
            vm = Machine(spec_of(args.qemu))
            vm.start()
            total += time.perf_counter() - t
            vm.shutdown()
        return total / starts

    figures.append(
        rounds.measure(
            "start-to-ready (machine/bare)", bare_starts, machine_starts, args.rounds, target=1.10, repeats=repeats
        )
    )

    readl, _, write, read, start = figures
    absolute = {
        "raw_readl_us": statistics.median(readl.raw) * 1e6,
        "client_readl_us": statistics.median(readl.measured) * 1e6,
        "raw_write_MBps": size / 1e6 / statistics.median(write.raw),
        "client_write_MBps": size / 1e6 / statistics.median(write.measured),
        "raw_read_MBps": size / 1e6 / statistics.median(read.raw),
        "client_read_MBps": size / 1e6 / statistics.median(read.measured),
        "bare_start_ms": statistics.median(start.raw) * 1e3,
        "machine_start_ms": statistics.median(start.measured) * 1e3,
    }
    rounds.report(
        figures,
        qemu=binary.identity,
        load=load,
        rounds=args.rounds,
        repeats=repeats,
        path=args.json,
        extra={"absolute": absolute},
    )
    print("absolute figures (medians of the rounds):")
    print(f"  readl round trip: raw {absolute['raw_readl_us']:.1f} us, client {absolute['client_readl_us']:.1f} us")
    print(
        f"  {args.bulk_mib} MiB write: raw {absolute['raw_write_MBps']:.0f} MB/s, "
        f"client {absolute['client_write_MBps']:.0f} MB/s (issue 2: >= 80)"
    )
    print(
        f"  {args.bulk_mib} MiB read:  raw {absolute['raw_read_MBps']:.0f} MB/s, "
        f"client {absolute['client_read_MBps']:.0f} MB/s (issue 2: >= 200)"
    )
    print(f"  start-to-ready: bare {absolute['bare_start_ms']:.1f} ms, machine {absolute['machine_start_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
