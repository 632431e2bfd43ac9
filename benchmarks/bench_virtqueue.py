#!/usr/bin/env python3
"""Requests per second on one virtqueue (virtio-rng, modern): split vs packed, event index on/off.

Two patterns: one request at a time (submit, kick, wait), and a full queue per kick (add
queue-size chains, one kick, collect them all). The baseline, measured in the same run on the
same socket, is a bare ``readl`` round trip: each figure is also given as "round trips per
request", which is what the harness's cost really is under qtest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from qtest_virtio import Machine, MachineSpec
from qtest_virtio.virtqueue import Buf


def raw_rtt(vm: Machine, n: int = 3000) -> float:
    sock = vm.qtest._sock
    sock.settimeout(None)
    t = time.perf_counter()
    for _ in range(n):
        sock.sendall(b"readl 0x100000\n")
        buf = b""
        while not buf.endswith(b"\n"):
            buf += sock.recv(4096)
    dt = (time.perf_counter() - t) / n
    sock.settimeout(vm.qtest.timeout)
    return dt


def measure(qemu: str | None, packed: bool, event_idx: bool, requests: int) -> dict[str, float]:
    spec = MachineSpec(qemu=qemu)
    spec.add_virtio(
        "virtio-rng-pci",
        mode="modern",
        id="rng0",
        packed="on" if packed else "off",
        event_idx="on" if event_idx else "off",
    )
    with Machine(spec) as vm:
        rng = vm.virtio("rng0")
        vq = rng.queues[0]
        rtt = raw_rtt(vm)
        buf = vm.memory.alloc(16 * vq.size)
        for _ in range(50):
            rng.request(16)
        t = time.perf_counter()
        for _ in range(requests):
            token = vq.add([Buf(buf, 16, True)])
            vq.kick()
            vq.wait_for(token)
        single = requests / (time.perf_counter() - t)
        t = time.perf_counter()
        done = 0
        while done < requests:
            tokens = [vq.add([Buf(buf + 16 * i, 16, True)]) for i in range(vq.size)]
            vq.kick()
            for tok in tokens:
                vq.wait_for(tok)
            done += len(tokens)
        batched = done / (time.perf_counter() - t)
        rtt2 = raw_rtt(vm)
        rtt = statistics.mean([rtt, rtt2])
        return {
            "rtt_us": rtt * 1e6,
            "single_rps": single,
            "batched_rps": batched,
            "single_rtt_per_request": 1 / single / rtt,
            "batched_rtt_per_request": 1 / batched / rtt,
            "notifications_suppressed": vq.kicks_suppressed,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", default=None)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    print(f"{'ring':8} {'event_idx':9} {'1-at-a-time':>12} {'rtt/req':>8} {'queue/kick':>11} {'rtt/req':>8}")
    for packed in (False, True):
        for event_idx in (True, False):
            r = measure(args.qemu, packed, event_idx, args.requests)
            name = f"{'packed' if packed else 'split'}-event_idx={'on' if event_idx else 'off'}"
            results[name] = r
            print(
                f"{'packed' if packed else 'split':8} {'on' if event_idx else 'off':9} "
                f"{r['single_rps']:>9.0f}/s {r['single_rtt_per_request']:>8.2f} "
                f"{r['batched_rps']:>8.0f}/s {r['batched_rtt_per_request']:>8.2f}"
            )
    print(f"(raw readl round trip in the same runs: {statistics.mean(r['rtt_us'] for r in results.values()):.1f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
