#!/usr/bin/env python3
"""Speed of the foundation against raw baselines measured in the same run.

- per-op latency: ``readl`` through QtestClient vs a bare blocking-socket loop on the same
  socket, in interleaved rounds (median of each);
- bulk 16 MiB write and read through memwrite/memread vs the best raw pipelined transfer;
- start-to-ready of a Machine (QEMU up, qtest answered, QMP negotiated) vs a bare QEMU
  process started with the same argv and answering its first qtest command.

Targets (issue 2): per-op within 1.3x of raw, writes >= 80 MB/s, reads >= 200 MB/s,
start-up within 10% of bare QEMU. ``--chunks`` sweeps raw chunk sizes (how WRITE_CHUNK and
READ_CHUNK were chosen). Prints a table and, with ``--json FILE``, writes the figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.binary import QemuBinary
from qtest_virtio.machine import build_argv

BULK = 16 << 20
BASE = 0x1000000


class Bare:
    """QEMU started by hand with the Machine's argv: the baseline for everything else."""

    def __init__(self, spec: MachineSpec) -> None:
        self.workdir = tempfile.mkdtemp(prefix="qtest-virtio-bench-")
        plan = build_argv(spec, QemuBinary.get(spec.qemu), self.workdir)
        listeners = {}
        for name in ("qtest", "qmp"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(os.path.join(self.workdir, f"{name}.sock"))
            s.listen(1)
            listeners[name] = s
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            plan.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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
        shutil.rmtree(self.workdir, ignore_errors=True)


def raw_pipelined(sock: socket.socket, payload: bytes, replies: int) -> None:
    sock.setblocking(False)
    view, sent, seen = memoryview(payload), 0, 0
    while seen < replies:
        r, w, _ = select.select([sock], [sock] if sent < len(view) else [], [], 30)
        if w:
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                pass
        if r:
            chunk = sock.recv(1 << 20)
            seen += chunk.count(b"\n")
            if not chunk:
                raise RuntimeError("QEMU went away")
    sock.setblocking(True)


def raw_write(sock: socket.socket, data: bytes, chunk: int) -> float:
    payload = b"".join(
        b"b64write %#x %#x %s\n" % (BASE + o, len(data[o : o + chunk]), base64.b64encode(data[o : o + chunk]))
        for o in range(0, len(data), chunk)
    )
    t = time.perf_counter()
    raw_pipelined(sock, payload, -(-len(data) // chunk))
    return time.perf_counter() - t


def raw_read(sock: socket.socket, size: int, chunk: int) -> float:
    t = time.perf_counter()
    payload = b"".join(b"b64read %#x %#x\n" % (BASE + o, min(chunk, size - o)) for o in range(0, size, chunk))
    sock.setblocking(False)
    view, sent, buf, seen = memoryview(payload), 0, bytearray(), 0
    n = -(-size // chunk)
    while seen < n:
        r, w, _ = select.select([sock], [sock] if sent < len(view) else [], [], 30)
        if w:
            sent += sock.send(view[sent:])
        if r:
            chunk_in = sock.recv(1 << 20)
            seen += chunk_in.count(b"\n")
            buf += chunk_in
    sock.setblocking(True)
    data = b"".join(base64.b64decode(line[3:]) for line in bytes(buf).split(b"\n")[:-1])
    assert len(data) == size
    return time.perf_counter() - t


def per_op(fn: object, n: int) -> float:
    assert callable(fn)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def median_of(fn: object, runs: int) -> float:
    assert callable(fn)
    return statistics.median(fn() for _ in range(runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", default=None)
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--starts", type=int, default=15)
    ap.add_argument("--chunks", action="store_true", help="sweep raw chunk sizes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    def spec() -> MachineSpec:
        s = MachineSpec(qemu=args.qemu, machine="q35", memory="256M")
        s.add_virtio("virtio-blk-pci", mode="transitional-modern", backend="null")
        return s

    _ = QemuBinary.get(args.qemu).has_qtest_accel  # probe once, outside every timed region
    results: dict[str, float] = {}
    data = os.urandom(BULK)
    bare = Bare(spec())
    try:
        results["raw_write_MBps"] = BULK / 1e6 / median_of(lambda: raw_write(bare.qtest, data, 32768), 3)
        results["raw_read_MBps"] = BULK / 1e6 / median_of(lambda: raw_read(bare.qtest, BULK, 262144), 3)
        if args.chunks:
            for chunk in (4096, 16384, 32768, 65536, 262144, 1 << 20):
                print(f"raw write chunk {chunk:>8}: {BULK / 1e6 / raw_write(bare.qtest, data, chunk):7.1f} MB/s")
            for chunk in (65536, 262144, 1 << 20, 4 << 20):
                print(f"raw read  chunk {chunk:>8}: {BULK / 1e6 / raw_read(bare.qtest, BULK, chunk):7.1f} MB/s")
    finally:
        bare.close()

    with Machine(spec()) as vm:
        q = vm.qtest
        sock = q._sock  # the raw baseline runs on the very same socket and QEMU

        def raw_readl() -> None:
            sock.sendall(b"readl 0x100000\n")
            buf = b""
            while not buf.endswith(b"\n"):
                buf += sock.recv(4096)

        def client_readl() -> None:
            q.readl(0x100000)

        raw_rounds, client_rounds = [], []
        rounds = 10
        for _ in range(rounds):  # interleaved, so drift and noise hit both alike
            sock.settimeout(None)  # a plain blocking socket, as a hand-written loop would use
            raw_rounds.append(per_op(raw_readl, args.ops // rounds))
            sock.settimeout(q.timeout)
            client_rounds.append(per_op(client_readl, args.ops // rounds))
        results["raw_readl_us"] = statistics.median(raw_rounds) * 1e6
        results["client_readl_us"] = statistics.median(client_rounds) * 1e6

        def write() -> float:
            t = time.perf_counter()
            q.memwrite(BASE, data)
            return time.perf_counter() - t

        def read() -> float:
            t = time.perf_counter()
            got = q.memread(BASE, BULK)
            dt = time.perf_counter() - t
            assert got == data
            return dt

        results["client_write_MBps"] = BULK / 1e6 / median_of(write, 3)
        results["client_read_MBps"] = BULK / 1e6 / median_of(read, 3)

    def bare_start() -> float:
        b = Bare(spec())
        b.close()
        return b.ready

    def machine_start() -> float:
        t = time.perf_counter()
        vm = Machine(spec())
        vm.start()
        dt = time.perf_counter() - t
        vm.shutdown()
        return dt

    bare_start(), machine_start()  # warm the page cache
    bare_times, machine_times = [], []
    for _ in range(args.starts):  # interleaved so drift hits both alike
        bare_times.append(bare_start())
        machine_times.append(machine_start())
    results["bare_start_ms"] = statistics.median(bare_times) * 1e3
    results["machine_start_ms"] = statistics.median(machine_times) * 1e3

    ratios = {
        "per-op latency (client/raw, target <= 1.30)": results["client_readl_us"] / results["raw_readl_us"],
        "16 MiB write (client/raw)": results["client_write_MBps"] / results["raw_write_MBps"],
        "16 MiB read (client/raw)": results["client_read_MBps"] / results["raw_read_MBps"],
        "start-to-ready (machine/bare, target <= 1.10)": results["machine_start_ms"] / results["bare_start_ms"],
    }
    print(f"QEMU: {QemuBinary.get(args.qemu).version_text}")
    print(f"readl round trip: raw {results['raw_readl_us']:.1f} us, client {results['client_readl_us']:.1f} us")
    print(
        f"16 MiB write: raw {results['raw_write_MBps']:.0f} MB/s, client {results['client_write_MBps']:.0f} MB/s"
        " (target >= 80)"
    )
    print(
        f"16 MiB read:  raw {results['raw_read_MBps']:.0f} MB/s, client {results['client_read_MBps']:.0f} MB/s"
        " (target >= 200)"
    )
    print(f"start-to-ready: bare {results['bare_start_ms']:.1f} ms, machine {results['machine_start_ms']:.1f} ms")
    for name, value in ratios.items():
        print(f"  ratio {name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": results, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
